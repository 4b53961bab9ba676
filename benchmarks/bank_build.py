"""Benchmark of the bank build: features/s with 1 vs 2 extractor actors (`build_bank`; 1 at `--quick`).

Uses a random-weight tiny baseline (`configs/tiny.yaml` model, `fbo=none`) saved with
`save_checkpoint`, over a prepared synthetic set, on the local Ray cluster (started here if none is
connected). Each build starts from an empty bank folder, so it includes actor start-up (model load),
extraction of every prepared part and the merge into the train/val sub-banks.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from benchmarks.table import Measure, cpu_count, format_table, machine_line, ratio

__all__ = ["run"]

SIZES = {"quick": (3, 20, 1), "default": (8, 60, 2)}  # (videos, seconds per video, max actors)


def _in_process(cfg, checkpoint: str, parts_dir: Path) -> int:
    """The actor's class called in this process, 1 torch thread, every part in turn; returns features."""
    import json

    import numpy as np
    import torch

    from lfb_ray.bank.build import BankExtractor
    from lfb_ray.data.prep import prepared_files

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        extractor = BankExtractor(cfg, checkpoint, str(parts_dir))
        items = [{"split": split, "uri": uri, "part_id": f"{split}-{i:05d}"}
                 for split in ("train", "val") for i, uri in enumerate(prepared_files(cfg.prepared_dir, split))]
        extractor({"item": np.array([json.dumps(it) for it in items], dtype=object)})
    finally:
        torch.set_num_threads(threads)
    return sum(len(np.load(f)["feature"]) for f in sorted(parts_dir.rglob("*.npz")))


def run(*, quick: bool = False, workdir: str | Path = "runs/bench") -> str:
    """Run the bank-build benchmark; prints and returns its table."""
    import dataclasses

    import ray
    import torch

    from benchmarks import start_local_ray
    from benchmarks.prepare import prepared_config
    from lfb_ray.bank.build import build_bank
    from lfb_ray.models import build_detector, save_checkpoint

    workdir = Path(workdir).resolve()
    videos, seconds, max_actors = SIZES["quick" if quick else "default"]
    print(machine_line(), flush=True)
    started = start_local_ray(cpu_count())
    try:
        cluster_cpus = int(ray.cluster_resources().get("CPU", 1))
        cfg = prepared_config("tiny", workdir, videos=videos, seconds=seconds, overrides=("model.fbo=none",))
        work = workdir / "bank_bench"
        shutil.rmtree(work, ignore_errors=True)
        torch.manual_seed(0)
        ckpt = str(work / "baseline.pt")
        save_checkpoint(build_detector(cfg.model).state_dict(), ckpt, source="random-weight bench baseline")
        load0 = os.getloadavg()[0]
        results = {}
        for actors in sorted({1, min(max_actors, cluster_cpus)}):
            bank_cfg = dataclasses.replace(cfg, bank=dataclasses.replace(
                cfg.bank, min_actors=actors, max_actors=actors, path=str(work / f"bank_{actors}actors")))
            with Measure(tree=True) as m:
                summary = build_bank(bank_cfg, ckpt)
            results[actors] = (m, summary)
    finally:
        if started:
            ray.shutdown()
    with Measure() as inproc:
        features = _in_process(cfg, ckpt, work / "inprocess_parts")
    load1 = os.getloadavg()[0]

    m1, s1 = results[1]
    rows = [["in-process BankExtractor, no Ray", s1.keyframes, features, inproc.wall_s, inproc.cpu_s,
             features / inproc.wall_s, features / inproc.cpu_s, ratio(m1.wall_s, inproc.wall_s), "-"]]
    for actors, (m, s) in results.items():
        speedup = m1.wall_s / m.wall_s
        rows.append([f"{actors} actor(s)", s.keyframes, s.features, m.wall_s, m.cpu_s, s.features / m.wall_s,
                     s.features / m.cpu_s, ratio(m1.wall_s, m.wall_s), f"{100 * speedup / actors:.0f}%"])
    notes = [f"model: depth {cfg.model.depth}, width {cfg.model.base_channels}, random weights, fp32 on CPU; "
             f"test short side {cfg.data.test_short_side}; one actor = 1 CPU, 1 torch thread",
             "wall = build_bank(): actor start-up (model load) + extraction + merge + validation; "
             "CPU s = driver + Ray processes; in-process row: model load + extraction only, 1 thread",
             f"on {cluster_cpus} CPUs the ceiling is CPU: 2 actors share the cores with Ray Data and the driver; "
             "efficiency = speed-up / actors",
             f"load average {load0:.1f} at start, {load1:.1f} at end"]
    table = format_table(
        f"[bank-build] {videos} synthetic videos x {seconds} s, prepared parts = work items, {cluster_cpus} CPUs",
        ["actors", "keyframes", "features", "wall s", "CPU s", "features/s", "features/CPU-s", "vs 1 actor",
         "efficiency"], rows, notes)
    print(table, flush=True)
    shutil.rmtree(workdir / "bank_bench", ignore_errors=True)
    return table
