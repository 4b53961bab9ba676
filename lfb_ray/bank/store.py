"""Long-term feature bank on disk: an uncompressed Arrow IPC file, memory-mapped and shared by processes.

`write_bank` writes a bank folder (features.arrow, index.arrow, manifest.json last), `write_bank_parts`
the same bytes from parts read one at a time; `FeatureBank.open`
maps one or several banks and `FeatureBank.sample` draws the LFB window of each RoI (W seconds
around its keyframe, at most K features per second), vectorised. `sample` is two steps that can run
apart: `window_rows` (which bank rows fill each slot: int32, host-side, all the randomness) and
`gather` (fetching them from the memory map); `lfb_ray.bank.window` gathers on the GPU instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import torch

from lfb_ray import cache
from lfb_ray.redaction import RedactedMessage
from lfb_ray.storage import resolve

__all__ = ["FORMAT_VERSION", "MISSING_VIDEO_MODES", "BankError", "BankPart", "BankSummary", "FeatureBank",
           "bank_manifests", "write_bank", "write_bank_parts"]

FORMAT_VERSION = 1
FEATURES_FILE = "features.arrow"
INDEX_FILE = "index.arrow"
MANIFEST_FILE = "manifest.json"
SPLITS = ("train", "val")  # sub-bank merge order of a split folder: val wins, as the reference
_ROWS_PER_BATCH = 1 << 18  # rows per Arrow record batch (1 GiB at C=2048 fp16); readers handle any
_COPY_BYTES = 1 << 18  # features copied per step when a streamed write gathers a part's rows
_SECOND_BIAS = 2**31  # key = video_code << 32 | (second + 2**31), sortable int64
# What `FeatureBank.sample` does for a video the bank does not hold: "error" (BankError naming it,
# as mmaction2's `lfb[video_id]` raises KeyError) or "zeros" (an all-zero window: an explicit opt-out).
MISSING_VIDEO_MODES = ("error", "zeros")
_NAMED = 5  # missing videos named in an error message; the rest are counted


class BankError(RedactedMessage, ValueError):
    """A bank is missing, incomplete, inconsistent, lacks videos, or does not fit the model."""


def _name_some(videos: Sequence[str]) -> str:
    """'a', 'b', 'c' (+N more): the first few of a sorted list of video ids, and how many others."""
    shown = ", ".join(repr(v) for v in videos[:_NAMED])
    return shown + (f" (+{len(videos) - _NAMED} more)" if len(videos) > _NAMED else "")


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


def _features_schema(dim: int) -> pa.Schema:
    return pa.schema([
        ("video_id", pa.string()),
        ("second", pa.int32()),
        ("person_index", pa.int32()),
        ("box", pa.list_(pa.float32(), 4)),
        ("score", pa.float32()),
        ("feature", pa.list_(pa.float16(), dim)),
    ])


def _split_location(path: str | os.PathLike, filesystem: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str, bool]:
    """(filesystem, path inside it, is_local) for a local path, a URI, or a path on `filesystem`."""
    if filesystem is not None:
        fs, p = filesystem, str(path)
    else:
        fs, p = resolve(os.fspath(path))
    local = isinstance(fs, pafs.LocalFileSystem)
    return fs, (str(Path(p).resolve()) if local else p.rstrip("/")), local


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
    fs, root, local = _split_location(path, filesystem)
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
    ], schema=_features_schema(dim))
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
    ], schema=pa.schema(list(_features_schema(dim))[:-1]))
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
    schema = _features_schema(dim)
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


def child_path(path: str | os.PathLike, name: str) -> str:
    """`path/name` for a local path or a URI, keeping a URI's `?query` (e.g. endpoint_override) last."""
    base, sep, query = os.fspath(path).partition("?")
    return f"{base.rstrip('/')}/{name}{sep}{query}"


def _read_manifest(fs: pafs.FileSystem, root: str) -> dict[str, Any] | None:
    try:
        with fs.open_input_stream(f"{root}/{MANIFEST_FILE}") as f:
            return json.loads(f.read().decode())
    except FileNotFoundError:
        return None


def _leaf_banks(fs: pafs.FileSystem, root: str) -> list[str]:
    """A bank folder, or the train/val sub-banks of a split folder (val last, so it wins)."""
    if _read_manifest(fs, root) is not None:
        return [root]
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        raise BankError(f"no feature bank at {root}")
    subs = [f"{root}/{s}" for s in SPLITS if fs.get_file_info(f"{root}/{s}").type == pafs.FileType.Directory]
    if not subs:
        raise BankError(f"{root} is not a complete bank: no {MANIFEST_FILE} (an incomplete or "
                        f"interrupted write) and no {'/'.join(SPLITS)} sub-banks")
    for s in subs:
        if _read_manifest(fs, s) is None:
            raise BankError(f"sub-bank {s} is incomplete: no {MANIFEST_FILE}")
    return subs


def _download(fs: pafs.FileSystem, root: str, manifest: dict[str, Any], cache_root: Path,
              label: str) -> tuple[Path, _Source]:
    """A remote bank mapped from its node-local copy (`cache_root/banks/<key>`, one per bank_id), and
    that folder, pinned (this process will not evict it) until the bank is closed.

    The copy is made in a temporary folder, manifest.json last, and renamed when complete: no process
    of the node ever maps a partial bank, and a killed download leaves no folder that looks complete.
    It counts against the node cache budget (`lfb_ray.cache`, `LFB_RAY_CACHE_MAX_GB`).
    """
    key = hashlib.sha256(f"{fs.type_name}:{root}:{manifest.get('bank_id')}".encode()).hexdigest()[:24]
    text = json.dumps(manifest, indent=1)
    size = sum(int(n) for n in manifest["files"].values()) + len(text.encode())

    def download(tmp: Path) -> None:
        for name in manifest["files"]:
            with fs.open_input_stream(f"{root}/{name}") as src, open(tmp / name, "wb") as dst:
                while chunk := src.read(64 << 20):
                    dst.write(chunk)
        (tmp / MANIFEST_FILE).write_text(text)

    return cache.fetch(
        cache_root, "banks", key, size, download,
        complete=lambda p: p.is_dir() and _read_manifest(pafs.LocalFileSystem(), str(p)) == manifest,
        open_entry=lambda p: _map_source(label, p, manifest), label=f"bank {label}", folder=True)


def _unpin(folders: tuple[Path, ...]) -> None:
    for f in folders:
        cache.unpin(f)


@dataclass
class _Source:
    """One mapped bank: its table and the zero-copy [rows, C] float16 views of its record batches."""

    path: str
    manifest: dict[str, Any]
    table: pa.Table
    index: pa.Table
    chunks: list[np.ndarray]
    chunk_starts: np.ndarray  # [num_chunks] first row of each chunk


def _map_source(label: str, local_dir: Path, manifest: dict[str, Any]) -> _Source:
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BankError(f"bank {label} has format version {manifest.get('format_version')}, "
                        f"this code reads {FORMAT_VERSION}")
    for name, size in manifest["files"].items():
        actual = (local_dir / name).stat().st_size if (local_dir / name).exists() else None
        if actual != size:
            raise BankError(f"bank {label}: {name} has {actual} bytes, manifest says {size} (corrupt or partial)")
    # memory_map + IPC file reader: buffers point into the page cache, shared by every process.
    table = pa.ipc.open_file(pa.memory_map(str(local_dir / FEATURES_FILE), "r")).read_all()
    index = pa.ipc.open_file(pa.memory_map(str(local_dir / INDEX_FILE), "r")).read_all()
    if int(pc.sum(index.column("count")).as_py() or 0) != table.num_rows:
        raise BankError(f"bank {label}: index counts do not add up to the {table.num_rows} rows")
    dim = manifest["feature_dim"]
    if table.schema.field("feature").type != pa.list_(pa.float16(), dim):
        raise BankError(f"bank {label}: feature column is {table.schema.field('feature').type}, "
                        f"manifest says fixed_size_list<float16, {dim}>")
    chunks, starts, row = [], [], 0
    for chunk in table.column("feature").chunks:
        if chunk.null_count:
            raise BankError(f"bank {label}: null features")
        # flatten() honours the chunk offset; to_numpy(zero_copy_only) guarantees no copy.
        chunks.append(chunk.flatten().to_numpy(zero_copy_only=True).reshape(len(chunk), dim))
        starts.append(row)
        row += len(chunk)
    return _Source(label, manifest, table, index, chunks, np.asarray(starts, dtype=np.int64))


class FeatureBank:
    """Read-only, memory-mapped long-term feature bank; cheap to open in many processes.

    Merged banks keep one owner per video (the last bank listing it). Pickling reopens from the paths,
    so a bank handed to another process maps the same files instead of copying the features.
    """

    def __init__(self, sources: list[_Source], spec: tuple[Any, ...], missing_videos: str = "error") -> None:
        if missing_videos not in MISSING_VIDEO_MODES:
            raise BankError(f"missing_videos must be one of {', '.join(MISSING_VIDEO_MODES)}, got {missing_videos!r}")
        self._sources = sources
        self._spec = spec
        self._missing_videos = missing_videos
        self._local = threading.local()
        dims = {s.manifest["feature_dim"] for s in sources}
        if len(dims) != 1:
            raise BankError("merged banks have different feature dims: "
                            + ", ".join(f"{s.path}: {s.manifest['feature_dim']}" for s in sources))
        self._dim = dims.pop()
        owner: dict[str, int] = {}
        for i, s in enumerate(sources):
            for v in s.index.column("video_id").unique().to_pylist():
                owner[v] = i  # later sources win per video
        self._owner = owner
        self._videos = tuple(sorted(owner))
        self._video_code = {v: c for c, v in enumerate(self._videos)}
        parts, row_offset = [], 0
        for i, s in enumerate(sources):
            names = s.index.column("video_id").combine_chunks().dictionary_encode()
            glob = np.array([self._video_code[v] if owner[v] == i else -1 for v in names.dictionary.to_pylist()],
                            dtype=np.int64)
            codes = glob[names.indices.to_numpy()]  # -1: the video is shadowed by a later bank
            keep = codes >= 0
            parts.append((
                codes[keep],
                s.index.column("second").to_numpy()[keep].astype(np.int64),
                s.index.column("row_start").to_numpy()[keep] + row_offset,
                s.index.column("count").to_numpy()[keep].astype(np.int64),
            ))
            row_offset += s.table.num_rows
        codes, secs, row_starts, counts = (np.concatenate(p) for p in zip(*parts, strict=True))
        order = np.lexsort((secs, codes))
        self._codes, self._seconds = codes[order], secs[order]
        self._row_starts, self._counts = row_starts[order], counts[order]
        self._keys = (self._codes << 32) | (self._seconds + _SECOND_BIAS)
        self._video_offsets = np.searchsorted(self._codes, np.arange(len(self._videos) + 1))
        # Global row space: sources one after another, each split into its record-batch chunks.
        self._chunks = [c for s in sources for c in s.chunks]
        base = np.cumsum([0] + [s.table.num_rows for s in sources])[:-1]
        self._chunk_starts = np.concatenate([s.chunk_starts + b for s, b in zip(sources, base, strict=True)])

    @classmethod
    def open(
        cls,
        path: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        expected_dim: int | None = None,
        filesystem: pafs.FileSystem | None = None,
        cache_dir: str | os.PathLike | None = None,
        missing_videos: str = "error",
    ) -> FeatureBank:
        """Map a bank, a split folder (`train/` + `val/`, val wins per video), or a list of those.

        Args:
            path: bank folder, split folder, or list of them (later wins per video); local paths or
                URIs. Remote banks are downloaded once per node to `<cache root>/banks` and mapped from
                there (`lfb_ray.cache`: LRU eviction within `LFB_RAY_CACHE_MAX_GB`).
            expected_dim: feature dim C the model expects; checked here so a mismatch fails early.
            filesystem: pyarrow filesystem the path(s) live on, instead of inferring it from URIs.
            cache_dir: the node cache root for remote banks (default `$LFB_RAY_CACHE`, else
                `~/.cache/lfb_ray`); they go under its `banks/`.
            missing_videos: "error" (default): `sample` and `require_videos` raise `BankError` for a
                video the bank does not hold; "zeros": `sample` gives such a video an all-zero window
                and `require_videos` only warns (`bank.missing_videos`).

        Raises:
            BankError: missing/incomplete bank (no manifest), corrupt files, dims that differ between
                merged banks or from `expected_dim`.
        """
        paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
        if not paths:
            raise BankError("FeatureBank.open needs at least one path")
        cache_root = Path(cache_dir) if cache_dir is not None else cache.cache_root()
        sources, pinned = [], []
        try:
            for p in paths:
                fs, root, local = _split_location(p, filesystem)
                for leaf in _leaf_banks(fs, root):
                    manifest = _read_manifest(fs, leaf)
                    if local:
                        sources.append(_map_source(leaf, Path(leaf), manifest))
                        continue
                    folder, source = _download(fs, leaf, manifest, cache_root, f"{fs.type_name}://{leaf}")
                    pinned.append(folder)
                    sources.append(source)
            bank = cls(sources, (paths, filesystem, expected_dim, cache_dir), missing_videos)
            if expected_dim is not None and bank.feature_dim != expected_dim:
                raise BankError(f"bank {os.fspath(paths[0]) if len(paths) == 1 else paths} has feature dim "
                                f"{bank.feature_dim}, model expects {expected_dim}")
        except BaseException:
            _unpin(tuple(pinned))
            raise
        weakref.finalize(bank, _unpin, tuple(pinned))  # its node-cache copies may be evicted once it is gone
        return bank

    def __reduce__(self) -> tuple[Any, ...]:
        paths, filesystem, expected_dim, cache_dir = self._spec
        return (_reopen, (paths, filesystem, expected_dim, cache_dir, self._missing_videos))

    @property
    def path(self) -> str:
        """Where the bank was opened from, for messages (a URI's `?query` options left out)."""
        return ", ".join(os.fspath(p).partition("?")[0] for p in self._spec[0])

    @property
    def missing_videos(self) -> str:
        """What `sample` does for a video the bank does not hold (`MISSING_VIDEO_MODES`)."""
        return self._missing_videos

    def require_videos(self, videos: Sequence[str], split: str) -> tuple[str, ...]:
        """Check that the bank holds every video of `split` that a run will sample, before it starts.

        Args:
            videos: video ids the run reads (e.g. those of the split's annotation CSV).
            split: name for the message ("train", "val").

        Returns:
            the sorted missing videos: always () in "error" mode; in "zeros" mode the videos whose
            windows will be zeros (a warning naming them is printed).

        Raises:
            BankError: in "error" mode, naming the split, the first missing videos, their count and
                the bank path.
        """
        missing = tuple(sorted({str(v) for v in videos} - set(self._video_code)))
        if not missing:
            return ()
        what = (f"the feature bank at {self.path} lacks {len(missing)} of the {len(set(videos))} {split} "
                f"videos: {_name_some(missing)}")
        if self._missing_videos == "error":
            raise BankError(f"{what}. Rebuild the bank for these videos (jobs/build_bank.py), or set "
                            "bank.missing_videos=zeros to give them all-zero long-term features")
        print(f"[lfb_ray] WARNING: {what}; their long-term features are zeros (bank.missing_videos=zeros)",
              flush=True)
        return missing

    @property
    def feature_dim(self) -> int:
        return self._dim

    def checkpoint_sha256s(self) -> set[str]:
        """sha256 of the checkpoint(s) that computed the merged banks (manifest metadata)."""
        return {str(s.manifest.get("metadata", {}).get("checkpoint_sha256", "")) for s in self._sources}

    def entries(self) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        """Every stored entry of the videos this bank owns (shadowed videos of merged banks left out).

        Returns:
            video_ids [N], seconds int64 [N], boxes float32 [N, 4] (normalised x1, y1, x2, y2),
            features float16 [N, C] (a copy: N x C x 2 bytes).
        """
        vids, secs, boxes, feats = [], [], [], []
        for i, s in enumerate(self._sources):
            v = s.table.column("video_id").to_pylist()
            keep = np.array([self._owner[x] == i for x in v], dtype=bool)
            vids += [x for x, k in zip(v, keep, strict=True) if k]
            secs.append(s.table.column("second").to_numpy().astype(np.int64)[keep])
            boxes.append(np.asarray(s.table.column("box").to_pylist(), dtype=np.float32).reshape(-1, 4)[keep])
            feats.append(np.concatenate(s.chunks)[keep] if s.chunks else np.zeros((0, self._dim), np.float16))
        return vids, np.concatenate(secs), np.concatenate(boxes), np.concatenate(feats)

    @property
    def num_features(self) -> int:
        """Features reachable after merging (rows of videos shadowed by a later bank excluded)."""
        return int(self._counts.sum())

    @property
    def videos(self) -> tuple[str, ...]:
        """Sorted video ids."""
        return self._videos

    @property
    def nbytes(self) -> int:
        """Bytes of mapped feature data (all source banks, including shadowed videos)."""
        return int(sum(c.nbytes for c in self._chunks))

    @property
    def manifests(self) -> tuple[dict[str, Any], ...]:
        """Manifest of each source bank in merge order (its `metadata` holds checkpoint hash, config)."""
        return tuple(s.manifest for s in self._sources)

    def __len__(self) -> int:
        return len(self._videos)

    def __contains__(self, video_id: object) -> bool:
        return video_id in self._video_code

    def __repr__(self) -> str:
        return (f"FeatureBank(videos={len(self._videos)}, seconds={len(self._keys)}, "
                f"features={self.num_features}, dim={self._dim}, sources={len(self._sources)})")

    def seconds_of(self, video_id: str) -> np.ndarray:
        """Sorted seconds of `video_id` that have features, [S] int64 (read-only). KeyError if unknown."""
        c = self._video_code[video_id]
        out = self._seconds[self._video_offsets[c]:self._video_offsets[c + 1]]
        out.flags.writeable = False
        return out

    def features_at(self, video_id: str, second: int) -> np.ndarray:
        """Features of one keyframe in person order, [n, C] float16, a read-only view of the mapped
        file ([0, C] if the second has none). KeyError if the video is unknown."""
        c = self._video_code[video_id]
        key = (c << 32) | (int(second) + _SECOND_BIAS)
        i = int(np.searchsorted(self._keys, key))
        if i == len(self._keys) or self._keys[i] != key:
            return np.zeros((0, self._dim), np.float16)
        return self._gather_range(int(self._row_starts[i]), int(self._counts[i]))

    def _gather_range(self, start: int, count: int) -> np.ndarray:
        k = int(np.searchsorted(self._chunk_starts, start, side="right")) - 1
        lo = start - int(self._chunk_starts[k])
        chunk = self._chunks[k]
        if lo + count <= len(chunk):
            return chunk[lo:lo + count]
        return self._gather(np.arange(start, start + count))  # spans record batches: a copy

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        """[M] global rows -> [M, C] float16 copy, one fancy-index per record-batch chunk."""
        if len(self._chunks) == 1:
            return self._chunks[0][rows]
        k = np.searchsorted(self._chunk_starts, rows, side="right") - 1
        out = np.empty((len(rows), self._dim), np.float16)
        for c in np.unique(k):
            m = k == c
            out[m] = self._chunks[c][rows[m] - self._chunk_starts[c]]
        return out

    def _scratch(self, rows: int) -> np.ndarray:
        """A reused per-thread [rows, C] float16 buffer: fresh pages cost more than the sampling."""
        buf = getattr(self._local, "window", None)
        if buf is None or len(buf) < rows:
            buf = self._local.window = np.empty((rows, self._dim), np.float16)
        return buf[:rows]

    def window_rows(
        self,
        video_ids: Sequence[str],
        seconds: Sequence[int] | np.ndarray,
        rng: np.random.Generator,
        *,
        window_seconds: int = 60,
        max_feats_per_second: int = 5,
    ) -> np.ndarray:
        """Which bank entries fill each RoI's LFB window: `sample` without fetching any feature.

        Why: the window's *rows* are a few hundred KB of int32 that the host computes from the index
        alone; the features they name ([R, W*K, C], ~147 MB fp32 at the AVA shape) can then be
        gathered where the features live (`gather` on the host, `lfb_ray.bank.window.DeviceFeatures`
        on a GPU), off the host's critical path.

        Same semantics and RNG contract as `sample` (see there): the same `rng` draws in the same
        order, so `gather(window_rows(...))` equals `sample(...)` bitwise.

        Args:
            video_ids: [R] video id of each RoI.
            seconds: [R] keyframe second t of each RoI.
            rng: the only source of randomness.
            window_seconds: W.
            max_feats_per_second: K.

        Returns:
            int32 [R, W*K]: the global bank row of each window slot (slot j*K + i: the i-th draw of
            second t - W//2 + j), -1 where the window is empty (zeros).

        Raises:
            BankError: a video the bank does not hold (in "error" mode), naming it and the bank path.
        """
        W, K = window_seconds, max_feats_per_second
        if W < 1 or K < 1:
            raise ValueError(f"window_seconds and max_feats_per_second must be >= 1, got {W}, {K}")
        R = len(video_ids)
        t = np.asarray(seconds, dtype=np.int64).reshape(-1)
        if len(t) != R:
            raise ValueError(f"{R} video ids but {len(t)} seconds")
        codes = np.fromiter((self._video_code.get(v, -1) for v in video_ids), dtype=np.int64, count=R)
        if self._missing_videos == "error" and (codes < 0).any():
            missing = sorted({str(v) for v, c in zip(video_ids, codes, strict=True) if c < 0})
            raise BankError(f"the feature bank at {self.path} has no features for video(s) {_name_some(missing)} "
                            f"({int((codes < 0).sum())} of {R} RoIs); set bank.missing_videos=zeros to sample "
                            "all-zero windows for them instead")
        out = np.full((R, W * K), -1, np.int32)
        if R == 0 or len(self._keys) == 0:
            return out
        if self.num_rows >= 2**31:
            raise BankError(f"the feature bank at {self.path} has {self.num_rows} rows, more than int32 rows address")
        secs = t[:, None] + (np.arange(W) - W // 2)  # [R, W] second of each window slot
        valid = (codes[:, None] >= 0) & (secs >= -_SECOND_BIAS) & (secs < _SECOND_BIAS)
        query = ((codes[:, None] << 32) | (secs + _SECOND_BIAS)).ravel()
        pos = np.minimum(np.searchsorted(self._keys, query), len(self._keys) - 1)
        pair = np.flatnonzero(valid.ravel() & (self._keys[pos] == query))  # [P] flat r*W + j
        if len(pair) == 0:
            return out
        entry = pos[pair]
        n = self._counts[entry]
        # A random permutation of each second's n features: argsort of uniform keys, padding last.
        width = int(n.max())
        keys = rng.random((len(pair), width))
        keys[np.arange(width) >= n[:, None]] = 2.0
        take = min(K, width)
        perm = np.argsort(keys, axis=1)[:, :take]  # [P, take]
        used = np.arange(take) < np.minimum(n, K)[:, None]  # [P, take]
        rows = (self._row_starts[entry][:, None] + perm)[used]
        dst = (pair[:, None] * K + np.arange(take))[used]  # slot in the flat [R*W*K] window
        out.reshape(-1)[dst] = rows
        return out

    @property
    def num_rows(self) -> int:
        """Rows of the global row space that `window_rows` indexes: every mapped row of every source
        bank, shadowed videos included (`num_features` counts only the reachable ones)."""
        return int(sum(len(c) for c in self._chunks))

    def gather(self, rows: np.ndarray, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """The features of `window_rows`' rows, read from the memory-mapped bank on the host.

        The window is assembled in a reused per-thread fp16 buffer (half the bytes to zero and
        scatter, and no fresh pages to fault in), then converted to fp32 in one vectorised torch
        copy into `out`; numpy's own fp16 casts are several times slower than torch's.

        Args:
            rows: int [R, S] global bank rows (S = W*K), -1 for an empty slot.
            out: optional contiguous CPU float32 [R, S, C] tensor to fill, e.g. a reused or pinned
                buffer; reusing one roughly halves the cost, which is otherwise dominated by the
                kernel zero-filling fresh pages for the new output.

        Returns:
            [R, S, C] float32 on the CPU (`out` when given): zeros where `rows` is -1.
        """
        rows = np.asarray(rows)
        if rows.ndim != 2:
            raise ValueError(f"rows must be [R, S], got shape {rows.shape}")
        R, S = rows.shape
        C = self._dim
        if out is None:
            out = torch.empty((R, S, C), dtype=torch.float32)
        elif out.shape != (R, S, C) or out.dtype != torch.float32 or out.device.type != "cpu" \
                or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous CPU float32 tensor of shape {(R, S, C)}, "
                             f"got {tuple(out.shape)} {out.dtype} on {out.device}")
        flat = rows.reshape(-1)
        dst = np.flatnonzero(flat >= 0)
        if len(dst) == 0:
            return out.zero_()
        window = self._scratch(R * S)
        window.fill(0)
        window[dst] = self._gather(flat[dst].astype(np.int64))
        out.copy_(torch.from_numpy(window).view(R, S, C))
        return out

    def sample(
        self,
        video_ids: Sequence[str],
        seconds: Sequence[int] | np.ndarray,
        rng: np.random.Generator,
        *,
        window_seconds: int = 60,
        max_feats_per_second: int = 5,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sample the long-term features of each RoI, all RoIs at once: `gather(window_rows(...))`.

        Slot j of the window holds second `t - W//2 + j` (the current second at slot W//2). For each
        such second present in the bank with n features, a uniformly random subset of min(n, K) of
        them, without replacement and in random order, goes to rows j*K .. j*K+min(n,K)-1. Everything
        else (missing seconds, beyond the video edges, unused rows) is zero. A video the bank does
        not hold is a `BankError`, unless the bank was opened with `missing_videos="zeros"` (then its
        windows are zero). Draws are independent per RoI, including RoIs of the same keyframe, and
        reproducible from `rng`.

        Args:
            video_ids: [R] video id of each RoI.
            seconds: [R] keyframe second t of each RoI.
            rng: the only source of randomness.
            window_seconds: W.
            max_feats_per_second: K.
            out: optional contiguous CPU float32 [R, W*K, C] tensor to fill, e.g. a reused pinned
                buffer; reusing one roughly halves the cost, which is otherwise dominated by the
                kernel zero-filling fresh pages for the new output.

        Returns:
            [R, W*K, C] float32.

        Raises:
            BankError: a video the bank does not hold (in "error" mode), naming it and the bank path.
        """
        W, K, C = window_seconds, max_feats_per_second, self._dim
        R = len(video_ids)
        if out is not None and (out.shape != (R, W * K, C) or out.dtype != torch.float32
                                or out.device.type != "cpu" or not out.is_contiguous()):
            raise ValueError(f"out must be a contiguous CPU float32 tensor of shape {(R, W * K, C)}, "
                             f"got {tuple(out.shape)} {out.dtype} on {out.device}")
        rows = self.window_rows(video_ids, seconds, rng, window_seconds=W, max_feats_per_second=K)
        return self.gather(rows, out=out)


def _reopen(paths: Any, filesystem: Any, expected_dim: Any, cache_dir: Any, missing_videos: str = "error") -> FeatureBank:
    return FeatureBank.open(paths, expected_dim=expected_dim, filesystem=filesystem, cache_dir=cache_dir,
                            missing_videos=missing_videos)


def bank_manifests(path: str) -> list[dict[str, Any]]:
    """The manifests of the bank at `path` (a bank folder, or a split folder's train/val sub-banks),
    read without opening or downloading the features: what `lfb_ray.identity.bank_id` hashes.

    Raises:
        BankError: no complete bank there.
    """
    fs, root = resolve(path)
    return [_read_manifest(fs, leaf) for leaf in _leaf_banks(fs, root)]
