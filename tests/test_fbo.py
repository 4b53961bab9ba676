"""Feature-bank operators against direct formulas (mmaction2's Conv3d layout), dropout, init."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lfb_ray.models.fbo import FBOAvg, FBOMax, FBONonLocal, build_fbo

C, L, S, N = 12, 8, 7, 3


def reference_nl(fbo: FBONonLocal, st: torch.Tensor, lt: torch.Tensor) -> torch.Tensor:
    """mmaction2 FBONonLocal.forward (eval) written out with Conv3d maps, matmuls and layer_norm."""
    n = st.shape[0]
    sd = fbo.state_dict()  # LayerNorm affine in mmaction2's [L, 1, 1, 1] shape
    s = F.conv3d(st.view(n, C, 1, 1, 1), fbo.st_feat_conv.weight, fbo.st_feat_conv.bias)  # [N, L, 1, 1, 1]
    lmap = F.conv3d(lt.permute(0, 2, 1).reshape(n, C, S, 1, 1), fbo.lt_feat_conv.weight,
                    fbo.lt_feat_conv.bias)  # [N, L, S, 1, 1]
    for i in range(1, fbo.num_layers + 1):
        layer = fbo.get_submodule(f"non_local_layer_{i}")
        theta = F.conv3d(s, layer.st_feat_conv.conv.weight, layer.st_feat_conv.conv.bias).view(n, L, 1)
        phi = F.conv3d(lmap, layer.lt_feat_conv.conv.weight, layer.lt_feat_conv.conv.bias).view(n, L, S)
        g = F.conv3d(lmap, layer.global_conv.conv.weight, layer.global_conv.conv.bias).view(n, L, S)
        p = (torch.matmul(theta.permute(0, 2, 1), phi) / math.sqrt(L)).softmax(dim=-1)  # [N, 1, S]
        y = torch.matmul(g, p.permute(0, 2, 1)).view(n, L, 1, 1, 1)
        y = F.relu(F.layer_norm(y, [L, 1, 1, 1], sd[f"non_local_layer_{i}.ln.weight"],
                                    sd[f"non_local_layer_{i}.ln.bias"], eps=1e-5))
        y = F.conv3d(y, layer.out_conv.conv.weight, layer.out_conv.conv.bias)
        s = s + y
    return s.view(n, L)


def make_nl(num_layers: int = 2) -> FBONonLocal:
    torch.manual_seed(0)
    fbo = FBONonLocal(C, L, num_layers)
    with torch.no_grad():  # non-trivial LN affine and biases (init has 1/0)
        for p in fbo.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return fbo


def bank_with_zero_slots() -> torch.Tensor:
    lt = torch.rand(N, S, C)
    lt[:, -3:] = 0  # empty seconds are zero rows
    lt[1] = 0  # a RoI with an empty window
    return lt


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_nl_matches_formula(num_layers: int) -> None:
    fbo = make_nl(num_layers).eval()
    st, lt = torch.rand(N, C), bank_with_zero_slots()
    out = fbo(st, lt)
    assert out.shape == (N, L) and fbo.out_channels == L
    torch.testing.assert_close(out, reference_nl(fbo, st, lt), rtol=1e-5, atol=1e-5)


def test_nl_does_not_mask_zero_slots() -> None:
    fbo = make_nl().eval()
    st, lt = torch.rand(N, C), torch.rand(N, S, C)
    padded = torch.cat([lt, torch.zeros(N, 5, C)], dim=1)
    assert not torch.allclose(fbo(st, lt), fbo(st, padded))


def test_nl_state_dict_layout_and_init() -> None:
    fbo = FBONonLocal(2048, 512, 2)
    shapes = {k: tuple(v.shape) for k, v in fbo.state_dict().items()}
    assert shapes["st_feat_conv.weight"] == (512, 2048, 1, 1, 1)
    assert shapes["non_local_layer_2.out_conv.conv.weight"] == (512, 512, 1, 1, 1)
    assert shapes["non_local_layer_1.ln.weight"] == (512, 1, 1, 1)
    assert len(shapes) == 4 + 2 * 10
    for name, p in fbo.named_parameters():
        if name.endswith("conv.bias") or name.endswith("ln.bias"):
            assert torch.count_nonzero(p) == 0, name
        elif name.endswith("ln.weight"):
            assert torch.all(p == 1)
        else:  # kaiming normal, fan_out = out channels (1x1x1): std sqrt(2 / 512); out conv not zero
            assert abs(p.std().item() - math.sqrt(2 / 512)) < 0.01, name


def test_nl_ln_shape_round_trip_and_channels_last() -> None:
    src, dst = make_nl().eval(), FBONonLocal(C, L, 2).eval()
    sd = src.state_dict()
    assert sd["non_local_layer_1.ln.bias"].shape == (L, 1, 1, 1)
    dst.load_state_dict(sd)
    st, lt = torch.rand(N, C), torch.rand(N, S, C)
    torch.testing.assert_close(dst(st, lt), src(st, lt), rtol=0, atol=0)
    dst.to(memory_format=torch.channels_last_3d)  # no 4-D parameters to trip over
    torch.testing.assert_close(dst(st, lt), src(st, lt))


def test_nl_dropout_train_vs_eval() -> None:
    fbo = make_nl()
    st, lt = torch.rand(N, C), torch.rand(N, S, C)
    fbo.train()
    assert not torch.equal(fbo(st, lt), fbo(st, lt))
    fbo.eval()
    assert torch.equal(fbo(st, lt), fbo(st, lt))
    zero_drop = FBONonLocal(C, L, 2, st_dropout=0.0, lt_dropout=0.0, nl_dropout=0.0).train()
    assert torch.equal(zero_drop(st, lt), zero_drop(st, lt))


def test_avg_max_reference_values() -> None:
    lt = torch.tensor([[[1.0, 2.0], [3.0, 0.5], [0.0, 0.0], [0.0, 0.0]],
                       [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])  # [N=2, S=4, C=2]
    st = torch.ones(2, 2)
    torch.testing.assert_close(FBOAvg(2)(st, lt), torch.tensor([[1.0, 0.625], [0.0, 0.0]]))
    torch.testing.assert_close(FBOMax(2)(st, lt), torch.tensor([[3.0, 2.0], [0.0, 0.0]]))
    neg = -torch.ones(1, 3, 2)
    neg[:, 2] = 0  # zero slots take part in the max
    torch.testing.assert_close(FBOMax(2)(st[:1], neg), torch.zeros(1, 2))
    assert not list(FBOAvg(2).parameters()) and not list(FBOMax(2).parameters())
    assert FBOAvg(2).out_channels == FBOMax(2).out_channels == 2


def test_build_fbo() -> None:
    assert build_fbo(fbo_type="none", in_channels=C) is None
    assert isinstance(build_fbo(fbo_type="avg", in_channels=C), FBOAvg)
    assert isinstance(build_fbo(fbo_type="max", in_channels=C), FBOMax)
    nl = build_fbo(fbo_type="nl", in_channels=C, latent_channels=L, num_layers=3, nl_dropout=0.3)
    assert isinstance(nl, FBONonLocal) and nl.num_layers == 3 and nl.non_local_layer_3.dropout.p == 0.3
    with pytest.raises(ValueError, match="unknown fbo"):
        build_fbo(fbo_type="attention", in_channels=C)
