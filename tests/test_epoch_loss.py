"""`train/loss_epoch` of a resumed epoch is the mean over all of its iterations (issue 32): the
running sum and count go into state.pt with every checkpoint and come back on resume."""

from __future__ import annotations

import math

import pytest
import torch

from lfb_ray.train.recipe import EpochLoss


def _through_state_pt(tmp_path, state: dict) -> dict:
    """What a resumed worker reads: state.pt is loaded with weights_only=True."""
    torch.save({"epoch": 0, "iter_in_epoch": 4, "epoch_loss": state}, tmp_path / "state.pt")
    return torch.load(tmp_path / "state.pt", map_location="cpu", weights_only=True)["epoch_loss"]


def test_a_resume_at_the_epochs_last_iteration_keeps_the_epochs_loss(tmp_path):
    losses = [4.0, 3.0, 2.0, 1.0]
    run = EpochLoss()
    for v in losses:
        run.add(v)
    # The checkpoint after the last iteration (iter_in_epoch 4 of epoch 0); the worker dies before
    # the epoch's end, and the resumed one runs no iteration of epoch 0.
    resumed = EpochLoss.restore(_through_state_pt(tmp_path, run.state(0)), 0)
    assert resumed.mean == pytest.approx(2.5)  # was 0.0: only this process's iterations counted
    assert resumed.count == 4


def test_a_resume_mid_epoch_averages_over_both_processes(tmp_path):
    first = EpochLoss()
    for v in (4.0, 3.0):
        first.add(v)
    resumed = EpochLoss.restore(_through_state_pt(tmp_path, first.state(0)), 0)
    for v in (2.0, 1.0):
        resumed.add(v)
    assert resumed.mean == pytest.approx(2.5) and resumed.count == 4


def test_another_epochs_or_an_old_checkpoints_sums_are_not_used():
    old = EpochLoss()
    old.add(9.0)
    assert EpochLoss.restore(old.state(0), 1).count == 0  # a checkpoint at epoch 0's end resumes epoch 1
    assert EpochLoss.restore(None, 0).count == 0  # state.pt of an earlier version has no epoch_loss
    assert math.isnan(EpochLoss().mean)  # an epoch without iterations has no loss (not 0.0)


@pytest.mark.ray
@pytest.mark.slow
def test_a_run_resumed_at_the_last_iteration_reports_the_epochs_loss(prepared, tmp_path):
    """A real run: 1 epoch of 2 iterations checkpointed after each 2; the final checkpoint is made
    to look like the one a worker death after the last iteration leaves (state.pt of the step-2
    checkpoint), and the rerun resumes there, runs no iteration and reports the same epoch loss."""
    import shutil
    from pathlib import Path

    from conftest import tiny_config

    from lfb_ray.train import fit

    cfg0, _ = prepared
    cfg = tiny_config(tmp_path / "w", cfg0.data.root, f"data.prepared_dir={cfg0.prepared_dir}", "model.fbo=none",
                      "train.epochs=1", "train.max_iters_per_epoch=2", "train.checkpoint_every_iters=2",
                      "train.run_name=resume_loss", "cluster.num_workers=1", "tracking.enabled=false")
    r1 = fit(cfg)
    loss = r1.metrics["train/loss_epoch"]
    assert loss > 0 and r1.metrics["global_step"] == 2
    ckpts = sorted(p for p in Path(r1.checkpoint_path).parent.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))
    mid, final = ckpts[-2], ckpts[-1]
    assert Path(r1.checkpoint_path) == final
    state = torch.load(mid / "state.pt", weights_only=True)
    assert (state["epoch"], state["iter_in_epoch"]) == (0, 2)
    assert state["epoch_loss"]["count"] == 2
    shutil.copy(mid / "state.pt", final / "state.pt")
    r2 = fit(cfg)
    assert r2.metrics["global_step"] == 2  # no iteration ran again
    assert r2.metrics["train/loss_epoch"] == pytest.approx(loss)  # was 0.0
