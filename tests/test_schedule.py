"""The optimiser and lr schedule of the training loop (no Ray)."""

from __future__ import annotations

import pytest
import torch

from lfb_ray.config import load_config
from lfb_ray.train.schedule import build_optimizer, lr_at


def _train_cfg(*overrides: str):
    return load_config("configs/tiny.yaml", list(overrides)).train


def test_lr_warmup_then_steps():
    tc = _train_cfg("train.warmup_epochs=2", "train.warmup_factor=0.1", "train.lr_steps=[4,6]", "train.lr_gamma=0.1",
                    "train.epochs=8")
    assert lr_at(0.0, tc, 1.0) == pytest.approx(0.1)
    assert lr_at(1.0, tc, 1.0) == pytest.approx(0.55)  # halfway through the linear warmup
    assert lr_at(3.0, tc, 1.0) == pytest.approx(1.0)
    assert lr_at(4.0, tc, 1.0) == pytest.approx(0.1)
    assert lr_at(7.5, tc, 1.0) == pytest.approx(0.01)


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_optimizer_choice_keeps_lr_and_weight_decay(name, cls):
    tc = _train_cfg(f"train.optimizer={name}", "train.weight_decay=0.001", "train.momentum=0.8")
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(3))], tc, 0.25)
    assert type(opt) is cls
    group = opt.param_groups[0]
    assert group["lr"] == 0.25 and group["weight_decay"] == 0.001
    if name == "sgd":
        assert group["momentum"] == 0.8


def test_adamw_step_does_not_depend_on_the_loss_scale():
    """Why `adamw` exists: a head whose loss is divided by 81 (mean BCE over classes) moves as far."""
    steps = []
    for scale in (1.0, 1 / 81):
        p = torch.nn.Parameter(torch.ones(4))
        opt = build_optimizer([p], _train_cfg("train.optimizer=adamw", "train.weight_decay=0"), 0.01)
        (scale * (p ** 2).sum()).backward()
        opt.step()
        steps.append((1 - p.detach()).abs().max().item())
    assert steps[0] == pytest.approx(steps[1], rel=1e-3)
