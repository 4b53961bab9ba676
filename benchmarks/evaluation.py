"""Benchmark of frame-mAP: vectorised `evaluate_frame_map` vs the per-class loop reference.

The case is generated in memory at AVA scale (default ~60 evaluated classes out of 80 ids, ~50k
GT rows, ~1M detection rows; `--quick` is 10x smaller). Both protocols are timed; identical
results are asserted as a correctness check, timings never are.
"""

from __future__ import annotations

import os

import numpy as np

from benchmarks.table import Measure, format_table, machine_line, ratio
from lfb_ray.data.annotations import AnnotationRows, ResultRows

__all__ = ["make_case", "run"]

SIZES = {"quick": 800, "default": 8000}  # keyframes
ACTION_IDS = 80  # ids 1..80 appear in the rows; 60 of them are in the label map (as AVA v2.x)
EVALUATED = 60


def _jitter(boxes: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    out = np.clip(boxes + rng.normal(0, sigma, boxes.shape), 0, 1)
    out[:, 2:] = np.maximum(out[:, 2:], out[:, :2])  # never inverted (mmaction2 rejects those)
    return out


def make_case(num_keyframes: int, seed: int = 0):
    """An AVA-like GT / detection pair.

    Per keyframe 1 + Poisson(1.1) persons with 1 + Poisson(2) actions each (Zipf-like class
    frequencies); detections are the persons' boxes jittered plus Poisson(0.3) spurious boxes,
    each scored for 52 of the 80 action ids (always including its true ones, scored higher).
    About 1% of keyframes are excluded and 0.1% of detection boxes are zero-area.

    Returns:
        (gt AnnotationRows [~6.2 * K], detections ResultRows [~125 * K], label_map, exclusions).
    """
    rng = np.random.default_rng(seed)
    k = num_keyframes
    videos = np.array([f"vid{i:04d}" for i in range(max(1, k // 250))])
    kf_video = videos[np.arange(k) % len(videos)]
    kf_second = 902 + np.arange(k) // len(videos)
    persons = 1 + rng.poisson(1.1, k)
    p_kf = np.repeat(np.arange(k), persons)
    xy = rng.uniform(0, 0.7, (len(p_kf), 2))
    p_box = np.concatenate([xy, xy + rng.uniform(0.1, 0.3, (len(p_kf), 2))], 1)
    freq = 1.0 / np.arange(1, ACTION_IDS + 1) ** 0.8
    freq = rng.permutation(freq / freq.sum())
    n_act = 1 + rng.poisson(2.0, len(p_kf))
    g_person = np.repeat(np.arange(len(p_kf)), n_act)
    g_action = rng.choice(ACTION_IDS, len(g_person), p=freq) + 1
    gt = AnnotationRows(video_ids=kf_video[p_kf[g_person]], timestamps=kf_second[p_kf[g_person]],
                        boxes=p_box[g_person], action_ids=g_action.astype(np.int64),
                        person_ids=g_person.astype(np.int64), line_numbers=np.arange(1, len(g_person) + 1))

    # Detection boxes: each person (jittered) plus spurious ones.
    extra = rng.poisson(0.3, k)
    e_kf = np.repeat(np.arange(k), extra)
    exy = rng.uniform(0, 0.7, (len(e_kf), 2))
    d_kf = np.concatenate([p_kf, e_kf])
    d_box = np.concatenate([_jitter(p_box, rng, 0.04), np.concatenate([exy, exy + 0.2], 1)])
    per_box = 52
    true = np.zeros((len(d_kf), ACTION_IDS), bool)  # detection box i < len(p_kf) is person i
    true[g_person, g_action - 1] = True
    key = rng.random((len(d_kf), ACTION_IDS))
    key[true] = -1.0  # a box's true actions are always among its scored ones
    cls = np.argsort(key, axis=1)[:, :per_box]  # [D, 52] 0-based action index
    row_true = np.take_along_axis(true, cls, axis=1)
    scores = rng.beta(1, 6, cls.shape)
    scores[row_true] = rng.beta(4, 2, int(row_true.sum()))
    b = d_box.repeat(per_box, axis=0)
    degenerate = rng.random(len(b)) < 0.001
    b[degenerate, 2] = b[degenerate, 0]  # zero width: the official protocol drops these
    det_kf = d_kf.repeat(per_box)
    det = ResultRows(video_ids=kf_video[det_kf], timestamps=kf_second[det_kf], boxes=b,
                     action_ids=(cls.ravel() + 1).astype(np.int64), scores=np.round(scores.ravel(), 4))
    label_ids = np.sort(rng.choice(ACTION_IDS, EVALUATED, replace=False) + 1)
    label_map = {int(i): f"action {i}" for i in label_ids}
    ex = rng.choice(k, max(1, k // 100), replace=False)
    exclusions = {(str(kf_video[i]), int(kf_second[i])) for i in ex}
    return gt, det, label_map, exclusions


def _same(a, b) -> float:
    """Largest |difference| of mAP and per-class AP (NaN where both are NaN counts as equal)."""
    va = np.array([a.mAP, *a.per_class.values()])
    vb = np.array([b.mAP, *b.per_class.values()])
    if list(a.per_class) != list(b.per_class) or not np.array_equal(np.isnan(va), np.isnan(vb)):
        return float("inf")
    ok = ~np.isnan(va)
    return float(np.max(np.abs(va[ok] - vb[ok]), initial=0.0))


def run(*, quick: bool = False, repeats: int = 3) -> str:
    """Run the evaluation benchmark; prints and returns its table.

    Raises:
        AssertionError: the vectorised and reference results differ (more than 1e-12).
    """
    from lfb_ray.evaluation.ava_map import evaluate_frame_map
    from lfb_ray.evaluation.reference import evaluate_frame_map_reference

    print(machine_line(), flush=True)
    load0 = os.getloadavg()[0]
    with Measure() as gen:
        gt, det, label_map, exclusions = make_case(SIZES["quick" if quick else "default"])
    rows, notes = [], []
    for protocol in ("official", "mmaction2"):
        fast = []
        for _ in range(repeats):  # best of a few: the fast path is short enough to be noisy
            with Measure() as m:
                res = evaluate_frame_map(gt, det, label_map, exclusions, protocol=protocol)
            fast.append(m)
        with Measure() as ref_m:
            ref = evaluate_frame_map_reference(gt, det, label_map, exclusions, protocol=protocol)
        diff = _same(res, ref)
        assert diff <= 1e-12, f"{protocol}: vectorised and reference frame-mAP differ by {diff}"
        best_wall = min(m.wall_s for m in fast)
        best_cpu = min(m.cpu_s for m in fast)
        rows.append([f"{protocol}: reference (per-class loops)", ref_m.wall_s, ref_m.cpu_s, "x1.00", "x1.00",
                     f"{ref.mAP:.6f}"])
        rows.append([f"{protocol}: evaluate_frame_map (best of {repeats})", best_wall, best_cpu,
                     ratio(ref_m.wall_s, best_wall), ratio(ref_m.cpu_s, best_cpu), f"{res.mAP:.6f}"])
        notes.append(f"{protocol}: max |AP difference| {diff:.1e}; speed-up wall "
                     f"{ratio(ref_m.wall_s, best_wall)}, CPU {ratio(ref_m.cpu_s, best_cpu)} (target >= x10)")
    notes.append(f"case built in {gen.wall_s:.1f} s; load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} "
                 "at end; one thread (numpy)")
    table = format_table(
        f"[eval] frame-mAP@0.5: {len(gt)} GT rows, {len(det)} detection rows, {len(label_map)} evaluated classes, "
        f"{len(set(zip(gt.video_ids.tolist(), gt.timestamps.tolist())))} GT keyframes, {len(exclusions)} excluded",
        ["implementation", "wall s", "CPU s", "wall speed-up", "CPU speed-up", "mAP"], rows, notes)
    print(table, flush=True)
    return table
