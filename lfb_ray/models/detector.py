"""LFBDetector: SlowOnly backbone + RoIAlign head + feature-bank operator + linear classifier
its loss, and `build_detector(model_cfg)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from lfb_ray.config import ModelConfig, check_exclusive_groups
from lfb_ray.models.backbone import ResNet3dSlowOnly, build_backbone
from lfb_ray.models.fbo import FBOAvg, FBOMax, FBONonLocal, build_fbo

__all__ = ["FEATURE_STRIDE", "LFBDetector", "build_detector", "detector_loss",
           "detector_scores", "roi_features"]

FEATURE_STRIDE = 16  # spatial stride of the res5 map (res5 is not downsampled)


def roi_features(feature_map: torch.Tensor, rois: torch.Tensor, output_size: int = 8,
                 spatial_scale: float = 1.0 / FEATURE_STRIDE) -> torch.Tensor:
    """Pool one short-term feature per RoI, as mmaction2's SingleRoIExtractor3D + FBOHead do.

    ::

        feature_map [B, C, T, H', W'] -> mean over T -> [B, C, H', W']
          -> RoIAlign (output_size^2, aligned, adaptive sampling, avg) -> [R, C, o, o]
          -> max over the o x o grid -> [R, C]

    Args:
        feature_map: backbone output [B, C, T, H', W'].
        rois: [R, 5] rows (batch index, x1, y1, x2, y2) in input-pixel coordinates.
        output_size: RoIAlign grid size.
        spatial_scale: feature-map size / input size.

    Returns:
        [R, C] float32.
    """
    # fp32 even under bf16 autocast: bf16 RoI coordinates would be off by pixels (8-bit mantissa).
    fm = feature_map.float().mean(dim=2)  # [B, C, H', W']
    pooled = roi_align(fm, rois.to(device=fm.device, dtype=torch.float32), output_size=output_size,
                       spatial_scale=spatial_scale, sampling_ratio=0, aligned=True)  # [R, C, o, o]
    return pooled.amax(dim=(2, 3))


def detector_loss(logits: torch.Tensor, labels: torch.Tensor, groups: tuple[tuple[int, ...], ...] = (),
                  sigmoid_cols: torch.Tensor | None = None, group_weight: float = 1.0,
                  group_cols: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """The detector's loss; see `LFBDetector.loss`. `sigmoid_cols` [K'] = columns 1.. outside `groups`;
    `group_cols` = each group's columns as a long tensor on the logits' device (built here if None).

    Means over the positive RoIs are masked sums divided by on-device counts (clamped to >= 1), not
    boolean indexing behind a `bool(mask.any())`: the value is the same up to float rounding, and the
    training step never waits for the GPU to learn how many RoIs are positive (issue 33).
    """
    logits = logits.float()
    targets = labels.to(device=logits.device, dtype=torch.float32)
    positive = targets[:, 1:].ne(0).any(dim=1).to(torch.float32)  # [R] 1.0 for a positive RoI
    if not groups:
        cols_logits, cols_targets = logits[:, 1:], targets[:, 1:]
    else:
        if sigmoid_cols is None:
            grouped = {c for g in groups for c in g}
            sigmoid_cols = torch.tensor([c for c in range(1, logits.shape[1]) if c not in grouped])
        cols = sigmoid_cols.to(logits.device, non_blocking=True)
        cols_logits, cols_targets = logits[:, cols], targets[:, cols]
    bce = F.binary_cross_entropy_with_logits(cols_logits, cols_targets, reduction="none")  # [R, K']
    # No positive RoI: 0 / 1, a zero that is still connected to `logits`.
    loss = (bce * positive[:, None]).sum() / (positive.sum() * bce.shape[1]).clamp(min=1)
    for i, g in enumerate(groups):
        g_idx = group_cols[i] if group_cols is not None else torch.tensor(g, device=logits.device)
        g_t = targets[:, g_idx]  # [R, |g|]
        one = g_t.sum(dim=1).eq(1).to(torch.float32)  # [R] RoIs with exactly one label of the group
        ce = F.cross_entropy(logits[:, g_idx], g_t.argmax(dim=1), reduction="none")  # [R]
        loss = loss + group_weight * (ce * one).sum() / one.sum().clamp(min=1)
    return loss


def detector_scores(logits: torch.Tensor, groups: tuple[tuple[int, ...], ...] = ()) -> torch.Tensor:
    """[R, K] logits -> [R, K] fp32 scores: sigmoid, softmax within each exclusive group."""
    logits = logits.float()
    scores = torch.sigmoid(logits)
    for g in groups:
        g_idx = torch.tensor(g, device=logits.device)
        scores[:, g_idx] = torch.softmax(logits[:, g_idx], dim=1)
    return scores


class LFBDetector(nn.Module):
    """Actor classifier over RoIs of a clip, with an optional long-term feature bank.

    ::

        clips [B, 3, T, H, W] -> backbone -> [B, C, T, H/16, W/16]
          -> roi_features(rois [R, 5]) -> st [R, C] ----------------------------.
        lt [R, S, C] (bank, detached) -> fbo(st, lt) -> [R, F] ------------- concat [R, C + F]
          -> Dropout -> fc_cls -> logits [R, num_classes]

    F is 0 with no operator (baseline), L (latent) for NL and C for avg/max.

    Args:
        backbone: maps clips to the res5 map; needs an `out_channels` attribute (C).
        fbo: the feature-bank operator, or None for the baseline.
        num_classes: classifier outputs, including the unused class 0 (81 for AVA).
        head_dropout: dropout ratio before `fc_cls`.
        roi_output_size: RoIAlign grid size.
        exclusive_groups: groups of class ids of which a box has at most one (AVA's pose classes,
            the synthetic set's roles). Their columns get a softmax cross-entropy in `loss` and
            softmax scores in `scores` instead of independent sigmoids; () = mmaction2's loss.
    """

    def __init__(self, backbone: ResNet3dSlowOnly, fbo: FBONonLocal | FBOAvg | FBOMax | None,
                 num_classes: int = 81, head_dropout: float = 0.5, roi_output_size: int = 8,
                 exclusive_groups: tuple[tuple[int, ...], ...] = (), exclusive_group_weight: float = 1.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.fbo = fbo
        self.roi_output_size = roi_output_size
        self.exclusive_groups = check_exclusive_groups(exclusive_groups, num_classes)
        self.exclusive_group_weight = float(exclusive_group_weight)
        grouped = {c for g in self.exclusive_groups for c in g}
        # Columns 1.. outside every group: these keep the per-class sigmoid BCE.
        self.register_buffer("_sigmoid_cols", torch.tensor(
            [c for c in range(1, num_classes) if c not in grouped], dtype=torch.long), persistent=False)
        for i, g in enumerate(self.exclusive_groups):  # on the model's device: no copy per loss
            self.register_buffer(f"_group_cols_{i}", torch.tensor(g, dtype=torch.long), persistent=False)
        in_features = backbone.out_channels + (fbo.out_channels if fbo is not None else 0)
        self.dropout = nn.Dropout(head_dropout)
        self.fc_cls = nn.Linear(in_features, num_classes)
        # mmaction2 0.x BBoxHeadAVA init.
        nn.init.normal_(self.fc_cls.weight, std=0.01)
        nn.init.zeros_(self.fc_cls.bias)

    @property
    def feature_channels(self) -> int:
        """C, the width of short-term and bank features."""
        return self.backbone.out_channels

    @property
    def fbo_type(self) -> str:
        """'none', 'nl', 'avg' or 'max'."""
        return "none" if self.fbo is None else self.fbo.kind

    def roi_features(self, feature_map: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """[B, C, T, H', W'] map and [R, 5] RoIs -> [R, C]; see the module-level `roi_features`."""
        return roi_features(feature_map, rois, self.roi_output_size)

    def classify(self, st_feats: torch.Tensor, lt_feats: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from short-term features and, for LFB models, the sampled bank.

        The bank is detached and cast to the dtype/device of `st_feats` (it may be stored as
        fp16): it never receives a gradient and is never modified.

        Args:
            st_feats: [R, C].
            lt_feats: [R, S, C]; required with an operator, must be None for the baseline.

        Returns:
            logits [R, num_classes].

        Raises:
            ValueError: `lt_feats` given to the baseline or missing for an LFB model.
        """
        if self.fbo is None:
            if lt_feats is not None:
                raise ValueError("the baseline detector (fbo='none') takes no long-term features")
            x = st_feats
        else:
            if lt_feats is None:
                raise ValueError(f"fbo={self.fbo_type!r} needs lt_feats [R, S, C]")
            lt = lt_feats.detach().to(device=st_feats.device, dtype=st_feats.dtype)
            x = torch.cat([st_feats, self.fbo(st_feats, lt)], dim=1)
        return self.fc_cls(self.dropout(x))

    def forward(self, clips: torch.Tensor, rois: torch.Tensor,
                lt_feats: torch.Tensor | None = None) -> torch.Tensor:
        """Args:
            clips: [B, 3, T, H, W] normalised frames.
            rois: [R, 5] (batch index, x1, y1, x2, y2) in input pixels.
            lt_feats: [R, S, C] sampled bank per RoI, or None for the baseline.

        Returns:
            logits [R, num_classes].
        """
        return self.classify(self.roi_features(self.backbone(clips), rois), lt_feats)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sigmoid BCE over classes 1.. on positive RoIs only (mmaction2 BBoxHeadAVA), plus a
        softmax cross-entropy per exclusive group.

        Column 0 is dropped; RoIs whose remaining label row is all zero (negatives) are left
        out; the BCE mean runs over all (RoI, class) elements of the positives, classes of the
        exclusive groups excepted. Each group adds the mean cross-entropy over the RoIs with
        exactly one label in it (RoIs without one say nothing about the group).

        Why: with a mean sigmoid BCE over 80 classes, a group of mutually exclusive labels that
        only long-term context can tell gets about 1/80 of the gradient, and the LFB-NL head
        did not learn to retrieve it on the synthetic set (docs/synthetic_study.md); the
        softmax form is also the right likelihood for labels of which exactly one holds.

        Args:
            logits: [R, K].
            labels: [R, K] multi-hot targets.

        Returns:
            scalar loss; with no positive RoI, a zero that is still connected to `logits`.
        """
        group_cols = [getattr(self, f"_group_cols_{i}") for i in range(len(self.exclusive_groups))]
        return detector_loss(logits, labels, self.exclusive_groups, self._sigmoid_cols, self.exclusive_group_weight,
                             group_cols)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """[R, K] logits -> [R, K] fp32 scores: sigmoid, softmax within each exclusive group."""
        return detector_scores(logits, self.exclusive_groups)


def build_detector(model_cfg: ModelConfig) -> LFBDetector:
    """Build an untrained detector from `cfg.model` (pretrained weights are loaded separately)."""
    backbone = build_backbone(depth=model_cfg.depth, base_channels=model_cfg.base_channels)
    # `build_fbo` holds the `match` on model.fbo ("none" gives the baseline).
    fbo = build_fbo(
        fbo_type=model_cfg.fbo,
        in_channels=backbone.out_channels,
        latent_channels=model_cfg.latent_channels,
        num_layers=model_cfg.num_nl_layers,
        st_dropout=model_cfg.st_feat_dropout,
        lt_dropout=model_cfg.lt_feat_dropout,
        nl_dropout=model_cfg.nl_dropout,
    )
    return LFBDetector(backbone, fbo, num_classes=model_cfg.num_classes,
                       head_dropout=model_cfg.head_dropout, roi_output_size=model_cfg.roi_output_size,
                       exclusive_groups=model_cfg.exclusive_groups,
                       exclusive_group_weight=model_cfg.exclusive_group_weight)
