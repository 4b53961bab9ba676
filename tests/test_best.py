"""`train.save_best` (lfb_ray.train.best): which epoch is the run's result, and its round trip
through a checkpoint directory."""

from __future__ import annotations

import math

import torch

from lfb_ray.train.best import BEST_FILE, BestEpoch


def _model(value: float) -> torch.nn.Module:
    m = torch.nn.Linear(2, 1)
    with torch.no_grad():
        m.weight.fill_(value)
        m.bias.fill_(value)
    return m


def test_the_best_is_the_highest_map_ties_keep_the_earlier_epoch_and_nan_never_counts(tmp_path):
    best = BestEpoch()
    assert not best.offer(1, {"val/mAP": float("nan")}, _model(1))  # no GT: nothing to rank
    assert best.offer(2, {"val/mAP": 0.30, "val/csv": "e2.csv", "train/loss": 9.0}, _model(2))
    assert not best.offer(3, {"val/mAP": 0.25}, _model(3))
    assert not best.offer(4, {"val/mAP": 0.30}, _model(4))  # a tie: epoch 2 stays (mmaction2's `>`)
    assert best.offer(5, {"val/mAP": 0.31}, _model(5))
    assert not best.offer(6, {"val/mAP": 0.20}, _model(6))
    assert best.epoch == 5 and best.mAP == 0.31
    assert float(best.state["weight"][0, 0]) == 5.0  # a copy, taken when offered
    last = {"epoch": 6, "val/mAP": 0.20, "val/csv": "e6.csv", "train/loss_epoch": 0.5}
    out = best.result_metrics(last)
    assert out == {"epoch": 6, "train/loss_epoch": 0.5, "val/mAP": 0.31, "best/epoch": 5, "last/val/mAP": 0.20}


def test_the_copy_does_not_follow_later_training():
    m = _model(1)
    best = BestEpoch()
    best.offer(1, {"val/mAP": 0.1}, m)
    with torch.no_grad():
        m.weight.add_(10)
    assert float(best.state["weight"][0, 0]) == 1.0


def test_round_trip_through_a_checkpoint_directory(tmp_path):
    empty = BestEpoch()
    empty.save(str(tmp_path))  # nothing evaluated yet: no file
    assert not (tmp_path / BEST_FILE).exists()
    assert BestEpoch.load(str(tmp_path)).state is None
    assert BestEpoch().result_metrics({"val/mAP": 0.2}) == {"val/mAP": 0.2}  # no best: the last epoch
    best = BestEpoch()
    best.offer(3, {"val/mAP": 0.4, "val/mAP_family_long_term": 0.5, "val/csv": "x.csv"}, _model(7))
    best.save(str(tmp_path))
    back = BestEpoch.load(str(tmp_path))  # weights_only load
    assert back.epoch == 3 and back.metrics == best.metrics and math.isclose(back.mAP, 0.4)
    assert torch.equal(back.state["weight"], best.state["weight"])
    assert not back.offer(4, {"val/mAP": 0.39}, _model(8))
