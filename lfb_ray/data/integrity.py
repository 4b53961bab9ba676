"""Integrity of prepared outputs: sizes and checksums recorded at write time, checked on reuse.

Why: a rerun of the prepare job used to skip a video on its `_DONE.json` hash alone, so a
`frames.arrow` cut in half (a full disk, a copy that stopped) was trusted forever, and the reader's
advice to "rerun jobs/prepare_data.py" skipped the damaged video again. Now each video's marker holds
`checks: {file: {size, sha256}}` of the files it commits (hashed while they are written, so nothing
is read back); a rerun compares sizes always (one metadata call per file) and checksums with
`--verify`, and redoes a video whose files do not match. Local writes are fsynced before their
marker (`lfb_ray.storage.fsync_local`), so a crash cannot leave a marker naming data that never
reached the disk.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pyarrow.fs as pafs

__all__ = ["HashingSink", "check_files", "file_check"]


class HashingSink:
    """A write-only file object over a pyarrow output stream that hashes what goes through it.

    For `pa.ipc.new_file(pa.PythonFile(sink, mode="w"), ...)`: the frame store's SHA-256 and size
    come out of the write itself, without reading a (up to GB) file back from object storage.
    """

    def __init__(self, raw: Any):
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data) -> int:
        view = memoryview(data)
        self.sha256.update(view)
        self.size += view.nbytes
        self.raw.write(data)
        return view.nbytes

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.raw.flush()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self.raw.close()
            self.closed = True

    def check(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256.hexdigest()}


def file_check(data: bytes) -> dict[str, Any]:
    """{size, sha256} of bytes about to be written."""
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _sha256_of(fs: pafs.FileSystem, path: str) -> str:
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_files(fs: pafs.FileSystem, vdir: str, checks: dict[str, dict], *, checksums: bool) -> str | None:
    """Compare a video's files with the checks of its marker; None when they match, else why not.

    Args:
        checksums: also recompute each file's SHA-256 (reads the files; `--verify`); sizes are
            always compared.
    """
    for name, want in sorted(checks.items()):
        path = f"{vdir}/{name}"
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            return f"{name} is missing"
        if info.size != want.get("size"):
            return f"{name} has {info.size} bytes, its marker says {want.get('size')} (truncated or replaced)"
        if checksums and want.get("sha256") and _sha256_of(fs, path) != want["sha256"]:
            return f"{name} does not match its SHA-256 (damaged)"
    return None
