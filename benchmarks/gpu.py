"""GPU benchmark: SlowOnly-R50 training clips/s and bank-build keyframes/s (issue #10's GPU targets).

    python jobs/benchmark.py gpu --prepared DIR   # a CUDA machine; DIR = a prepared folder (no Ray needed)
    python jobs/benchmark.py gpu --quick          # CPU smoke test: tiny model, tiny prepared set (Ray)

Training: one whole SGD step (forward, loss, backward, optimiser step: the training loop's
optimiser) of a fresh SlowOnly-R50 detector on clips [B, 3, 4, 256, 256] with 4 RoIs per clip
(and a [R, 300, 2048] fp16 bank for LFB-NL), fp32 vs bf16 autocast vs bf16 + channels-last-3d,
at several batch sizes; ratios are to the fp32 row at the same batch size. Target (issue #10):
>= 250 clips/s on one H100.

Bank build: `BankExtractor` (the bank actor's class, called in this process) over every part of the
prepared folder with a random-weight R50 baseline, one keyframe per forward pass vs
`bank.batch_size`, plus the same path with the network replaced by zeros (JPEG decode + test
transform alone: the CPU ceiling of one actor). Keyframes/s include reading the Parquet part.
Nothing is asserted about timings.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks.table import format_table, machine_line, ratio, shown

__all__ = ["run"]

# (fbo, clips per step, bf16 autocast, channels-last-3d); the first row of each batch size is its baseline
TRAIN_CASES = [("none", 12, False, False), ("none", 12, True, False), ("none", 12, True, True),
               ("none", 32, False, False), ("none", 32, True, True), ("none", 64, True, True),
               ("nl", 12, False, False), ("nl", 12, True, True), ("nl", 32, True, True)]
QUICK_TRAIN_CASES = [("none", 2, False, False), ("nl", 2, False, False)]
BANK_BATCH = 16
REPEATS = 8  # each prepared part extracted this many times in the timed pass


def _train_rows(device: str, quick: bool) -> tuple[list[list], float]:
    import torch

    from benchmarks.model import BenchSize, time_train_step

    cases = QUICK_TRAIN_CASES if quick else TRAIN_CASES
    if device == "cpu":  # fp32 only: autocast/channels-last rows are GPU rows
        cases = [c for c in cases if not c[2] and not c[3]]
    arch = dict(depth=18, base_channels=16) if quick else dict(depth=50, base_channels=64)
    rows, base, best = [], {}, 0.0
    for fbo, batch, bf16, cl in cases:
        size = (BenchSize(clips=batch, crop_pixels=64, rois_per_clip=2, bank_slots=60, warmup_iters=1, iters=2)
                if quick else BenchSize(clips=batch, rois_per_clip=4, bank_slots=300, warmup_iters=3, iters=10))
        mode = "bf16 + channels-last-3d" if bf16 and cl else ("bf16 autocast" if bf16 else "fp32")
        try:
            r = time_train_step(device=device, size=size, fbo=fbo, bf16=bf16, channels_last=cl, **arch)
        except torch.OutOfMemoryError:
            rows.append([fbo, batch, mode, "OOM", "-", "-", "-"])
            torch.cuda.empty_cache()
            continue
        if not bf16 and not cl:
            base[(fbo, batch)] = r.clips_per_second
        best = max(best, r.clips_per_second) if fbo == "none" else best
        peak = f"{r.peak_memory_mib / 1024:.1f}" if r.peak_memory_mib is not None else "-"
        rows.append([fbo, batch, mode, r.clips_per_second, r.seconds_per_iter * 1000,
                     ratio(r.clips_per_second, base.get((fbo, batch), 0.0)), peak])
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows, best


def _decode_only(extractor_cls):
    """`BankExtractor` with `_features` replaced by zeros: what the actor's CPU side alone sustains."""

    class DecodeOnlyExtractor(extractor_cls):
        def _features(self, clips, boxes):
            return [np.zeros((len(b), self.model.feature_channels), np.float16) for b in boxes]

    return DecodeOnlyExtractor


def _bank_rows(cfg, checkpoint: str, work: Path, batch: int, repeats: int) -> list[list]:
    import torch

    from lfb_ray.bank.build import BankExtractor
    from lfb_ray.data.prep import PrepareError, prepared_files

    uris = []
    for split in ("train", "val"):
        try:
            uris += [(split, uri) for uri in prepared_files(cfg.prepared_dir, split)]
        except PrepareError:  # a benchmark folder may hold one split only
            continue
    if not uris:
        raise FileNotFoundError(f"no prepared parts under {cfg.prepared_dir}")
    # each part `repeats` times under its own part id: enough keyframes for a steady GPU rate
    items = [{"split": split, "uri": uri, "part_id": f"{split}-{i:05d}-{k}"}
             for k in range(repeats) for i, (split, uri) in enumerate(uris)]
    threads = 4
    cases = [("decode + transform only (no network)", 1, "auto", True, 1),
             (f"decode + transform only, {threads} threads", 1, "auto", True, threads),
             ("1 keyframe / forward", 1, "auto", False, 1), (f"{batch} keyframes / forward", batch, "auto", False, 1),
             (f"{batch} keyframes / forward, {threads} decode threads", batch, "auto", False, threads),
             (f"{batch} keyframes / forward, {2 * threads} decode threads", batch, "auto", False, 2 * threads)]
    if torch.cuda.is_available():
        cases.append((f"{batch} keyframes / forward, {threads} decode threads, fp32", batch, "off", False, threads))
    rows, base, network = [], None, None
    for name, size, amp, decode_only, decode_threads in cases:
        c = dataclasses.replace(cfg, bank=dataclasses.replace(cfg.bank, batch_size=size, cpus_per_actor=decode_threads),
                                train=dataclasses.replace(cfg.train, amp=amp))
        cls = _decode_only(BankExtractor) if decode_only else BankExtractor
        extractor = cls(c, checkpoint, str(work / "warmup"))
        extractor({"item": np.array([json.dumps(items[0])], dtype=object)})  # cuDNN autotune, caches
        parts = work / f"parts_{len(rows)}"
        extractor.parts_dir = str(parts)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        extractor({"item": np.array([json.dumps(it) for it in items], dtype=object)})
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        shutil.rmtree(work / "warmup", ignore_errors=True)
        keyframes = features = 0
        for f in sorted(parts.rglob("*.npz")):
            z = np.load(f)
            keyframes += int(z["keyframes"])
            features += len(z["feature"])
        if base is None and not decode_only:
            base = keyframes / wall
        rows.append([name, "bf16" if amp == "auto" and torch.cuda.is_available() else "fp32", keyframes,
                     features, wall, keyframes / wall, features / wall,
                     ratio(keyframes / wall, base) if base else "-"])
        if size == batch and amp == "auto" and not decode_only:
            network = extractor
    rows.append(_network_only_row(network, uris, batch, repeats, base))
    return rows


def _network_only_row(extractor, uris, batch: int, repeats: int, base: float) -> list:
    """The same forward passes on clips decoded beforehand: the network's own ceiling."""
    import pyarrow.parquet as pq
    import torch

    from lfb_ray.storage import resolve

    decoded = []
    for _, uri in uris:
        fs, path = resolve(uri)
        with fs.open_input_file(path) as f:
            decoded += [extractor._decode(r) for r in pq.read_table(f).to_pylist()]
    clips, boxes = [d[0] for d in decoded], [d[1] for d in decoded]
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        for s in range(0, len(clips), batch):
            extractor._features(clips[s:s + batch], boxes[s:s + batch])
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    keyframes, features = len(clips) * repeats, sum(len(b) for b in boxes) * repeats
    return [f"network only: {batch} pre-decoded keyframes / forward", "bf16" if cuda else "fp32", keyframes,
            features, wall, keyframes / wall, features / wall, ratio(keyframes / wall, base)]


def run(*, quick: bool = False, workdir: str | Path = "runs/bench", prepared: str | None = None) -> str:
    """Run both sections on CUDA if available (CPU otherwise); prints and returns the tables."""
    import torch

    from benchmarks.prepare import bench_config
    from lfb_ray.models import build_detector, save_checkpoint

    device = "cuda" if torch.cuda.is_available() else "cpu"
    workdir = Path(workdir).resolve()
    print(machine_line(), flush=True)
    rows, best = _train_rows(device, quick)
    train_table = format_table(
        f"[gpu-train] one SGD step of a fresh detector on {device}"
        + (" (quick: depth 18, width 16, 64 px)" if quick else ": SlowOnly-R50 4x16, 256 px, 4 RoIs per clip"),
        ["fbo", "clips/step", "mode", "clips/s", "ms/step", "vs fp32", "peak GiB"], rows,
        [f"best baseline (fbo none) rate {best:.0f} clips/s; target >= 250 clips/s on one H100",
         "step = forward + sigmoid BCE + backward + SGD step (momentum 0.9); inputs already on the device",
         "nl rows: the LFB-NL head reads a [R, 300, 2048] fp16 bank window per RoI"])
    print(train_table, flush=True)

    work = workdir / "gpu_bench"
    shutil.rmtree(work, ignore_errors=True)
    arch = ("model.depth=18", "model.base_channels=16", "data.test_short_side=112") if quick else (
        "model.depth=50", "model.base_channels=64", "data.test_short_side=256")
    if prepared is None:
        from benchmarks import start_local_ray
        from benchmarks.prepare import prepared_config
        from benchmarks.table import cpu_count

        started = start_local_ray(cpu_count())
        try:
            cfg = prepared_config("synthetic", workdir, videos=2, seconds=12 if quick else 30,
                                  overrides=("model.fbo=none", *arch))
        finally:
            if started:
                import ray

                ray.shutdown()
    else:
        cfg = bench_config("synthetic", work, work / "no-videos", f"data.prepared_dir={Path(prepared).resolve()}",
                           "model.fbo=none", *arch)
    torch.manual_seed(0)
    ckpt = str(work / "baseline.pt")
    save_checkpoint(build_detector(cfg.model).state_dict(), ckpt, source="random-weight bench baseline")
    bank_table = format_table(
        f"[gpu-bank-build] BankExtractor in this process on {device}, prepared parts of {shown(cfg.prepared_dir)}",
        ["extraction", "precision", "keyframes", "features", "wall s", "keyframes/s", "features/s",
         "vs 1 / forward"], _bank_rows(cfg, ckpt, work, 4 if quick else BANK_BATCH, 1 if quick else REPEATS),
        [f"model: depth {cfg.model.depth}, width {cfg.model.base_channels}, random weights, test short side "
         f"{cfg.data.test_short_side}; one actor = this process (bank.cpus_per_actor JPEG decode threads, 1 unless the row says more, running ahead of the network on "
         f"{device})",
         "wall: read each Parquet part, decode 4 JPEG frames per keyframe, resize, forward, write the npz part; "
         f"a warm-up part first (cuDNN autotune); each part extracted {1 if quick else REPEATS} time(s)"])
    print(bank_table, flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return train_table + "\n\n" + bank_table
