"""The node-local cache (lfb_ray.cache) of frame stores and banks copied from object storage: one root,
a budget (LFB_RAY_CACHE_MAX_GB) kept by least-recently-used eviction, safe across processes.

A `SubTreeFileSystem` over a local folder plays the object store: it is not a `LocalFileSystem`, so
frames.py and bank/sources.py take their copy-to-cache path, as for s3://.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from lfb_ray.data import frames
from lfb_ray.data.frames import FrameStoreWriter

PAYLOAD = 100_000  # bytes of "JPEG" per store: a store is ~100 kB (plus a little Arrow framing)
STEP = 0.05  # s between uses: file mtimes have a clock tick's resolution


def remote_fs(tmp_path: Path) -> pafs.FileSystem:
    (tmp_path / "remote").mkdir(exist_ok=True)
    return pafs.SubTreeFileSystem(str(tmp_path / "remote"), pafs.LocalFileSystem())


def make_stores(fs: pafs.FileSystem, n: int) -> tuple[list[str], int]:
    """n remote frame stores of the same size; their paths and that size."""
    paths = []
    for i in range(n):
        w = FrameStoreWriter(fs, f"set/v{i}/frames.arrow")
        w.add(0, bytes([i]) * PAYLOAD)
        size = w.close()
        paths.append(f"set/v{i}/frames.arrow")
    return paths, size


def cached_files(root: Path) -> dict[str, int]:
    """Every file under the cache's frames/ and banks/ (temporaries included) and its size."""
    out = {}
    for section in ("frames", "banks"):
        for d, _, files in os.walk(root / section):
            for f in files:
                try:
                    out[os.path.relpath(os.path.join(d, f), root)] = os.stat(os.path.join(d, f)).st_size
                except FileNotFoundError:
                    pass
    return out


def copy(fs: pafs.FileSystem, path: str):
    """Copy a store into the cache and stop using it (as if it had left the open-store LRU)."""
    from lfb_ray import cache

    store = frames._local_copy(fs, path, path)
    assert bytes(store.jpeg(0))[:1] == bytes([int(path.split("/")[1][1:])])
    cache.unpin(store.cache_path)
    return store


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("LFB_RAY_CACHE", str(root))
    monkeypatch.delenv("LFB_RAY_CACHE_MAX_GB", raising=False)
    yield root
    frames._open.clear()


def set_budget(monkeypatch, nbytes: float) -> None:
    monkeypatch.setenv("LFB_RAY_CACHE_MAX_GB", repr(nbytes / 1e9))


def test_lru_eviction_a_hit_refreshes(tmp_path, cache_env, monkeypatch):
    fs = remote_fs(tmp_path)
    (a, b, c, d), size = make_stores(fs, 4)
    set_budget(monkeypatch, 2.5 * size)  # room for two stores
    sa = copy(fs, a)
    time.sleep(STEP)
    copy(fs, b)
    time.sleep(STEP)
    assert copy(fs, a).cache_path == sa.cache_path  # a hit: no new copy, a's use time refreshed
    time.sleep(STEP)
    copy(fs, c)  # evicts b (least recently used), not a (older copy, but used since)
    names = {Path(f).name for f in cached_files(cache_env)}
    assert Path(sa.cache_path).name in names and len(names) == 2
    assert not any(".tmp-" in n for n in names)
    time.sleep(STEP)
    copy(fs, d)  # now a is the least recently used
    assert Path(sa.cache_path).name not in {Path(f).name for f in cached_files(cache_env)}


def test_budget_holds_after_each_insert_across_frames_and_banks(tmp_path, cache_env, monkeypatch):
    fs = remote_fs(tmp_path)
    paths, size = make_stores(fs, 6)
    budget = 3.5 * size
    set_budget(monkeypatch, budget)
    (cache_env / "banks" / "old").mkdir(parents=True)  # an entry of the other section, used long ago
    (cache_env / "banks" / "old" / "features.arrow").write_bytes(b"x" * size)
    os.utime(cache_env / "banks" / "old", (1, 1))
    for p in paths:
        copy(fs, p)
        files = cached_files(cache_env)
        assert sum(files.values()) <= budget, files
        time.sleep(STEP)
    assert not (cache_env / "banks" / "old").exists()  # one budget for the whole root, LRU across sections
    assert len(cached_files(cache_env)) == 3


def test_an_entry_larger_than_the_budget_is_an_error_before_downloading(tmp_path, cache_env, monkeypatch):
    fs = remote_fs(tmp_path)
    (a,), size = make_stores(fs, 1)
    monkeypatch.setenv("LFB_RAY_CACHE_MAX_GB", "0.00005")  # 50 kB
    message = rf"is {size:,} bytes, more than .* budget of 50,000 bytes \(LFB_RAY_CACHE_MAX_GB=0\.00005\)"
    with pytest.raises(ValueError, match=message):
        frames._local_copy(fs, a, "s3://bucket/set/v0/frames.arrow")
    assert cached_files(cache_env) == {}


@pytest.mark.parametrize("value", ["abc", "-1", "nan"])
def test_an_invalid_budget_is_an_error_naming_the_variable(tmp_path, cache_env, monkeypatch, value):
    fs = remote_fs(tmp_path)
    (a,), _ = make_stores(fs, 1)
    monkeypatch.setenv("LFB_RAY_CACHE_MAX_GB", value)
    with pytest.raises(ValueError, match=f"LFB_RAY_CACHE_MAX_GB='{value}' is not a size in GB"):
        frames._local_copy(fs, a, a)


def test_unset_or_zero_budget_is_unlimited(tmp_path, cache_env, monkeypatch):
    fs = remote_fs(tmp_path)
    paths, _ = make_stores(fs, 3)
    monkeypatch.setenv("LFB_RAY_CACHE_MAX_GB", "0")
    for p in paths:
        copy(fs, p)
    assert len(cached_files(cache_env)) == 3
    assert all(f.startswith("frames/") for f in cached_files(cache_env))


def test_a_store_open_in_this_process_is_not_evicted(tmp_path, cache_env, monkeypatch):
    fs = remote_fs(tmp_path)
    (a, b, c), size = make_stores(fs, 3)
    set_budget(monkeypatch, 2.5 * size)
    monkeypatch.setattr(frames, "resolve", lambda uri: (fs, "set"))
    opened = frames.open_frame_store("s3://bucket/set", "v0/frames.arrow")  # kept in the open-store LRU
    time.sleep(STEP)
    copy(fs, b)
    time.sleep(STEP)
    copy(fs, c)  # a is the least recently used, but open: b goes
    names = {Path(f).name for f in cached_files(cache_env)}
    assert Path(opened.cache_path).name in names and len(names) == 2
    assert bytes(opened.jpeg(0))[:1] == b"\x00"
    # A budget that holds one store: the open one is closed (leaves the LRU) to make room.
    set_budget(monkeypatch, 1.5 * size)
    frames.open_frame_store("s3://bucket/set", "v1/frames.arrow")
    assert ("s3://bucket/set", "v0/frames.arrow") not in frames._open
    assert len(cached_files(cache_env)) == 1


def test_banks_live_under_banks_and_an_open_bank_is_not_evicted(tmp_path, cache_env, monkeypatch):
    pytest.importorskip("torch")
    from test_bank_store import encoded_bank

    from lfb_ray.bank import FeatureBank

    fs = remote_fs(tmp_path)
    encoded_bank("lfb1", {"a": {1: 2}}, filesystem=fs)
    encoded_bank("lfb2", {"b": {1: 2}}, filesystem=fs)
    bank = FeatureBank.open("lfb1", filesystem=fs)
    files = cached_files(cache_env)
    assert files and all(f.startswith("banks/") for f in files)
    set_budget(monkeypatch, sum(files.values()) * 1.5)  # one bank
    with pytest.raises(ValueError, match="entries this process has open.*LFB_RAY_CACHE_MAX_GB"):
        FeatureBank.open("lfb2", filesystem=fs)
    assert FeatureBank.open("lfb1", filesystem=fs).videos == ("a",)  # a hit
    del bank
    gc.collect()
    assert FeatureBank.open("lfb2", filesystem=fs).videos == ("b",)  # lfb1 closed: evicted
    assert len({Path(f).parts[1] for f in cached_files(cache_env)}) == 1


def test_a_download_in_flight_is_reserved_and_never_deleted(tmp_path, cache_env, monkeypatch):
    """Another process's temporary (flock held: being written) counts with the size in its name and is
    waited for, never deleted; one whose writer died (flock free) is removed; an old-style one is kept."""
    import fcntl

    from lfb_ray import cache

    fs = remote_fs(tmp_path)
    (a,), size = make_stores(fs, 1)
    set_budget(monkeypatch, 2.5 * size)
    monkeypatch.setattr(cache, "_WAIT_S", 0.5)
    frames_dir = cache_env / "frames"
    frames_dir.mkdir(parents=True)
    live = frames_dir / f".k1.arrow.tmp-0000aaaa-{2 * size}"  # reserves two stores, holds a few bytes
    live.write_bytes(b"x" * 10)
    fd = os.open(live, os.O_RDONLY)  # an open file of its own: flock excludes it like another process
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(ValueError, match="waited"):
            frames._local_copy(fs, a, a)
        assert live.exists() and cached_files(cache_env) == {f"frames/{live.name}": 10}
    finally:
        os.close(fd)  # the writer dies: its temporary is an orphan now
    old_style = frames_dir / ".k2.arrow.tmp-0000bbbb"
    old_style.write_bytes(b"y" * 10)
    copy(fs, a)
    assert not live.exists() and old_style.exists()


def _fill(remote: str, paths: list[str], errors) -> None:
    """A process copying stores into the cache; each download lingers as a complete temporary, and
    fails if that temporary was deleted meanwhile (by the other process)."""
    from lfb_ray import cache

    fetch = cache.fetch

    def slow_fetch(*args, **kwargs):
        args = list(args)
        download = args[4]

        def slow(tmp):
            time.sleep(0.02)
            download(tmp)
            time.sleep(0.03)
            if not tmp.exists():
                errors.put(f"{tmp} was deleted while in flight")

        args[4] = slow
        return fetch(*args, **kwargs)

    cache.fetch = slow_fetch
    fs = pafs.SubTreeFileSystem(remote, pafs.LocalFileSystem())
    try:
        for p in paths:
            store = frames._local_copy(fs, p, p)
            if bytes(store.jpeg(0))[:1] != bytes([int(p.split("/")[1][1:])]):
                errors.put(f"{p}: wrong content")
            cache.unpin(store.cache_path)
    except Exception as e:  # reported to the test
        errors.put(f"{type(e).__name__}: {e}")


def test_two_processes_filling_the_cache_keep_the_budget(tmp_path, cache_env, monkeypatch):
    fs = remote_fs(tmp_path)
    paths, size = make_stores(fs, 6)
    budget = 2.5 * size
    set_budget(monkeypatch, budget)
    ctx = multiprocessing.get_context("spawn")
    errors = ctx.Queue()
    order = [paths + paths, list(reversed(paths + paths))]
    procs = [ctx.Process(target=_fill, args=(str(tmp_path / "remote"), o, errors)) for o in order]
    peak, stop = [0], threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], sum(cached_files(cache_env).values()))
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
    finally:
        stop.set()
        watcher.join()
    reported = []
    while not errors.empty():
        reported.append(errors.get())
    assert reported == []
    assert [p.exitcode for p in procs] == [0, 0]
    assert peak[0] > size  # both filled it
    assert peak[0] <= budget + size, (peak[0], budget)
    final = cached_files(cache_env)
    assert sum(final.values()) <= budget and not any(".tmp-" in f for f in final)
    assert len(final) == 2
