"""Benchmark of the Ray Train loop against a plain single-process torch loop on the same model and data.

Ray: `fit` with 1 and 2 CPU workers (`configs/synthetic.yaml` model, `fbo=none`; at `--quick` 1
worker, 1 epoch), a fixed number of iterations per epoch and 2 epochs; the loop's own
`train/clips_per_s` and `train/data_wait_frac` of the last epoch are reported (fit's wall time also
holds start-up, checkpoints and the final val evaluation), next to the Ray Data input pipeline
consumed alone. Baselines, in this process without Ray and with the one torch thread a Ray worker
gets: (1) batches decoded in advance with `decode_train_rows` + `collate_train`, timing
forward/backward/step only; (2) the same loop decoding each batch just before its step.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.table import Measure, cpu_count, format_table, machine_line, ratio
from lfb_ray.config import Config

if TYPE_CHECKING:
    from lfb_ray.data.batches import TrainBatch

__all__ = ["decode_batch", "run"]

# (videos, seconds per video, batch per worker, iterations per epoch, epochs, max Ray workers)
SIZES = {"quick": (3, 20, 4, 3, 1, 1), "default": (8, 60, 8, 16, 2, 2)}


def _raw_batches(cfg: Config, batch_size: int, num_batches: int) -> list[dict]:
    """The first train rows (exclusions dropped) as Ray-Data-like column batches, read with pyarrow."""
    import numpy as np
    import pyarrow as pa

    from lfb_ray.data.dataset import read_keyframes

    table = read_keyframes(cfg, "train", drop_excluded=True)
    if len(table) < batch_size * num_batches:
        raise ValueError(f"only {len(table)} train rows for {num_batches} batches of {batch_size}")
    table = table.append_column("row_id", pa.array(np.arange(len(table)))).append_column(
        "epoch", pa.array(np.zeros(len(table), np.int64)))
    return [table.slice(i * batch_size, batch_size).to_pydict() for i in range(num_batches)]


def decode_batch(cfg: Config, raw: dict) -> TrainBatch:
    """One batch of `_raw_batches` through the training loop's own decode + collate (no Ray):
    `decode_train_rows` then `collate_train`."""
    from lfb_ray.data.dataset import collate_train, decode_train_rows

    return collate_train(decode_train_rows(raw, data=cfg.data, prepared_uri=cfg.prepared_dir, seed=cfg.train.seed),
                         cfg.data.mean, cfg.data.std)


def _pipeline_only(cfg: Config, batch_size: int, num_batches: int) -> dict:
    """The loop's Ray Data input alone (`train_samples` of one rank's epoch order, as every
    training worker builds it), consumed by the driver for two epochs.

    Returns:
        first_batch_s per pass (the first pass starts cold Ray worker processes), clips/s after
        the first batch of the second pass, and the Measure of both passes.
    """
    import time

    from lfb_ray.data.dataset import epoch_order, read_keyframes, train_samples
    from lfb_ray.train.recipe import TrainCollate

    first_s, clips, rest_s = [], 0, 0.0
    with Measure(tree=True) as m:
        table = read_keyframes(cfg, "train", drop_excluded=True)
        for p in range(2):
            t0 = time.perf_counter()
            order = epoch_order(table.num_rows, cfg.train.seed, p, 1)[0][: batch_size * num_batches]
            ds = train_samples(cfg, table, order, p)
            for i, b in enumerate(ds.iter_torch_batches(batch_size=batch_size, prefetch_batches=2,
                                                        collate_fn=TrainCollate(cfg.data.mean, cfg.data.std))):
                if i == 0:
                    first_s.append(time.perf_counter() - t0)
                    t1, clips = time.perf_counter(), 0
                else:
                    clips += b.num_clips
                if i + 1 >= num_batches:
                    break
            rest_s = time.perf_counter() - t1
    return {"first_batch_s": first_s, "clips_per_s": clips / max(rest_s, 1e-9), "measure": m}


def _baselines(cfg: Config, raw: list[dict]) -> dict:
    """Plain torch loop (no Ray, 1 thread): decode cost, compute-only and decode+compute clips/s."""
    import torch

    from lfb_ray.models import build_detector

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what a 1-CPU (or 0.5-CPU) Ray Train worker gets (OMP_NUM_THREADS=1)
    try:
        tc = cfg.train

        def decode(i: int) -> TrainBatch:
            return decode_batch(cfg, raw[i])

        torch.manual_seed(tc.seed)
        model = build_detector(cfg.model).train()
        lr = tc.base_lr * tc.batch_size_per_worker / tc.reference_batch
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=tc.momentum, weight_decay=tc.weight_decay)

        def step(batch: TrainBatch) -> None:  # the loop's step without the bank (fbo=none) and logging
            logits = model(batch.clip, batch.rois, None)
            loss = model.loss(logits.float(), batch.labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()

        with Measure() as dec:
            decoded = [decode(i) for i in range(len(raw))]
        step(decoded[0])  # warm-up: first-call allocations, as epoch 1 is for the Ray loop
        with Measure() as compute:
            for b in decoded:
                step(b)
        with Measure() as both:
            for i in range(len(raw)):
                step(decode(i))
    finally:
        torch.set_num_threads(threads)
    clips = sum(b.num_clips for b in decoded)
    return {"clips": clips, "decode": dec, "compute": compute, "both": both}


def run(*, quick: bool = False, workdir: str | Path = "runs/bench") -> str:
    """Run the training benchmark; prints and returns its table."""
    import dataclasses

    import ray

    from benchmarks import start_local_ray
    from benchmarks.prepare import prepared_config
    from lfb_ray.train.driver import fit

    workdir = Path(workdir).resolve()
    videos, seconds, batch, iters, epochs, max_workers = SIZES["quick" if quick else "default"]
    print(machine_line(), flush=True)
    started = start_local_ray(cpu_count())
    work = workdir / "train_bench"
    try:
        cluster_cpus = int(ray.cluster_resources().get("CPU", 1))
        common = ("model.fbo=none", f"train.epochs={epochs}", f"train.max_iters_per_epoch={iters}",
                  f"train.batch_size_per_worker={batch}", "train.eval_every_epochs=0", "train.max_failures=0",
                  "cluster.device=cpu", f"train.storage_path={work / 'ray_results'}")
        cfg = prepared_config("synthetic", workdir, videos=videos, seconds=seconds, overrides=common)
        shutil.rmtree(work, ignore_errors=True)
        load0 = os.getloadavg()[0]
        pipe = _pipeline_only(dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, data_cpus=1.0)),
                              batch, iters)
        ray_runs = {}
        for workers in sorted({1, min(max_workers, cluster_cpus)}):
            share = cluster_cpus / workers / 2  # half of each worker's share trains, half decodes
            wcfg = dataclasses.replace(
                cfg, cluster=dataclasses.replace(cfg.cluster, num_workers=workers, cpus_per_worker=share,
                                                 data_cpus=share),
                train=dataclasses.replace(cfg.train, run_name=f"bench-{workers}w"))
            with Measure(tree=True) as m:
                result = fit(wcfg, fresh=True)
            ray_runs[workers] = (m, result.metrics, wcfg)
    finally:
        if started:
            ray.shutdown()
    base = _baselines(cfg, _raw_batches(cfg, batch, iters))
    load1 = os.getloadavg()[0]
    shutil.rmtree(work, ignore_errors=True)

    ref = base["clips"] / base["compute"].wall_s
    ref_cpu = base["clips"] / base["compute"].cpu_s
    rows = [["plain torch loop, pre-decoded batches", 1, ref, ref_cpu, ref, "x1.00", "-", "-", "-", "-"],
            ["plain torch loop, decode + train", 1, base["clips"] / base["both"].wall_s,
             base["clips"] / base["both"].cpu_s, base["clips"] / base["both"].wall_s,
             ratio(base["clips"] / base["both"].wall_s, ref), "-", "-", "-", "-"],
            ["Ray Data input only (no training)", "-", pipe["clips_per_s"], "-", "-", ratio(pipe["clips_per_s"], ref),
             "-", "-", "-", "-"]]
    fit_notes = []
    for workers, (m, met, wcfg) in ray_runs.items():
        cps = met["train/clips_per_s"]
        wait = met["train/data_wait_frac"]
        busy = cps / max(1 - wait, 1e-9)  # clips/s while not waiting for data
        rows.append([f"Ray Train fit, {workers} worker(s)", workers, cps, "-", busy, ratio(cps, ref), f"{100 * wait:.1f}%",
                     wait * met["train/epoch_seconds"], met["train/epoch_seconds"], m.wall_s])
        fit_notes.append(f"{workers} worker(s): cpus_per_worker={wcfg.cluster.cpus_per_worker}, data_cpus="
                     f"{wcfg.cluster.data_cpus}; fit() {m.wall_s:.1f} s wall, {m.cpu_s:.1f} s CPU (all Ray "
                     f"processes), epoch-{epochs} loss {met['train/loss_epoch']:.3f}")
    m1 = ray_runs[1][1]["train/clips_per_s"]
    overhead = ref / m1 - 1 if m1 else math.nan
    notes = [f"Ray loop overhead, 1 worker vs pre-decoded plain loop: {100 * overhead:.0f}% more time per clip "
             f"(target <= 10%); data wait {100 * ray_runs[1][1]['train/data_wait_frac']:.1f}% (target <= 5%)"]
    if 2 in ray_runs:
        notes.append(f"2 workers / 1 worker: x{ray_runs[2][1]['train/clips_per_s'] / m1:.2f} clips/s (2 workers x "
                     f"1 thread on {cluster_cpus} CPUs, sharing them with Ray Data decode and gloo)")
    notes += [
        f"Ray Data input alone (data_cpus=1, the driver reads {iters} batches, twice): first batch after "
        f"{pipe['first_batch_s'][0]:.1f} s (cold) and {pipe['first_batch_s'][1]:.1f} s (2nd pass), then "
        f"{pipe['clips_per_s']:.1f} clips/s; both passes {pipe['measure'].wall_s:.1f} s wall, "
        f"{pipe['measure'].cpu_s:.1f} s CPU (all Ray processes)",
        f"decode_train_rows + collate_train in-process: {1e3 * base['decode'].cpu_s / base['clips']:.1f} ms CPU "
        f"per clip; forward/backward/step: {1e3 * base['compute'].cpu_s / base['clips']:.1f} ms CPU per clip",
        *fit_notes,
        f"Ray clips/s and data wait are the loop's own metrics of epoch {epochs} (its wall includes waiting for "
        "the first batch of the epoch; wait s = data wait x epoch s; busy clips/s = clips/s / (1 - data wait)); fit s also holds Ray Train start-up, checkpoints and the final val "
        "evaluation",
        f"model: depth {cfg.model.depth}, width {cfg.model.base_channels}, fbo none, fp32, crop "
        f"{cfg.data.train_crop_size}, {cfg.data.clip_frames} frames; {iters} iterations x {batch} clips per "
        f"worker per epoch; load average {load0:.1f} at start, {load1:.1f} at end",
    ]
    table = format_table(
        f"[train] {videos} synthetic videos x {seconds} s, {cluster_cpus} CPUs, CPU training (gloo)",
        ["loop", "workers", "clips/s", "clips/CPU-s", "busy clips/s", "vs plain", "data wait", "wait s", "epoch s",
         "fit s"],
        rows, notes)
    print(table, flush=True)
    return table
