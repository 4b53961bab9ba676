"""Annotation rows grouped into keyframes (one record per annotated second, persons merged by box),
and the first-N-keyframes cap that prepare, the bank's coverage and val mAP share."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from lfb_ray.data.annotations.ava_csv import AnnotationRows, read_annotation_rows
from lfb_ray.data.annotations.errors import error_at

__all__ = ["KeyframeBoxes", "cap_annotation_rows", "first_keyframes", "group_keyframes", "read_annotations"]


@dataclass(frozen=True)
class KeyframeBoxes:
    """All GT persons of one keyframe, with multi-hot labels."""

    video_id: str
    timestamp: int
    boxes: np.ndarray  # [N, 4] float32 normalised x1, y1, x2, y2
    labels: np.ndarray  # [N, num_classes] float32 multi-hot; column 0 unused
    person_ids: np.ndarray  # [N] int64 entity id of the first row of each box (-1 if absent)


def group_keyframes(rows: AnnotationRows, num_classes: int = 81) -> dict[tuple[str, int], KeyframeBoxes]:
    """Merges rows into keyframes; rows with identical 4 box floats on a keyframe are one person.

    Entity ids are not used for merging (mmaction2 groups by box too). Persons keep the order in which their
    box first appears in the file.

    Args:
        rows: from `read_annotation_rows`.
        num_classes: width of the multi-hot vector (81 for AVA: ids 1..80, index 0 unused).

    Returns:
        {(video_id, timestamp): KeyframeBoxes}, ordered by (video_id, timestamp).

    Raises:
        AnnotationError: an action id >= num_classes or < 1.
    """
    n = len(rows)
    if n == 0:
        return {}
    bad = (rows.action_ids < 1) | (rows.action_ids >= num_classes)
    if bad.any():
        k = int(np.argmax(bad))
        raise error_at(rows.path, int(rows.line_numbers[k]),
                     f"action_id {int(rows.action_ids[k])} does not fit num_classes={num_classes}")
    vids, vid_code = np.unique(rows.video_ids, return_inverse=True)
    # Adding 0.0 turns -0.0 into 0.0 so that bit patterns compare like floats.
    bits = (np.asarray(rows.boxes, np.float64) + 0.0).view(np.int64).reshape(n, 4)
    row = np.arange(n)
    order = np.lexsort((row, bits[:, 3], bits[:, 2], bits[:, 1], bits[:, 0], rows.timestamps, vid_code))
    keys = np.stack([vid_code, rows.timestamps, *bits.T], axis=1)[order]  # [n, 6]
    new_person = np.ones(n, bool)
    new_person[1:] = (keys[1:] != keys[:-1]).any(axis=1)
    person_of_sorted = np.cumsum(new_person) - 1
    person = np.empty(n, np.int64)
    person[order] = person_of_sorted
    first_row = order[new_person]  # [P] first file row of each person
    # Order persons by (keyframe, first appearance in the file).
    p_order = np.lexsort((first_row, rows.timestamps[first_row], vid_code[first_row]))
    rank = np.empty_like(p_order)
    rank[p_order] = np.arange(len(p_order))
    person = rank[person]
    first_row = first_row[p_order]
    labels = np.zeros((len(first_row), num_classes), np.float32)
    labels[person, rows.action_ids] = 1.0
    boxes = np.asarray(rows.boxes, np.float32)[first_row]
    pids = np.asarray(rows.person_ids, np.int64)[first_row]
    kf_vid, kf_ts = vid_code[first_row], rows.timestamps[first_row]
    starts = np.flatnonzero(np.r_[True, (kf_vid[1:] != kf_vid[:-1]) | (kf_ts[1:] != kf_ts[:-1])])
    ends = np.r_[starts[1:], len(first_row)]
    out: dict[tuple[str, int], KeyframeBoxes] = {}
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        key = (str(vids[kf_vid[s]]), int(kf_ts[s]))
        out[key] = KeyframeBoxes(video_id=key[0], timestamp=key[1], boxes=boxes[s:e].copy(),
                                 labels=labels[s:e].copy(), person_ids=pids[s:e].copy())
    return out


def first_keyframes(keys, n: int) -> set[tuple[str, int]]:
    """The first `n` of the (video_id, second) keyframes `keys`, by video id then second; all of them
    when `n` is 0. `data.max_keyframes_per_split` (trying a config on a few keyframes before paying
    for the whole set): prepare, the bank's coverage and val mAP all keep the same keyframes."""
    keys = {(str(v), int(t)) for v, t in keys}
    return keys if n <= 0 else set(sorted(keys)[:n])


def cap_annotation_rows(rows: AnnotationRows, n: int) -> AnnotationRows:
    """`rows` of the first `n` keyframes only (`first_keyframes`); `rows` itself when n is 0."""
    if n <= 0:
        return rows
    keep = first_keyframes(zip(rows.video_ids.tolist(), rows.timestamps.tolist()), n)
    mask = np.array([(str(v), int(t)) in keep for v, t in zip(rows.video_ids.tolist(), rows.timestamps.tolist())],
                    dtype=bool).reshape(-1)
    return AnnotationRows(video_ids=rows.video_ids[mask], timestamps=rows.timestamps[mask], boxes=rows.boxes[mask],
                          action_ids=rows.action_ids[mask], person_ids=rows.person_ids[mask],
                          line_numbers=rows.line_numbers[mask], path=rows.path)


def read_annotations(path: str | os.PathLike, num_classes: int = 81,
                     label_map: dict[int, str] | None = None) -> dict[tuple[str, int], KeyframeBoxes]:
    """`read_annotation_rows` + `group_keyframes`: {(video_id, timestamp): KeyframeBoxes}."""
    return group_keyframes(read_annotation_rows(path, label_map=label_map), num_classes=num_classes)
