"""LFBDetector: shapes per operator, RoI pooling, bank gets no gradient, loss on positives only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from lfb_ray.config import DataConfig, ModelConfig
from lfb_ray.models.detector import LFBDetector, build_detector, detector_loss, detector_scores, roi_features

SMALL = {"depth": 18, "base_channels": 8, "latent_channels": 16}  # C = 64
ROIS = torch.tensor([[0, 0.0, 0.0, 32.0, 40.0], [0, 10.0, 12.0, 60.0, 63.0], [1, 4.0, 4.0, 20.0, 30.0]])


def small(fbo: str, **kwargs) -> LFBDetector:
    torch.manual_seed(0)
    return build_detector(ModelConfig(**SMALL, fbo=fbo, **kwargs))


@pytest.mark.parametrize(("fbo", "fc_in"), [("none", 64), ("nl", 80), ("avg", 128), ("max", 128)])
def test_forward_shapes(fbo: str, fc_in: int) -> None:
    model = small(fbo).eval()
    assert model.fbo_type == fbo and model.feature_channels == 64
    assert model.fc_cls.in_features == fc_in and model.fc_cls.out_features == 81
    lt = None if fbo == "none" else torch.rand(3, 10, 64)
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 4, 64, 64), ROIS, lt)
    assert logits.shape == (3, 81)


def test_r50_widths() -> None:
    with torch.device("meta"):
        nl = build_detector(ModelConfig(fbo="nl"))
        avg = build_detector(ModelConfig(fbo="avg"))
        base = build_detector(ModelConfig(fbo="none"))
    assert (nl.fc_cls.in_features, avg.fc_cls.in_features, base.fc_cls.in_features) == (2560, 4096, 2048)


def test_fc_init() -> None:
    model = build_detector(ModelConfig(depth=18, base_channels=64, fbo="max"))
    assert abs(model.fc_cls.weight.std().item() - 0.01) < 1e-3 and torch.count_nonzero(model.fc_cls.bias) == 0


def test_roi_features_formula() -> None:
    torch.manual_seed(0)
    fm = torch.rand(2, 5, 3, 6, 7)
    got = roi_features(fm, ROIS)
    want = roi_align(fm.mean(2), ROIS, 8, 1 / 16, 0, True).amax(dim=(2, 3))
    assert got.shape == (3, 5)
    torch.testing.assert_close(got, want)
    # A map that varies only in time pools to its temporal mean; batch index selects the clip.
    ramp = torch.arange(3.0).view(1, 1, 3, 1, 1).expand(2, 5, 3, 6, 7) * torch.tensor([1.0, 10.0]).view(2, 1, 1, 1, 1)
    torch.testing.assert_close(roi_features(ramp.contiguous(), ROIS), torch.tensor([1.0, 1.0, 10.0]).view(3, 1).expand(3, 5))


def test_roi_features_fp32_under_bf16() -> None:
    fm = torch.rand(2, 5, 3, 6, 7).bfloat16()
    rois = torch.tensor([[0, 1.3, 2.7, 70.1, 90.9], [1, 33.3, 4.1, 99.7, 60.2]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = roi_features(fm, rois)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, roi_features(fm.float(), rois), rtol=0, atol=0)


def test_bank_gets_no_gradient_and_is_not_modified() -> None:
    for fbo in ("nl", "avg", "max"):
        model = small(fbo).train()
        st = torch.rand(3, 64, requires_grad=True)
        lt = torch.rand(3, 10, 64).half().requires_grad_(True)
        before = lt.detach().clone()
        model.loss(model.classify(st, lt), torch.ones(3, 81)).backward()
        assert lt.grad is None and torch.equal(lt.detach(), before)
        assert st.grad is not None and model.fc_cls.weight.grad is not None
        frozen = torch.rand(3, 10, 64)
        model.classify(st, frozen)
        assert not frozen.requires_grad


def test_classify_argument_checks() -> None:
    with pytest.raises(ValueError, match="baseline"):
        small("none").classify(torch.rand(2, 64), torch.rand(2, 4, 64))
    with pytest.raises(ValueError, match="lt_feats"):
        small("nl").classify(torch.rand(2, 64))


def test_head_dropout_train_vs_eval() -> None:
    model = small("avg", head_dropout=0.5)
    st, lt = torch.rand(4, 64), torch.rand(4, 6, 64)
    model.train()
    assert not torch.equal(model.classify(st, lt), model.classify(st, lt))
    model.eval()
    assert torch.equal(model.classify(st, lt), model.classify(st, lt))


def test_loss_ignores_negatives() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 81, requires_grad=True)
    labels = torch.zeros(4, 81)
    labels[0, [3, 7]] = 1
    labels[2, 80] = 1
    labels[3, 0] = 1  # class 0 alone does not make a positive
    loss = detector_loss(logits, labels)
    want = F.binary_cross_entropy_with_logits(logits[[0, 2], 1:], labels[[0, 2], 1:])
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert torch.count_nonzero(logits.grad[[1, 3]]) == 0 and torch.count_nonzero(logits.grad[:, 0]) == 0
    shifted = logits.detach().clone()
    shifted[[1, 3]] += 5.0
    torch.testing.assert_close(detector_loss(shifted, labels), want.detach())


def test_loss_without_positives_is_connected_zero() -> None:
    logits = torch.randn(3, 81, requires_grad=True)
    loss = detector_loss(logits, torch.zeros(3, 81))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0


def test_bf16_autocast_channels_last_step() -> None:
    model = small("nl").train().to(memory_format=torch.channels_last_3d)
    clips = torch.randn(2, 3, 4, 32, 32).contiguous(memory_format=torch.channels_last_3d)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(clips, ROIS, torch.rand(3, 10, 64).half())
    loss = model.loss(logits, torch.ones(3, 81))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert model.fbo.non_local_layer_1.out_conv.conv.weight.grad is not None


def test_exclusive_group_loss_is_bce_elsewhere_plus_group_cross_entropy() -> None:
    torch.manual_seed(0)
    model = small("none", exclusive_groups=((64, 65, 66),))
    logits = torch.randn(4, 81, requires_grad=True)
    labels = torch.zeros(4, 81)
    labels[0, [3, 65]] = 1
    labels[1, [66]] = 1
    labels[2, [5]] = 1  # positive, no label in the group: BCE only
    # row 3 negative: left out entirely
    loss = model.loss(logits, labels)
    other = [c for c in range(1, 81) if c not in (64, 65, 66)]
    want = (F.binary_cross_entropy_with_logits(logits[:3][:, other], labels[:3][:, other])
            + F.cross_entropy(logits[:2][:, [64, 65, 66]], torch.tensor([1, 2])))
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert torch.count_nonzero(logits.grad[3]) == 0
    assert torch.count_nonzero(logits.grad[2, [64, 65, 66]]) == 0  # no group label: the group is not trained
    # No groups: exactly the mmaction2 loss.
    torch.testing.assert_close(small("none").loss(logits, labels), detector_loss(logits, labels))


def test_exclusive_group_scores_softmax_within_group() -> None:
    logits = torch.randn(5, 81)
    scores = detector_scores(logits, ((1, 2), (64, 65, 66)))
    torch.testing.assert_close(scores[:, [64, 65, 66]].sum(1), torch.ones(5))
    torch.testing.assert_close(scores[:, [1, 2]], torch.softmax(logits[:, [1, 2]], dim=1))
    rest = [c for c in range(81) if c not in (1, 2, 64, 65, 66)]
    torch.testing.assert_close(scores[:, rest], torch.sigmoid(logits[:, rest]))
    torch.testing.assert_close(detector_scores(logits), torch.sigmoid(logits))


@pytest.mark.parametrize("groups, msg", [(((64,),), "at least two"), (((64, 64),), "at least two"),
                                         (((0, 5),), "outside"), (((80, 81),), "outside"),
                                         (((3, 4), (4, 5)), "another group")])
def test_exclusive_groups_are_validated(groups, msg) -> None:
    from lfb_ray.config import ConfigError

    with pytest.raises(ConfigError, match=msg):
        ModelConfig(**SMALL, exclusive_groups=groups)


def test_exclusive_groups_from_yaml_override(tmp_path) -> None:
    from lfb_ray.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("model:\n  exclusive_groups: [[64, 65, 66]]\n")
    assert load_config(path).model.exclusive_groups == ((64, 65, 66),)
    assert load_config(path, ["model.exclusive_groups=[]"]).model.exclusive_groups == ()


@pytest.mark.parametrize("fbo", ["none", "nl"])
def test_a_box_scores_the_same_whatever_clips_share_its_test_batch(fbo: str) -> None:
    """Test batches mix frame sizes (AVA's aspect ratios); a box's score must not depend on the
    padding to its batch's widest frame (mmaction2 tests one clip per forward)."""
    import numpy as np

    from lfb_ray.data.dataset import collate_test
    from lfb_ray.inference import predict_batch

    def windows(video_ids, seconds, rng):  # the same long-term features for a RoI whatever its batch (the bank's contract)
        return torch.stack([torch.full((6, 64), float(s % 7) / 7) for s in seconds])

    model = small(fbo).eval()
    rng = np.random.default_rng(0)
    sizes = [(64, 112), (64, 80), (64, 112)]
    clips = np.empty(3, dtype=object)
    clips[:] = [rng.integers(0, 256, (4, h, w, 3), dtype=np.uint8) for h, w in sizes]
    px = [np.array([[w - 30.0, 20.0, w - 1.0, 63.0], [0.0, 0.0, 30.0, 40.0]], np.float32) for _, w in sizes]
    boxes = np.empty(3, dtype=object)
    boxes[:] = [p / np.array([w, h, w, h], np.float32) for p, (h, w) in zip(px, sizes)]
    box_px = np.empty(3, dtype=object)
    box_px[:] = px
    batch = {"clip": clips, "boxes": boxes, "box_px": box_px, "video_id": np.array(["a", "b", "c"], object),
             "timestamp": np.array([902, 903, 904])}
    kw = dict(windows=windows if fbo != "none" else None, rng=np.random.default_rng(1), device=torch.device("cpu"),
              amp="off")
    mean, std = DataConfig().mean, DataConfig().std
    together = predict_batch(model, collate_test(batch, mean, std), **kw).scores
    alone = np.concatenate([predict_batch(model, collate_test({k: v[i:i + 1] for k, v in batch.items()}, mean, std),
                                          **kw).scores
                            for i in range(3)])
    assert together.shape == (6, 81)
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-6)
