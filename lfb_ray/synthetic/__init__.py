"""Synthetic AVA-format dataset whose role labels need a long-term feature bank, and its report.

Actors move in short, visible motion segments (short-term labels) and carry a hidden role (long-term
label) that is shown only as a brief coloured cue a few times per video. The rules, sizes and files:
docs/synthetic_dataset.md. A dataset generator, not a pipeline stage: the pipeline reads its files
as it reads AVA's.
"""

from lfb_ray.synthetic.classes import (
    APPEARANCE_CLASSES,
    APPEARANCE_POOL,
    BACKGROUND_POOL,
    CLASSES,
    GENERATOR_VERSION,
    LABEL_FAMILIES,
    MOTION_CLASSES,
    ROLE_CLASSES,
    ROLE_CUE_RGB,
    SyntheticClass,
)
from lfb_ray.synthetic.dataset import DatasetInfo, dataset_matches, generate_dataset, load_actors
from lfb_ray.synthetic.render import render_frames
from lfb_ray.synthetic.report import BankProbe, RoleAccuracy, bank_probe, find_result_csvs, role_accuracy
from lfb_ray.synthetic.scene import (
    Actor,
    MotionSegment,
    VideoPlan,
    actor_x_px,
    make_video_ids,
    motion_label_at,
    plan_video,
)

__all__ = [
    "APPEARANCE_CLASSES",
    "APPEARANCE_POOL",
    "BACKGROUND_POOL",
    "CLASSES",
    "GENERATOR_VERSION",
    "LABEL_FAMILIES",
    "MOTION_CLASSES",
    "ROLE_CLASSES",
    "ROLE_CUE_RGB",
    "Actor",
    "BankProbe",
    "DatasetInfo",
    "MotionSegment",
    "RoleAccuracy",
    "SyntheticClass",
    "VideoPlan",
    "actor_x_px",
    "bank_probe",
    "dataset_matches",
    "find_result_csvs",
    "generate_dataset",
    "load_actors",
    "make_video_ids",
    "motion_label_at",
    "plan_video",
    "render_frames",
    "role_accuracy",
]
