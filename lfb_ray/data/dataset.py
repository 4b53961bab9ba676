"""Ray Datasets of training and test samples read from the prepared shards.

JPEG decoding, frame choice, augmentation and target assignment run in Ray Data CPU tasks
(`map_batches`), so training workers only move ready tensors. Train samples have a fixed shape
(crop size, RoIs padded to `max_rois_per_keyframe`), which lets `iter_torch_batches` stack them.
Test samples keep the full frame and their own number of RoIs; `collate_test` pads per batch.
"""

from __future__ import annotations

import numpy as np

from lfb_ray.config import Config
from lfb_ray.data.clips import (
    ClipSpec,
    assign_targets,
    decode_jpeg,
    pick_clip_frames,
    select_proposals,
    test_transform,
    train_transform,
)
from lfb_ray.data.schema import row_gt, row_proposals

__all__ = ["collate_test", "collate_train", "count_rows", "decode_test_rows", "decode_train_rows", "normalise",
           "read_split"]

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # DataConfig defaults (RGB, 0-255 pixels)
IMAGENET_STD = (58.395, 57.12, 57.375)

RAW_COLUMNS = ["video_id", "timestamp", "excluded", "ref_offsets", "frame_slot", "frames", "height",
               "width", "num_gt", "gt_boxes", "gt_labels", "num_proposals", "proposals"]


def read_split(cfg: Config, split: str, *, drop_excluded: bool | None = None):
    """Ray Dataset of the raw prepared rows of one split.

    Args:
        drop_excluded: drop keyframes in the exclusions file; default True for train (mmaction2
            0.x removes them from training only) and False otherwise.
    """
    import ray

    from lfb_ray.data.prep import prepared_files
    from lfb_ray.storage import resolve

    files = prepared_files(cfg.prepared_dir, split)
    fs, _ = resolve(cfg.prepared_dir)
    # Reads take `cluster.data_cpus` (not Ray Data's default 1 CPU), or small nodes whose CPUs are
    # held by training workers would never schedule a read.
    ds = ray.data.read_parquet(files, filesystem=fs, ray_remote_args={"num_cpus": cfg.cluster.data_cpus})
    ds = ds.select_columns(RAW_COLUMNS)
    if drop_excluded if drop_excluded is not None else split == "train":
        from ray.data.expressions import col

        ds = ds.filter(expr=col("excluded") == False)  # noqa: E712 (an expression, not a bool)
    return ds


def count_rows(cfg: Config, split: str, *, drop_excluded: bool) -> int:
    """Rows of a split from the Parquet files' `excluded` column, without running Ray Data."""
    import pyarrow.parquet as pq

    from lfb_ray.data.prep import prepared_files
    from lfb_ray.storage import resolve

    fs, _ = resolve(cfg.prepared_dir)
    n = 0
    for f in prepared_files(cfg.prepared_dir, split):
        with fs.open_input_file(f) as fh:
            excl = pq.read_table(fh, columns=["excluded"]).column("excluded").to_numpy(zero_copy_only=False)
        n += int((~excl).sum()) if drop_excluded else len(excl)
    return n


def _rows(batch: dict) -> list[dict]:
    n = len(batch["video_id"])
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def _clip_frames(row: dict, spec: ClipSpec, rng: np.random.Generator | None) -> np.ndarray:
    offsets = np.asarray(row["ref_offsets"], dtype=np.int64)
    pos = pick_clip_frames(offsets, spec, rng)
    slots = np.asarray(row["frame_slot"], dtype=np.int64)[pos]
    frames = row["frames"]
    return np.stack([decode_jpeg(frames[s]) for s in slots])  # [T, H, W, 3]


def decode_train_rows(batch: dict, *, cfg_data: dict, seed: int | None = None) -> dict:
    """Ray Data UDF: raw rows → fixed-shape training samples.

    Returns (numpy batch of B rows):
        clip uint8 [B, T, S, S, 3] (normalised by `collate_train`); rois float32 [B, R, 4] crop pixels (R =
        max_rois_per_keyframe, padded); roi_valid bool [B, R]; labels float32 [B, R, C];
        video_id [B] str; timestamp int64 [B].
    """
    from lfb_ray.config import DataConfig, config_from_dict

    d: DataConfig = config_from_dict({"data": cfg_data}).data
    spec = ClipSpec.from_config(d)
    rng = np.random.default_rng(seed)
    r_max, c = d.max_rois_per_keyframe, d.num_classes
    out = {k: [] for k in ("clip", "rois", "roi_valid", "labels", "video_id", "timestamp")}
    for row in _rows(batch):
        frames = _clip_frames(row, spec, rng if d.temporal_jitter else None)
        gt_boxes, gt_labels = row_gt(row, c)
        props = select_proposals(row_proposals(row), d.train_person_score_thr, d.max_proposals)
        rois, labels = assign_targets(gt_boxes, gt_labels, props, pos_iou_thr=d.pos_iou_thr,
                                      max_rois=r_max, rng=rng)
        clip, px = train_transform(frames, rois, spec, rng)
        n = len(px)
        pad_rois = np.zeros((r_max, 4), np.float32)
        pad_rois[:n] = px
        pad_labels = np.zeros((r_max, c), np.float32)
        pad_labels[:n] = labels
        valid = np.zeros(r_max, bool)
        valid[:n] = True
        out["clip"].append(clip)
        out["rois"].append(pad_rois)
        out["roi_valid"].append(valid)
        out["labels"].append(pad_labels)
        out["video_id"].append(str(row["video_id"]))
        out["timestamp"].append(int(row["timestamp"]))
    return {k: (np.stack(v) if k not in ("video_id",) else np.array(v, dtype=object)) for k, v in out.items()}


def decode_test_rows(batch: dict, *, cfg_data: dict, score_thr: float) -> dict:
    """Ray Data UDF: raw rows → full-frame test clips with their thresholded proposals.

    Returns (numpy batch, ragged fields as object arrays):
        clip [B] of uint8 [T, H, W, 3] (normalised by `collate_test`); boxes [B] of float32 [n, 4] normalised; box_px [B]
        of float32 [n, 4] clip pixels; box_scores [B] of float32 [n]; video_id [B];
        timestamp int64 [B].
    """
    from lfb_ray.config import config_from_dict

    d = config_from_dict({"data": cfg_data}).data
    spec = ClipSpec.from_config(d)
    out = {k: [] for k in ("clip", "boxes", "box_px", "box_scores", "video_id", "timestamp")}
    for row in _rows(batch):
        frames = _clip_frames(row, spec, None)
        props = select_proposals(row_proposals(row), score_thr, d.max_proposals)
        clip, px = test_transform(frames, props[:, :4], spec)
        out["clip"].append(clip)
        out["boxes"].append(props[:, :4].astype(np.float32))
        out["box_px"].append(px)
        out["box_scores"].append(props[:, 4].astype(np.float32))
        out["video_id"].append(str(row["video_id"]))
        out["timestamp"].append(int(row["timestamp"]))
    res = {}
    for k, v in out.items():
        if k == "timestamp":
            res[k] = np.array(v, dtype=np.int64)
        else:
            arr = np.empty(len(v), dtype=object)
            arr[:] = v
            res[k] = arr
    return res


def normalise(frames, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """uint8 [B, T, H, W, 3] (numpy or torch, on any device) → float32 [B, 3, T, H, W] with mean/std
    on 0-255, on the input's device (send uint8 to the GPU and normalise there: 4x fewer bytes)."""
    import torch

    x = torch.as_tensor(frames).float()
    x = (x - torch.tensor(mean, device=x.device)) / torch.tensor(std, device=x.device)
    return x.permute(0, 4, 1, 2, 3).contiguous()


def collate_train(batch: dict, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> dict:
    """`iter_torch_batches` collate: numpy train batch → torch tensors (+ keys as lists).

    Returns:
        clip [B, 3, T, S, S]; rois [R_valid, 5] (batch index, x1, y1, x2, y2); labels
        [R_valid, C]; roi_batch [R_valid] long; video_ids list[str] per RoI; seconds [R_valid].
    """
    import torch

    valid = np.asarray(batch["roi_valid"], dtype=bool)
    b_idx, r_idx = np.nonzero(valid)
    rois = np.asarray(batch["rois"], dtype=np.float32)[b_idx, r_idx]
    labels = np.asarray(batch["labels"], dtype=np.float32)[b_idx, r_idx]
    vids = np.asarray(batch["video_id"], dtype=object)
    ts = np.asarray(batch["timestamp"], dtype=np.int64)
    return {
        "clip": normalise(np.asarray(batch["clip"]), mean, std),
        "rois": torch.from_numpy(np.concatenate([b_idx[:, None].astype(np.float32), rois], axis=1)),
        "labels": torch.from_numpy(labels),
        "roi_video_ids": [str(v) for v in vids[b_idx]],
        "roi_seconds": ts[b_idx],
        "num_clips": int(valid.shape[0]),
    }


def collate_test(batch: dict, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> dict:
    """Pad full-frame clips of one batch to a common size (bottom/right) and list all RoIs.

    Returns:
        clip [B, 3, T, Hmax, Wmax]; rois [R, 5]; boxes [R, 4] normalised; roi_batch [R];
        video_ids list[str] per RoI; seconds [R].
    """
    import torch

    clips = [normalise(c[None], mean, std)[0] for c in batch["clip"]]  # [3, T, H, W] each
    hmax = max(c.shape[2] for c in clips)
    wmax = max(c.shape[3] for c in clips)
    out = torch.zeros(len(clips), clips[0].shape[0], clips[0].shape[1], hmax, wmax)
    for i, c in enumerate(clips):
        out[i, :, :, : c.shape[2], : c.shape[3]] = c  # zero (= mean colour) padding bottom/right
    rois, boxes, bidx = [], [], []
    for i, (px, nb) in enumerate(zip(batch["box_px"], batch["boxes"])):
        rois.append(np.concatenate([np.full((len(px), 1), i, np.float32), px], axis=1))
        boxes.append(nb)
        bidx.append(np.full(len(px), i, np.int64))
    b = np.concatenate(bidx)
    vids = np.asarray(batch["video_id"], dtype=object)
    ts = np.asarray(batch["timestamp"], dtype=np.int64)
    return {"clip": out, "rois": torch.from_numpy(np.concatenate(rois)),
            "boxes": np.concatenate(boxes), "roi_batch": b,
            "roi_video_ids": [str(v) for v in vids[b]], "roi_seconds": ts[b]}
