"""A bank's files mapped into memory: a local bank in place, a remote one from its node-cache copy."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from lfb_ray import cache
from lfb_ray.bank.format import (
    FEATURES_FILE,
    FORMAT_VERSION,
    INDEX_FILE,
    MANIFEST_FILE,
    BankError,
    read_manifest,
)

__all__ = ["Source", "download", "map_source", "unpin"]


def download(fs: pafs.FileSystem, root: str, manifest: dict[str, Any], cache_root: Path,
              label: str) -> tuple[Path, Source]:
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
        complete=lambda p: p.is_dir() and read_manifest(pafs.LocalFileSystem(), str(p)) == manifest,
        open_entry=lambda p: map_source(label, p, manifest), label=f"bank {label}", folder=True)


def unpin(folders: tuple[Path, ...]) -> None:
    for f in folders:
        cache.unpin(f)


@dataclass
class Source:
    """One mapped bank: its table and the zero-copy [rows, C] float16 views of its record batches."""

    path: str
    manifest: dict[str, Any]
    table: pa.Table
    index: pa.Table
    chunks: list[np.ndarray]
    chunk_starts: np.ndarray  # [num_chunks] first row of each chunk


def map_source(label: str, local_dir: Path, manifest: dict[str, Any]) -> Source:
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
    return Source(label, manifest, table, index, chunks, np.asarray(starts, dtype=np.int64))
