"""Per-video frame stores: each decoded frame stored once as JPEG, read back a frame at a time.

A store is an uncompressed Arrow IPC file (`frames.arrow`, schema `FRAME_SCHEMA`) with one record
batch per frame, in frame order. Readers memory-map it, as the feature bank does: `get_batch(i)`
points into the page cache, so a training clip reads the pages of its 4 JPEGs and nothing else, and
every process on a node shares the same cached pages. A store on object storage (`s3://...`) is
copied once per node into the node cache (`lfb_ray.cache`: `$LFB_RAY_CACHE/frames`, default
`~/.cache/lfb_ray/frames`, least recently used stores evicted beyond `LFB_RAY_CACHE_MAX_GB`) and
mapped from there.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from lfb_ray import cache
from lfb_ray.data.integrity import HashingSink
from lfb_ray.data.schema import FRAME_SCHEMA
from lfb_ray.storage import fsync_local, join, resolve

__all__ = ["FrameStore", "FrameStoreError", "FrameStoreWriter", "open_frame_store"]

_OPEN_LIMIT = 256  # stores kept open per process (an mmap each; cheap)


# What repairs a damaged or missing frame store: the prepare job compares every committed video's
# files with its marker (sizes always, SHA-256s with --verify) and prepares the damaged ones again.
REPAIR = ("its video's prepared files are damaged: repair them with `python jobs/prepare_data.py --config "
          "<the config> --verify` (or rerun the pipeline), which prepares the damaged videos again")


class FrameStoreError(ValueError):
    """A frame store is missing, truncated or does not hold the frame asked for."""


class FrameStoreWriter:
    """Write a frame store atomically: frames are streamed to a temporary name, moved on `close`.

    Frames must come in increasing frame-index order; `add` returns each frame's row.
    """

    def __init__(self, fs: pafs.FileSystem, path: str):
        self.fs, self.path = fs, path
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        self._tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        self._sink = HashingSink(fs.open_output_stream(self._tmp))  # size and SHA-256 for the marker
        self._writer = pa.ipc.new_file(pa.PythonFile(self._sink, mode="w"), FRAME_SCHEMA)
        self.check: dict | None = None  # {size, sha256} once closed
        self._count = 0  # frames written so far: the next frame's row
        self._last = -1  # the last frame index added (O(1) order check: a movie has ~10^5 frames)

    def add(self, frame_index: int, jpeg: bytes) -> int:
        """Append one frame; returns its row."""
        if frame_index <= self._last:
            raise ValueError(f"frame {frame_index} after frame {self._last}: frames must be in increasing order")
        self._last = int(frame_index)
        self._writer.write_batch(pa.record_batch([pa.array([frame_index], pa.int32()), pa.array([jpeg], pa.binary())],
                                                 schema=FRAME_SCHEMA))
        self._count += 1
        return self._count - 1

    def close(self) -> int:
        """Finish the file, fsync it (local), move it into place; returns its size in bytes (its
        size and SHA-256 are in `check`)."""
        self._writer.close()
        self._sink.close()
        fsync_local(self.fs, self._tmp)
        self.fs.move(self._tmp, self.path)
        self.check = self._sink.check()
        return int(self.check["size"])

    def abort(self) -> None:
        try:
            self._writer.close()
            self._sink.close()
        except Exception:  # cleaning up after another error, which is what propagates
            pass
        try:
            self.fs.delete_file(self._tmp)
        except (FileNotFoundError, OSError):
            pass


class FrameStore:
    """A memory-mapped frame store. `jpeg(row)` is zero-copy (a `pyarrow.Buffer` into the mapping)."""

    def __init__(self, local_path: str, label: str | None = None):
        self.label = label or local_path
        self.cache_path: str | None = None  # the node-cache entry it maps, pinned while in `_open`
        self.touched = time.monotonic()  # when that entry's use time was last refreshed
        try:
            self._reader = pa.ipc.open_file(pa.memory_map(local_path, "r"))
        except (OSError, pa.ArrowInvalid) as e:
            raise FrameStoreError(f"frame store {self.label} cannot be read (missing, truncated or not an "
                                  f"Arrow IPC file): {e}; {REPAIR}") from e
        if not self._reader.schema.equals(FRAME_SCHEMA):
            raise FrameStoreError(f"frame store {self.label} has schema {self._reader.schema}, expected {FRAME_SCHEMA}")
        self.num_frames = self._reader.num_record_batches

    def _batch(self, row: int) -> pa.RecordBatch:
        if not 0 <= row < self.num_frames:
            raise FrameStoreError(f"frame store {self.label} has {self.num_frames} frames, row {row} was asked for")
        return self._reader.get_batch(int(row))

    def jpeg(self, row: int) -> pa.Buffer:
        """The JPEG of one row (frame), without copying."""
        col = self._batch(row).column(1)
        start, size = _value_span(col)
        return col.buffers()[2].slice(start, size)

    def frame_index(self, row: int) -> int:
        return int(self._batch(row).column(0)[0].as_py())


def _value_span(col: pa.BinaryArray) -> tuple[int, int]:
    """(offset, length) of the single value of a length-1 binary array inside its data buffer."""
    offsets = np.frombuffer(col.buffers()[1], dtype=np.int32, count=col.offset + 2)
    start, end = int(offsets[col.offset]), int(offsets[col.offset + 1])
    return start, end - start


_open: OrderedDict[tuple[str, str], FrameStore] = OrderedDict()
_lock = threading.Lock()
_TOUCH_S = 60.0  # an open cached store's use time (eviction order) is refreshed at most this often


def _local_copy(fs: pafs.FileSystem, path: str, label: str) -> FrameStore:
    """A remote store opened from its node-local copy, downloaded once per node (keyed by path, size
    and mtime) into the node cache (`lfb_ray.cache`, `$LFB_RAY_CACHE/frames`, LRU within
    `LFB_RAY_CACHE_MAX_GB`). The copy is written to a temporary name and renamed when complete, so no
    process of the node ever maps a partial store, and a killed download leaves no entry behind that
    looks complete. The returned store is pinned (this process will not evict it) until it leaves the
    per-process LRU of open stores.
    """
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FrameStoreError(f"frame store {label} does not exist; {REPAIR}")
    key = hashlib.sha256(f"{fs.type_name}:{path}:{info.size}:{info.mtime_ns}".encode()).hexdigest()[:24]

    def download(tmp: Path) -> None:
        with fs.open_input_stream(path) as src, open(tmp, "wb") as dst:
            while chunk := src.read(64 << 20):
                dst.write(chunk)

    local, store = cache.fetch(
        cache.cache_root(), "frames", f"{key}.arrow", int(info.size), download,
        complete=lambda p: p.is_file() and p.stat().st_size == info.size,
        open_entry=lambda p: FrameStore(str(p), label), label=f"frame store {label}", release=_release_oldest)
    store.cache_path = str(local)
    return store


def _release_oldest() -> bool:
    """Close the least recently used open store that came from the node cache, so that the cache
    may evict its file; False if no such store is open (`lfb_ray.cache.fetch`'s `release`)."""
    with _lock:
        key = next((k for k, s in _open.items() if s.cache_path is not None), None)
        store = _open.pop(key) if key is not None else None
    if store is None:
        return False
    cache.unpin(store.cache_path)
    return True


def open_frame_store(prepared_uri: str, rel_path: str) -> FrameStore:
    """The store `rel_path` (a keyframe row's `frames_file`) of the prepared set at `prepared_uri`,
    opened once per process (kept in a small LRU; a store copied into the node cache stays pinned
    there while it is in this LRU)."""
    key = (prepared_uri, rel_path)
    with _lock:
        store = _open.get(key)
        if store is not None:
            _open.move_to_end(key)
            now = time.monotonic()
            if store.cache_path is not None and now - store.touched > _TOUCH_S:
                store.touched = now
                cache.touch(store.cache_path)  # a hit: keep the node cache's LRU order true
            return store
    fs, root = resolve(prepared_uri)
    path = join(root, rel_path)
    label = join(prepared_uri.partition("?")[0], rel_path)
    if isinstance(fs, pafs.LocalFileSystem):
        if not os.path.exists(path):
            raise FrameStoreError(f"frame store {label} does not exist; {REPAIR}")
        store = FrameStore(path, label)
    else:
        store = _local_copy(fs, path, label)
    with _lock:
        dropped = [s for s in [_open.pop(key, None)] if s is not None]  # another thread opened it too
        _open[key] = store
        while len(_open) > _OPEN_LIMIT:
            dropped.append(_open.popitem(last=False)[1])
    for s in dropped:
        if s.cache_path is not None:
            cache.unpin(s.cache_path)
    return store
