"""AVA file readers: label map, excluded timestamps, annotation/result CSVs, person proposals.

Pure numpy (no Ray, no torch). Every malformed input raises `AnnotationError` naming the file, the
1-based line number and the problem. One module per kind of input; this package re-exports them:

    errors       AnnotationError and the `<file>:<line>` convention
    label_map    the protobuf-text label map
    ava_csv      GT / result / exclusion CSVs as typed columns (AnnotationRows, ResultRows)
    keyframes    rows grouped into keyframes (KeyframeBoxes) and the first-N-keyframes cap
    proposals    the person-proposal pickle and per-keyframe selection
"""

from __future__ import annotations

from lfb_ray.data.annotations.ava_csv import (
    AVA_NUM_ACTIONS,
    AnnotationRows,
    ResultRows,
    read_annotation_rows,
    read_exclusions,
    read_result_rows,
)
from lfb_ray.data.annotations.errors import AnnotationError
from lfb_ray.data.annotations.keyframes import (
    KeyframeBoxes,
    cap_annotation_rows,
    first_keyframes,
    group_keyframes,
    read_annotations,
)
from lfb_ray.data.annotations.label_map import read_label_map
from lfb_ray.data.annotations.proposals import load_proposals, select_proposals

__all__ = [
    "AVA_NUM_ACTIONS",
    "AnnotationError",
    "AnnotationRows",
    "KeyframeBoxes",
    "ResultRows",
    "group_keyframes",
    "load_proposals",
    "read_annotation_rows",
    "read_annotations",
    "read_exclusions",
    "read_label_map",
    "read_result_rows",
    "first_keyframes",
    "cap_annotation_rows",
    "select_proposals",
]
