"""Benchmark of the feature bank's cost on the critical path of one LFB training iteration (issue 33).

At the AVA configs' shape (12 clips per GPU, 5 RoIs a clip: R=60 RoIs; W=60 s, K=5, C=2048) each
iteration needs an [R, 300, 2048] float32 window (~147 MB). Before: the loop called
`FeatureBank.sample` without a reused buffer and copied the result to the device synchronously.
After (`lfb_ray.bank.window.WindowSampler`): the host computes only the int32 rows of the window
(`FeatureBank.window_rows`) and the features are gathered where they live: on the GPU (the bank
held there in fp16) or, on the host path, from the memory-mapped bank into a reused buffer.

Each row is the time per iteration the training loop's thread spends on the window, wall and CPU,
as a share of the H100 LFB step (BENCHMARKS.md, section `gpu`). On a GPU the device rows are
measured too (skipped with a line when there is no CUDA). A synthetic bank of AVA v2.1's size is
built in a temporary folder. Prints numbers; asserts only that every path gives the same window.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bank import FIRST_SECOND, build_synthetic_bank
from benchmarks.table import format_table, machine_line, ratio
from lfb_ray.bank import FeatureBank
from lfb_ray.bank.window import DeviceFeatures, WindowSampler

__all__ = ["H100_STEP_MS", "run"]

# One SGD step of the LFB-NL detector, 12 clips, bf16 + channels-last-3d, inputs already on the device:
# BENCHMARKS.md, section `gpu` (H100 80GB HBM3, commit 9545e6f).
H100_STEP_MS = 39.309
CLIPS, ROIS_PER_CLIP, W, K = 12, 5, 60, 5


def _queries(bank: FeatureBank, seconds: int, n: int, seed: int = 0) -> list[tuple[list[str], np.ndarray]]:
    """`n` batches of 12 keyframes x 5 RoIs (RoIs of a keyframe share its video and second)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        vids = rng.choice(bank.videos, CLIPS)
        secs = rng.integers(FIRST_SECOND, FIRST_SECOND + seconds, CLIPS)
        out.append(([str(v) for v in np.repeat(vids, ROIS_PER_CLIP)], np.repeat(secs, ROIS_PER_CLIP)))
    return out


def _time(fn, queries, sync=None) -> tuple[float, float, float]:
    """(wall ms, CPU ms, wall ms until the device finished) per iteration, after one warm-up call."""
    fn(*queries[0])
    if sync:
        sync()
    wall = cpu = done = 0.0
    for vids, secs in queries:
        w0, c0 = time.perf_counter(), time.process_time()
        fn(vids, secs)
        wall += time.perf_counter() - w0
        cpu += time.process_time() - c0
        if sync:
            sync()
        done += time.perf_counter() - w0
    n = len(queries)
    return 1e3 * wall / n, 1e3 * cpu / n, 1e3 * done / n


def _rows(bank: FeatureBank, queries, device: str) -> list[list]:
    """The measured table rows for `device` ("cpu" or "cuda"), after checking every path's window."""
    rng = np.random.default_rng(1)
    sample = lambda v, s: bank.sample(v, s, rng, window_seconds=W, max_feats_per_second=K)  # noqa: E731
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else None
    methods = {
        "before: sample() + copy, as the recipe called it": lambda v, s: sample(v, s).to(device),
        "window_rows only (the host's part when gathered on the device)":
            lambda v, s: bank.window_rows(v, s, rng, window_seconds=W, max_feats_per_second=K),
    }
    host = WindowSampler(bank, device, window_seconds=W, max_feats_per_second=K, mode="cpu")
    methods[f"after, host path: rows + gather into a reused{' pinned' if cuda else ''} buffer"
            + (" + async copy" if cuda else "")] = lambda v, s: host(v, s, rng)
    if cuda:
        dev = WindowSampler(bank, device, window_seconds=W, max_feats_per_second=K, mode="cuda")
        methods["after, device path: rows + index upload + gather on the GPU"] = lambda v, s: dev(v, s, rng)
    else:  # the device path's code on a CPU torch tensor: not what a CPU run uses (bank.device=auto)
        dev = WindowSampler(bank, device, window_seconds=W, max_feats_per_second=K, mode="cpu")
        dev.on_device = DeviceFeatures(bank, "cpu")
        methods["(device path's index_select on a CPU torch copy of the bank)"] = lambda v, s: dev(v, s, rng)
    # Every path gives the same window for the same generator state.
    windows = []
    for name, fn in methods.items():
        if not name.startswith("window_rows"):
            rng = np.random.default_rng(7)
            windows.append(fn(*queries[0]).cpu().clone())
    if not all(torch.equal(w, windows[0]) for w in windows[1:]):
        raise AssertionError(f"{device}: the paths give different windows")
    timed = {name: _time(fn, queries, sync) for name, fn in methods.items()}
    before_wall, before_cpu, _ = timed[next(iter(timed))]
    rows = []
    for name, (wall, cpu, done) in timed.items():
        rows.append([name, device, wall, cpu, done if cuda else float("nan"), ratio(before_wall, wall),
                     ratio(before_cpu, cpu), f"{100 * wall / H100_STEP_MS:.0f}%"])
    return rows


def run(quick: bool = False, workdir: str | None = None) -> None:
    """Build the bank, time every path on the CPU, then on the GPU if there is one; print the table."""
    videos, seconds, dim, iters = (6, 120, 256, 3) if quick else (60, 900, 2048, 20)
    print(machine_line())
    if workdir:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_bankstep_", dir=workdir))
    try:
        t0 = time.perf_counter()
        n = build_synthetic_bank(work / "bank", num_videos=videos, seconds_per_video=seconds, persons_mean=3.0,
                                 dim=dim)
        bank = FeatureBank.open(work / "bank")
        print(f"bank: {videos} videos x {seconds} s x ~3 persons, C={dim}: {n} features, "
              f"{n * dim * 2 / 2**30:.2f} GiB fp16, built in {time.perf_counter() - t0:.1f} s")
        queries = _queries(bank, seconds, iters)
        for vids, secs in queries:  # page the sampled rows in: steady state, not first-touch faults
            bank.sample(vids, secs, np.random.default_rng(0), window_seconds=W, max_feats_per_second=K)
        rows = _rows(bank, queries, "cpu")
        notes = [f"{iters} iterations of {CLIPS} keyframes x {ROIS_PER_CLIP} RoIs = {CLIPS * ROIS_PER_CLIP} RoIs, "
                 f"W={W} K={K} C={dim}: a [{CLIPS * ROIS_PER_CLIP}, {W * K}, {dim}] float32 window; torch threads "
                 f"{torch.get_num_threads()}",
                 "wall/CPU ms: the training loop's thread per iteration (its critical path); done ms: until the "
                 "device has the window (cuda rows)",
                 f"of H100 step: wall / {H100_STEP_MS} ms (LFB-NL, 12 clips, bf16, BENCHMARKS.md section gpu)"]
        if torch.cuda.is_available():
            rows += _rows(bank, queries, "cuda")
        else:
            notes.append("no CUDA here: the cuda rows (device path, pinned host path) are skipped")
        print(format_table("[bank-step] the bank's cost on the critical path of one LFB iteration",
                           ["path", "device", "wall ms", "CPU ms", "done ms", "vs before", "CPU vs before",
                            "of H100 step"],
                           rows, notes))
    finally:
        shutil.rmtree(work, ignore_errors=True)
