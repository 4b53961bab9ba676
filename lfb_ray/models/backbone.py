"""SlowOnly ResNet3D short-term backbone, named like mmaction2 so that
checkpoint keys map one to one: `conv1.{conv,bn}`, `layer{1..4}.{i}.conv{1,2,3}.{conv,bn}`,
`layer{1..4}.0.downsample.{conv,bn}`.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BasicBlock3d", "Bottleneck3d", "ConvBN3d", "ResNet3dSlowOnly", "build_backbone"]

# depth -> (block kind, blocks per stage)
_STAGE_BLOCKS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}
_SPATIAL_STRIDES = (1, 2, 2, 1)  # res5 keeps stride 16 (no dilation)
_INFLATE = (False, False, True, True)  # '3x1x1' temporal kernels in res4/res5 only


class ConvBN3d(nn.Module):
    """Conv3d (no bias) -> BatchNorm3d -> optional ReLU; mmaction2's `ConvModule` key layout.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: (t, h, w) kernel.
        stride: (t, h, w) stride.
        padding: (t, h, w) padding.
        relu: apply ReLU after BN.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int, int],
        stride: tuple[int, int, int] = (1, 1, 1),
        padding: tuple[int, int, int] = (0, 0, 0),
        relu: bool = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm3d(out_channels)
        self.relu = nn.ReLU(inplace=True) if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class Bottleneck3d(nn.Module):
    """ResNet bottleneck, 'pytorch' style (spatial stride on conv2), expansion 4.

    ::

        x -> conv1 (1x1x1 | 3x1x1 if inflate) -> conv2 1x3x3 /(1,s,s) -> conv3 1x1x1 (no ReLU)
        x -> [downsample 1x1x1 /(1,s,s)] ----------------------------------------> + -> ReLU

    Args:
        in_channels: input channels.
        planes: bottleneck width; the output has `planes * 4` channels.
        spatial_stride: stride of conv2 and the downsample branch in H and W.
        inflate: use a temporal 3x1x1 kernel (padding 1 in T) for conv1.
        downsample: build the 1x1x1 conv + BN shortcut projection.
    """

    expansion = 4

    def __init__(self, in_channels: int, planes: int, spatial_stride: int, inflate: bool,
                 downsample: bool) -> None:
        super().__init__()
        t = 3 if inflate else 1
        out_channels = planes * self.expansion
        self.conv1 = ConvBN3d(in_channels, planes, (t, 1, 1), padding=(t // 2, 0, 0))
        self.conv2 = ConvBN3d(planes, planes, (1, 3, 3), (1, spatial_stride, spatial_stride), (0, 1, 1))
        self.conv3 = ConvBN3d(planes, out_channels, (1, 1, 1), relu=False)
        self.downsample = (
            ConvBN3d(in_channels, out_channels, (1, 1, 1), (1, spatial_stride, spatial_stride), relu=False)
            if downsample else None
        )
        self.relu = nn.ReLU(inplace=True)

    @property
    def last_bn(self) -> nn.BatchNorm3d:
        return self.conv3.bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv3(self.conv2(self.conv1(x))) + identity)


class BasicBlock3d(nn.Module):
    """ResNet basic block (depth 18/34), expansion 1; the small CPU variants use it.

    ::

        x -> conv1 (1x3x3 | 3x3x3 if inflate) /(1,s,s) -> conv2 1x3x3 (no ReLU)
        x -> [downsample 1x1x1 /(1,s,s)] --------------------------> + -> ReLU

    Inflation puts the temporal kernel of 3 on conv1, as Bottleneck3d does; unlike mmaction2's
    BasicBlock3d (which inflates both convs), so R18/R34 checkpoints of mmaction2 do not load.

    Args:
        in_channels: input channels.
        planes: output channels.
        spatial_stride: stride of conv1 and the downsample branch in H and W.
        inflate: temporal kernel 3 (padding 1) on conv1.
        downsample: build the 1x1x1 conv + BN shortcut projection.
    """

    expansion = 1

    def __init__(self, in_channels: int, planes: int, spatial_stride: int, inflate: bool,
                 downsample: bool) -> None:
        super().__init__()
        t = 3 if inflate else 1
        self.conv1 = ConvBN3d(in_channels, planes, (t, 3, 3), (1, spatial_stride, spatial_stride),
                              (t // 2, 1, 1))
        self.conv2 = ConvBN3d(planes, planes, (1, 3, 3), padding=(0, 1, 1), relu=False)
        self.downsample = (
            ConvBN3d(in_channels, planes, (1, 1, 1), (1, spatial_stride, spatial_stride), relu=False)
            if downsample else None
        )
        self.relu = nn.ReLU(inplace=True)

    @property
    def last_bn(self) -> nn.BatchNorm3d:
        return self.conv2.bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv2(self.conv1(x)) + identity)


class ResNet3dSlowOnly(nn.Module):
    """SlowOnly ResNet3D returning the res5 map; no temporal striding anywhere.

    ::

        clips [B, 3, T, H, W]
          -> conv1 1x7x7 /(1,2,2) + BN + ReLU -> maxpool 1x3x3 /(1,2,2)      [B, w, T, H/4, W/4]
          -> layer1 (stride 1) -> layer2 (/2) -> layer3 (/2, 3x1x1 inflated)
          -> layer4 (stride 1, 3x1x1 inflated)                            [B, C, T, H/16, W/16]

    with w = `base_channels` and C = `out_channels` = w * 8 * expansion (2048 for R50 w=64).

    Args:
        depth: 18 | 34 (BasicBlock3d) or 50 | 101 (Bottleneck3d).
        base_channels: width of the stem and of res2.
        in_channels: input image channels.
        zero_init_residual: start the last BN gamma of each block at 0 (identity blocks).
    """

    def __init__(self, depth: int, base_channels: int = 64, in_channels: int = 3,
                 zero_init_residual: bool = True) -> None:
        super().__init__()
        if depth not in _STAGE_BLOCKS:
            raise ValueError(f"depth must be one of {sorted(_STAGE_BLOCKS)}, got {depth}")
        kind, stage_blocks = _STAGE_BLOCKS[depth]
        block = Bottleneck3d if kind == "bottleneck" else BasicBlock3d
        self.depth = depth
        self.conv1 = ConvBN3d(in_channels, base_channels, (1, 7, 7), (1, 2, 2), (0, 3, 3))
        self.maxpool = nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1))
        channels = base_channels
        for i, num_blocks in enumerate(stage_blocks):
            planes = base_channels * 2**i
            blocks = []
            for j in range(num_blocks):
                needs_projection = j == 0 and (_SPATIAL_STRIDES[i] != 1 or channels != planes * block.expansion)
                blocks.append(block(channels, planes, _SPATIAL_STRIDES[i] if j == 0 else 1, _INFLATE[i],
                                    downsample=needs_projection))
                channels = planes * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.out_channels = channels
        self.reset_parameters(zero_init_residual)

    def reset_parameters(self, zero_init_residual: bool = True) -> None:
        """mmaction2 ResNet3d init: kaiming-normal (fan_out, relu) convs, BN gamma 1 / beta 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (Bottleneck3d, BasicBlock3d)):
                    nn.init.zeros_(m.last_bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args:
            x: clips [B, 3, T, H, W].

        Returns:
            res5 feature map [B, C, T, ceil(H/16), ceil(W/16)].
        """
        x = self.maxpool(self.conv1(x))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def build_backbone(*, depth: int, base_channels: int = 64) -> ResNet3dSlowOnly:
    """Build the SlowOnly backbone (scratch init; load weights with `models.checkpoint`)."""
    return ResNet3dSlowOnly(depth=depth, base_channels=base_channels)
