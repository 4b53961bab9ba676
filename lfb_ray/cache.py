"""The node-local cache of objects copied from object storage (frame stores, feature banks).

Layout: one root, `$LFB_RAY_CACHE` (default `~/.cache/lfb_ray`), with a folder per kind of entry
(`frames/`: one `<key>.arrow` file per frame store; `banks/`: one `<key>/` folder per bank). An entry
only ever appears under its final name by an atomic rename of a fully written temporary
(`.<name>.tmp-<id>-<bytes>`), so a reader never sees a partial entry and a killed download leaves
only a temporary behind.

Budget: `LFB_RAY_CACHE_MAX_GB` (decimal GB, a float; unset or 0 = unlimited) caps the bytes of all
entries of a root together, temporaries of downloads in flight included (their final size is in
their name and is reserved before the download starts). To make room, the least recently used
complete entries are deleted; "use" is the entry's mtime, refreshed on every cache hit.

Several processes of a node (Ray workers) share a root: the accounting and eviction decision, and
the rename that completes a download, run under `fcntl.flock` on `<root>/.lock`. Each download holds
an exclusive flock on its own temporary while it writes, so other processes count it as in flight
(wait for it, never delete it); a temporary whose flock is free belongs to a process that died
(a killed worker) and is removed, as it can never complete. Temporaries named without their size
(written by lfb_ray before this cache) are counted, never removed: nothing tells whether they are live. An entry this process has in use (`pin`ned: an open frame store, an open bank)
is never evicted by this process. Another process may evict an entry this process has memory-mapped:
on Linux, unlinking a mapped file only removes its name, the mapping keeps reading the same pages
until it is closed (the disk space comes back then), so readers are never disturbed.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from lfb_ray.redaction import RedactedMessage

__all__ = ["CACHE_ENV", "MAX_GB_ENV", "CacheError", "cache_root", "fetch", "max_bytes", "pin", "touch", "unpin"]

CACHE_ENV = "LFB_RAY_CACHE"
MAX_GB_ENV = "LFB_RAY_CACHE_MAX_GB"
SECTIONS = ("frames", "banks")  # folders of a root whose entries share the budget
LOCK_FILE = ".lock"
_TMP = ".tmp-"
_WAIT_S = 3600.0  # longest wait for other processes' downloads to make room (an AVA store: seconds)
_POLL_S = 0.2

T = TypeVar("T")


class CacheError(RedactedMessage, ValueError):
    """A bad cache setting, or an entry the cache budget cannot hold."""


def cache_root() -> Path:
    """`$LFB_RAY_CACHE`, default `~/.cache/lfb_ray`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lfb_ray")


def max_bytes() -> int | None:
    """The budget from `LFB_RAY_CACHE_MAX_GB` in bytes (1 GB = 1e9 bytes); None = unlimited."""
    raw = os.environ.get(MAX_GB_ENV, "").strip()
    if not raw:
        return None
    try:
        gb = float(raw)
    except ValueError:
        gb = math.nan
    if not math.isfinite(gb) or gb < 0:
        raise CacheError(f"{MAX_GB_ENV}={raw!r} is not a size in GB: give a number such as 500 or 0.5 "
                         "(unset or 0 means no limit)")
    return None if gb == 0 else int(gb * 1e9)


def _gb(n: int) -> str:
    return f"{n / 1e9:,.3f} GB" if n >= 10**7 else f"{n:,} bytes"


# In-process pins: entries this process has open. A Counter, as two handles may share an entry.
_pins: Counter[str] = Counter()
_pins_lock = threading.Lock()


def pin(path: str | os.PathLike) -> None:
    """Mark an entry as in use by this process: this process will not evict it."""
    with _pins_lock:
        _pins[os.fspath(path)] += 1


def unpin(path: str | os.PathLike) -> None:
    """Undo one `pin`; the entry's use time is refreshed, as it was in use until now."""
    key = os.fspath(path)
    with _pins_lock:
        if _pins[key] <= 1:
            _pins.pop(key, None)
        else:
            _pins[key] -= 1
    touch(key)


def _pinned() -> set[str]:
    with _pins_lock:
        return set(_pins)


def touch(path: str | os.PathLike) -> None:
    """Record a use of an entry (its mtime), which orders eviction; a vanished entry is ignored."""
    with contextlib.suppress(OSError):
        os.utime(path)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """The node-wide lock of a root. A fresh open file per call, so threads exclude each other too."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def _size(path: Path) -> int:
    """Bytes of a file, or of all files under a folder."""
    try:
        if not path.is_dir():
            return path.stat().st_size
        return sum((Path(d) / f).stat().st_size for d, _, files in os.walk(path) for f in files)
    except OSError:  # removed meanwhile
        return 0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _tmp_reserved(name: str) -> int | None:
    """The bytes reserved by a temporary named `.<entry>.tmp-<id>-<bytes>`; None if not such a name."""
    tail = name.rpartition(_TMP)[2]
    _, sep, size = tail.rpartition("-")
    return int(size) if sep and size.isdigit() else None


def _writer_alive(path: Path) -> bool:
    """Whether a process still holds the flock of a temporary (is writing it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


@dataclass
class _Entry:
    path: Path
    size: int
    used: float  # mtime
    live: bool = False  # a temporary whose writer holds its flock (a download in flight)


def _scan(root: Path) -> tuple[list[_Entry], list[_Entry]]:
    """(complete entries, temporaries in flight) of a root; removes temporaries of dead processes.

    Must run under `_locked(root)`: a temporary is created and locked under it, so one found without
    its flock held is an orphan. Temporaries without a reserved size in their name (written by an
    older version) are never removed, only counted.
    """
    complete, flight = [], []
    for section in SECTIONS:
        try:
            children = list(os.scandir(root / section))
        except FileNotFoundError:
            continue
        for c in children:
            path = Path(c.path)
            if c.name.startswith("."):
                if _TMP not in c.name:
                    continue
                reserved = _tmp_reserved(c.name)
                if reserved is not None and not _writer_alive(path):
                    _remove(path)  # its writer died (a killed worker): never completes
                    continue
                flight.append(_Entry(path, max(reserved or 0, _size(path)), 0.0, reserved is not None))
            else:
                try:
                    used = c.stat().st_mtime
                except OSError:
                    continue
                complete.append(_Entry(path, _size(path), used))
    return complete, flight


def fetch(
    root: Path,
    section: str,
    name: str,
    size: int,
    download: Callable[[Path], None],
    *,
    complete: Callable[[Path], bool],
    open_entry: Callable[[Path], T],
    label: str,
    folder: bool = False,
    release: Callable[[], bool] | None = None,
) -> tuple[Path, T]:
    """The entry `root/section/name`, downloaded first if it is not complete, opened and pinned.

    Args:
        root: the cache root whose budget the entry counts against (`cache_root()` normally).
        section: "frames" or "banks".
        name: the entry's name, a key of the remote object's identity (path, size, version).
        size: the entry's bytes, known before downloading (to reserve them).
        download: writes the entry into the temporary it is given (a new empty file or folder).
        complete: whether a path holds the complete entry (a hit).
        open_entry: opens (memory-maps) the entry; called under the lock, so that no other process
            evicts it between the check and the mapping. Its errors propagate (the entry is unpinned).
        label: the remote object, for messages.
        folder: the entry is a folder (a bank) rather than a file.
        release: called when only this process's pinned entries stand in the way; it drops one of its
            own handles (unpinning it) and returns True, or returns False if it has none to drop.

    Returns:
        (local path, what `open_entry` returned). The caller `unpin`s the path when done with it.

    Raises:
        CacheError: a bad `LFB_RAY_CACHE_MAX_GB`; an entry larger than the whole budget (before any
            download); entries pinned by this process leave no room; waited `_WAIT_S` for others.
    """
    root = Path(root).absolute()  # pins and scans must name an entry by the same string
    budget = max_bytes()
    if budget is not None and size > budget:
        raise CacheError(f"{label} is {_gb(size)}, more than the whole node cache budget of {_gb(budget)} "
                         f"({MAX_GB_ENV}={os.environ.get(MAX_GB_ENV)}); raise {MAX_GB_ENV} or unset it")
    (root / section).mkdir(parents=True, exist_ok=True)
    dest = root / section / name
    deadline = time.monotonic() + _WAIT_S
    tmp, tmp_fd = None, None
    while tmp is None:
        with _locked(root):
            if complete(dest):
                return dest, _open_pinned(dest, open_entry)
            entries, flight = _scan(root)
            # Only new-style temporaries are waited for: their flock tells a live writer from a dead one.
            same = [f for f in flight if f.path.name.startswith(f".{name}{_TMP}") and f.live]
            if not same:  # else another process is downloading this very entry: wait for it
                if budget is None or _make_room(entries, flight, dest, size, budget, label, release):
                    tmp, tmp_fd = _reserve(root / section, name, size, folder)
        if tmp is None:
            if time.monotonic() > deadline:
                raise CacheError(f"waited {_WAIT_S:.0f} s for other downloads into {root} to make room for "
                                 f"{label} ({_gb(size)}, {MAX_GB_ENV}={os.environ.get(MAX_GB_ENV)})")
            time.sleep(_POLL_S)
    try:
        download(tmp)
        with _locked(root):
            if not complete(dest):
                if dest.exists() or dest.is_symlink():
                    _remove(dest)  # a partial or corrupt entry under this name (an older version's)
                os.replace(tmp, dest)
            touch(dest)
            return dest, _open_pinned(dest, open_entry)
    finally:
        os.close(tmp_fd)
        _remove(tmp)  # gone after the rename; else a failed download or a copy that lost the race


def _make_room(entries: list[_Entry], flight: list[_Entry], dest: Path, size: int, budget: int, label: str,
               release: Callable[[], bool] | None) -> bool:
    """Evict least recently used entries until `size` more bytes fit the budget; whether they do.

    Nothing is evicted unless that makes enough room. If in-flight downloads stand in the way, False
    (the caller waits for them to complete: then they can be evicted); if entries this process has
    pinned do, `release` is asked to drop some, else CacheError. Runs under `_locked`.
    """
    used = sum(e.size for e in entries) + sum(f.size for f in flight)
    while True:
        pinned = _pinned()
        free = sorted((e for e in entries if str(e.path) not in pinned and e.path != dest), key=lambda e: e.used)
        need, victims = used + size - budget, []
        for e in free:
            if need <= 0:
                break
            victims.append(e)
            need -= e.size
        if need <= 0:
            for e in victims:
                _remove(e.path)
            return True
        if any(f.live for f in flight):
            return False
        if release is not None and release():
            continue
        held = sum(e.size for e in entries if str(e.path) in pinned)
        stale = [f for f in flight if not f.live]
        left = (f"; {_gb(sum(f.size for f in stale))} are temporaries left by an older lfb_ray "
                f"(remove them when no job runs: {', '.join(str(f.path) for f in stale[:3])})") if stale else ""
        raise CacheError(f"the node cache budget of {_gb(budget)} ({MAX_GB_ENV}) has no room for {label} "
                         f"({_gb(size)}): {_gb(held)} of it are entries this process has open{left}; "
                         f"raise {MAX_GB_ENV}")


def _reserve(section_dir: Path, name: str, size: int, folder: bool) -> tuple[Path, int]:
    """Create and flock the temporary of a download; its name carries the bytes it reserves."""
    tmp = section_dir / f".{name}{_TMP}{uuid.uuid4().hex[:8]}-{size}"
    if folder:
        tmp.mkdir()
        fd = os.open(tmp, os.O_RDONLY)
    else:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return tmp, fd


def _open_pinned(dest: Path, open_entry: Callable[[Path], T]) -> T:
    touch(dest)
    pin(dest)
    try:
        return open_entry(dest)
    except BaseException:
        unpin(dest)
        raise
