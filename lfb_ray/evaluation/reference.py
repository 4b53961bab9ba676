"""Plain-loop frame-mAP, written like the reference evaluators: the oracle for `ava_map.py`.

Dicts keyed by keyframe, per-class Python loops, IoU on Python floats (or numpy float32 scalars
for mmaction2). Slow; for tests and benchmarks only. Same tie rules as the vectorised version.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from lfb_ray.data.annotations import AnnotationRows, ResultRows
from lfb_ray.evaluation.ava_map import GROUPS, MAX_DETECTIONS_PER_KEYFRAME, MapResult, Protocol

__all__ = ["evaluate_frame_map_reference"]


def _iou(d: tuple[float, ...], g: tuple[float, ...], float32: bool) -> float:
    """IoU of two (x1, y1, x2, y2) boxes, with the op order of the TF `np_box_ops.iou`."""
    if float32:
        d = tuple(np.float32(v) for v in d)
        g = tuple(np.float32(v) for v in g)
    h = float(max(0.0, min(d[3], g[3]) - max(d[1], g[1])))
    w = float(max(0.0, min(d[2], g[2]) - max(d[0], g[0])))
    inter = h * w
    area_sum = (d[3] - d[1]) * (d[2] - d[0]) + (g[3] - g[1]) * (g[2] - g[0])
    union = float(area_sum) - inter
    if union == 0:
        return math.nan if inter == 0 else math.inf
    return inter / union


def _argmax(values: list[float]) -> int:
    """np.argmax semantics: first maximum; the first NaN if there is one."""
    best = 0
    for j, v in enumerate(values):
        if math.isnan(v):
            return j
        if v > values[best]:
            best = j
    return best


def _average_precision(tp_in_rank_order: list[bool], num_gt: int) -> float:
    """TF object-detection `compute_precision_recall` + `compute_average_precision`, as loops."""
    precision, recall, ctp, cfp = [], [], 0, 0
    for is_tp in tp_in_rank_order:
        ctp += is_tp
        cfp += not is_tp
        precision.append(ctp / (ctp + cfp))
        recall.append(ctp / num_gt)
    if not precision:
        return 0.0
    recall = [0.0] + recall + [1.0]
    precision = [0.0] + precision + [0.0]
    for i in range(len(precision) - 2, -1, -1):
        precision[i] = max(precision[i], precision[i + 1])
    terms = [(recall[i] - recall[i - 1]) * precision[i] for i in range(1, len(recall)) if recall[i] != recall[i - 1]]
    return float(np.sum(terms))


def evaluate_frame_map_reference(gt_rows: AnnotationRows, det_rows: ResultRows, label_map: dict[int, str],
                                 exclusions: set[tuple[str, int]] | frozenset = frozenset(),
                                 protocol: Protocol = "official", iou_thr: float = 0.5) -> MapResult:
    """Same contract as `evaluate_frame_map` (see there); straightforward loops."""
    official = protocol == "official"
    classes = set(label_map)
    gt: dict[tuple[str, int], list] = defaultdict(list)  # key -> [(box, class)] in file order
    gt_count_all: dict[int, int] = defaultdict(int)
    for i in range(len(gt_rows)):
        c = int(gt_rows.action_ids[i])
        if c in classes:
            gt[(str(gt_rows.video_ids[i]), int(gt_rows.timestamps[i]))].append((tuple(gt_rows.boxes[i].tolist()), c))
            gt_count_all[c] += 1
    det: dict[tuple[str, int], list] = defaultdict(list)  # key -> [(score, row, class, box)]
    for i in range(len(det_rows)):
        c = int(det_rows.action_ids[i])
        if c in classes:
            key = (str(det_rows.video_ids[i]), int(det_rows.timestamps[i]))
            det[key].append((float(det_rows.scores[i]), i, c, tuple(det_rows.boxes[i].tolist())))
    for key in det:
        det[key].sort(key=lambda e: (-e[0], e[1]))

    if official:
        for key in list(det):
            kept = det[key][:MAX_DETECTIONS_PER_KEYFRAME]
            det[key] = [e for e in kept if e[3][0] < e[3][2] and e[3][1] < e[3][3]]
        gt = {k: v for k, v in gt.items() if k not in exclusions}
        det = {k: v for k, v in det.items() if k not in exclusions}
        num_gt: dict[int, int] = defaultdict(int)
        for boxes in gt.values():
            for _, c in boxes:
                num_gt[c] += 1
        keys = list(det)
    else:
        num_gt = gt_count_all
        keys = [k for k in gt if k not in exclusions]
        for k in keys:
            for what, boxes in (("detection", [e[3] for e in det.get(k, [])]),
                                ("GT", [b for b, c in gt[k] if any(e[2] == c for e in det.get(k, []))])):
                for b in boxes:
                    if b[0] > b[2] or b[1] > b[3]:
                        raise ValueError(f"protocol 'mmaction2': {what} box {list(b)} of keyframe {k} is inverted")

    pooled: dict[int, list] = defaultdict(list)  # class -> [(rank score, row, tp)]
    for key in keys:
        entries = det.get(key, [])
        for c in sorted({e[2] for e in entries}):
            gts = [b for b, gc in gt.get(key, []) if gc == c]
            matched = [False] * len(gts)
            for score, row, _, box in (e for e in entries if e[2] == c):
                tp = False
                if gts:
                    ious = [_iou(box, g, float32=not official) for g in gts]
                    j = _argmax(ious)
                    if ious[j] >= iou_thr and not matched[j]:
                        tp, matched[j] = True, True
                rank = score if official else float(np.float32(score))
                pooled[c].append((rank, row, tp))

    per_class, num_det = {}, {}
    for c in sorted(classes):
        ranked = sorted(pooled.get(c, []), key=lambda e: (-e[0], e[1]))
        num_det[c] = len(ranked)
        if num_gt.get(c, 0) == 0 or (not official and not ranked):
            per_class[c] = float("nan")
        else:
            per_class[c] = _average_precision([e[2] for e in ranked], num_gt[c])

    def nanmean(values: list[float]) -> float:
        finite = [v for v in values if not math.isnan(v)]
        return sum(finite) / len(finite) if finite else float("nan")

    groups = {name: nanmean([ap for c, ap in per_class.items() if lo <= c <= hi]) for name, (lo, hi) in GROUPS.items()}
    return MapResult(mAP=nanmean(list(per_class.values())), per_class=per_class, group_mAP=groups,
                     class_names={c: label_map[c] for c in sorted(classes)},
                     num_gt={c: int(num_gt.get(c, 0)) for c in sorted(classes)}, num_det=num_det,
                     protocol=protocol)
