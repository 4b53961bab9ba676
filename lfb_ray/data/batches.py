"""The collated batches a step or a forward pass reads: `TrainBatch` (`collate_train`) and
`TestBatch` (`collate_test`).

Typed so that the fields and their shapes are written down once; the raw numpy batches Ray Data
hands the collates (dicts of columns) stay dicts, as that is Ray's format. `iter_torch_batches`
passes a collate's output through untouched when it is not a plain tensor container, so these
reach the training loop as they are.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["TestBatch", "TrainBatch"]


@dataclass(frozen=True)
class TrainBatch:
    """One training step's B clips and their R RoIs (padding RoIs dropped).

    Attributes:
        clip: float32 [B, 3, T, S, S], normalised with `data.mean` / `data.std`.
        rois: float32 [R, 5], (clip index in the batch, x1, y1, x2, y2) in crop pixels.
        labels: float32 [R, C], multi-hot action targets.
        roi_video_ids: list[str] [R], each RoI's video (its bank key, with `roi_seconds`).
        roi_seconds: int64 [R], each RoI's keyframe second.
        num_clips: B.
    """

    clip: torch.Tensor
    rois: torch.Tensor
    labels: torch.Tensor
    roi_video_ids: list[str]
    roi_seconds: np.ndarray
    num_clips: int

    def pin_memory(self) -> TrainBatch:
        """A copy with the tensors that go to the device (clip, rois, labels) in pinned host memory,
        so the step's `non_blocking` copies overlap with compute."""
        return dataclasses.replace(self, clip=self.clip.pin_memory(), rois=self.rois.pin_memory(),
                                   labels=self.labels.pin_memory())


@dataclass(frozen=True)
class TestBatch:
    """B full-frame test clips, padded to a common size, and all their R proposal boxes.

    The padding is only for transport: `lfb_ray.inference.predict_batch` runs each frame size on
    its own, cut back to `sizes`.

    Attributes:
        clip: float32 [B, 3, T, Hmax, Wmax], normalised, zero padded bottom/right.
        sizes: int64 [B, 2], each clip's own (H, W).
        rois: float32 [R, 5], (clip index in the batch, x1, y1, x2, y2) in clip pixels.
        boxes: float32 [R, 4], the same boxes normalised x1, y1, x2, y2 (what the CSV gets).
        roi_batch: int64 [R], each RoI's clip index (numpy, for selecting a clip's rows).
        roi_video_ids: list[str] [R], each RoI's video.
        roi_seconds: int64 [R], each RoI's keyframe second.
    """

    __test__ = False  # not a pytest test class, whatever its name

    clip: torch.Tensor
    sizes: np.ndarray
    rois: torch.Tensor
    boxes: np.ndarray
    roi_batch: np.ndarray
    roi_video_ids: list[str]
    roi_seconds: np.ndarray
