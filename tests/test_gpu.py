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


def test_ddp_nccl_train_steps_bf16_channels_last(tmp_path):
    """The training loop's GPU recipe under DDP with the nccl backend (one process): the step runs and
    moves the weights; the optimiser is the loop's own (`build_optimizer`)."""
    import socket

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from lfb_ray.config import ModelConfig, TrainConfig
    from lfb_ray.inference import autocast_for, to_model_layout
    from lfb_ray.models import build_detector
    from lfb_ray.train.schedule import build_optimizer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        dev = torch.device("cuda", 0)
        torch.manual_seed(0)
        core = to_model_layout(build_detector(ModelConfig(depth=18, base_channels=16, fbo="nl", latent_channels=64)).to(dev))
        model = DistributedDataParallel(core, device_ids=[0])
        opt = build_optimizer(model.parameters(), TrainConfig(), 0.1)
        before = [p.detach().clone() for p in core.parameters()]
        clips = to_model_layout(torch.randn(4, 3, 4, 112, 112, device=dev))
        rois = torch.tensor([[i, 10, 10, 80, 100] for i in range(4)], dtype=torch.float32, device=dev)
        lt = torch.rand(4, 60, core.feature_channels, device=dev).half()
        labels = torch.zeros(4, 81, device=dev)
        labels[:, 3] = 1
        for _ in range(2):
            with autocast_for(dev, "auto"):
                logits = model(clips, rois, lt)
            loss = core.loss(logits.float(), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        assert torch.isfinite(loss)
        assert any(not torch.equal(a, b) for a, b in zip(before, core.parameters()))
    finally:
        dist.destroy_process_group()


def test_bank_extractor_batches_on_gpu(tmp_path):
    """`bank.batch_size` keyframes per bf16 channels-last forward: features match one at a time."""
    import numpy as np

    from lfb_ray.bank.build import BankExtractor
    from lfb_ray.config import load_config
    from lfb_ray.models import build_detector, save_checkpoint

    cfg = load_config("configs/synthetic.yaml", ["model.fbo=none", f"workdir={tmp_path}"])
    torch.manual_seed(0)
    save_checkpoint(build_detector(cfg.model).state_dict(), str(tmp_path / "m.pt"), source="test")
    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 255, (4, 112, 150, 3), dtype=np.uint8) for _ in range(5)]
    boxes = [np.array([[10, 10, 60, 100]] * n, np.float32) + 5 * n for n in (1, 2, 0, 3, 1)]
    feats = {}
    for size in (1, 4):
        c = load_config("configs/synthetic.yaml", ["model.fbo=none", f"workdir={tmp_path}", f"bank.batch_size={size}"])
        ex = BankExtractor(c, str(tmp_path / "m.pt"), str(tmp_path / "parts"))
        assert ex.device.type == "cuda"
        feats[size] = ex._features(clips, boxes)
    for a, b, bx in zip(feats[1], feats[4], boxes):
        assert a.shape == b.shape == (len(bx), 128)
        np.testing.assert_allclose(b.astype(np.float32), a.astype(np.float32), rtol=0.05,
                                   atol=0.05 * max(1e-3, float(np.abs(a).max(initial=0))))
