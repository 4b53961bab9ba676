"""Running a detector on a device: the device to use, bf16 autocast on CUDA, channels-last-3d
layout, and loading a trained detector for inference.

Shared by training (`lfb_ray.train.recipe`), the bank builder (`lfb_ray.bank.build`) and val/test
inference (`lfb_ray.inference`), so that all three run the network the same way.
"""

from __future__ import annotations

import contextlib

import torch

from lfb_ray.config import Config
from lfb_ray.models.checkpoint import load_checkpoint
from lfb_ray.models.detector import build_detector
from lfb_ray.storage import checkpoint_file

__all__ = ["autocast_for", "best_device", "load_model", "to_model_layout"]


def best_device() -> torch.device:
    """CUDA when this process sees a GPU, else the CPU (Ray actors: the GPU Ray gave them)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_for(device: torch.device, amp: str):
    """bf16 autocast on CUDA when amp is auto/bf16; fp32 elsewhere."""
    if device.type == "cuda" and amp in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_model_layout(x):
    """Clips [B, 3, T, H, W] or a model, in channels-last-3d on CUDA (where cuDNN's bf16 3-D
    convolutions are fastest, as in training); unchanged on CPU."""
    on_cuda = x.is_cuda if isinstance(x, torch.Tensor) else next(x.parameters()).is_cuda
    return x.to(memory_format=torch.channels_last_3d) if on_cuda else x


def load_model(cfg: Config, checkpoint: str, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Build the detector of `cfg.model` and load `checkpoint` strictly, in eval mode.

    Accepts our `model.pt` (or a Ray checkpoint folder holding one), files converted by
    `jobs/convert_checkpoint.py` and mmaction2 `.pth` detector checkpoints; never unpickles
    arbitrary objects (see `lfb_ray.models.checkpoint`).
    """
    model = build_detector(cfg.model)
    load_checkpoint(model, checkpoint_file(checkpoint), expect=cfg.model)
    return to_model_layout(model.to(device)).eval()
