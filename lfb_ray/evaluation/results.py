"""The AVA result CSV: one row per (keyframe, box, class) `video_id,timestamp,x1,y1,x2,y2,action_id,score`.

Scores are written with 6 decimals and boxes with 6 (mmaction2 writes 3-4, which creates score
ties, whose order neither the official evaluator nor mmaction2's defines).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from lfb_ray.data.annotations import AVA_NUM_ACTIONS, ResultRows, read_result_rows
from lfb_ray.storage import atomic_path

__all__ = ["build_result_rows", "read_results_csv", "write_results_csv"]


def _select(num_boxes: int, scores: np.ndarray, action_thr: float | None,
            class_ids: Sequence[int] | None) -> tuple[np.ndarray, np.ndarray]:
    """(box index [K], class id [K]) of the rows to write, box-major then class order."""
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[0] != num_boxes:
        raise ValueError(f"scores must be [R, num_classes] with R={num_boxes}, got {list(scores.shape)}")
    classes = np.arange(1, AVA_NUM_ACTIONS + 1) if class_ids is None else np.asarray(class_ids, np.int64)
    if len(classes) and (classes.min() < 1 or classes.max() >= scores.shape[1]):
        raise ValueError(f"class ids must be in 1..{scores.shape[1] - 1}, got {classes.tolist()}")
    keep = np.ones((num_boxes, len(classes)), bool)
    if action_thr is not None:
        keep = scores[:, classes] > action_thr
    box, col = np.nonzero(keep)
    return box, classes[col]


def build_result_rows(video_ids: Sequence[str] | np.ndarray, timestamps: Sequence[int] | np.ndarray,
                      boxes: np.ndarray, scores: np.ndarray, action_thr: float | None = None,
                      class_ids: Sequence[int] | None = None) -> ResultRows:
    """In-memory result rows, exactly the rows `write_results_csv` would write (unrounded).

    Args:
        video_ids, timestamps: [R] keyframe of each box.
        boxes: [R, 4] normalised x1, y1, x2, y2.
        scores: [R, C] per-class scores, C >= 81 for AVA (column 0 unused).
        action_thr: keep (box, class) with score > action_thr; None keeps all.
        class_ids: classes to emit; default 1..80.

    Returns:
        ResultRows with one row per kept (box, class), box-major.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    scores = np.asarray(scores)
    box, cls = _select(len(boxes), scores, action_thr, class_ids)
    return ResultRows(video_ids=np.asarray(video_ids, dtype=str).reshape(-1)[box],
                      timestamps=np.asarray(timestamps, np.int64).reshape(-1)[box], boxes=boxes[box],
                      action_ids=cls, scores=scores[box, cls].astype(np.float64))


def write_results_csv(path: str | os.PathLike, video_ids: Sequence[str] | np.ndarray,
                      timestamps: Sequence[int] | np.ndarray, boxes: np.ndarray, scores: np.ndarray,
                      action_thr: float | None = None, class_ids: Sequence[int] | None = None) -> int:
    """Writes the AVA result CSV atomically (`lfb_ray.storage.atomic_path`).

    Args:
        path: destination; parent folders are created.
        video_ids, timestamps: [R] keyframe of each box (timestamps in integer seconds).
        boxes: [R, 4] normalised x1, y1, x2, y2.
        scores: [R, C] per-class scores (C >= 81; column 0 unused).
        action_thr: write (box, class) only if score > action_thr; None writes every class.
        class_ids: classes to write; default 1..80.

    Returns:
        Number of rows written.
    """
    video_ids = np.asarray(video_ids, dtype=str).reshape(-1)
    timestamps = np.asarray(timestamps, np.int64).reshape(-1)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    scores = np.asarray(scores)
    if not len(video_ids) == len(timestamps) == len(boxes):
        raise ValueError(f"video_ids ({len(video_ids)}), timestamps ({len(timestamps)}) and boxes "
                         f"({len(boxes)}) must have the same length")
    box, cls = _select(len(boxes), scores, action_thr, class_ids)
    prefix = [f"{v},{t},{b[0]:.6f},{b[1]:.6f},{b[2]:.6f},{b[3]:.6f},"
              for v, t, b in zip(video_ids.tolist(), timestamps.tolist(), boxes.tolist(), strict=True)]
    values = scores[box, cls].astype(np.float64).tolist()
    text = "".join(f"{prefix[i]}{c},{s:.6f}\n" for i, c, s in zip(box.tolist(), cls.tolist(), values, strict=True))
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    return len(box)


def read_results_csv(path: str | os.PathLike) -> ResultRows:
    """Reads a result CSV (see `lfb_ray.data.annotations.read_result_rows`)."""
    return read_result_rows(path)
