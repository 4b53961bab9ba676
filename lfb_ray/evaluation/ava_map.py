"""AVA frame-mAP@0.5, vectorised: the official ActivityNet evaluator or mmaction2 1.x's variant.

Implements both evaluators' rules as `evaluate_frame_map` lists them (label-map filter, exclusions,
top-50 cap, degenerate boxes, greedy IoU matching, empty classes, ties). Rows are grouped with sorts
(no per-keyframe Python loop); the greedy matching is vectorised because a detection only ever claims its own best GT:
it is a true positive iff IoU >= thr and it is the first such claimant of that GT in score order.
`reference.py` is the plain-loop version the tests compare against.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np

from lfb_ray.data.annotations import AnnotationRows, ResultRows

__all__ = ["GROUPS", "MAX_DETECTIONS_PER_KEYFRAME", "MapResult", "Protocol", "evaluate_frame_map",
           "group_means", "pair_iou", "voc_ap"]

Protocol = Literal["official", "mmaction2"]
MAX_DETECTIONS_PER_KEYFRAME = 50  # official evaluator's cap, over all classes of a keyframe
_PAIRS_PER_CHUNK = 1 << 22  # (detection, GT) IoU pairs computed at once; bounds memory

# mmaction2's AVA sub-means by action id.
GROUPS: dict[str, tuple[int, int]] = {  # name -> (lowest id, highest id), inclusive
    "person_movement": (-(1 << 30), 14),
    "object_manipulation": (15, 63),
    "person_interaction": (64, 1 << 30),
}


@dataclass(frozen=True)
class MapResult:
    """Frame-mAP and its parts; NaN marks a class with no GT (or, for mmaction2, no detections)."""

    mAP: float
    per_class: dict[int, float]  # label-map id -> AP
    group_mAP: dict[str, float]  # GROUPS name -> nan-mean of its classes' AP
    class_names: dict[int, str]
    num_gt: dict[int, int]  # GT instances in each class's recall denominator
    num_det: dict[int, int]  # detections that entered matching
    protocol: str = "official"


def _nanmean(values: list[float]) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slice -> NaN, no warning
        return float(np.nanmean(values)) if values else float("nan")


def group_means(per_class: dict[int, float]) -> tuple[float, dict[str, float]]:
    """(mAP, group_mAP): nan-means over all classes and over each of GROUPS."""
    groups = {name: _nanmean([ap for c, ap in per_class.items() if lo <= c <= hi])
              for name, (lo, hi) in GROUPS.items()}
    return _nanmean(list(per_class.values())), groups


def voc_ap(tp: np.ndarray, num_gt: int) -> float:
    """VOC area under the monotone precision envelope (TF object-detection API `metrics`).

    Args:
        tp: [D] bool, detections of one class sorted by descending score.
        num_gt: GT instances of the class (> 0).

    Returns:
        AP in [0, 1]; 0.0 when there are no detections.
    """
    if len(tp) == 0:
        return 0.0
    ctp = np.cumsum(tp)
    cfp = np.cumsum((~tp).astype(float))
    precision = np.concatenate([[0.0], ctp.astype(float) / (ctp + cfp), [0.0]])
    recall = np.concatenate([[0.0], ctp.astype(float) / num_gt, [1.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    return float(np.sum((recall[idx] - recall[idx - 1]) * precision[idx]))


def evaluate_frame_map(gt_rows: AnnotationRows, det_rows: ResultRows, label_map: dict[int, str],
                       exclusions: set[tuple[str, int]] | frozenset = frozenset(),
                       protocol: Protocol = "official", iou_thr: float = 0.5) -> MapResult:
    """Frame-mAP of detections against GT, by the rules of one of the two evaluators.

    "official" (ActivityNet `get_ava_performance.py`, March 2019): label-map filter; excluded
    keyframes dropped on both sides; top-50 detections per keyframe (ties: earlier row); degenerate
    detection boxes dropped; greedy matching with IoU in float64; detections on keyframes without
    GT are false positives; class with GT and no detections -> 0; without GT -> NaN.

    "mmaction2" (1.x `ava_eval`): GT of excluded keyframes still count in the class totals; no cap;
    zero-area boxes are ordinary false positives; only keyframes with GT are scored; a class
    without detections is left out (NaN); IoU from float32 boxes; scores ranked as float32.

    Score ties have no defined order in either reference; here the earlier file row goes first.

    Args:
        gt_rows: GT rows [N] (duplicated rows are separate instances).
        det_rows: detection rows [R].
        label_map: {id: name}; only these ids are evaluated.
        exclusions: {(video_id, timestamp)} excluded keyframes.
        protocol: "official" or "mmaction2".
        iou_thr: matching threshold.

    Returns:
        MapResult over the label-map ids.

    Raises:
        ValueError: unknown protocol; for "mmaction2", an inverted box (x1 > x2 or y1 > y2) on a
            scored keyframe, where mmaction2 itself crashes.
    """
    if protocol not in ("official", "mmaction2"):
        raise ValueError(f"protocol must be 'official' or 'mmaction2', got {protocol!r}")
    official = protocol == "official"
    class_ids = np.array(sorted(label_map), dtype=np.int64)
    num_classes = len(class_ids)
    gt_key, det_key, excluded_codes = _keyframe_codes(gt_rows, det_rows, exclusions)
    gt_cls = _class_index(gt_rows.action_ids, class_ids)
    det_cls = _class_index(det_rows.action_ids, class_ids)
    gt_boxes = np.asarray(gt_rows.boxes, np.float64).reshape(-1, 4)
    det_boxes = np.asarray(det_rows.boxes, np.float64).reshape(-1, 4)
    scores = np.asarray(det_rows.scores, np.float64).reshape(-1)
    # Every detection ordering below is "by score descending, ties by file row": rank once.
    score_rank = _score_rank(scores)

    gt_in = np.flatnonzero(gt_cls >= 0)
    gt_idx = gt_in[~np.isin(gt_key[gt_in], excluded_codes)]
    det_idx = np.flatnonzero(det_cls >= 0)
    if official:
        det_idx = _top_k_per_key(det_key, score_rank, det_idx, MAX_DETECTIONS_PER_KEYFRAME)
        det_idx = det_idx[~np.isin(det_key[det_idx], excluded_codes)]
        b = det_boxes[det_idx]
        det_idx = det_idx[(b[:, 0] < b[:, 2]) & (b[:, 1] < b[:, 3])]
        num_gt = np.bincount(gt_cls[gt_idx], minlength=num_classes)
        pool_rank = score_rank
    else:
        num_gt = np.bincount(gt_cls[gt_in], minlength=num_classes)  # excluded keyframes included
        det_idx = det_idx[np.isin(det_key[det_idx], np.unique(gt_key[gt_idx]))]
        _check_not_inverted(gt_rows, det_rows, gt_idx, det_idx,
                            gt_key * num_classes + gt_cls, det_key * num_classes + det_cls)
        pool_rank = _score_rank(scores.astype(np.float32))  # mmaction2 pools float32 scores

    tp = _match(gt_key[gt_idx] * num_classes + gt_cls[gt_idx], gt_boxes[gt_idx],
                det_key[det_idx] * num_classes + det_cls[det_idx], det_boxes[det_idx],
                score_rank[det_idx], iou_thr, float32=not official)

    # Per class: pool, rank by score (ties: file order), VOC AP.
    cls = det_cls[det_idx]
    order = _sort_by(cls, pool_rank[det_idx])
    tp_sorted = tp[order]
    bounds = np.searchsorted(cls[order], np.arange(num_classes + 1))
    per_class, num_det = {}, {}
    for c, class_id in enumerate(class_ids.tolist()):
        lo, hi = int(bounds[c]), int(bounds[c + 1])
        num_det[class_id] = hi - lo
        if num_gt[c] == 0 or (not official and hi == lo):
            per_class[class_id] = float("nan")
        else:
            per_class[class_id] = voc_ap(tp_sorted[lo:hi], int(num_gt[c]))
    mean, groups = group_means(per_class)
    return MapResult(mAP=mean, per_class=per_class, group_mAP=groups,
                     class_names={c: label_map[c] for c in class_ids.tolist()},
                     num_gt={c: int(n) for c, n in zip(class_ids.tolist(), num_gt.tolist(), strict=True)},
                     num_det=num_det, protocol=protocol)


def _keyframe_codes(gt_rows: AnnotationRows, det_rows: ResultRows,
                    exclusions: set[tuple[str, int]] | frozenset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer codes for (video_id, timestamp), shared by GT, detections and exclusions.

    Returns:
        gt codes [N], detection codes [R], sorted codes of the excluded keyframes [E'] (those that
        occur in the rows).
    """
    gt_v = np.asarray(gt_rows.video_ids, dtype=str).reshape(-1)
    det_v = np.asarray(det_rows.video_ids, dtype=str).reshape(-1)
    videos, inverse = _factorize(np.concatenate([gt_v, det_v]))
    ts = np.concatenate([np.asarray(gt_rows.timestamps, np.int64).reshape(-1),
                         np.asarray(det_rows.timestamps, np.int64).reshape(-1)])
    if len(ts) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    t0, span = int(ts.min()), int(ts.max() - ts.min()) + 1
    codes = inverse.reshape(-1).astype(np.int64) * span + (ts - t0)
    excluded = []
    for video_id, t in exclusions:
        j = int(np.searchsorted(videos, video_id))
        if j < len(videos) and videos[j] == video_id and t0 <= int(t) < t0 + span:
            excluded.append(j * span + int(t) - t0)
    return codes[: len(gt_v)], codes[len(gt_v):], np.unique(np.array(excluded, np.int64))


def _factorize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted uniques, code of each value), like np.unique(return_inverse=True).

    Sorting strings is the slow part of np.unique; rows come in runs of one video, so only the
    run heads are sorted.
    """
    if len(values) == 0:
        return values[:0], np.zeros(0, np.int64)
    head = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
    uniques, head_code = np.unique(values[head], return_inverse=True)
    return uniques, np.repeat(head_code.reshape(-1), np.diff(np.r_[head, len(values)]))


def _class_index(action_ids: np.ndarray, class_ids: np.ndarray) -> np.ndarray:
    """Position of each action id in the sorted label-map ids; -1 when not in the label map."""
    action_ids = np.asarray(action_ids, np.int64).reshape(-1)
    if len(class_ids) == 0:
        return np.full(len(action_ids), -1, np.int64)
    if (len(action_ids) and int(action_ids.min()) >= 0 and int(action_ids.max()) < 1 << 20
            and int(class_ids.max()) < 1 << 20):
        lut = np.full(max(int(action_ids.max()), int(class_ids.max())) + 1, -1, np.int64)  # O(N) lookup
        lut[class_ids[class_ids >= 0]] = np.flatnonzero(class_ids >= 0)
        return lut[action_ids]
    pos = np.minimum(np.searchsorted(class_ids, action_ids), len(class_ids) - 1)
    return np.where(class_ids[pos] == action_ids, pos, -1)


def _top_k_per_key(keys: np.ndarray, score_rank: np.ndarray, idx: np.ndarray, k: int) -> np.ndarray:
    """Rows `idx` keeping the k highest scores per keyframe (ties: earlier row); sorted by row."""
    order = idx[_sort_by(keys[idx], score_rank[idx])]
    if len(order) == 0:
        return order
    sorted_keys = keys[order]
    heads = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])  # first row of each keyframe
    rank = np.arange(len(order)) - np.repeat(heads, np.diff(np.r_[heads, len(order)]))
    keep = np.zeros(len(keys), bool)
    keep[order[rank < k]] = True
    return np.flatnonzero(keep)  # sorted by row, without a sort


def _check_not_inverted(gt_rows: AnnotationRows, det_rows: ResultRows, gt_idx: np.ndarray,
                        det_idx: np.ndarray, gt_group: np.ndarray, det_group: np.ndarray) -> None:
    """mmaction2's BoxList raises on x1 > x2 or y1 > y2 for boxes it scores; say so clearly."""
    checks = (("detection", det_rows, det_idx),
              ("GT", gt_rows, gt_idx[np.isin(gt_group[gt_idx], det_group[det_idx])]))
    for what, rows, idx in checks:
        b = np.asarray(rows.boxes, np.float64)[idx]
        bad = (b[:, 0] > b[:, 2]) | (b[:, 1] > b[:, 3])
        if bad.any():
            i = int(idx[int(np.argmax(bad))])
            where = (f"{rows.path or 'rows'} line {int(rows.line_numbers[i])}" if len(rows.line_numbers) > i
                     else f"row index {i}")
            raise ValueError(
                f"protocol 'mmaction2': {what} box {b[int(np.argmax(bad))].tolist()} of keyframe "
                f"{rows.video_ids[i]},{int(rows.timestamps[i])} ({where}) has "
                "x1 > x2 or y1 > y2; mmaction2 1.x crashes on such boxes. Fix the boxes or use "
                "protocol='official', which drops them.")


def _score_rank(scores: np.ndarray) -> np.ndarray:
    """[R] int64 position of each row when sorted by (score descending, row ascending)."""
    rank = np.empty(len(scores), np.int64)
    rank[np.argsort(-scores, kind="stable")] = np.arange(len(scores))
    return rank


def _sort_by(group: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Indices ordering rows by (group ascending, rank ascending); ranks are unique.

    One argsort of the unique int64 key group * R + rank: about 3x faster than np.lexsort.
    """
    group = np.asarray(group, np.int64)
    if len(group) == 0:
        return np.zeros(0, np.int64)
    span = int(rank.max()) + 1
    if int(group.min()) < 0 or int(group.max()) >= (1 << 62) // span:
        return np.lexsort((rank, group))
    return np.argsort(group * span + rank)


def _match(gt_group: np.ndarray, gt_boxes: np.ndarray, det_group: np.ndarray, det_boxes: np.ndarray,
           det_rank: np.ndarray, iou_thr: float, float32: bool) -> np.ndarray:
    """Greedy matching inside each (keyframe, class) group, vectorised over all groups.

    Detections go in descending score (ties: earlier row); each takes its highest-IoU GT (ties:
    earlier GT row) and is a TP iff IoU >= thr and no earlier detection took that GT as a TP.
    GT must be given in file order.

    Args:
        gt_group: [G] group code of each GT; gt_boxes: [G, 4].
        det_group, det_rank: [D] (rank from `_score_rank`); det_boxes: [D, 4].

    Returns:
        [D] bool true-positive flags, aligned with the inputs.
    """
    go = np.argsort(gt_group, kind="stable")
    gt_group, gt_boxes = gt_group[go], gt_boxes[go]
    do = _sort_by(det_group, det_rank)
    d_group, d_boxes = det_group[do], det_boxes[do]
    start = np.searchsorted(gt_group, d_group, side="left")
    count = np.searchsorted(gt_group, d_group, side="right") - start
    best_gt = np.full(len(do), -1, np.int64)
    best_iou = np.full(len(do), -np.inf)
    # Chunks of whole detections with at most _PAIRS_PER_CHUNK pairs (one detection may exceed it).
    ends = np.cumsum(count)
    lo = 0
    while lo < len(do):
        base = ends[lo] - count[lo]
        hi = max(lo + 1, int(np.searchsorted(ends, base + _PAIRS_PER_CHUNK, side="right")))
        _best_in_chunk(slice(lo, hi), start, count, d_boxes, gt_boxes, best_gt, best_iou, float32)
        lo = hi
    candidate = np.flatnonzero(best_iou >= iou_thr)  # sorted order = matching order
    _, first = np.unique(best_gt[candidate], return_index=True)
    tp_sorted = np.zeros(len(do), bool)
    tp_sorted[candidate[first]] = True
    tp = np.empty(len(do), bool)
    tp[do] = tp_sorted
    return tp


def _best_in_chunk(sl: slice, start: np.ndarray, count: np.ndarray, d_boxes: np.ndarray,
                   gt_boxes: np.ndarray, best_gt: np.ndarray, best_iou: np.ndarray, float32: bool) -> None:
    """Fills best_gt/best_iou[sl]: first GT of maximal IoU per detection (NaN IoU: no match)."""
    cnt = count[sl]
    has = np.flatnonzero(cnt > 0)
    if len(has) == 0:
        return
    cnt_h = cnt[has]
    seg = np.cumsum(cnt_h) - cnt_h  # [H] offset of each detection's pairs
    n_pairs = int(cnt_h.sum())
    pair_det = np.repeat(has, cnt_h)
    pair_gt = np.repeat(start[sl][has] - seg, cnt_h) + np.arange(n_pairs)
    iou = pair_iou(d_boxes[sl][pair_det], gt_boxes[pair_gt], float32=float32)
    best = np.maximum.reduceat(iou, seg)  # NaN if any pair is NaN (np.argmax picks it: no match)
    is_best = iou == np.repeat(best, cnt_h)
    first = np.minimum.reduceat(np.where(is_best, np.arange(n_pairs), n_pairs), seg)
    ok = ~np.isnan(best)
    rows = np.arange(sl.start, sl.stop)[has[ok]]
    best_gt[rows] = pair_gt[first[ok]]
    best_iou[rows] = best[ok]


def pair_iou(a: np.ndarray, b: np.ndarray, float32: bool = False) -> np.ndarray:
    """IoU of row-aligned box pairs with the references' exact arithmetic.

    Args:
        a, b: [P, 4] (x1, y1, x2, y2); no "+1" in areas.
        float32: mmaction2 1.x numerics (boxes and areas in float32, intersection and the final
            division in float64, as its `np_box_ops` mixes them); else all float64 (official).

    Returns:
        [P] float64 IoU (NaN when both boxes have zero area and no overlap).
    """
    dt = np.float32 if float32 else np.float64
    a, b = a.astype(dt, copy=False), b.astype(dt, copy=False)
    h = np.maximum(0.0, np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1])).astype(np.float64)
    w = np.maximum(0.0, np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0])).astype(np.float64)
    inter = h * w
    area_a = (a[:, 3] - a[:, 1]) * (a[:, 2] - a[:, 0])
    area_b = (b[:, 3] - b[:, 1]) * (b[:, 2] - b[:, 0])
    union = (area_a + area_b).astype(np.float64) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return inter / union
