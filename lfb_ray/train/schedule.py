"""Optimiser and learning-rate schedule, free of Ray so GPU benchmarks share them."""

from __future__ import annotations

import torch

__all__ = ["build_optimizer", "lr_at"]


def build_optimizer(params, cfg_train, base_lr: float) -> torch.optim.Optimizer:
    """`train.optimizer`: SGD with momentum (mmaction2) or AdamW, both with `train.weight_decay`."""
    if cfg_train.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=base_lr, weight_decay=cfg_train.weight_decay)
    return torch.optim.SGD(params, lr=base_lr, momentum=cfg_train.momentum, weight_decay=cfg_train.weight_decay)


def lr_at(epoch_float: float, cfg_train, base_lr: float) -> float:
    """Learning rate at a fractional epoch: linear warmup from `warmup_factor`, then x gamma steps."""
    lr = base_lr * cfg_train.lr_gamma ** sum(epoch_float >= s for s in cfg_train.lr_steps)
    if epoch_float < cfg_train.warmup_epochs:
        alpha = epoch_float / cfg_train.warmup_epochs
        lr *= cfg_train.warmup_factor * (1 - alpha) + alpha
    return lr
