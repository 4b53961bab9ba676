"""Writing a feature bank: `write_bank` from arrays in memory, `write_bank_parts` from parts read one
at a time (the bank build's merge); both write the same bytes for the same rows.

Locally a bank is written into a temporary sibling folder, fsynced, manifest.json last, and renamed
into place; on object stores the old manifest is deleted first and the new one written last.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from lfb_ray import cache
from lfb_ray.bank.format import (
    FEATURES_FILE,
    FORMAT_VERSION,
    INDEX_FILE,
    MANIFEST_FILE,
    BankError,
    features_schema,
    split_location,
)

__all__ = ["BankPart", "BankSummary", "write_bank", "write_bank_parts"]

_ROWS_PER_BATCH = 1 << 18  # rows per Arrow record batch (1 GiB at C=2048 fp16); readers handle any
_COPY_BYTES = 1 << 18  # features copied per step when a streamed write gathers a part's rows


@dataclass(frozen=True)
class BankSummary:
    """What `write_bank` wrote; `manifest` is the full manifest.json content."""

    path: str
    feature_dim: int
    num_videos: int
    num_seconds: int
    num_features: int
    nbytes: int  # bytes of all files of the bank
    manifest: dict[str, Any] = field(repr=False)


def _write_ipc(stream: pa.NativeFile, table: pa.Table) -> None:
    # Uncompressed IPC *file* format: buffers can be memory-mapped in place by readers.
    with pa.ipc.new_file(stream, table.schema) as writer:
        writer.write_table(table, max_chunksize=_ROWS_PER_BATCH)


def _as_rows(n: int, seconds: Any, person_index: Any, boxes: Any, scores: Any,
             where: str = "") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The small columns of `n` rows in their stored dtypes: int32 [n], int32 [n], float32 [n, 4], float32 [n]."""
    seconds = np.asarray(seconds).astype(np.int32, casting="same_kind").reshape(-1)
    person_index = np.asarray(person_index).astype(np.int32, casting="same_kind").reshape(-1)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    if not len(seconds) == len(person_index) == len(boxes) == len(scores) == n:
        raise BankError(f"{where}row counts differ: video_ids {n}, seconds {len(seconds)}, person_index "
                        f"{len(person_index)}, boxes {len(boxes)}, scores {len(scores)}")
    return seconds, person_index, boxes, scores


@dataclass(frozen=True)
class _Layout:
    """Where each input row goes: the bank's rows are sorted by (video, second, person_index).

    `order[i]` is the input row stored at bank row i; the keyframe seconds start at `starts` [S]
    and hold `counts` [S] rows each.
    """

    uniq: np.ndarray  # [V] sorted video ids
    codes: np.ndarray  # [N] video code of each bank row (index into uniq)
    seconds: np.ndarray  # [N] int32
    person_index: np.ndarray  # [N] int32
    order: np.ndarray  # [N] int64
    starts: np.ndarray  # [S] int64
    counts: np.ndarray  # [S] int32


def _layout(uniq: np.ndarray, codes: np.ndarray, seconds: np.ndarray, person_index: np.ndarray) -> _Layout:
    """Sort rows given as video codes (`uniq` sorted: code-point order == UTF-8 byte order).

    Raises:
        BankError: duplicate (video, second, person_index) rows.
    """
    n = len(codes)
    order = np.lexsort((person_index, seconds, codes))
    codes, seconds, person_index = codes[order], seconds[order], person_index[order]
    same_second = (codes[1:] == codes[:-1]) & (seconds[1:] == seconds[:-1])
    dup = same_second & (person_index[1:] == person_index[:-1])
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        raise BankError(f"duplicate row (video {uniq[codes[i]]!r}, second {seconds[i]}, "
                        f"person_index {person_index[i]})")
    starts = np.flatnonzero(np.concatenate([[True], ~same_second])) if n else np.zeros(0, np.int64)
    counts = np.diff(np.append(starts, n)).astype(np.int32)
    return _Layout(uniq, codes, seconds, person_index, order, starts.astype(np.int64), counts)


def _index_table(layout: _Layout) -> pa.Table:
    n = len(layout.codes)
    return pa.table({
        "video_id": pa.array(layout.uniq[layout.codes[layout.starts]].tolist() if n else [], pa.string()),
        "second": pa.array(layout.seconds[layout.starts], pa.int32()),
        "row_start": pa.array(layout.starts),
        "count": pa.array(layout.counts),
    })


def _new_manifest(layout: _Layout, dim: int, metadata: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "format": "lfb_ray.bank",
        "format_version": FORMAT_VERSION,
        "bank_id": uuid.uuid4().hex,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "feature_dim": dim,
        "feature_dtype": "float16",
        "num_videos": len(layout.uniq),
        "num_seconds": len(layout.starts),
        "num_features": len(layout.codes),
        "files": {},
        "metadata": metadata or {},
    }


# Writes one bank file into an open stream; the Path is a folder for scratch files (removed after).
_FileWriter = Callable[[pa.NativeFile, Path], None]


def _write_files(path: str | os.PathLike, filesystem: pafs.FileSystem | None, files: dict[str, _FileWriter],
                 layout: _Layout, manifest: dict[str, Any]) -> BankSummary:
    fs, root, local = split_location(path, filesystem)
    if local:
        _write_local(Path(root), files, manifest)
    else:
        _write_remote(fs, root, files, manifest)
    return BankSummary(path=os.fspath(path), feature_dim=manifest["feature_dim"], num_videos=len(layout.uniq),
                       num_seconds=len(layout.starts), num_features=len(layout.codes),
                       nbytes=sum(manifest["files"].values()), manifest=manifest)


def write_bank(
    path: str | os.PathLike,
    *,
    video_ids: Sequence[str] | np.ndarray,
    seconds: np.ndarray,
    person_index: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    features: np.ndarray,
    metadata: dict[str, Any] | None = None,
    filesystem: pafs.FileSystem | None = None,
) -> BankSummary:
    """Write a feature bank folder; one row per stored person feature, in any order.

    Locally the bank is written into a temporary sibling folder and renamed into place, so an existing
    bank at `path` is replaced only once the new one is complete. On object stores (`s3://...`) files
    are written in place: the old manifest is deleted first and the new one written last, so a reader
    never sees a half-written bank as complete. `write_bank_parts` writes the same bytes from parts
    read one at a time, for banks larger than memory.

    Args:
        path: destination folder, local or a pyarrow filesystem URI (`s3://bucket/prefix`, `file://`).
        video_ids: [N] video id of each row.
        seconds: [N] integer keyframe second (AVA timestamp).
        person_index: [N] order of the person within its keyframe; unique per (video, second).
        boxes: [N, 4] normalised x1, y1, x2, y2 (NaN when unknown).
        scores: [N] detection scores (NaN when unknown).
        features: [N, C] features, stored as float16 (cast if given in another dtype).
        metadata: JSON-serialisable extras recorded in the manifest (checkpoint hash, config, ...).
        filesystem: pyarrow filesystem `path` lives on, instead of inferring it from a URI.

    Returns:
        BankSummary of the written bank.

    Raises:
        BankError: inconsistent lengths or duplicate (video, second, person_index) rows, or `path`
            is a non-empty folder that is not a bank.
    """
    video_ids = np.asarray(video_ids, dtype=str)
    n = len(video_ids)
    seconds, person_index, boxes, scores = _as_rows(n, seconds, person_index, boxes, scores)
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[1] < 1:
        raise BankError(f"features must be [N, C] with C >= 1, got shape {features.shape}")
    if len(features) != n:
        raise BankError(f"row counts differ: video_ids {n}, features {len(features)}")
    features = features.astype(np.float16, copy=False)
    dim = features.shape[1]
    uniq, codes = np.unique(video_ids, return_inverse=True)
    layout = _layout(uniq, codes.reshape(-1), seconds, person_index)
    order = layout.order

    flat = pa.array(features[order].reshape(-1))
    table = pa.table([
        pa.array(uniq[layout.codes].tolist() if n else [], pa.string()),
        pa.array(layout.seconds),
        pa.array(layout.person_index),
        pa.FixedSizeListArray.from_arrays(pa.array(boxes[order].reshape(-1)), 4),
        pa.array(scores[order]),
        pa.FixedSizeListArray.from_arrays(flat, dim),
    ], schema=features_schema(dim))
    index = _index_table(layout)
    files = {FEATURES_FILE: lambda f, _: _write_ipc(f, table), INDEX_FILE: lambda f, _: _write_ipc(f, index)}
    return _write_files(path, filesystem, files, layout, _new_manifest(layout, dim, metadata))


class BankPart(Protocol):
    """Some rows of a bank, read on demand by `write_bank_parts`: first the small columns of every
    part, then the features of one part at a time."""

    name: str  # names the part in errors (a file path)

    def columns(self) -> Mapping[str, np.ndarray]:
        """video_id [n] str, second [n] int, person_index [n] int, box [n, 4] float, score [n] float."""

    def feature_shape(self) -> tuple[int, ...]:
        """Shape of `features()` without reading them: (n, C)."""

    def features(self) -> np.ndarray:
        """[n, C] features in the order of `columns()` (stored as float16)."""


def write_bank_parts(
    path: str | os.PathLike,
    parts: Sequence[BankPart],
    *,
    metadata: dict[str, Any] | None = None,
    filesystem: pafs.FileSystem | None = None,
) -> BankSummary:
    """Write the bank of all rows of `parts`: the bytes `write_bank` writes for their concatenation.

    Why: a split's bank is tens of GB on AVA. Only the small columns of all parts are held (about
    60 bytes a row); the features are read one part at a time into a memory-mapped scratch file of
    one Arrow record batch, which is appended to features.arrow; peak memory is about one part.
    Atomicity and fsyncs as `write_bank`.

    Args:
        path, metadata, filesystem: as `write_bank`.
        parts: the bank's rows, in any order and spread over the parts in any way.

    Raises:
        BankError: a part whose columns or features disagree in length, feature dims that differ
            between parts (each naming the part), duplicate rows, or `path` not a bank folder.
    """
    if not parts:
        raise BankError(f"no parts to write the bank {os.fspath(path)} from")
    names, codes, rows, sizes, dims = [], [], [], [], set()
    for part in parts:
        cols = part.columns()
        vids = np.asarray(cols["video_id"], dtype=str).reshape(-1)
        n = len(vids)
        rows.append(_as_rows(n, cols["second"], cols["person_index"], cols["box"], cols["score"],
                             f"bank part {part.name}: "))
        shape = tuple(part.feature_shape())
        if len(shape) != 2 or shape[0] != n or shape[1] < 1:
            raise BankError(f"bank part {part.name}: features of shape {shape}, expected [{n}, C] with C >= 1")
        dims.add(shape[1])
        u, c = np.unique(vids, return_inverse=True)
        names.append(u)
        codes.append(c.reshape(-1))
        sizes.append(n)
    if len(dims) != 1:
        raise BankError("bank parts have different feature dims: "
                        + ", ".join(f"{p.name}: {p.feature_shape()[1]}" for p in parts))
    dim = dims.pop()
    uniq = np.unique(np.concatenate(names))
    codes = np.concatenate([np.searchsorted(uniq, u)[c] for u, c in zip(names, codes, strict=True)])
    seconds, person_index, boxes, scores = (np.concatenate(c) for c in zip(*rows, strict=True))
    layout = _layout(uniq, codes, seconds, person_index)
    order = layout.order
    small = pa.table([
        pa.array(uniq.tolist(), pa.string()).take(pa.array(layout.codes)),
        pa.array(layout.seconds),
        pa.array(layout.person_index),
        pa.FixedSizeListArray.from_arrays(pa.array(boxes[order].reshape(-1)), 4),
        pa.array(scores[order]),
    ], schema=pa.schema(list(features_schema(dim))[:-1]))
    del codes, seconds, person_index, boxes, scores, rows
    offsets = np.cumsum([0, *sizes])
    files = {FEATURES_FILE: lambda f, scratch: _stream_features(f, scratch, small, parts, offsets, order, dim),
             INDEX_FILE: lambda f, _: _write_ipc(f, _index_table(layout))}
    return _write_files(path, filesystem, files, layout, _new_manifest(layout, dim, metadata))


class _PartFeatures:
    """The features of one part at a time (the last one read is kept: parts often straddle batches)."""

    def __init__(self, parts: Sequence[BankPart], offsets: np.ndarray, dim: int) -> None:
        self._parts, self._offsets, self._dim = parts, offsets, dim
        self._index, self._features = -1, np.zeros((0, dim), np.float16)

    def __call__(self, i: int) -> np.ndarray:
        if i != self._index:
            self._index, self._features = -1, None  # drop the last part before reading the next
            part = self._parts[i]
            feats = np.asarray(part.features())
            want = (int(self._offsets[i + 1] - self._offsets[i]), self._dim)
            if feats.shape != want:
                raise BankError(f"bank part {part.name}: features of shape {feats.shape}, expected {want}")
            self._index, self._features = i, feats.astype(np.float16, copy=False)
        return self._features


def _ipc_feature_bytes(n: int, lo: int, rows: int, row_bytes: int) -> int:
    """Bytes of the whole table's feature buffer that the IPC writer stores for rows lo..lo+rows.

    Arrow's writer keeps a child buffer whole unless it is offset or longer than its length padded
    to 64 bytes; otherwise it stores the slice padded to 8 bytes, padding with the bytes that follow.
    """
    need = rows * row_bytes
    if lo == 0 and -(-need // 64) * 64 >= n * row_bytes:
        return n * row_bytes
    return min(-(-need // 8) * 8, (n - lo) * row_bytes)


def _stream_features(stream: pa.NativeFile, scratch_dir: Path, small: pa.Table, parts: Sequence[BankPart],
                     offsets: np.ndarray, order: np.ndarray, dim: int) -> None:
    """features.arrow as `_write_ipc` writes it for the whole table, one record batch at a time.

    Each batch's features are gathered from the parts into a memory-mapped scratch file, with the
    few rows after it that the whole table's batch would carry as padding (`_ipc_feature_bytes`).
    """
    n, per_batch, row_bytes = small.num_rows, _ROWS_PER_BATCH, 2 * dim
    schema = features_schema(dim)
    scratch_rows = min(n, per_batch + -(-64 // row_bytes))
    scratch_file = scratch_dir / f".scratch-{uuid.uuid4().hex[:8]}"
    scratch = (np.memmap(scratch_file, np.float16, "w+", shape=(scratch_rows, dim)) if scratch_rows
               else np.zeros((0, dim), np.float16))
    part_features = _PartFeatures(parts, offsets, dim)
    copy_rows = max(1, _COPY_BYTES // row_bytes)
    try:
        with pa.ipc.new_file(stream, schema) as writer:
            for lo in range(0, max(n, 1), per_batch):
                hi = min(n, lo + per_batch)
                nbytes = _ipc_feature_bytes(n, lo, hi - lo, row_bytes)
                rows = order[lo:lo + -(-nbytes // row_bytes)]  # input rows of the bytes this batch stores
                part_of = np.searchsorted(offsets, rows, side="right") - 1
                by_part = np.argsort(part_of, kind="stable")
                for dst in np.split(by_part, np.flatnonzero(np.diff(part_of[by_part])) + 1) if len(rows) else []:
                    p = int(part_of[dst[0]])
                    src = rows[dst] - offsets[p]
                    feats = part_features(p)
                    for k in range(0, len(dst), copy_rows):  # bounded temporaries, not a part-sized copy
                        scratch[dst[k:k + copy_rows]] = feats[src[k:k + copy_rows]]
                    del feats  # or it would live on beside the next part
                data = pa.py_buffer(scratch.reshape(-1).view(np.uint8))[:nbytes]
                flat = pa.Array.from_buffers(pa.float16(), (hi - lo) * dim, [None, data])
                batch = small.slice(lo, hi - lo).append_column(
                    schema.field("feature"), pa.FixedSizeListArray.from_arrays(flat, dim))
                writer.write_table(batch, max_chunksize=per_batch)
                del data, flat, batch
    finally:
        del scratch
        scratch_file.unlink(missing_ok=True)


def _write_local(dest: Path, files: dict[str, _FileWriter], manifest: dict[str, Any]) -> None:
    if dest.exists() and not (dest / MANIFEST_FILE).exists() and any(dest.iterdir()):
        # An incomplete bank of ours may be replaced; anything else is not ours to delete.
        if set(os.listdir(dest)) - {FEATURES_FILE, INDEX_FILE}:
            raise BankError(f"refusing to overwrite {dest}: a non-empty folder that is not a bank")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for name, write in files.items():
            with pa.OSFile(str(tmp / name), "wb") as f:
                write(f, tmp)
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())  # data durable before the manifest that vouches for it
            manifest["files"][name] = (tmp / name).stat().st_size
        data = json.dumps(manifest, indent=1).encode()
        with open(tmp / MANIFEST_FILE, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if dest.exists():
            # Readers that already mapped the old files keep them (unlinked inodes stay valid).
            old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_remote(fs: pafs.FileSystem, root: str, files: dict[str, _FileWriter], manifest: dict[str, Any]) -> None:
    fs.create_dir(root, recursive=True)
    if fs.get_file_info(f"{root}/{MANIFEST_FILE}").type == pafs.FileType.File:
        fs.delete_file(f"{root}/{MANIFEST_FILE}")  # the bank is incomplete from here on
    cache_root = cache.cache_root()
    cache_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bank-write-", dir=cache_root) as scratch:  # node disk, not /tmp
        for name, write in files.items():
            with fs.open_output_stream(f"{root}/{name}") as f:
                write(f, Path(scratch))
            manifest["files"][name] = fs.get_file_info(f"{root}/{name}").size
    with fs.open_output_stream(f"{root}/{MANIFEST_FILE}") as f:
        f.write(json.dumps(manifest, indent=1).encode())
