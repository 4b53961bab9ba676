"""Frame-mAP: hand-computed cases for each evaluator rule (label-map filter, exclusions, top-50 cap,
degenerate boxes, matching, empty classes, ties) in both protocols, the vectorised evaluator against
the plain-loop reference on random cases, and against this file's own implementation of the
official ActivityNet evaluator (which shares no code or constants with lfb_ray.evaluation) on random
cases with distinct scores."""

from __future__ import annotations

import collections
import heapq
import math

import numpy as np
import pytest

from lfb_ray.data.annotations import AnnotationRows, ResultRows
from lfb_ray.evaluation import evaluate_frame_map, evaluate_frame_map_reference
from lfb_ray.evaluation.ava_map import MapResult, pair_iou, voc_ap

LM = {1: "bend/bow", 2: "crawl", 20: "climb", 64: "fight/hit"}
A = (0.1, 0.1, 0.4, 0.4)
A2 = (0.1, 0.1, 0.4, 0.41)  # IoU(A, A2) = 0.9677
B = (0.5, 0.5, 0.9, 0.9)
C = (0.05, 0.6, 0.3, 0.95)


def gt_rows(*rows) -> AnnotationRows:
    """rows: (video, second, box, action)."""
    n = len(rows)
    return AnnotationRows(
        video_ids=np.array([r[0] for r in rows], dtype=str), timestamps=np.array([r[1] for r in rows], np.int64),
        boxes=np.array([r[2] for r in rows], np.float64).reshape(n, 4),
        action_ids=np.array([r[3] for r in rows], np.int64), person_ids=np.full(n, -1, np.int64),
        line_numbers=np.arange(1, n + 1), path="gt.csv")


def det_rows(*rows) -> ResultRows:
    """rows: (video, second, box, action, score)."""
    n = len(rows)
    return ResultRows(
        video_ids=np.array([r[0] for r in rows], dtype=str), timestamps=np.array([r[1] for r in rows], np.int64),
        boxes=np.array([r[2] for r in rows], np.float64).reshape(n, 4),
        action_ids=np.array([r[3] for r in rows], np.int64), scores=np.array([r[4] for r in rows], np.float64),
        line_numbers=np.arange(1, n + 1), path="det.csv")


def _same(a: MapResult, b: MapResult) -> None:
    assert list(a.per_class) == list(b.per_class)
    np.testing.assert_allclose(list(a.per_class.values()), list(b.per_class.values()), rtol=0, atol=1e-12)
    np.testing.assert_allclose(a.mAP, b.mAP, rtol=0, atol=1e-12)
    np.testing.assert_allclose(list(a.group_mAP.values()), list(b.group_mAP.values()), rtol=0, atol=1e-12)
    assert a.num_gt == b.num_gt and a.num_det == b.num_det and a.protocol == b.protocol


def evaluate(gt, det, excl=frozenset(), protocol="official", label_map=LM) -> MapResult:
    """Vectorised result, checked against the reference on every hand case."""
    out = evaluate_frame_map(gt, det, label_map, excl, protocol=protocol)
    _same(out, evaluate_frame_map_reference(gt, det, label_map, excl, protocol=protocol))
    return out


def both(gt, det, excl=frozenset(), label_map=LM) -> tuple[MapResult, MapResult]:
    return evaluate(gt, det, excl, "official", label_map), evaluate(gt, det, excl, "mmaction2", label_map)


def nan(x: float) -> bool:
    return math.isnan(x)


# --- AP arithmetic --------------------------------------------------------------------------------


def test_voc_ap_hand_computed():
    # ranks TP, FP, TP with 3 GT: precision 1, 1/2, 2/3; recall 1/3, 1/3, 2/3 -> 1/3 * 1 + 1/3 * 2/3
    assert voc_ap(np.array([True, False, True]), 3) == pytest.approx(1 / 3 + 2 / 9)
    assert voc_ap(np.array([False, True]), 1) == pytest.approx(0.5)
    assert voc_ap(np.zeros(0, bool), 4) == 0.0


def test_iou_exact_threshold_and_no_plus_one():
    a = np.array([[0.0, 0.0, 0.5, 1.0]])
    b = np.array([[0.0, 0.0, 1.0, 1.0]])
    assert pair_iou(a, b)[0] == 0.5
    off, mm = both(gt_rows(("v", 902, (0, 0, 0.5, 1), 1)), det_rows(("v", 902, (0, 0, 1, 1), 1, 0.3)))
    assert off.per_class[1] == 1.0 and mm.per_class[1] == 1.0  # IoU >= 0.5 is a match


# --- point 8 and the basics -------------------------------------------------------------------------


def test_perfect_detections_score_one():
    gt = gt_rows(("v", 902, A, 1), ("v", 902, A, 20), ("v", 902, B, 64), ("w", 903, C, 2))
    det = det_rows(("v", 902, A, 1, 0.9), ("v", 902, A, 20, 0.8), ("v", 902, B, 64, 0.7), ("w", 903, C, 2, 0.6),
                   ("v", 902, B, 1, 0.1))  # one low-ranked false positive does not hurt
    for r in both(gt, det):
        assert r.mAP == 1.0 and all(v == 1.0 for v in r.per_class.values())
        assert r.group_mAP == {"person_movement": 1.0, "object_manipulation": 1.0, "person_interaction": 1.0}
        assert r.num_gt == {1: 1, 2: 1, 20: 1, 64: 1} and r.num_det == {1: 2, 2: 1, 20: 1, 64: 1}
        assert r.class_names == LM


def test_class_with_gt_but_no_detection_is_zero_official_left_out_mmaction2():
    gt = gt_rows(("v", 902, A, 1), ("v", 902, A, 2))
    off, mm = both(gt, det_rows(("v", 902, A, 1, 0.9)))
    assert off.per_class == {1: 1.0, 2: 0.0, 20: off.per_class[20], 64: off.per_class[64]}
    assert nan(off.per_class[20]) and nan(off.per_class[64])  # no GT -> NaN
    assert off.mAP == 0.5
    assert mm.per_class[1] == 1.0 and nan(mm.per_class[2]) and mm.mAP == 1.0
    assert off.group_mAP["person_movement"] == 0.5 and nan(off.group_mAP["object_manipulation"])


def test_class_without_gt_is_nan_even_with_detections():
    off, mm = both(gt_rows(("v", 902, A, 1)), det_rows(("v", 902, A, 1, 0.9), ("v", 902, A, 2, 0.9)))
    for r in (off, mm):
        assert nan(r.per_class[2]) and r.num_det[2] == 1 and r.mAP == 1.0


# --- point 1: label map ------------------------------------------------------------------------------


def test_rows_outside_label_map_are_dropped_first():
    gt = gt_rows(("v", 902, A, 1), ("v", 902, B, 3))
    det = det_rows(("v", 902, B, 3, 0.99), ("v", 902, A, 1, 0.5))
    for r in both(gt, det):
        assert 3 not in r.per_class and r.per_class[1] == 1.0 and r.num_det[1] == 1


# --- point 2: exclusions -----------------------------------------------------------------------------


def test_excluded_keyframes():
    gt = gt_rows(("v", 902, A, 1), ("v", 903, A, 1), ("v", 903, B, 2))
    det = det_rows(("v", 902, A, 1, 0.9), ("v", 903, A, 1, 0.8), ("v", 903, B, 2, 0.7),
                   ("v", 903, C, 1, 0.95))  # a false positive on the excluded keyframe: ignored
    off, mm = both(gt, det, {("v", 903)})
    assert off.per_class[1] == 1.0 and off.num_gt[1] == 1 and off.num_det[1] == 1
    assert nan(off.per_class[2]) and off.num_gt[2] == 0  # only GT was excluded -> no GT
    # mmaction2 counts the excluded GT in the totals: 1 TP of 2 GT.
    assert mm.per_class[1] == 0.5 and mm.num_gt[1] == 2 and mm.num_gt[2] == 1
    assert nan(mm.per_class[2])  # its only detection was on the excluded keyframe: left out
    assert off.mAP == 1.0 and mm.mAP == 0.5


# --- point 3: top-50 per keyframe ----------------------------------------------------------------------


def _cap_case(tp_first: bool):
    gt = gt_rows(("v", 902, A, 1), ("w", 902, B, 2))
    fillers = [("v", 902, (0.5, 0.5, 0.6 + i / 1000, 0.6), 2, 0.9) for i in range(49)]
    fp, tp = ("v", 902, C, 2, 0.5), ("v", 902, A, 1, 0.5)  # tie exactly at the cut (ranks 50 and 51)
    return gt, det_rows(*fillers, *((tp, fp) if tp_first else (fp, tp)), ("w", 902, B, 2, 0.95))


def test_top50_cap_tie_at_cut_earlier_row_wins():
    off, mm = both(*_cap_case(tp_first=False))
    assert off.per_class[1] == 0.0 and off.num_det[1] == 0  # the TP was 51st: cut
    assert off.num_det[2] == 51  # 49 + the FP on v + the TP on w (cap is per keyframe)
    assert mm.per_class[1] == 1.0 and mm.num_det[1] == 1 and mm.num_det[2] == 51  # no cap
    off, _ = both(*_cap_case(tp_first=True))
    assert off.per_class[1] == 1.0 and off.num_det[1] == 1


def test_cap_counts_only_label_map_rows_and_comes_before_degenerate_drop():
    gt = gt_rows(("v", 902, A, 1))
    unmapped = [("v", 902, B, 3, 0.99)] * 60  # not in the label map: never counted
    degenerate = [("v", 902, (0.5, 0.5, 0.5, 0.9), 2, 0.9)] * 50  # fill the 50 slots, then dropped
    off, mm = both(gt, det_rows(*unmapped, ("v", 902, A, 1, 0.95), *degenerate, ("v", 902, A2, 1, 0.4)))
    assert off.per_class[1] == 1.0 and off.num_det[1] == 1 and off.num_det[2] == 0
    assert mm.num_det[1] == 2 and mm.num_det[2] == 50


# --- point 4: degenerate detection boxes ------------------------------------------------------------


def test_zero_area_detection_dropped_official_false_positive_mmaction2():
    gt = gt_rows(("v", 902, A, 1))
    det = det_rows(("v", 902, (0.1, 0.1, 0.1, 0.4), 1, 0.9), ("v", 902, A, 1, 0.5))
    off, mm = both(gt, det)
    assert off.per_class[1] == 1.0 and off.num_det[1] == 1
    assert mm.per_class[1] == 0.5 and mm.num_det[1] == 2  # FP ranked first: precision 1/2 at recall 1


def test_inverted_detection_dropped_official_clear_error_mmaction2():
    gt = gt_rows(("v", 902, A, 1))
    det = det_rows(("v", 902, A, 1, 0.5), ("v", 902, (0.4, 0.1, 0.1, 0.4), 1, 0.9))
    assert evaluate(gt, det).per_class[1] == 1.0
    with pytest.raises(ValueError, match=r"mmaction2.*detection box.*v,902.*det\.csv line 2.*official"):
        evaluate_frame_map(gt, det, LM, protocol="mmaction2")
    # mmaction2 never looks at keyframes without GT, so an inverted box there is harmless.
    det_elsewhere = det_rows(("v", 902, A, 1, 0.5), ("w", 902, (0.4, 0.1, 0.1, 0.4), 1, 0.9))
    assert evaluate(gt, det_elsewhere, protocol="mmaction2").per_class[1] == 1.0


# --- points 5 and 9: matching -------------------------------------------------------------------------


def test_no_fallback_to_second_best_gt():
    gt = gt_rows(("v", 902, (0.1, 0.1, 0.5, 0.5), 1), ("v", 902, (0.3, 0.1, 0.7, 0.5), 1))
    # d1 matches GT0 perfectly; d2 overlaps GT0 (IoU 0.67) more than GT1 (0.54): it takes GT0, which is
    # taken, and becomes a FP although GT1 is free.
    d2 = (0.18, 0.1, 0.58, 0.5)
    ious = pair_iou(np.array([d2, d2]), np.array([[0.1, 0.1, 0.5, 0.5], [0.3, 0.1, 0.7, 0.5]]))
    assert ious[0] > ious[1] >= 0.5
    det = det_rows(("v", 902, (0.1, 0.1, 0.5, 0.5), 1, 0.9), ("v", 902, d2, 1, 0.8))
    for r in both(gt, det):
        assert r.per_class[1] == 0.5  # TP, FP with 2 GT: 1/2 * 1


def test_equal_iou_goes_to_first_gt_row():
    g0, g1 = (0.125, 0.125, 0.5, 0.5), (0.375, 0.125, 0.75, 0.5)  # dyadic: IoUs are exact
    mid = (0.25, 0.125, 0.625, 0.5)
    assert pair_iou(np.array([mid, mid]), np.array([g0, g1])).tolist() == [0.5, 0.5]
    gt = gt_rows(("v", 902, g0, 1), ("v", 902, g1, 1))
    det = det_rows(("v", 902, g0, 1, 0.9), ("v", 902, mid, 1, 0.8))
    for r in both(gt, det):
        assert r.per_class[1] == 0.5  # mid takes GT0 (first row), already matched -> FP


def test_duplicated_gt_rows_count_twice():
    gt = gt_rows(("v", 902, A, 1), ("v", 902, A, 1))
    one = det_rows(("v", 902, A, 1, 0.9))
    two = det_rows(("v", 902, A, 1, 0.9), ("v", 902, A, 1, 0.8))
    for r in both(gt, one) + both(gt, two):
        assert r.num_gt[1] == 2 and r.per_class[1] == 0.5  # the second detection also picks GT0: FP


def test_duplicate_detection_is_false_positive_and_order_by_score():
    gt = gt_rows(("v", 902, A, 1), ("v", 902, B, 1))
    # The lower-scored duplicate comes first in the file: matching still goes by score.
    det = det_rows(("v", 902, A2, 1, 0.3), ("v", 902, A, 1, 0.9), ("v", 902, B, 1, 0.2))
    for r in both(gt, det):
        # ranks: A (TP), A2 (FP), B (TP): 1/2 * 1 + 1/2 * 2/3
        assert r.per_class[1] == pytest.approx(0.5 + 1 / 3)


def test_iou_float64_official_float32_mmaction2():
    # Found by search: float64 IoU is exactly 0.5, the float32 arithmetic gives 0.49999999.
    d, g = (0.433, 0.224, 0.841, 0.569), (0.509, 0.192, 0.815, 0.47)
    assert pair_iou(np.array([d]), np.array([g]))[0] >= 0.5 > pair_iou(np.array([d]), np.array([g]), float32=True)[0]
    off, mm = both(gt_rows(("v", 902, g, 1)), det_rows(("v", 902, d, 1, 0.9)))
    assert off.per_class[1] == 1.0 and mm.per_class[1] == 0.0
    d, g = (0.311, 0.144, 0.476, 0.662), (0.289, 0.145, 0.525, 0.475)  # the other way round
    off, mm = both(gt_rows(("v", 902, g, 1)), det_rows(("v", 902, d, 1, 0.9)))
    assert off.per_class[1] == 0.0 and mm.per_class[1] == 1.0


def test_score_ties_pool_in_file_order():
    gt = gt_rows(("v", 902, A, 1), ("w", 902, A, 1))
    fp_first = det_rows(("w", 902, B, 1, 0.5), ("v", 902, A, 1, 0.5))
    tp_first = det_rows(("v", 902, A, 1, 0.5), ("w", 902, B, 1, 0.5))
    for r in both(gt, fp_first):
        assert r.per_class[1] == 0.25  # FP, TP: precision 1/2 at recall 1/2
    for r in both(gt, tp_first):
        assert r.per_class[1] == 0.5


# --- point 6: keyframes without GT ------------------------------------------------------------------


def test_detections_on_keyframes_without_gt():
    gt = gt_rows(("v", 902, A, 1), ("x", 902, A, 3))  # x,902 has GT only for a class outside the map
    for extra in (("w", 902, A, 1, 0.9), ("x", 902, A, 1, 0.9)):
        off, mm = both(gt, det_rows(("v", 902, A, 1, 0.5), extra))
        assert off.per_class[1] == 0.5 and off.num_det[1] == 2  # FP ranked first
        assert mm.per_class[1] == 1.0 and mm.num_det[1] == 1  # ignored


def test_empty_inputs():
    for r in both(gt_rows(), det_rows()):
        assert nan(r.mAP) and all(nan(v) for v in r.per_class.values())
    off, mm = both(gt_rows(("v", 902, A, 1)), det_rows())
    assert off.mAP == 0.0 and nan(mm.mAP)


def test_unknown_protocol():
    with pytest.raises(ValueError, match="protocol"):
        evaluate_frame_map(gt_rows(), det_rows(), LM, protocol="voc")


# --- random cases: vectorised == reference ---------------------------------------------------------


def _random_case(seed: int, protocol: str):
    rng = np.random.default_rng(seed)
    classes = [1, 2, 5, 20, 40, 64, 70]
    label_map = {c: f"class {c}" for c in classes}
    keyframes = [(f"vid{rng.integers(3)}", int(902 + rng.integers(12))) for _ in range(25)]
    gt, det = [], []
    for v, t in keyframes:
        for _ in range(rng.integers(0, 4)):
            x1, y1 = rng.uniform(0, 0.6, 2)
            w, h = rng.uniform(0.05, 0.4, 2)
            box = tuple(np.round([x1, y1, x1 + w, y1 + h], 3))
            for a in rng.choice(classes + [3, 80], size=rng.integers(1, 3), replace=False):
                gt += [(v, t, box, int(a))] * (2 if rng.random() < 0.05 else 1)
    for v, t, box, a in gt:
        for _ in range(rng.integers(0, 6)):
            jitter = np.round(np.clip(np.array(box) + rng.normal(0, 0.04, 4), 0, 1), 3)
            jitter = np.r_[np.minimum(jitter[:2], jitter[2:]), np.maximum(jitter[:2], jitter[2:])]
            cls = a if rng.random() < 0.6 else int(rng.choice(classes))
            det.append((v, t, tuple(jitter), cls, round(float(rng.random()), 2)))  # 2 decimals: ties
    for _ in range(60):  # keyframes without GT, zero-area and (official only) inverted boxes
        v, t = f"vid{rng.integers(4)}", int(902 + rng.integers(14))
        x1, y1 = rng.uniform(0, 0.8, 2)
        dx = rng.choice([0.0, 0.1, -0.05 if protocol == "official" else 0.2])
        det.append((v, t, (x1, y1, x1 + dx, y1 + 0.1), int(rng.choice(classes)), round(float(rng.random()), 2)))
    if rng.random() < 0.5:  # one crowded keyframe so the 50-cap bites
        v, t = keyframes[0]
        det += [(v, t, (0.1, 0.1, 0.3 + i / 500, 0.3), int(rng.choice(classes)), round(float(rng.random()), 1))
                for i in range(70)]
    order = rng.permutation(len(det))
    det = [det[i] for i in order]
    excl = {keyframes[i] for i in rng.choice(len(keyframes), 3)} | {("nope", 902)}
    return gt_rows(*gt), det_rows(*det), excl, label_map


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("protocol", ["official", "mmaction2"])
def test_vectorised_matches_reference(seed, protocol):
    gt, det, excl, label_map = _random_case(seed, protocol)
    fast = evaluate_frame_map(gt, det, label_map, excl, protocol=protocol)
    _same(fast, evaluate_frame_map_reference(gt, det, label_map, excl, protocol=protocol))
    assert 0.0 <= fast.mAP <= 1.0 and sum(fast.num_det.values()) > 0


# --- hand-computed APs over several keyframes and classes (issue 22) ---------------------------------


def test_hand_computed_pooling_across_keyframes_and_classes():
    gt = gt_rows(("v", 902, A, 1), ("v", 902, B, 1), ("w", 903, C, 1),  # class 1: 3 GT on 2 keyframes
                 ("v", 902, B, 2),  # class 2: 1 GT
                 ("w", 903, C, 20))  # class 20: 1 GT, never detected
    det = det_rows(("v", 902, A, 1, 0.9),  # class 1 rank 1: TP (A)
                   ("w", 903, C, 1, 0.8),  # rank 2: TP (C, the other keyframe)
                   ("v", 902, C, 1, 0.7),  # rank 3: FP (C's box on v,902 overlaps neither A nor B)
                   ("v", 902, B, 1, 0.6),  # rank 4: TP (B)
                   ("v", 902, B, 2, 0.5))  # class 2: TP
    off = evaluate(gt, det)
    # class 1, ranks T T F T of 3 GT: precision 1, 1, 2/3, 3/4 at recall 1/3, 2/3, 2/3, 1; the envelope
    # lifts rank 3 to 3/4; AP = 1/3 * 1 + 1/3 * 1 + 1/3 * 3/4 = 11/12.
    assert off.per_class[1] == pytest.approx(11 / 12, abs=1e-15)
    assert off.per_class[2] == 1.0 and off.per_class[20] == 0.0 and nan(off.per_class[64])
    # mAP over the classes with GT: (11/12 + 1 + 0) / 3 = 23/36.
    assert off.mAP == pytest.approx(23 / 36, abs=1e-15)
    assert off.num_gt == {1: 3, 2: 1, 20: 1, 64: 0} and off.num_det == {1: 4, 2: 1, 20: 0, 64: 0}


def test_hand_computed_envelope_after_false_positives():
    gt = gt_rows(("v", 902, A, 1), ("v", 902, B, 1))
    det = det_rows(("x", 902, A, 1, 0.9),  # rank 1: FP (x,902 has no GT)
                   ("v", 902, A, 1, 0.8),  # rank 2: TP (A)
                   ("v", 902, A2, 1, 0.7),  # rank 3: FP (its best GT, A, is taken)
                   ("x", 902, B, 1, 0.6),  # rank 4: FP
                   ("v", 902, B, 1, 0.5))  # rank 5: TP (B)
    # precision 0, 1/2, 1/3, 1/4, 2/5 at recall 0, 1/2, 1/2, 1/2, 1; envelope 1/2, 1/2, 2/5, 2/5, 2/5;
    # AP = (1/2 - 0) * 1/2 + (1 - 1/2) * 2/5 = 1/4 + 1/5 = 9/20.
    off, mm = both(gt, det)
    assert off.per_class[1] == pytest.approx(9 / 20, abs=1e-15)
    # mmaction2 ignores keyframes without GT: ranks T F T, precision 1, 1/2, 2/3 -> 1/2 * 1 + 1/2 * 2/3.
    assert mm.per_class[1] == pytest.approx(1 / 2 + 1 / 3, abs=1e-15)


# The 60 classes evaluated in AVA v2.1 (ActivityNet Evaluation/ava/
# ava_action_list_v2.1_for_activitynet_2018.pbtxt.txt), written out here, not read from lfb_ray.
AVA_V21_60 = (1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 17, 20, 22, 24, 26, 27, 28, 29, 30, 34, 36, 37,
              38, 41, 43, 45, 46, 47, 48, 49, 51, 52, 54, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 66, 67, 68,
              69, 70, 72, 73, 74, 76, 77, 78, 79, 80)


def test_hand_computed_with_the_60_class_list():
    label_map = {c: f"c{c}" for c in AVA_V21_60}
    assert len(label_map) == 60 and 2 not in label_map and 16 not in label_map
    gt = gt_rows(("v", 902, A, 2), ("v", 902, A, 1), ("v", 902, B, 16), ("v", 902, B, 80))
    det = det_rows(("v", 902, A, 2, 0.99), ("v", 902, B, 16, 0.98),  # classes outside the 60: dropped
                   ("v", 902, A, 1, 0.5), ("v", 902, B, 80, 0.4), ("v", 902, A, 80, 0.3))
    off = evaluate(gt, det, label_map=label_map)
    # class 1: T -> 1; class 80: T, F (A's box does not overlap B) -> 1 (recall 1 reached at rank 1);
    # the 58 others have no GT: NaN. mAP = (1 + 1) / 2.
    assert len(off.per_class) == 60 and off.per_class[1] == 1.0 and off.per_class[80] == 1.0
    assert sum(not nan(v) for v in off.per_class.values()) == 2 and off.mAP == 1.0


# --- an independent implementation of the official evaluator, against ava_map on random cases -----------


def official_ava_frame_map(gt: list[tuple], det: list[tuple], class_ids: tuple[int, ...],
                           excluded: set[tuple[str, int]], difficult: set[int] = frozenset(),
                           capacity: int = 50, iou_threshold: float = 0.5) -> tuple[dict[int, float], float]:
    """ActivityNet `Evaluation/get_ava_performance.py` (the March 2019 version, with the excluded
    timestamps file) and its `ava/` PASCAL evaluator, re-written from that code for this test; shares
    nothing with lfb_ray.evaluation.

    Reading: rows of classes outside the label map are skipped first; a keyframe keeps its first
    `capacity` detections in a min-heap of (score, action, y1, x1, y2, x2) that a later row replaces
    only with a strictly higher score (GT: no cap, score 1); then sorted by descending score.
    Excluded keyframes' GT and detections are dropped. Per keyframe, detection boxes with y1 >= y2
    or x1 >= x2 are removed; per class, detections in that order each take the GT box of highest IoU
    (float64, no +1): a true positive if IoU >= 0.5, the box is not difficult and not yet taken; a
    detection whose best box is difficult is ignored. A keyframe without GT makes its detections
    false positives. Difficult GT does not count in a class's GT total (AVA marks none difficult:
    the official script passes all-False flags). Per class: pooled detections by descending score,
    cumulative precision/recall, VOC AP under the monotone precision envelope; 0 with GT and no
    detection, NaN without GT. mAP: NaN-mean over the classes.

    Args:
        gt: (video, second, (x1, y1, x2, y2), action) rows.
        det: (video, second, (x1, y1, x2, y2), action, score) rows.
        difficult: indices into `gt` of difficult boxes.

    Returns:
        ({class id: AP}, mAP).
    """
    whitelist = set(class_ids)

    def read(rows, cap, scored):
        """{keyframe: [(score, action, y1, x1, y2, x2, GT row index or -1)] by descending score}."""
        heaps = collections.defaultdict(list)
        for i, row in enumerate(rows):
            video, second, (x1, y1, x2, y2), action = row[:4]
            if action not in whitelist:
                continue
            score = row[4] if scored else 1.0
            entry = (score, action, y1, x1, y2, x2, -1 if scored else i)
            heap = heaps[(video, int(second))]
            if cap < 1 or len(heap) < cap:
                heapq.heappush(heap, entry)
            elif score > heap[0][0]:
                heapq.heapreplace(heap, entry)
        return {key: sorted(heap, key=lambda e: -e[0]) for key, heap in heaps.items()}

    def iou(d, g):  # boxes [N, 4] / [M, 4] as (y1, x1, y2, x2)
        ih = np.maximum(0.0, np.minimum(d[:, None, 2], g[None, :, 2]) - np.maximum(d[:, None, 0], g[None, :, 0]))
        iw = np.maximum(0.0, np.minimum(d[:, None, 3], g[None, :, 3]) - np.maximum(d[:, None, 1], g[None, :, 1]))
        inter = ih * iw
        area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
        return inter / (area(d)[:, None] + area(g)[None, :] - inter)

    gt_images = {k: v for k, v in read(gt, 0, scored=False).items() if k not in excluded}
    det_images = {k: v for k, v in read(det, capacity, scored=True).items() if k not in excluded}
    num_gt = collections.Counter(e[1] for entries in gt_images.values() for e in entries if e[6] not in difficult)
    pooled = collections.defaultdict(lambda: ([], []))  # class -> (scores, tp flags)
    for key, entries in det_images.items():
        entries = [e for e in entries if e[2] < e[4] and e[3] < e[5]]
        gts = gt_images.get(key, [])
        for c in sorted(whitelist):
            d = [e for e in entries if e[1] == c]
            if not d:
                continue
            g = [e for e in gts if e[1] == c]
            tp = np.zeros(len(d), bool)
            ignored = np.zeros(len(d), bool)
            if g:
                ious = iou(np.array([e[2:6] for e in d], float), np.array([e[2:6] for e in g], float))
                best = np.argmax(ious, axis=1)
                taken = np.zeros(len(g), bool)
                for i, j in enumerate(best):
                    if ious[i, j] >= iou_threshold:
                        if g[j][6] in difficult:
                            ignored[i] = True
                        elif not taken[j]:
                            tp[i] = taken[j] = True
            pooled[c][0].extend(e[0] for e, skip in zip(d, ignored) if not skip)
            pooled[c][1].extend(tp[~ignored].tolist())
    aps = {}
    for c in class_ids:
        if num_gt[c] == 0:
            aps[c] = float("nan")
            continue
        scores, flags = np.array(pooled[c][0], float), np.array(pooled[c][1], bool)
        if not len(scores):
            aps[c] = 0.0
            continue
        ranked = flags[np.argsort(scores)[::-1]].astype(int)
        ctp, cfp = np.cumsum(ranked), np.cumsum(1 - ranked)
        precision = np.concatenate([[0.0], ctp / (ctp + cfp), [0.0]])
        recall = np.concatenate([[0.0], ctp / num_gt[c], [1.0]])
        for i in range(len(precision) - 2, -1, -1):
            precision[i] = max(precision[i], precision[i + 1])
        steps = np.flatnonzero(recall[1:] != recall[:-1]) + 1
        aps[c] = float(np.sum((recall[steps] - recall[steps - 1]) * precision[steps]))
    finite = [v for v in aps.values() if not math.isnan(v)]
    return aps, (sum(finite) / len(finite) if finite else float("nan"))


def test_independent_official_rules_on_hand_cases():
    """The test's own implementation against the hand-computed answers above, incl. difficult GT."""
    gt = [("v", 902, A, 1), ("v", 902, B, 1), ("w", 903, C, 1), ("v", 902, B, 2), ("w", 903, C, 20)]
    det = [("v", 902, A, 1, 0.9), ("w", 903, C, 1, 0.8), ("v", 902, C, 1, 0.7), ("v", 902, B, 1, 0.6),
           ("v", 902, B, 2, 0.5)]
    aps, m = official_ava_frame_map(gt, det, tuple(LM), set())
    assert aps[1] == pytest.approx(11 / 12, abs=1e-15) and aps[2] == 1.0 and aps[20] == 0.0 and nan(aps[64])
    assert m == pytest.approx(23 / 36, abs=1e-15)
    # GT row 1 (B, class 1) difficult: 2 GT left; its detection (rank 4) is ignored -> T T F: 1/2 + 1/2.
    aps, _ = official_ava_frame_map(gt, det, tuple(LM), set(), difficult={1})
    assert aps[1] == 1.0
    # (w, 903) excluded: class 1 has 2 GT on v,902: T F T -> 1/2 * 1 + 1/2 * 2/3; class 20 has no GT.
    aps, _ = official_ava_frame_map(gt, det, tuple(LM), {("w", 903)})
    assert aps[1] == pytest.approx(1 / 2 + 1 / 3, abs=1e-15) and nan(aps[20])


def _official_random_case(seed: int):
    """AVA-like rows with distinct scores (the official evaluator leaves tie order undefined): the
    60-class list with rows of all 80 ids, duplicated GT, detections on keyframes without GT, zero-area
    and inverted boxes, excluded keyframes, and crowded keyframes where the 50-cap bites."""
    rng = np.random.default_rng(1000 + seed)
    keyframes = sorted({(f"vid{rng.integers(4)}", int(902 + rng.integers(10))) for _ in range(30)})
    gt, det = [], []
    for v, t in keyframes:
        for _ in range(rng.integers(0, 4)):
            x1, y1 = rng.uniform(0, 0.7, 2)
            box = (x1, y1, x1 + rng.uniform(0.05, 0.3), y1 + rng.uniform(0.05, 0.3))
            for a in rng.choice(np.arange(1, 81), size=rng.integers(1, 4), replace=False):
                gt += [(v, t, box, int(a))] * (2 if rng.random() < 0.05 else 1)
    frequent = rng.choice(AVA_V21_60, size=12, replace=False)  # most detections in a few classes
    for v, t, box, a in gt:
        for _ in range(rng.integers(0, 5)):
            j = np.clip(np.array(box) + rng.normal(0, 0.03, 4), 0, 1)
            cls = a if rng.random() < 0.7 else int(rng.choice(frequent))
            det.append((v, t, (min(j[0], j[2]), min(j[1], j[3]), max(j[0], j[2]), max(j[1], j[3])), cls))
    for _ in range(40):  # elsewhere, some on keyframes without GT; some zero-area or inverted
        v, t = f"vid{rng.integers(5)}", int(902 + rng.integers(12))
        x1, y1 = rng.uniform(0, 0.8, 2)
        w = float(rng.choice([0.0, -0.05, 0.1, 0.15]))
        det.append((v, t, (x1, y1, x1 + w, y1 + 0.1), int(rng.choice(frequent))))
    filler = np.zeros(len(det), bool)
    for v, t in [keyframes[i] for i in rng.choice(len(keyframes), 3, replace=False)]:  # crowded
        for _ in range(int(rng.integers(40, 70))):
            x1, y1 = rng.uniform(0, 0.6, 2)
            det.append((v, t, (x1, y1, x1 + 0.3, y1 + 0.3), int(rng.choice(frequent))))
        filler = np.r_[filler, np.ones(len(det) - len(filler), bool)]
    # Distinct scores (integers, and x.25 for the crowded keyframes' fillers); the fillers rank high,
    # so the 50-cap cuts the detections of those keyframes' actual persons.
    n = len(det)
    scores = (rng.permutation(n) + np.where(filler, 0.5 * n + 0.25, 0.0)) / (1.5 * n + 1)
    det = [(*d, float(s)) for d, s in zip(det, scores)]
    det = [det[i] for i in rng.permutation(len(det))]
    excluded = {keyframes[i] for i in rng.choice(len(keyframes), 3, replace=False)} | {("vid9", 902)}
    return gt, det, excluded


@pytest.mark.parametrize("seed", range(25))
def test_vectorised_matches_an_independent_official_implementation(seed):
    gt, det, excluded = _official_random_case(seed)
    label_map = {c: f"class {c}" for c in AVA_V21_60}
    want, want_map = official_ava_frame_map(gt, det, AVA_V21_60, excluded)
    got = evaluate_frame_map(gt_rows(*gt), det_rows(*det), label_map, excluded, protocol="official")
    assert list(got.per_class) == sorted(AVA_V21_60)
    for c in AVA_V21_60:
        assert (nan(want[c]) and nan(got.per_class[c])) or abs(want[c] - got.per_class[c]) <= 1e-12, (c, want[c])
    assert abs(got.mAP - want_map) <= 1e-12
    assert sum(not nan(v) for v in want.values()) >= 5 and 0.0 < want_map < 1.0  # a case with something in it
