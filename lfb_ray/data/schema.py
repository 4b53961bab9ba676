"""The prepared-shard schema: one Parquet row per annotated keyframe.

Frames are JPEG bytes for every reference offset the configured sampler can touch (4 without
jitter, 64 with the [-8, 7] jitter at stride 16). Ragged per-keyframe arrays (boxes, labels,
proposals) are stored flat with a count column so plain pyarrow and Ray Data both read them.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

__all__ = ["SCHEMA", "SCHEMA_VERSION", "row_gt", "row_proposals"]

SCHEMA_VERSION = 1

SCHEMA = pa.schema([
    ("video_id", pa.string()),
    ("timestamp", pa.int32()),  # AVA movie second of the keyframe
    ("split", pa.string()),  # "train" | "val"
    ("excluded", pa.bool_()),  # in the excluded-timestamps file of the split
    ("ref_offsets", pa.list_(pa.int16())),  # [O] sorted reference-frame offsets (30 fps units)
    ("frame_slot", pa.list_(pa.int16())),  # [O] index into `frames` for each offset
    ("frame_indices", pa.list_(pa.int32())),  # [F] native frame index of each stored JPEG
    ("frames", pa.list_(pa.binary())),  # [F] JPEG bytes (RGB, short side data.short_side)
    ("height", pa.int32()),  # stored frame size
    ("width", pa.int32()),
    ("orig_height", pa.int32()),  # size of the source video
    ("orig_width", pa.int32()),
    ("fps", pa.float32()),  # native fps of the source video
    ("num_gt", pa.int32()),
    ("gt_boxes", pa.list_(pa.float32())),  # [num_gt * 4] normalised x1, y1, x2, y2
    ("gt_labels", pa.list_(pa.uint8())),  # [num_gt * num_classes] multi-hot, index 0 unused
    ("gt_person_ids", pa.list_(pa.int32())),  # [num_gt], -1 when the CSV has no person id
    ("num_proposals", pa.int32()),
    ("proposals", pa.list_(pa.float32())),  # [num_proposals * 5] normalised boxes + score, unthresholded
    ("proposals_missing", pa.bool_()),  # key absent from the proposals file: whole-frame box stored
])


def row_gt(row: dict, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """GT boxes [N, 4] float32 and multi-hot labels [N, num_classes] float32 of a row."""
    n = int(row["num_gt"])
    boxes = np.asarray(row["gt_boxes"], dtype=np.float32).reshape(n, 4)
    labels = np.asarray(row["gt_labels"], dtype=np.float32).reshape(n, num_classes)
    return boxes, labels


def row_proposals(row: dict) -> np.ndarray:
    """Unthresholded proposals [M, 5] float32 (x1, y1, x2, y2, score) of a row."""
    return np.asarray(row["proposals"], dtype=np.float32).reshape(int(row["num_proposals"]), 5)
