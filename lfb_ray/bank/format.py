"""The on-disk layout of a feature bank, shared by its writer and reader.

A bank is a folder: features.arrow (an uncompressed Arrow IPC file, one row per stored person
feature, sorted by video, second and person), index.arrow (one row per keyframe second: where its
rows start and how many there are) and manifest.json, written last: a folder without it is an
incomplete bank. A split folder holds `train/` and `val/` sub-banks (val wins per video).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from lfb_ray.redaction import RedactedMessage
from lfb_ray.storage import resolve

__all__ = ["FEATURES_FILE", "FORMAT_VERSION", "INDEX_FILE", "MANIFEST_FILE", "SPLITS", "BankError", "bank_manifests",
           "child_path", "features_schema", "leaf_banks", "read_manifest", "split_location"]

FORMAT_VERSION = 1
FEATURES_FILE = "features.arrow"
INDEX_FILE = "index.arrow"
MANIFEST_FILE = "manifest.json"
SPLITS = ("train", "val")  # sub-bank merge order of a split folder: val wins, as the reference


class BankError(RedactedMessage, ValueError):
    """A bank is missing, incomplete, inconsistent, lacks videos, or does not fit the model."""


def features_schema(dim: int) -> pa.Schema:
    return pa.schema([
        ("video_id", pa.string()),
        ("second", pa.int32()),
        ("person_index", pa.int32()),
        ("box", pa.list_(pa.float32(), 4)),
        ("score", pa.float32()),
        ("feature", pa.list_(pa.float16(), dim)),
    ])


def split_location(path: str | os.PathLike, filesystem: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str, bool]:
    """(filesystem, path inside it, is_local) for a local path, a URI, or a path on `filesystem`."""
    if filesystem is not None:
        fs, p = filesystem, str(path)
    else:
        fs, p = resolve(os.fspath(path))
    local = isinstance(fs, pafs.LocalFileSystem)
    return fs, (str(Path(p).resolve()) if local else p.rstrip("/")), local


def child_path(path: str | os.PathLike, name: str) -> str:
    """`path/name` for a local path or a URI, keeping a URI's `?query` (e.g. endpoint_override) last."""
    base, sep, query = os.fspath(path).partition("?")
    return f"{base.rstrip('/')}/{name}{sep}{query}"


def read_manifest(fs: pafs.FileSystem, root: str) -> dict[str, Any] | None:
    try:
        with fs.open_input_stream(f"{root}/{MANIFEST_FILE}") as f:
            return json.loads(f.read().decode())
    except FileNotFoundError:
        return None


def leaf_banks(fs: pafs.FileSystem, root: str) -> list[str]:
    """A bank folder, or the train/val sub-banks of a split folder (val last, so it wins)."""
    if read_manifest(fs, root) is not None:
        return [root]
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        raise BankError(f"no feature bank at {root}")
    subs = [f"{root}/{s}" for s in SPLITS if fs.get_file_info(f"{root}/{s}").type == pafs.FileType.Directory]
    if not subs:
        raise BankError(f"{root} is not a complete bank: no {MANIFEST_FILE} (an incomplete or "
                        f"interrupted write) and no {'/'.join(SPLITS)} sub-banks")
    for s in subs:
        if read_manifest(fs, s) is None:
            raise BankError(f"sub-bank {s} is incomplete: no {MANIFEST_FILE}")
    return subs


def bank_manifests(path: str) -> list[dict[str, Any]]:
    """The manifests of the bank at `path` (a bank folder, or a split folder's train/val sub-banks),
    read without opening or downloading the features: what `lfb_ray.identity.bank_id` hashes.

    Raises:
        BankError: no complete bank there.
    """
    fs, root = resolve(path)
    return [read_manifest(fs, leaf) for leaf in leaf_banks(fs, root)]
