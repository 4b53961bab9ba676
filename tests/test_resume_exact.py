"""Exact resumption (issue 32): a training run killed mid-epoch and resumed from its checkpoint ends
with the weights of a run that was never interrupted, LFB bank sampling and dropout included.

Every source of randomness of a training step derives from (seed, rank, epoch, iteration)
(`lfb_ray.train.step.seed_step`, `epoch_order`, `decode_train_rows`); before, the bank-sampling
generator was reseeded from the global step at the resume, so the resumed run drew other windows.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import threading
import time

import numpy as np
import pytest
import torch
from conftest import tiny_config


def test_a_steps_draws_depend_on_its_position_only():
    """The same (seed, rank, epoch, iteration) gives the same bank draws and dropout mask, whatever
    was drawn before in the process; another rank, epoch or iteration gives others."""
    from lfb_ray.train.recipe import eval_generator, seed_step

    def draws(*key):
        rng = seed_step(*key)
        return rng.random(4), torch.nn.functional.dropout(torch.ones(64), 0.5, training=True)

    b0, d0 = draws(0, 0, 1, 3)
    np.random.default_rng(5).random(100), torch.rand(100)  # unrelated draws in between
    b1, d1 = draws(0, 0, 1, 3)
    assert np.array_equal(b0, b1) and torch.equal(d0, d1)
    for other in [(0, 1, 1, 3), (0, 0, 2, 3), (0, 0, 1, 4), (1, 0, 1, 3)]:
        b, d = draws(*other)
        assert not np.array_equal(b, b0) and not torch.equal(d, d0), other
    assert not np.array_equal(eval_generator(0, 0, 1).random(4), seed_step(0, 0, 1, 0).random(4))


def _random_bank(cfg, dim: int) -> None:
    """A bank of random features for the train and val videos of `cfg` (two persons per annotated
    second, and the seconds around it that a window reaches), under `cfg.bank_dir`/{train,val}."""
    from lfb_ray.bank import write_bank

    rng = np.random.default_rng(1)
    for split, name in (("train", cfg.data.train_csv), ("val", cfg.data.val_csv)):
        seconds: dict[str, set[int]] = {}
        with open(cfg.data_path(name)) as f:
            for row in csv.reader(f):
                seconds.setdefault(row[0], set()).add(int(row[1]))
        vids, secs, pidx = [], [], []
        for v, ts in sorted(seconds.items()):
            for t in range(min(ts) - 3, max(ts) + 4):
                for p in range(2):
                    vids.append(v), secs.append(t), pidx.append(p)
        n = len(vids)
        write_bank(os.path.join(cfg.bank_dir, split), video_ids=vids, seconds=np.array(secs),
                   person_index=np.array(pidx), boxes=np.full((n, 4), np.nan), scores=np.ones(n),
                   features=rng.standard_normal((n, dim)))


def _state(checkpoint: str) -> dict:
    return torch.load(os.path.join(checkpoint, "state.pt"), map_location="cpu", weights_only=True)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.faults
def test_a_run_killed_mid_epoch_ends_with_the_uninterrupted_runs_weights(prepared, tmp_path, capfd):
    """A real fault: the Ray Train worker is SIGKILLed (`os.kill`) once the run's first checkpoint
    is registered, mid-epoch; Ray Train restarts it from its last checkpoint (`train.max_failures`)
    and the run finishes. Its final weights equal those of the same run without the kill (max abs
    difference <= 1e-5 on CPU; in practice bitwise), with an NL bank operator (dropout and bank
    windows every step), and so does the last epoch's `train/loss_epoch` (`EpochLoss`)."""
    from test_faults import _checkpoints, _recorded_checkpoint

    from lfb_ray.models import build_detector
    from lfb_ray.train import fit
    from tests.helpers.processes import wait_until
    from tests.helpers.ray_local import pids_with

    cfg0, _ = prepared

    def config(name: str):
        return tiny_config(tmp_path, cfg0.data.root, f"data.prepared_dir={cfg0.prepared_dir}",
                           f"bank.path={tmp_path / 'bank'}", "bank.device=cpu", "model.fbo=nl",
                           "train.epochs=2", "train.max_iters_per_epoch=5", "train.checkpoint_every_iters=2",
                           "train.max_failures=1",
                           "cluster.num_workers=1", "cluster.cpus_per_worker=1", "tracking.enabled=false",
                           f"train.run_name={name}")

    clean_cfg, killed_cfg = config("clean"), config("killed")
    _random_bank(clean_cfg, build_detector(clean_cfg.model).feature_channels)
    clean = fit(clean_cfg)
    total = clean.metrics["global_step"]
    assert clean.metrics["epoch"] == 2 and total == 10  # checkpoints at steps 2, 4 (mid-epoch), 5 (its end), ...

    killed: list[int] = []

    def killer():
        wait_until(lambda: _recorded_checkpoint(killed_cfg.storage_path, "killed"), 300, "the first checkpoint")
        pids = wait_until(lambda: pids_with("RayTrainWorker"), 60, "a train worker")
        # Not yet finished: the final checkpoint (the one with model.pt) is not there.
        if not any((c / "model.pt").exists() for c in _checkpoints(killed_cfg.storage_path, "killed")):
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    resumed = fit(killed_cfg)
    t.join(timeout=5)
    assert killed, "the worker was not killed before the run finished"
    # The restarted worker says where it resumed (its stdout reaches the driver's through Ray).
    out, line = "", None
    for _ in range(40):
        out += capfd.readouterr().out
        line = re.search(r"resumed from checkpoint at epoch (\d+), iteration (\d+), global step (\d+)", out)
        if line:
            break
        time.sleep(0.25)
    assert line, "no resume was reported"
    _epoch, iteration, step = (int(x) for x in line.groups())
    assert 0 < step < total and iteration > 0, line.group(0)  # mid-epoch, with steps left to run

    assert resumed.metrics["global_step"] == total
    a, b = _state(clean.checkpoint_path)["model"], _state(resumed.checkpoint_path)["model"]
    assert a.keys() == b.keys()
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())
    assert diff <= 1e-5, f"max abs weight difference {diff:g} after the resume at {line.group(0)}"
    assert resumed.metrics["train/loss_epoch"] == pytest.approx(clean.metrics["train/loss_epoch"], abs=1e-6)
