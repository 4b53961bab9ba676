"""Local paths and object-store URIs through one pyarrow filesystem interface, with atomic writes.

Every stage writes through these helpers so that `s3://bucket/prefix` works unchanged, and so a
crash never leaves a file that a later run trusts: files are written under a temporary name and
moved into place; completion markers are written last.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from lfb_ray.redaction import RedactedMessage

__all__ = ["StorageError", "atomic_path", "check_writable", "checkpoint_file", "exists", "file_sha256", "is_uri", "join", "join_uri", "local_file",
           "read_bytes", "file_exists", "fsync_local", "read_json", "remove_dir", "resolve", "upload_file", "write_bytes_atomic", "write_json_atomic"]


class StorageError(RedactedMessage, OSError):
    """An output location cannot be used (unwritable, full, bad URI).

    Its message is credential-free whoever raises it: the URIs it names may carry
    `s3://KEY:SECRET@...` or `?secret_key=...` (`lfb_ray.redaction.RedactedMessage`), since an
    error's text ends up in logs, job output and MLflow tags.
    """


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI such as `s3://bucket/prefix`."""
    if "://" in uri:
        try:
            return pafs.FileSystem.from_uri(uri)
        except Exception as e:  # pyarrow raises ArrowInvalid/OSError variants
            # Not chained: pyarrow's own text may echo the URI, credentials included, and a
            # chained cause is printed whole in every traceback. Its type and (redacted) text stay.
            raise StorageError(f"cannot open {uri}: {type(e).__name__}: {e}") from None
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


def is_uri(path: str | os.PathLike) -> bool:
    """Whether `path` is a URI (`s3://...`, `gs://...`) rather than a local path."""
    return "://" in os.fspath(path)


def join(base: str, *parts: str) -> str:
    """Join path parts of a filesystem path (always '/')."""
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def join_uri(uri: str, *parts: str) -> str:
    """Append path parts to a local path or URI, keeping a URI's `?options` at the end."""
    base, sep, query = uri.partition("?") if "://" in uri else (uri, "", "")
    if "://" not in uri:
        return os.path.join(base, *parts)
    return join(base, *parts) + sep + query


def checkpoint_file(path: str) -> str:
    """A checkpoint given as a file or as a (Ray Train) checkpoint folder holding `model.pt`, as
    the file's path or URI. Works for local paths and URIs (`s3://bucket/run/checkpoint_000001?...`)."""
    fs, inner = resolve(path)
    if fs.get_file_info(inner).type == pafs.FileType.Directory:
        return join_uri(path, "model.pt")
    return path


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def fsync_local(fs: pafs.FileSystem, path: str, *, directory: bool = False) -> None:
    """fsync a local file (or, with `directory`, a folder's entries); object stores need none.

    Why: a marker written after its data must not reach the disk before that data does; a crash
    in between would leave a marker naming bytes that were never stored.
    """
    if not isinstance(fs, pafs.LocalFileSystem):
        return
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write `data` to `path` via a temporary name and a move (atomic on local filesystems; the file
    and then its folder are fsynced, so what a later marker names is on disk first)."""
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fsync_local(fs, tmp)
        fs.move(tmp, path)
        fsync_local(fs, parent, directory=True)
    except Exception:
        try:
            fs.delete_file(tmp)
        except Exception:
            pass
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = "") -> Iterator[str]:
    """A temporary local path beside `path`, for writers that need a file name (torch.save, PyAV,
    Pillow, text): when the block ends the file is fsynced and moved over `path`; when it raises, the
    temporary file is removed and `path` keeps what it held. `suffix` keeps the extension a library
    infers the format from (".mp4", ".png")."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp{suffix}")
    try:
        yield str(tmp)
        local = pafs.LocalFileSystem()
        fsync_local(local, str(tmp))
        os.replace(tmp, target)
        fsync_local(local, str(target.parent), directory=True)
    finally:
        tmp.unlink(missing_ok=True)


_SHA256_MEMO: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str) -> str:
    """SHA-256 of a checkpoint file, or of `model.pt` in a checkpoint folder; local path or URI.

    Memoised per process on (location, size, mtime): the pipeline asks for the baseline's hash for
    the bank stage's key, the bank build and the LFB runs' input identities (`lfb_ray.identity`),
    and a checkpoint is hundreds of MB (or an S3 download).
    """
    fs, inner = resolve(checkpoint_file(path))
    info = fs.get_file_info(inner)
    key = (f"{fs.type_name}:{inner}", int(info.size or 0), int(info.mtime_ns or 0))
    if info.type == pafs.FileType.File and key in _SHA256_MEMO:
        return _SHA256_MEMO[key]
    h = hashlib.sha256()
    with fs.open_input_stream(inner) as f:  # a missing file raises here, as before
        while chunk := f.read(1 << 20):
            h.update(chunk)
    _SHA256_MEMO[key] = h.hexdigest()
    return _SHA256_MEMO[key]


def upload_file(local_path: str | os.PathLike, dest: str) -> None:
    """Copy the local file `local_path` to `dest`, a local path or URI (`write_bytes_atomic`: a reader
    never sees a partial file). Meant for small outputs (result CSVs, tables, plots): it is read whole."""
    fs, path = resolve(dest)
    with open(local_path, "rb") as f:
        write_bytes_atomic(fs, path, f.read())


@contextlib.contextmanager
def local_file(path: str) -> Iterator[str]:
    """A local path with the contents of the file `path`: `path` itself when it is local, else a
    download into a temporary folder (under the system's temp dir, never the working directory)
    that is removed when the block ends. For readers that need a local file (CSV parsers)."""
    if not is_uri(path):
        yield path
        return
    fs, inner = resolve(path)
    with tempfile.TemporaryDirectory(prefix="lfb_ray_") as d:
        local = os.path.join(d, inner.rsplit("/", 1)[-1] or "file")
        with fs.open_input_stream(inner) as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst)
        yield local


def read_bytes(path: str | os.PathLike) -> bytes:
    """The whole file `path`, a local path or a URI (`s3://bucket/data/ava/annotations/x.csv?...`).

    Raises:
        FileNotFoundError: no such file.
    """
    path = os.fspath(path)
    if not is_uri(path):
        return Path(path).read_bytes()
    fs, inner = resolve(path)
    if fs.get_file_info(inner).type != pafs.FileType.File:
        from lfb_ray.redaction import redact_text

        raise FileNotFoundError(f"{redact_text(path.partition('?')[0])}: no such file")
    with fs.open_input_stream(inner) as f:
        return f.read()


def file_exists(path: str | os.PathLike) -> bool:
    """Whether the file `path` (a local path or a URI) exists."""
    path = os.fspath(path)
    if not is_uri(path):
        return os.path.isfile(path)
    fs, inner = resolve(path)
    return fs.get_file_info(inner).type == pafs.FileType.File


def write_json_atomic(fs: pafs.FileSystem, path: str, obj: Any) -> None:
    write_bytes_atomic(fs, path, json.dumps(obj, indent=1, sort_keys=True).encode())


def read_json(fs: pafs.FileSystem, path: str) -> Any:
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def remove_dir(fs: pafs.FileSystem, path: str, *, inside: str | None = None) -> None:
    """Delete the folder `path` if it exists.

    Args:
        inside: the output root `path` must lie strictly inside (after normalising `..`); a path
            that escapes it, or is the root itself, raises instead of deleting (an id such as `..`
            joined into an output path once deleted a whole prepared folder).

    Raises:
        StorageError: `path` is not strictly inside `inside`.
    """
    if inside is not None:
        root = posixpath.normpath(inside.replace(os.sep, "/"))
        target = posixpath.normpath(path.replace(os.sep, "/"))
        if not target.startswith(root.rstrip("/") + "/"):
            raise StorageError(f"refusing to delete {path}: it is not inside the output folder {inside}")
    if exists(fs, path):
        fs.delete_dir(path)


def check_writable(uri: str, *, min_free_bytes: int = 0) -> None:
    """Fail early, before any work, if `uri` cannot be written or (locally) has too little space.

    Raises:
        StorageError: naming the location and the reason.
    """
    fs, path = resolve(uri)
    probe = join(path, f".write-probe-{uuid.uuid4().hex[:8]}")
    try:
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except Exception as e:  # not chained, like `resolve`'s: the cause's text may hold credentials
        raise StorageError(f"output location {uri} is not writable: {type(e).__name__}: {e}") from None
    if isinstance(fs, pafs.LocalFileSystem) and min_free_bytes:
        st = os.statvfs(path)
        free = st.f_bavail * st.f_frsize
        if free < min_free_bytes:
            raise StorageError(f"output location {uri} has {free / 1e9:.2f} GB free, "
                               f"needs at least {min_free_bytes / 1e9:.2f} GB")
