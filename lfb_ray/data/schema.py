"""The prepared format (version 2): per video, a frame store holding each decoded frame once, and a
small keyframe table that refers to it.

Why two tables: the clip windows of neighbouring keyframes overlap (with the [-8, 7] jitter at
stride 16 a keyframe touches 64 reference offsets, ~2.1 s, and keyframes are 1 s apart), so rows
that carried their own JPEGs stored every frame about twice, and a training step read all 64 JPEGs
of a row to use 4. Now `frames.arrow` holds each needed frame of the video once, one Arrow record
batch per frame (uncompressed IPC file: memory-mapped, a reader touches only the frames it takes),
and `keyframes.parquet` holds boxes, labels, proposals and, per reference offset, the row of its
frame in the store. Ragged per-keyframe arrays are stored flat with a count column.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

__all__ = ["FRAMES_FILE", "FRAME_SCHEMA", "KEYFRAMES_FILE", "SCHEMA", "SCHEMA_VERSION", "row_gt", "row_proposals"]

SCHEMA_VERSION = 2
KEYFRAMES_FILE = "keyframes.parquet"
FRAMES_FILE = "frames.arrow"

FRAME_SCHEMA = pa.schema([
    ("frame_index", pa.int32()),  # native 0-based frame index in the source video
    ("jpeg", pa.binary()),  # RGB JPEG, stored short side (see the keyframe table's height/width)
])

SCHEMA = pa.schema([
    ("video_id", pa.string()),
    ("timestamp", pa.int32()),  # AVA movie second of the keyframe
    ("split", pa.string()),  # "train" | "val"
    ("excluded", pa.bool_()),  # in the excluded-timestamps file of the split
    ("ref_offsets", pa.list_(pa.int16())),  # [O] sorted reference-frame offsets (30 fps units)
    ("frame_rows", pa.list_(pa.int32())),  # [O] record batch (= row) of each offset's frame in frames.arrow
    ("frame_indices", pa.list_(pa.int32())),  # [O] native frame index of each offset's frame
    ("frames_file", pa.string()),  # the video's frame store, relative to the prepared root
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
