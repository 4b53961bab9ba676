"""GPU path (skipped without CUDA; CI runs all but these): bf16 autocast + channels_last_3d."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_detector_bf16_channels_last_forward_backward():
    from lfb_ray.config import load_config
    from lfb_ray.inference import autocast_for
    from lfb_ray.models import build_detector

    cfg = load_config("configs/lfb_nl.yaml")
    dev = torch.device("cuda")
    model = build_detector(cfg.model).to(dev).to(memory_format=torch.channels_last_3d)
    clips = torch.randn(2, 3, 4, 256, 256, device=dev).contiguous(memory_format=torch.channels_last_3d)
    rois = torch.tensor([[0, 10, 10, 100, 200], [1, 50, 40, 200, 250]], dtype=torch.float32, device=dev)
    lt = torch.rand(2, 300, 2048, device=dev)
    labels = torch.zeros(2, 81, device=dev)
    labels[:, 12] = 1
    with autocast_for(dev, "auto"):
        logits = model(clips, rois, lt)
    loss = model.loss(logits.float(), labels)
    loss.backward()
    assert logits.shape == (2, 81) and torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
