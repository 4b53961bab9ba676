"""Clip sampling, transforms and training targets for one prepared keyframe row (pure numpy/torch).

A prepared row (see `lfb_ray.data.schema`) stores JPEG frames for every reference offset the
sampler can touch. Here we pick the clip's frames (with train-time jitter), decode them, apply the
train or test transform to frames and boxes together, and build the RoIs and their 81-wide
multi-hot targets (column k = AVA action id k; column 0 unused, as in mmaction2). Ray Data calls
these functions in CPU workers, so training workers receive ready tensors. numpy, PIL and
simplejpeg only: no torch import (and no torch thread pool) in the data workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image

from lfb_ray.config import DataConfig
from lfb_ray.data.annotations import select_proposals
from lfb_ray.data.timing import clip_ref_offsets

__all__ = [
    "ClipSpec",
    "assign_targets",
    "box_iou",
    "decode_jpeg",
    "encode_jpeg",
    "pick_clip_frames",
    "select_proposals",
    "test_transform",
    "train_transform",
]


_DATA = DataConfig()  # the defaults' one owner


@dataclass(frozen=True)
class ClipSpec:
    """Plain arguments of clip sampling and transforms, flattened from `DataConfig` (`from_config`;
    the defaults are `DataConfig`'s, read from it, so the two cannot drift apart)."""

    clip_frames: int = _DATA.clip_frames
    frame_interval: int = _DATA.frame_interval
    jitter_min: int = _DATA.jitter_min
    jitter_max: int = _DATA.jitter_max
    scale_range: tuple[int, int] = tuple(_DATA.train_scale_range)
    crop_size: int = _DATA.train_crop_size
    flip_ratio: float = _DATA.flip_ratio
    test_short_side: int = _DATA.test_short_side
    mean: tuple[float, float, float] = tuple(_DATA.mean)
    std: tuple[float, float, float] = tuple(_DATA.std)

    @classmethod
    def from_config(cls, data_cfg) -> ClipSpec:
        return cls(
            clip_frames=data_cfg.clip_frames, frame_interval=data_cfg.frame_interval,
            jitter_min=data_cfg.jitter_min, jitter_max=data_cfg.jitter_max,
            scale_range=tuple(data_cfg.train_scale_range), crop_size=data_cfg.train_crop_size,
            flip_ratio=data_cfg.flip_ratio, test_short_side=data_cfg.test_short_side,
            mean=tuple(data_cfg.mean), std=tuple(data_cfg.std))


def encode_jpeg(frame: np.ndarray, quality: int) -> bytes:
    """uint8 [H, W, 3] RGB → JPEG bytes, 4:2:0 chroma as Pillow's default (deterministic for the
    same input and quality). simplejpeg (libjpeg-turbo) encodes from the array without Pillow's
    image copy: about 25% less CPU per frame, and prepare encodes every stored frame once."""
    return simplejpeg.encode_jpeg(np.ascontiguousarray(frame), quality=int(quality), colorspace="RGB",
                                  colorsubsampling="420")


def decode_jpeg(data) -> np.ndarray:
    """JPEG bytes (any buffer: bytes, memoryview, a pyarrow Buffer of the frame store) → uint8 [H, W, 3] RGB.

    simplejpeg (libjpeg-turbo, like Pillow, and the same pixels) decodes straight into a numpy array:
    about 35% less CPU per frame than Pillow's decode + copy, and the loaders decode 4 frames per clip.
    Grayscale JPEGs come back as RGB too.
    """
    # Zero-copy uint8 view: Arrow buffers export signed bytes, which simplejpeg refuses.
    return simplejpeg.decode_jpeg(np.frombuffer(data, np.uint8), colorspace="RGB")


def pick_clip_frames(ref_offsets: np.ndarray, spec: ClipSpec, rng: np.random.Generator | None) -> np.ndarray:
    """Choose, for each clip position, which stored frame to use.

    Args:
        ref_offsets: [O] sorted reference offsets stored in the row.
        rng: jitter source at train time; None means test mode (no jitter).

    Returns:
        int64 [T] positions into the row's frame list.
    """
    want = clip_ref_offsets(spec.clip_frames, spec.frame_interval)
    if rng is not None:
        want = want + rng.integers(spec.jitter_min, spec.jitter_max + 1, size=want.shape)
    pos = np.searchsorted(ref_offsets, want)
    pos = np.clip(pos, 0, len(ref_offsets) - 1)
    if not np.array_equal(ref_offsets[pos], want):
        missing = sorted(set(want.tolist()) - set(ref_offsets.tolist()))
        raise ValueError(f"prepared row lacks reference offsets {missing}: it was prepared without "
                         "temporal jitter; set data.temporal_jitter=true and rerun prepare")
    return pos


def _short_side_size(h: int, w: int, short: int) -> tuple[int, int]:
    """(height, width) of an h x w frame rescaled to short side `short`, aspect kept."""
    if h <= w:
        return short, int(round(w * short / h))
    return int(round(h * short / w)), short


def _resize_short(frames: np.ndarray, short: int) -> np.ndarray:
    """Bilinear resize of uint8 [T, H, W, 3] to short side `short`, aspect kept."""
    _, h, w, _ = frames.shape
    nh, nw = _short_side_size(h, w, short)
    if (nh, nw) == (h, w):
        return frames
    return np.stack([np.asarray(Image.fromarray(f).resize((nw, nh), Image.BILINEAR)) for f in frames])


def _rescale_crop(frames: np.ndarray, size: tuple[int, int], origin: tuple[int, int], crop: int) -> np.ndarray:
    """The crop x crop window at `origin` (y0, x0) of uint8 [T, H, W, 3] frames rescaled to `size`
    (h, w), computed without rescaling the rest of the frame.

    Pillow's `resize(box=...)` samples the source region that maps onto the window with the scale
    of the whole rescale (W / w, H / h) and the filter clamped to the full frame, so the result is
    the window of `_resize_short` (to rounding: at most 1 grey level apart), at about
    crop² / (h·w) of its cost (0.45 at short side 288 of a 456x256 frame).
    """
    _, fh, fw, _ = frames.shape
    h, w = size
    y0, x0 = origin
    if (h, w) == (fh, fw):
        return frames[:, y0:y0 + crop, x0:x0 + crop]
    sx, sy = fw / w, fh / h
    box = (x0 * sx, y0 * sy, (x0 + crop) * sx, (y0 + crop) * sy)
    return np.stack([np.asarray(Image.fromarray(f).resize((crop, crop), Image.BILINEAR, box=box)) for f in frames])


def train_transform(frames: np.ndarray, boxes: np.ndarray, spec: ClipSpec,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """RandomRescale [lo, hi] → RandomCrop(crop) → Flip(0.5) (normalised later).

    Args:
        frames: uint8 [T, H, W, 3].
        boxes: float32 [N, 4] normalised x1, y1, x2, y2.

    Returns:
        frames uint8 [T, crop, crop, 3] and boxes float32 [N, 4] in crop pixels, clipped to
        [0, crop - 1] (boxes are never dropped, as mmaction2's RandomCrop). Frames stay uint8
        (4x less to move through the object store); `lfb_ray.data.dataset.normalise` finishes
        the transform on the training worker.
    """
    short = int(rng.integers(spec.scale_range[0], spec.scale_range[1] + 1))
    _, fh, fw, _ = frames.shape
    h, w = _short_side_size(fh, fw, short)
    px = boxes.astype(np.float32) * np.array([w, h, w, h], dtype=np.float32)
    c = spec.crop_size
    y0 = int(rng.integers(0, h - c + 1))
    x0 = int(rng.integers(0, w - c + 1))
    x = _rescale_crop(frames, (h, w), (y0, x0), c)
    px = px - np.array([x0, y0, x0, y0], dtype=np.float32)
    px = np.clip(px, 0, c - 1)
    if rng.random() < spec.flip_ratio:
        x = x[:, :, ::-1]
        px = np.stack([c - px[:, 2], px[:, 1], c - px[:, 0], px[:, 3]], axis=1)
    return np.ascontiguousarray(x), px.astype(np.float32)


def test_transform(frames: np.ndarray, boxes: np.ndarray, spec: ClipSpec) -> tuple[np.ndarray, np.ndarray]:
    """Resize to short side `test_short_side`, no crop or flip (normalised later).

    Returns:
        frames uint8 [T, H', W', 3] and boxes float32 [N, 4] in pixels of those frames.
    """
    x = _resize_short(frames, spec.test_short_side)
    _, h, w, _ = x.shape
    px = boxes.astype(np.float32) * np.array([w, h, w, h], dtype=np.float32)
    return np.ascontiguousarray(x), px


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes [N, 4] x [M, 4] (x1, y1, x2, y2, no +1) → [N, M] float64."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def assign_targets(gt_boxes: np.ndarray, gt_labels: np.ndarray, proposals: np.ndarray, *,
                   pos_iou_thr: float, max_rois: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Training RoIs of one keyframe: GT boxes plus proposals with IoU >= thr (labels copied).

    mmaction2's MaxIoUAssignerAVA + RandomSampler(num=32, pos_fraction=1): negatives never enter
    the loss, so only positives are kept; more than `max_rois` positives are subsampled. It runs
    on the boxes after the train transform (mmaction2 assigns in the RoI head, after RandomCrop),
    so a GT box clipped to zero area by the crop matches nothing, itself included (IoU 0), and
    is dropped like any negative.

    Args:
        gt_boxes: [N, 4]; gt_labels: [N, C] multi-hot; proposals: [M, 4+] already thresholded
            (x1, y1, x2, y2 first), in the same coordinates as the GT boxes.

    Returns:
        rois [R, 4] and labels [R, C] in the input coordinates, R <= max_rois.
    """
    kept = (gt_boxes[:, 2] > gt_boxes[:, 0]) & (gt_boxes[:, 3] > gt_boxes[:, 1])  # IoU 1 with itself
    rois, labels = [gt_boxes[kept]], [gt_labels[kept]]
    if len(proposals) and len(gt_boxes):
        iou = box_iou(proposals[:, :4], gt_boxes)
        best = iou.argmax(1)
        pos = iou[np.arange(len(proposals)), best] >= pos_iou_thr
        rois.append(proposals[pos, :4])
        labels.append(gt_labels[best[pos]])
    rois_a = np.concatenate(rois).astype(np.float32)
    labels_a = np.concatenate(labels).astype(np.float32)
    if len(rois_a) > max_rois:
        keep = np.sort(rng.choice(len(rois_a), max_rois, replace=False))
        rois_a, labels_a = rois_a[keep], labels_a[keep]
    return rois_a, labels_a


def transform_and_assign(frames: np.ndarray, gt_boxes: np.ndarray, gt_labels: np.ndarray, proposals: np.ndarray,
                         spec: ClipSpec, *, pos_iou_thr: float, max_rois: int,
                         rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One training sample in mmaction2's order: rescale/crop/flip the frames with the GT boxes and
    the proposals, then assign the targets on the transformed boxes (`assign_targets`).

    Args:
        frames: uint8 [T, H, W, 3]; gt_boxes: [N, 4] normalised; gt_labels: [N, C];
        proposals: [M, 4+] normalised, already thresholded.

    Returns:
        clip uint8 [T, crop, crop, 3]; rois float32 [R, 4] in crop pixels; labels float32 [R, C].
    """
    n_gt = len(gt_boxes)
    boxes = np.concatenate([np.asarray(gt_boxes, np.float32).reshape(-1, 4),
                            np.asarray(proposals, np.float32)[:, :4].reshape(-1, 4)])
    clip, px = train_transform(frames, boxes, spec, rng)
    rois, labels = assign_targets(px[:n_gt], gt_labels, px[n_gt:], pos_iou_thr=pos_iou_thr, max_rois=max_rois,
                                  rng=rng)
    return clip, rois, labels
