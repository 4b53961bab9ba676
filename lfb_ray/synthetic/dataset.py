"""The whole dataset: plan every video, render them, write the annotations and `dataset.json` last.

`dataset.json` records the seed, sizes, rules and every actor, so a dataset can be recognised
(`dataset_matches`) and its ground truth read back (`load_actors`) without re-running the generator.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lfb_ray.synthetic.annotations import label_map_bytes, write_atomic, write_split
from lfb_ray.synthetic.classes import (
    AVA_START_SECOND,
    CLASSES,
    CUE_HALF_FRAMES,
    FPS,
    GENERATOR_VERSION,
    LABEL_FAMILIES,
    ROLE_CLASSES,
    ROLE_CUE_RGB,
)
from lfb_ray.synthetic.scene import Actor, MotionSegment, make_video_ids, plan_video
from lfb_ray.synthetic.video import write_video


@dataclass(frozen=True)
class DatasetInfo:
    """What generate_dataset wrote."""

    out_dir: Path
    train_videos: tuple[str, ...]
    val_videos: tuple[str, ...]
    keyframes: dict[str, int]  # split -> number of annotated keyframes
    boxes: dict[str, int]  # split -> number of GT person boxes


def generate_dataset(
    out_dir: str | os.PathLike,
    *,
    num_videos: int,
    seconds: int,
    seed: int,
    width: int = 160,
    height: int = 120,
    val_fraction: float = 0.4,
    overwrite: bool = False,
    workers: int = 1,
) -> DatasetInfo:
    """Writes a synthetic AVA-format dataset (videos, CSVs, label map, proposals, dataset.json).

    Args:
        out_dir: destination; must be missing or empty unless overwrite.
        num_videos: videos in total (>= 2), split by video into train and val.
        seconds: length of each video; keyframes are AVA seconds 902 .. 900+seconds-2.
        seed: everything (ids, content, split, proposals) is a function of the seed and sizes.
        width, height: frame size in pixels (even numbers, for yuv420p).
        val_fraction: share of videos in val (at least one video in each split).
        overwrite: allow writing into a non-empty out_dir (our files are replaced, others kept).
        workers: processes used to render and encode videos.

    Returns:
        DatasetInfo with video ids, keyframe and box counts per split.

    Raises:
        FileExistsError: out_dir is non-empty and overwrite is False.
        ValueError: sizes out of range.
    """
    if num_videos < 2 or seconds < 8 or width % 2 or height % 2 or width < 64 or height < 48:
        raise ValueError("need num_videos >= 2, seconds >= 8, even width >= 64 and even height >= 48")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty (pass overwrite=True / --overwrite)")
    (out / "videos").mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)

    ids = make_video_ids(seed, num_videos)
    num_val = min(num_videos - 1, max(1, round(val_fraction * num_videos)))
    val_idx = set(np.random.default_rng([seed, 2]).permutation(num_videos)[:num_val].tolist())
    plans = [
        plan_video(
            np.random.default_rng([seed, 0, i]),
            vid,
            "val" if i in val_idx else "train",
            seconds=seconds,
            width=width,
            height=height,
        )
        for i, vid in enumerate(ids)
    ]
    jobs = [(p, seed, i, out / "videos" / f"{p.video_id}.mp4", width, height) for i, p in enumerate(plans)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(write_video, *zip(*jobs, strict=True)))
    else:
        for job in jobs:
            write_video(*job)

    meta_splits = {}
    for s, split in enumerate(("train", "val")):
        split_plans = sorted((p for p in plans if p.split == split), key=lambda p: p.video_id)
        meta_splits[split] = write_split(out, split, split_plans, np.random.default_rng([seed, 3, s]),
                                         width=width, height=height)
    write_atomic(out / "annotations" / "label_map.pbtxt", label_map_bytes())

    meta = {
        "generator": "lfb_ray.synthetic",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "args": {
            "num_videos": num_videos,
            "seconds": seconds,
            "width": width,
            "height": height,
            "val_fraction": val_fraction,
        },
        "fps": FPS,
        "ava_start_second": AVA_START_SECOND,
        "cue_half_frames": CUE_HALF_FRAMES,
        "label_rule": {
            "short_term": "action_id of the actor's motion segment containing keyframe t "
            "(segments change on half seconds and last >= 2 s, so it covers >= 1.5 s of [t-1, t+1])",
            "long_term": "the actor's role_action_id at every keyframe; drawn as a ring + badge in "
            "role_cue_rgb only on frames within cue_half_frames of each of its cue_seconds",
            "appearance": "the action_id of the actor's look (APPEARANCE_POOL index `look`) at every keyframe",
        },
        "classes": [asdict(c) for c in CLASSES],
        "label_families": {k: list(v) for k, v in LABEL_FAMILIES.items()},
        "role_cue_rgb": {c.action_id: rgb for c, rgb in zip(ROLE_CLASSES, ROLE_CUE_RGB, strict=True)},
        "splits": meta_splits,
        "videos": [
            {
                "video_id": p.video_id,
                "split": p.split,
                "seconds": p.seconds,
                "background": p.background,
                "actors": [asdict(a) for a in p.actors],
            }
            for p in plans
        ],
    }
    write_atomic(out / "dataset.json", (json.dumps(meta, indent=1) + "\n").encode())
    return DatasetInfo(
        out_dir=out,
        train_videos=tuple(meta_splits["train"]["videos"]),
        val_videos=tuple(meta_splits["val"]["videos"]),
        keyframes={split: m["keyframes"] for split, m in meta_splits.items()},
        boxes={split: m["boxes"] for split, m in meta_splits.items()},
    )


def load_actors(dataset_json: str | os.PathLike) -> dict[str, tuple[Actor, ...]]:
    """Reads the per-video ground-truth actors back from dataset.json: video_id -> actors."""
    meta = json.loads(Path(dataset_json).read_text())
    out = {}
    for v in meta["videos"]:
        actors = []
        for a in v["actors"]:
            a = dict(a)
            a["colors"] = tuple(tuple(c) for c in a["colors"])
            a["cue_seconds"] = tuple(a["cue_seconds"])
            a["segments"] = tuple(MotionSegment(**s) for s in a["segments"])
            actors.append(Actor(**a))
        out[v["video_id"]] = tuple(actors)
    return out


def dataset_matches(out_dir: str | os.PathLike, *, num_videos: int, seconds: int, seed: int, width: int = 160,
                    height: int = 120, val_fraction: float = 0.4) -> bool:
    """True if `out_dir` already holds a complete dataset generated with exactly these arguments.

    dataset.json is written last, so its presence means the other files are complete.
    """
    path = Path(out_dir) / "dataset.json"
    if not path.exists():
        return False
    meta = json.loads(path.read_text())
    want = {"num_videos": num_videos, "seconds": seconds, "width": width, "height": height,
            "val_fraction": val_fraction}
    return meta.get("version") == GENERATOR_VERSION and meta.get("seed") == seed and meta.get("args") == want
