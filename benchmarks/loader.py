"""Benchmark: training clips/s with the real loader feeding the step, against the step alone.

    python jobs/benchmark.py loader --prepared DIR   # a CUDA machine; DIR = a prepared folder (no Ray)
    python jobs/benchmark.py loader --quick          # CPU smoke test: tiny model, tiny prepared set (Ray)

The step is the training loop's own `train_step` (baseline detector, `fbo=none`; bf16 autocast +
channels-last-3d on CUDA, fp32 on CPU) at the AVA per-GPU batch of 12 clips. Rows:

1. step only: batches decoded beforehand (pinned on CUDA): the ceiling the loader is measured against.
2. loader only: `decode_train_rows` + `collate_train` (the Ray Data UDF and the collate the loop
   runs) in N spawned processes, consumed as fast as they come.
3. loader + step: the same processes decoding ahead while this process steps: what one training
   worker with N decode CPUs gets.

Ray Data is not used (the lent GPU machines have no Ray): the loader rows are the decode work Ray
Data's tasks run, without its scheduling. Rows repeat the prepared keyframes as often as needed, a
new `epoch` (new augmentation draws) each time round. Timings are printed, never asserted.
"""

from __future__ import annotations

import functools
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.table import cpu_count, format_table, machine_line, ratio, shown
from lfb_ray.config import Config

if TYPE_CHECKING:
    from lfb_ray.data.batches import TrainBatch

__all__ = ["run"]

# (clips per batch, timed batches, max decode processes)
SIZES = {"quick": (2, 3, 2), "default": (12, 24, 8)}


def _config(prepared: str | None, quick: bool, workdir: Path) -> Config:
    """The baseline's training config over `prepared` (R50 at 256 px), or a tiny prepared set (Ray)."""
    from benchmarks.prepare import bench_config

    if prepared is None:
        from benchmarks import start_local_ray
        from benchmarks.prepare import prepared_config

        started = start_local_ray(cpu_count())
        try:
            return prepared_config("synthetic", workdir, videos=2, seconds=12, overrides=("model.fbo=none",))
        finally:
            if started:
                import ray

                ray.shutdown()
    arch = ("model.depth=18", "model.base_channels=16") if quick else ("model.depth=50", "model.base_channels=64")
    return bench_config("synthetic", workdir / "loader_bench", workdir / "no-videos",
                        f"data.prepared_dir={Path(prepared).resolve()}", "model.fbo=none", *arch,
                        "data.short_side=256", "data.train_scale_range=[256,256]", "data.train_crop_size=256",
                        "data.test_short_side=256")


def _raw_batches(cfg: Config, clips: int, count: int) -> list[dict]:
    """`count` batches of `clips` train keyframe rows (Ray Data's column dicts), cycling the split."""
    import numpy as np
    import pyarrow as pa

    from lfb_ray.data.dataset import read_keyframes

    table = read_keyframes(cfg, "train", drop_excluded=True)
    if table.num_rows == 0:
        raise ValueError(f"no train keyframes in {shown(cfg.prepared_dir)}")
    out = []
    for b in range(count):
        idx = (np.arange(clips) + b * clips) % table.num_rows
        epoch = (b * clips) // table.num_rows
        part = table.take(pa.array(idx)).append_column("row_id", pa.array(idx.astype(np.int64)))
        out.append(part.append_column("epoch", pa.array(np.full(clips, epoch, np.int64))).to_pydict())
    return out


def _pinned(batch: TrainBatch, cuda: bool) -> TrainBatch:
    return batch.pin_memory() if cuda else batch


def run(*, quick: bool = False, workdir: str | Path = "runs/bench", prepared: str | None = None) -> str:
    """Time the three rows on CUDA if available (CPU otherwise); print and return the table."""
    import torch

    from benchmarks.train import decode_batch
    from lfb_ray.models import build_detector
    from lfb_ray.models.device import to_model_layout
    from lfb_ray.train.recipe import train_step
    from lfb_ray.train.schedule import build_optimizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    print(machine_line(), flush=True)
    clips, count, max_workers = SIZES["quick" if quick else "default"]
    cfg = _config(prepared, quick, Path(workdir).resolve())
    raw = _raw_batches(cfg, clips, count + 2)  # 2 warm-up batches
    workers = max(1, min(max_workers, cpu_count()))
    decode = functools.partial(decode_batch, cfg)
    amp = "auto" if cuda else "off"
    rows = []
    # Spawned before CUDA is touched in this process; the first map warms their imports up.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(decode, raw[:workers]))
        t0 = time.perf_counter()
        decoded = list(pool.map(decode, raw[2:]))
        loader_s = time.perf_counter() - t0

        torch.manual_seed(0)
        core = to_model_layout(build_detector(cfg.model).to(device)).train()
        optimizer = build_optimizer(core.parameters(), cfg.train, 0.01)

        def step(batch: TrainBatch) -> torch.Tensor:
            return train_step(core, core, optimizer, batch, device, amp=amp, grad_clip=cfg.train.grad_clip)

        def sync() -> None:
            if cuda:
                torch.cuda.synchronize()

        for b in raw[:2]:  # warm-up: cuDNN autotune, first allocations
            step(_pinned(decode(b), cuda))
        sync()
        ready = [_pinned(b, cuda) for b in decoded]
        t0 = time.perf_counter()
        for b in ready:
            loss = step(b)
        sync()
        step_s = time.perf_counter() - t0
        del ready
        t0 = time.perf_counter()
        for fut in [pool.submit(decode, b) for b in raw[2:]]:  # decoded ahead, `workers` at a time
            loss = step(_pinned(fut.result(), cuda))
        sync()
        both_s = time.perf_counter() - t0
    n = sum(b.num_clips for b in decoded)
    step_rate = n / step_s
    for name, secs in ((f"step only: {count} batches decoded beforehand", step_s),
                       (f"loader only: decode + collate in {workers} processes", loader_s),
                       (f"loader + step: {workers} processes decoding ahead", both_s)):
        rows.append([name, n, secs, n / secs, ratio(n / secs, step_rate)])
    table = format_table(
        f"[loader] training clips/s on {device}, real loader vs the step alone ({shown(cfg.prepared_dir)})",
        ["path", "clips", "wall s", "clips/s", "vs step only"], rows,
        [f"model: depth {cfg.model.depth}, width {cfg.model.base_channels}, fbo=none, "
         f"{'bf16 autocast + channels-last-3d' if cuda else 'fp32'}; {clips} clips per step, crop "
         f"{cfg.data.train_crop_size} px, {cfg.data.clip_frames} frames; last loss {float(loss):.4f}",
         "step = train_step (forward, loss, backward, SGD): the training loop's own; loader = decode_train_rows "
         "+ collate_train, as Ray Data runs them; pinning happens in this process on the loader + step row"])
    print(table, flush=True)
    return table
