"""SlowOnly backbone: shapes, layout of the R50 (key list equals mmaction2's), init."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lfb_ray.models.backbone import BasicBlock3d, Bottleneck3d, ResNet3dSlowOnly, build_backbone

# Key, shape and dtype of every parameter and buffer of mmaction2 0.x's ResNet3dSlowOnly(depth=50), FBOHead
# (non_local / avg / max) and BBoxHeadAVA state dicts, one section per module, printed from mmaction2.
KEYS_FILE = Path(__file__).parent / "data" / "mmaction2_state_dict_keys.txt"


def mmaction2_sections() -> dict[str, dict[str, tuple[tuple[int, ...], str]]]:
    """{section header: {key: (shape, dtype)}} parsed from the reference key list."""
    sections: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {}
    current: dict[str, tuple[tuple[int, ...], str]] = {}
    for line in KEYS_FILE.read_text().splitlines():
        if line.startswith("#"):
            current = sections.setdefault(line.lstrip("# ").strip(), {})
        elif "\t" in line:
            key, shape, dtype = line.split("\t")
            current[key] = (tuple(int(s) for s in shape.strip("()").split(",") if s.strip()), dtype)
    return sections


@pytest.mark.parametrize(("depth", "channels"), [(18, 64), (34, 64), (50, 256)])
def test_output_shape_small(depth: int, channels: int) -> None:
    torch.manual_seed(0)
    model = build_backbone(depth=depth, base_channels=8).eval()
    assert model.out_channels == channels
    with torch.no_grad():
        out = model(torch.randn(2, 3, 4, 64, 80))
    assert out.shape == (2, channels, 4, 4, 5)  # T kept, stride 16


def test_stage_layout() -> None:
    with torch.device("meta"):
        r101 = ResNet3dSlowOnly(101)
        r18 = ResNet3dSlowOnly(18, base_channels=8)
    assert [len(getattr(r101, f"layer{i}")) for i in range(1, 5)] == [3, 4, 23, 3]
    assert isinstance(r101.layer1[0], Bottleneck3d) and isinstance(r18.layer1[0], BasicBlock3d)
    assert r101.out_channels == 2048
    # 3x1x1 inflation only in res4/res5, on conv1; BasicBlock: temporal 3 on conv1 only.
    for i, t in zip(range(1, 5), (1, 1, 3, 3), strict=True):
        for block in getattr(r101, f"layer{i}"):
            assert block.conv1.conv.kernel_size == (t, 1, 1)
            assert block.conv2.conv.kernel_size == (1, 3, 3)
        assert r18.get_submodule(f"layer{i}.1.conv1.conv").kernel_size == (t, 3, 3)
    # Stride on conv2 (pytorch style); res5 not downsampled.
    assert r101.layer2[0].conv2.conv.stride == (1, 2, 2)
    assert r101.layer4[0].conv2.conv.stride == (1, 1, 1)
    assert r18.layer1[0].downsample is None and r18.layer2[0].downsample is not None
    with pytest.raises(ValueError, match="depth"):
        ResNet3dSlowOnly(26)


def test_r50_keys_equal_mmaction2() -> None:
    with torch.device("meta"):
        model = build_backbone(depth=50, base_channels=64)
    ours = {k: (tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items()}
    theirs = mmaction2_sections()["ResNet3dSlowOnly(depth=50) state_dict"]
    assert len(theirs) > 300
    assert ours == theirs
    assert all(not name.endswith(".bias") for name, p in model.named_parameters() if ".conv." in name)


def test_init_and_trainable() -> None:
    model = ResNet3dSlowOnly(50, base_channels=8)
    assert all(p.requires_grad for p in model.parameters())
    for block in model.modules():
        if isinstance(block, Bottleneck3d):
            assert torch.count_nonzero(block.conv3.bn.weight) == 0
            assert torch.all(block.conv1.bn.weight == 1)
    assert torch.all(model.conv1.bn.running_var == 1) and model.conv1.conv.weight.std() > 0
    no_zero = ResNet3dSlowOnly(18, base_channels=8, zero_init_residual=False)
    assert torch.all(no_zero.layer1[0].conv2.bn.weight == 1)


def test_backward_reaches_stem() -> None:
    model = ResNet3dSlowOnly(18, base_channels=8, zero_init_residual=False)
    model(torch.randn(1, 3, 2, 32, 32)).sum().backward()
    assert model.conv1.conv.weight.grad is not None and model.conv1.conv.weight.grad.abs().sum() > 0
