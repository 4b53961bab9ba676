"""Benchmark of the feature bank: batched `FeatureBank.sample` vs the mmaction2 0.x per-RoI loop, and
the memory of N processes sharing one memory-mapped bank vs each loading its own copy (`device='cpu'`).

Builds a synthetic bank (random fp16 features) in a temporary folder. Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from lfb_ray.bank import FeatureBank, write_bank
from lfb_ray.bank.format import FEATURES_FILE
from lfb_ray.bank.interop import _to_mmaction2

__all__ = ["build_synthetic_bank", "main", "reference_sample"]

FIRST_SECOND = 902  # AVA keyframes run 902..1798
MEMORY_MODES = {"mmap": "FeatureBank.open (shared mmap)", "copy": "private copy per process    "}


def build_synthetic_bank(path: str | Path, *, num_videos: int, seconds_per_video: int, persons_mean: float,
                         dim: int, seed: int = 0) -> int:
    """Write a bank with Poisson(persons_mean) persons per second (0 = a missing second); returns N."""
    rng = np.random.default_rng(seed)
    per_second = rng.poisson(persons_mean, size=(num_videos, seconds_per_video)).clip(0, 12)
    counts = per_second.ravel()
    n = int(counts.sum())
    video = np.repeat(np.repeat(np.arange(num_videos), seconds_per_video), counts)
    second = np.repeat(np.tile(np.arange(seconds_per_video) + FIRST_SECOND, num_videos), counts)
    person = np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts)
    features = np.empty((n, dim), np.float16)
    for lo in range(0, n, 1 << 16):  # in chunks: no fp32 copy of the whole bank
        hi = min(n, lo + (1 << 16))
        features[lo:hi] = rng.standard_normal((hi - lo, dim), dtype=np.float32)
    write_bank(path, video_ids=np.char.add("video_", video.astype(str)), seconds=second, person_index=person,
               boxes=np.zeros((n, 4), np.float32), scores=np.ones(n, np.float32), features=features)
    return n


def reference_sample(lfb: dict, video_id: str, second: int, window_seconds: int, k: int, dim: int) -> torch.Tensor:
    """mmaction2 0.x `LFB.sample_long_term_features`, verbatim in logic: [W*K, C] for one RoI."""
    video_features = lfb[video_id]
    start = second - window_seconds // 2
    lt_feats = torch.zeros(window_seconds * k, dim)
    for idx, sec in enumerate(range(start, start + window_seconds)):
        if sec in video_features:
            num_feat = len(video_features[sec])
            num_feat_sampled = min(num_feat, k)
            random_lfb_indices = np.random.choice(range(num_feat), num_feat_sampled, replace=False)
            for j, rand_idx in enumerate(random_lfb_indices):
                lt_feats[idx * k + j] = video_features[sec][rand_idx]
    return lt_feats


def _bench_sampling(bank_dir: Path, args: argparse.Namespace) -> None:
    bank = FeatureBank.open(bank_dir)
    lfb = _to_mmaction2(bank)  # the reference's in-memory {video: {second: [fp16 tensor]}} dict
    rng = np.random.default_rng(1)
    W, K, C = args.window_seconds, args.max_feats_per_second, bank.feature_dim
    queries = [(list(rng.choice(bank.videos, args.rois)),
                rng.integers(FIRST_SECOND, FIRST_SECOND + args.seconds, args.rois)) for _ in range(args.batches)]
    total_rois = args.rois * args.batches

    np.random.seed(0)
    out = torch.empty(args.rois, W * K, C)
    methods = {
        "mmaction2 0.x per-RoI loop": lambda v, s: torch.stack(
            [reference_sample(lfb, vid, int(sec), W, K, C) for vid, sec in zip(v, s, strict=True)]),
        "FeatureBank.sample": lambda v, s: bank.sample(v, s, rng, window_seconds=W, max_feats_per_second=K),
        "FeatureBank.sample(out=)": lambda v, s: bank.sample(v, s, rng, window_seconds=W,
                                                             max_feats_per_second=K, out=out),
        # not a sampler: writing the [R, W*K, C] fp32 output once, the floor of any sampler
        "floor: out.zero_()": lambda v, s: out.zero_(),
    }
    for fn in methods.values():
        fn(*queries[0])  # warm-up
    # Interleaved per batch, wall and process CPU time: CPU time is robust to other load on the host.
    wall, cpu = dict.fromkeys(methods, 0.0), dict.fromkeys(methods, 0.0)
    for vids, secs in queries:
        for name, fn in methods.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn(vids, secs)
            wall[name] += time.perf_counter() - w0
            cpu[name] += time.process_time() - c0
    ref = next(iter(methods))
    print(f"[sample] {args.batches} batches x {args.rois} RoIs, W={W} K={K} C={C}, torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for name in methods:
        print(f"  {name:27s}: wall {1e3 * wall[name] / total_rois:7.3f} ms/RoI (x{wall[ref] / wall[name]:5.1f}), "
              f"cpu {1e3 * cpu[name] / total_rois:7.3f} ms/RoI (x{cpu[ref] / cpu[name]:5.1f})")


def _memory_kib() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0])
    return fields


def _load_and_touch(mode: str, path: str) -> tuple[object, float]:
    """Open a bank the given way and read every feature; returns (what must stay alive, checksum)."""
    if mode == "mmap":
        bank = FeatureBank.open(path)
        return bank, sum(float(c.sum(dtype=np.float32)) for c in bank._chunks)
    # A private in-memory copy per process, as mmaction2's device='cpu' (no memory map).
    table = pa.ipc.open_file(pa.OSFile(str(Path(path) / FEATURES_FILE))).read_all()
    chunks = [c.flatten().to_numpy() for c in table.column("feature").chunks]
    return table, sum(float(c.sum(dtype=np.float32)) for c in chunks)


def _memory_worker(path: str, warmup_path: str, barrier, queue) -> None:
    for mode in MEMORY_MODES:
        _load_and_touch(mode, warmup_path)  # imports and lazy initialisation out of the measurement
        gc.collect()
        before = _memory_kib()
        t0 = time.perf_counter()
        keep, total = _load_and_touch(mode, path)
        seconds = time.perf_counter() - t0
        barrier.wait()  # every worker holds its bank now: shared pages are split between them in Pss
        after = _memory_kib()
        queue.put((mode, {k: after[k] - before.get(k, 0) for k in after} | {"load_s": seconds, "sum": total}))
        barrier.wait()
        del keep


def _bench_memory(path: Path, warmup_path: Path, workers: int, feature_bytes: int) -> None:
    """Spawn `workers` processes that load the bank each way in turn; print their total growth."""
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_memory_worker, args=(str(path), str(warmup_path), barrier, queue))
             for _ in range(workers)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=600) for _ in range(workers * len(MEMORY_MODES))]
    for p in procs:
        p.join()
    gib = 1024**3
    for mode, label in MEMORY_MODES.items():
        stats = [r for m, r in results if m == mode]
        pss = sum(s["Pss"] for s in stats) * 1024
        private = sum(s["Private_Clean"] + s["Private_Dirty"] for s in stats) * 1024
        rss = sum(s["Rss"] for s in stats) * 1024
        print(f"  {label}: Pss {pss / gib:6.2f} GiB ({pss / feature_bytes:4.2f}x bank), private "
              f"{private / gib:6.2f} GiB, Rss {rss / gib:6.2f} GiB; load+touch "
              f"{np.mean([s['load_s'] for s in stats]):.2f} s/proc")


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """Run both benchmarks; `--quick` is a < 30 s smoke size, the default about a minute on 2 cores.

    The command line of `python jobs/benchmark.py bank-read [--quick] ...`."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (< 30 s)")
    parser.add_argument("--videos", type=int)
    parser.add_argument("--seconds", type=int)
    parser.add_argument("--persons", type=float, default=3.0, help="mean persons per second")
    parser.add_argument("--dim", type=int)
    parser.add_argument("--rois", type=int, default=64, help="RoIs per sampled batch")
    parser.add_argument("--batches", type=int)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--window-seconds", type=int, default=60)
    parser.add_argument("--max-feats-per-second", type=int, default=5)
    parser.add_argument("--workdir", default=None, help="where to build the bank (default: a temp dir)")
    args = parser.parse_args(argv)
    size = (20, 300, 1024, 2) if args.quick else (100, 900, 2048, 10)
    args.videos = args.videos or size[0]
    args.seconds = args.seconds or size[1]
    args.dim = args.dim or size[2]
    args.batches = args.batches or size[3]

    est_bytes = args.videos * args.seconds * args.persons * args.dim * 2
    avail = next(int(x.split()[1]) * 1024 for x in Path("/proc/meminfo").read_text().splitlines()
                 if x.startswith("MemAvailable"))
    if est_bytes * (args.workers + 4) > 0.8 * avail:  # N private copies + build/dict overheads
        scale = 0.8 * avail / (est_bytes * (args.workers + 4))
        args.videos = max(1, int(args.videos * scale))
        print(f"scaled down to {args.videos} videos to fit {avail / 1024**3:.1f} GiB available memory")

    if args.workdir:  # a missing --workdir is created, not a traceback
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_bank_", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        n = build_synthetic_bank(work / "bank", num_videos=args.videos, seconds_per_video=args.seconds,
                                 persons_mean=args.persons, dim=args.dim)
        build_synthetic_bank(work / "tiny", num_videos=1, seconds_per_video=2, persons_mean=2, dim=8)
        feature_bytes = n * args.dim * 2
        print(f"bank: {args.videos} videos x {args.seconds} s x ~{args.persons} persons, C={args.dim}: "
              f"{n} features, {feature_bytes / 1024**3:.2f} GiB fp16, built in "
              f"{time.perf_counter() - t0:.1f} s")
        _bench_sampling(work / "bank", args)
        print(f"[memory] growth summed over {args.workers} spawned processes that each open the bank "
              "and sum every feature")
        _bench_memory(work / "bank", work / "tiny", args.workers, feature_bytes)
        print(f"total {time.perf_counter() - t0:.1f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
