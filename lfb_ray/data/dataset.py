"""Ray Datasets of training and test samples read from the prepared keyframe tables and frame stores.

JPEG decoding, frame choice, augmentation and target assignment run in Ray Data CPU tasks
(`map_batches`), so training workers only move ready tensors; each task reads from a video's frame
store (`lfb_ray.data.frames`) only the frames its clips use. Train samples have a fixed shape (crop
size, RoIs padded to `max_rois_per_keyframe`), which lets `iter_torch_batches` stack them. Test
samples keep the full frame and their own number of RoIs; `collate_test` pads per batch (for
transport only: inference runs each frame size on its own).

Training order (`epoch_order`, `train_samples`): every epoch is a fresh permutation of all training
keyframes, seeded by `train.seed` and the epoch and dealt out to the ranks like PyTorch's
`DistributedSampler(shuffle=True)` (mmaction2's sampler). Each sample's augmentation draws from its
own generator, seeded by (`train.seed`, epoch, keyframe), so a run is reproducible whatever the
batching, the number of data tasks or the rank a keyframe lands on, and a mid-epoch resume skips
exactly the keyframes already seen.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from lfb_ray.config import Config, DataConfig
from lfb_ray.data.batches import TestBatch, TrainBatch
from lfb_ray.data.clips import (
    ClipSpec,
    decode_jpeg,
    pick_clip_frames,
    select_proposals,
    test_transform,
    transform_and_assign,
)
from lfb_ray.data.frames import open_frame_store
from lfb_ray.data.schema import row_gt, row_proposals

__all__ = ["TestBatch", "TrainBatch", "clip_frames", "collate_test", "collate_train", "count_rows", "decode_test_rows",
           "decode_train_rows", "epoch_order", "normalise", "read_keyframes", "read_split", "train_samples"]


RAW_COLUMNS = ["video_id", "timestamp", "excluded", "ref_offsets", "frame_rows", "frames_file", "height",
               "width", "num_gt", "gt_boxes", "gt_labels", "num_proposals", "proposals"]


def read_split(cfg: Config, split: str, *, drop_excluded: bool | None = None):
    """Ray Dataset of the keyframe rows of one split (test-time readers; training uses
    `train_samples`).

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
    ds = ray.data.read_parquet(files, filesystem=fs, num_cpus=cfg.cluster.data_cpus)
    ds = ds.select_columns(RAW_COLUMNS)
    if drop_excluded if drop_excluded is not None else split == "train":
        from ray.data.expressions import col

        ds = ds.filter(expr=col("excluded") == False)  # noqa: E712 (an expression, not a bool)
    return ds


def read_keyframes(cfg: Config, split: str, *, drop_excluded: bool, files: list[str] | None = None) -> pa.Table:
    """The keyframe rows of a split as one Arrow table (`RAW_COLUMNS`), in manifest order (videos
    sorted, keyframes by second). Small: no frames (AVA v2.1 train: ~235k rows, tens of MB).

    `files`: a subset of the split's keyframe tables (default all).
    """
    import pyarrow.parquet as pq

    from lfb_ray.data.prep import prepared_files
    from lfb_ray.storage import resolve

    fs, _ = resolve(cfg.prepared_dir)
    tables = []
    for f in files if files is not None else prepared_files(cfg.prepared_dir, split):
        with fs.open_input_file(f) as fh:
            tables.append(pq.read_table(fh, columns=RAW_COLUMNS))
    table = pa.concat_tables(tables) if tables else pa.table({c: [] for c in RAW_COLUMNS})
    if drop_excluded:
        keep = ~table.column("excluded").to_numpy(zero_copy_only=False).astype(bool)
        table = table.filter(pa.array(keep))
    return table


def count_rows(cfg: Config, split: str, *, drop_excluded: bool) -> int:
    """Rows of a split from the keyframe tables, without running Ray Data."""
    return read_keyframes(cfg, split, drop_excluded=drop_excluded).num_rows


def epoch_order(num_keyframes: int, seed: int, epoch: int, world: int) -> np.ndarray:
    """Which keyframes each rank trains on in `epoch`, in order.

    A permutation of all keyframes drawn from (`seed`, `epoch`), padded with its own first entries
    to a multiple of `world` and dealt round-robin, as `torch.utils.data.DistributedSampler(
    shuffle=True)`: every keyframe once per epoch (plus at most `world - 1` repeats of the padding),
    the same number of steps on every rank, a new order every epoch, the same order for the same seed.

    Returns:
        int64 [world, ceil(num_keyframes / world)] row positions into the keyframe table.
    """
    if num_keyframes < 1:
        raise ValueError("no training keyframes to order")
    perm = np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_keyframes)
    per_rank = math.ceil(num_keyframes / world)
    perm = np.concatenate([perm, perm[: per_rank * world - num_keyframes]])
    return perm.reshape(per_rank, world).T.copy()


def train_samples(cfg: Config, table: pa.Table, positions: np.ndarray, epoch: int, *, block_rows: int = 0):
    """A Ray Dataset of decoded, augmented training samples for `positions` of `table`, in that order.

    Args:
        table: `read_keyframes(cfg, "train", drop_excluded=True)`.
        positions: int64 [N] rows of `table` (one rank's `epoch_order`, minus the already-seen
            prefix on a mid-epoch resume).
        block_rows: rows per Ray Data block (one decode task each); default two training batches.

    Order is preserved (`DataContext.execution_options.preserve_order`), so the sample order is
    `positions`' whatever the number of decode tasks.
    """
    import ray

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    positions = np.asarray(positions, dtype=np.int64)
    block = block_rows or 2 * cfg.train.batch_size_per_worker

    def block_of(pos: np.ndarray) -> pa.Table:  # `take` copies: a block never drags the whole table along
        return table.take(pa.array(pos)).append_column("row_id", pa.array(pos)).append_column(
            "epoch", pa.array(np.full(len(pos), epoch, np.int64)))

    blocks = [block_of(positions[i:i + block]) for i in range(0, len(positions), block)] or [block_of(positions)]
    return ray.data.from_arrow(blocks).map_batches(
        decode_train_rows, batch_size=block, num_cpus=cfg.cluster.data_cpus,
        fn_kwargs={"data": cfg.data, "prepared_uri": cfg.prepared_dir, "seed": cfg.train.seed})


def _rows(batch: dict) -> list[dict]:
    n = len(batch["video_id"])
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def clip_frames(row: dict, spec: ClipSpec, rng: np.random.Generator | None, prepared_uri: str) -> np.ndarray:
    """The clip of a keyframe row: its T frames (jittered when `rng` is given) read from the video's
    frame store and decoded. Returns uint8 [T, H, W, 3]."""
    offsets = np.asarray(row["ref_offsets"], dtype=np.int64)
    pos = pick_clip_frames(offsets, spec, rng)
    store = open_frame_store(prepared_uri, str(row["frames_file"]))
    rows = np.asarray(row["frame_rows"], dtype=np.int64)[pos]
    return np.stack([decode_jpeg(store.jpeg(int(r))) for r in rows])  # [T, H, W, 3]


def decode_train_rows(batch: dict, *, data: DataConfig, prepared_uri: str, seed: int) -> dict:
    """Ray Data UDF: keyframe rows (with `row_id` and `epoch` columns) → fixed-shape training samples.

    Each row's augmentation (jitter, scale, crop, flip, RoI subsampling) draws from
    `default_rng([seed, epoch, row_id])`.

    Returns (numpy batch of B rows):
        clip uint8 [B, T, S, S, 3] (normalised by `collate_train`); rois float32 [B, R, 4] crop pixels (R =
        max_rois_per_keyframe, padded); roi_valid bool [B, R]; labels float32 [B, R, C];
        video_id [B] str; timestamp int64 [B].
    """
    spec = ClipSpec.from_config(data)
    r_max, c = data.max_rois_per_keyframe, data.num_classes
    out = {k: [] for k in ("clip", "rois", "roi_valid", "labels", "video_id", "timestamp")}
    for row in _rows(batch):
        rng = np.random.default_rng([seed, int(row["epoch"]), int(row["row_id"])])
        frames = clip_frames(row, spec, rng if data.temporal_jitter else None, prepared_uri)
        gt_boxes, gt_labels = row_gt(row, c)
        props = select_proposals(row_proposals(row), data.train_person_score_thr, data.max_proposals)
        clip, px, labels = transform_and_assign(frames, gt_boxes, gt_labels, props, spec, pos_iou_thr=data.pos_iou_thr,
                                                max_rois=r_max, rng=rng)
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


def decode_test_rows(batch: dict, *, data: DataConfig, prepared_uri: str, score_thr: float) -> dict:
    """Ray Data UDF: raw rows → full-frame test clips with their thresholded proposals.

    Returns (numpy batch, ragged fields as object arrays):
        clip [B] of uint8 [T, H, W, 3] (normalised by `collate_test`); boxes [B] of float32 [n, 4] normalised; box_px [B]
        of float32 [n, 4] clip pixels; box_scores [B] of float32 [n]; video_id [B];
        timestamp int64 [B].
    """
    spec = ClipSpec.from_config(data)
    out = {k: [] for k in ("clip", "boxes", "box_px", "box_scores", "video_id", "timestamp")}
    for row in _rows(batch):
        frames = clip_frames(row, spec, None, prepared_uri)
        props = select_proposals(row_proposals(row), score_thr, data.max_proposals)
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


def normalise(frames, mean, std):
    """uint8 [B, T, H, W, 3] (numpy or torch, on any device) → float32 [B, 3, T, H, W] with the
    config's `data.mean` / `data.std` (RGB, 0-255), on the input's device (send uint8 to the GPU and normalise there: 4x fewer bytes)."""
    import torch

    x = torch.as_tensor(frames).float()
    x = (x - torch.tensor(mean, device=x.device)) / torch.tensor(std, device=x.device)
    return x.permute(0, 4, 1, 2, 3).contiguous()


def collate_train(batch: dict, mean, std) -> TrainBatch:
    """A numpy train batch (`decode_train_rows`, RoIs padded per clip) as the tensors of a step,
    padding RoIs dropped (`TrainBatch` gives the shapes)."""
    import torch

    valid = np.asarray(batch["roi_valid"], dtype=bool)
    b_idx, r_idx = np.nonzero(valid)
    rois = np.asarray(batch["rois"], dtype=np.float32)[b_idx, r_idx]
    labels = np.asarray(batch["labels"], dtype=np.float32)[b_idx, r_idx]
    vids = np.asarray(batch["video_id"], dtype=object)
    ts = np.asarray(batch["timestamp"], dtype=np.int64)
    return TrainBatch(
        clip=normalise(np.asarray(batch["clip"]), mean, std),
        rois=torch.from_numpy(np.concatenate([b_idx[:, None].astype(np.float32), rois], axis=1)),
        labels=torch.from_numpy(labels),
        roi_video_ids=[str(v) for v in vids[b_idx]],
        roi_seconds=ts[b_idx],
        num_clips=int(valid.shape[0]),
    )


def collate_test(batch: dict, mean, std) -> TestBatch:
    """Pad full-frame clips of one batch to a common size (bottom/right) and list all RoIs
    (`TestBatch` gives the shapes).

    The padding is only for transport: `lfb_ray.inference.predict_batch` runs each frame size of
    the batch as its own forward pass on the unpadded clips (`sizes`), so a box's score never
    depends on which other clips shared its batch.
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
    sizes = np.array([c.shape[2:4] for c in clips], np.int64).reshape(len(clips), 2)
    return TestBatch(clip=out, sizes=sizes, rois=torch.from_numpy(np.concatenate(rois)),
                     boxes=np.concatenate(boxes), roi_batch=b,
                     roi_video_ids=[str(v) for v in vids[b]], roi_seconds=ts[b])
