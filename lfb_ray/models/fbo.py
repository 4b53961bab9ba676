"""Feature-bank operators: non-local (LFB-NL), average and max over the bank.

Inputs are flat: short-term features [N, C] and the sampled bank [N, S, C] (S slots, zero
padded). The NL operator keeps mmaction2's Conv3d 1x1x1 modules (and names) so checkpoints load
unchanged, but applies their weights as linear maps, which is the same math on 1x1x1 maps.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FBOAvg", "FBOMax", "FBONonLocal", "NonLocalLayer", "build_fbo"]


def _pointwise(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """Apply a 1x1x1 Conv3d to channel-last features [..., C_in] -> [..., C_out]."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


def _kaiming_init(conv: nn.Conv3d) -> None:
    # mmcv kaiming_init defaults: normal, fan_out, relu gain, bias 0.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    nn.init.zeros_(conv.bias)


class _Conv1x1(nn.Module):
    """Holds `.conv` so keys read `<name>.conv.{weight,bias}` like mmaction2's ConvModule."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _pointwise(self.conv, x)


def _ln_to_mmaction2_shape(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for name in ("ln.weight", "ln.bias"):
        state_dict[prefix + name] = state_dict[prefix + name].view(-1, 1, 1, 1)


def _ln_from_mmaction2_shape(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    for name in ("ln.weight", "ln.bias"):
        if prefix + name in state_dict:
            state_dict[prefix + name] = state_dict[prefix + name].flatten()


class NonLocalLayer(nn.Module):
    """One pre-activation non-local layer attending from a short-term feature to the bank.

    ::

        st [N, L] -> theta ----\\
        lt [N, S, L] -> phi ---- softmax_S(theta . phi / sqrt(L)) [N, S]
        lt [N, S, L] -> g ------------------------------------------ weighted sum [N, L]
            -> LayerNorm(L) -> ReLU -> out conv -> Dropout            [N, L]

    Zero bank slots are not masked: after the biased convs they are constant keys and values
    that still take softmax mass, as in mmaction2. The caller adds the residual.

    Args:
        latent_channels: L, width of inputs and output.
        dropout: dropout ratio after the out conv.
    """

    def __init__(self, latent_channels: int, dropout: float) -> None:
        super().__init__()
        self.latent_channels = latent_channels
        self.st_feat_conv = _Conv1x1(latent_channels, latent_channels)
        self.lt_feat_conv = _Conv1x1(latent_channels, latent_channels)
        self.global_conv = _Conv1x1(latent_channels, latent_channels)
        # mmaction2 normalises the [L, num_st_feat=1, 1, 1] map: the same as LayerNorm over L.
        # The affine params are kept 1-D (so `model.to(memory_format=channels_last_3d)`, which
        # rejects 4-D tensors, works) and shown as [L, 1, 1, 1] in state dicts (mmaction2 shape).
        self.ln = nn.LayerNorm(latent_channels)
        self.register_state_dict_post_hook(_ln_to_mmaction2_shape)
        self.register_load_state_dict_pre_hook(_ln_from_mmaction2_shape)
        self.out_conv = _Conv1x1(latent_channels, latent_channels)
        self.dropout = nn.Dropout(dropout)
        for m in (self.st_feat_conv, self.lt_feat_conv, self.global_conv, self.out_conv):
            _kaiming_init(m.conv)

    def attention(self, st: torch.Tensor, lt: torch.Tensor) -> torch.Tensor:
        """Softmax weights of each short-term feature over the bank slots (the layer's own math).

        Args:
            st: reduced short-term features [N, L].
            lt: reduced bank [N, S, L].

        Returns:
            [N, S], each row summing to 1.
        """
        theta = self.st_feat_conv(st)  # [N, L]
        phi = self.lt_feat_conv(lt)  # [N, S, L]
        scores = torch.bmm(phi, theta.unsqueeze(2)).squeeze(2) / math.sqrt(st.shape[1])  # [N, S]
        return scores.softmax(dim=-1)

    def forward(self, st: torch.Tensor, lt: torch.Tensor) -> torch.Tensor:
        """Args:
            st: reduced short-term features [N, L].
            lt: reduced bank [N, S, L].

        Returns:
            the update to add to `st`, [N, L].
        """
        attention = self.attention(st, lt)  # [N, S]
        g = self.global_conv(lt)  # [N, S, L]
        y = torch.bmm(attention.unsqueeze(1), g).squeeze(1)  # [N, L]
        y = F.relu(self.ln(y))
        return self.dropout(self.out_conv(y))


class FBONonLocal(nn.Module):
    """LFB-NL: reduce both inputs to the latent width, then stacked residual NL layers.

    ::

        st [N, C] -> 1x1 conv -> Dropout ----------> s [N, L]
        lt [N, S, C] -> 1x1 conv -> Dropout -------> l [N, S, L] (computed once, shared)
        for each layer: s = s + NonLocalLayer(s, l)
        -> s [N, L]

    Args:
        in_channels: C, width of the short-term features and of the bank.
        latent_channels: L.
        num_layers: number of NonLocalLayers (`non_local_layer_1` ...).
        st_dropout: dropout after the short-term reduction.
        lt_dropout: dropout after the bank reduction.
        nl_dropout: dropout inside each layer, after its out conv.
    """

    kind: ClassVar[str] = "nl"

    def __init__(self, in_channels: int, latent_channels: int = 512, num_layers: int = 2,
                 st_dropout: float = 0.2, lt_dropout: float = 0.2, nl_dropout: float = 0.2) -> None:
        super().__init__()
        self.out_channels = latent_channels
        self.num_layers = num_layers
        self.st_feat_conv = nn.Conv3d(in_channels, latent_channels, 1)
        self.lt_feat_conv = nn.Conv3d(in_channels, latent_channels, 1)
        self.st_feat_dropout = nn.Dropout(st_dropout)
        self.lt_feat_dropout = nn.Dropout(lt_dropout)
        _kaiming_init(self.st_feat_conv)
        _kaiming_init(self.lt_feat_conv)
        for i in range(1, num_layers + 1):
            self.add_module(f"non_local_layer_{i}", NonLocalLayer(latent_channels, nl_dropout))

    def forward(self, st: torch.Tensor, lt: torch.Tensor) -> torch.Tensor:
        """Args:
            st: short-term features [N, C].
            lt: sampled bank [N, S, C].

        Returns:
            [N, L].
        """
        s = self.st_feat_dropout(_pointwise(self.st_feat_conv, st))
        lt = self.lt_feat_dropout(_pointwise(self.lt_feat_conv, lt))
        for i in range(1, self.num_layers + 1):
            s = s + self.get_submodule(f"non_local_layer_{i}")(s, lt)
        return s

    def attention(self, st: torch.Tensor, lt: torch.Tensor, layer: int = 1) -> torch.Tensor:
        """Attention weights of NL layer `layer` over the bank slots, for inspection.

        Recomputes what `forward` does up to that layer, with no state change. Dropout follows
        the module's mode: call it in eval mode (under `torch.no_grad()`) to get the weights of
        the eval forward. Slot s of a bank sampled with window W and K features per second
        holds second `t - W//2 + s // K` (see `FeatureBank.sample`).

        Args:
            st: short-term features [N, C].
            lt: sampled bank [N, S, C].
            layer: 1-based index of the NL layer.

        Returns:
            [N, S] softmax weights, each row summing to 1 (zero-padded slots included).

        Raises:
            ValueError: `layer` outside 1..num_layers.
        """
        if not 1 <= layer <= self.num_layers:
            raise ValueError(f"layer must be in 1..{self.num_layers}, got {layer}")
        s = self.st_feat_dropout(_pointwise(self.st_feat_conv, st))
        lt = self.lt_feat_dropout(_pointwise(self.lt_feat_conv, lt))
        for i in range(1, layer):
            s = s + self.get_submodule(f"non_local_layer_{i}")(s, lt)
        return self.get_submodule(f"non_local_layer_{layer}").attention(s, lt)


class FBOAvg(nn.Module):
    """LFB-Avg: mean over the S slots of the raw bank, zero slots included: [N, S, C] -> [N, C]."""

    kind: ClassVar[str] = "avg"

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.out_channels = in_channels

    def forward(self, st: torch.Tensor, lt: torch.Tensor) -> torch.Tensor:
        return lt.mean(dim=1)


class FBOMax(nn.Module):
    """LFB-Max: max over the S slots of the raw bank, zero slots included: [N, S, C] -> [N, C]."""

    kind: ClassVar[str] = "max"

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.out_channels = in_channels

    def forward(self, st: torch.Tensor, lt: torch.Tensor) -> torch.Tensor:
        return lt.amax(dim=1)


def build_fbo(*, fbo_type: str, in_channels: int, latent_channels: int = 512, num_layers: int = 2,
              st_dropout: float = 0.2, lt_dropout: float = 0.2,
              nl_dropout: float = 0.2) -> FBONonLocal | FBOAvg | FBOMax | None:
    """Build the operator named by `fbo_type` ("none" gives None: the baseline detector).

    Raises:
        ValueError: unknown `fbo_type`.
    """
    match fbo_type:
        case "none":
            return None
        case "nl":
            return FBONonLocal(in_channels, latent_channels, num_layers, st_dropout, lt_dropout, nl_dropout)
        case "avg":
            return FBOAvg(in_channels)
        case "max":
            return FBOMax(in_channels)
        case _:
            raise ValueError(f"unknown fbo type {fbo_type!r}; allowed: 'none', 'nl', 'avg', 'max'")
