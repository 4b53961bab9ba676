"""FeatureBank: on-disk format, window sampling semantics, merging, atomicity, mmap."""

from __future__ import annotations

import json
import os
import pickle
import re
import socket
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

from lfb_ray.bank import BankError, FeatureBank, write_bank
from lfb_ray.bank import writer as writer_module

C = 4  # feature = [second, person, video number, 1]: every slot says what it holds; zero = empty


def encoded_bank(path, persons: dict[str, dict[int, int]], *, dim: int = C, **kwargs):
    """Bank whose features encode (second, person, video); `persons[video][second]` = persons there."""
    rows = [(v, s, p) for v, secs in persons.items() for s, n in secs.items() for p in range(n)]
    rng = np.random.default_rng(123)
    rows = [rows[i] for i in rng.permutation(len(rows))]  # write_bank must sort
    vnum = {v: i + 1 for i, v in enumerate(sorted(persons))}
    feats = np.zeros((len(rows), dim), np.float16)
    feats[:, :4] = [(s, p, vnum[v], 1) for v, s, p in rows] if rows else np.zeros((0, 4))
    return write_bank(
        path,
        video_ids=[r[0] for r in rows],
        seconds=np.array([r[1] for r in rows], dtype=np.int64),
        person_index=np.array([r[2] for r in rows], dtype=np.int64),
        boxes=rng.random((len(rows), 4), dtype=np.float32),
        scores=rng.random(len(rows), dtype=np.float32),
        features=feats,
        **kwargs,
    )


# video "v": seconds 100..119 with (second % 8) persons, so second 104 and 112 are missing.
PERSONS = {"v": {s: s % 8 for s in range(100, 120) if s % 8}, "w": {100: 2, 101: 9}}


@pytest.fixture
def bank(tmp_path) -> FeatureBank:
    encoded_bank(tmp_path / "bank", PERSONS)
    return FeatureBank.open(tmp_path / "bank")


def check_window(out: torch.Tensor, video: str, t: int, window: int, k: int, persons=PERSONS) -> None:
    """Every slot of one RoI's [W*K, C] sample against the reference semantics."""
    slots = out.reshape(window, k, -1)
    for j in range(window):
        s = t - window // 2 + j
        n = persons.get(video, {}).get(s, 0)
        m = min(n, k)
        assert torch.all(slots[j, m:] == 0), (s, "unused rows must be zero")
        got = slots[j, :m]
        assert torch.all(got[:, 0] == s) and torch.all(got[:, 3] == 1), (s, got)
        people = got[:, 1].tolist()
        assert len(set(people)) == m and all(0 <= p < n for p in people), (s, people)


def test_open_properties(bank):
    assert bank.feature_dim == C and bank.videos == ("v", "w") and len(bank) == 2 and "v" in bank
    assert bank.num_features == sum(n for secs in PERSONS.values() for n in secs.values())
    assert bank.seconds_of("v").tolist() == sorted(PERSONS["v"])
    f = bank.features_at("v", 103)
    assert f.dtype == np.float16 and f.shape == (7, C)
    assert f[:, 1].tolist() == list(range(7)) and np.all(f[:, 0] == 103)  # person order kept
    assert bank.features_at("v", 104).shape == (0, C)
    with pytest.raises(KeyError):
        bank.features_at("nope", 1)
    assert bank.manifests[0]["num_features"] == bank.num_features


@pytest.mark.parametrize("t", [100, 103, 109, 119, 125, 80])  # video start, middle, end, past both edges
@pytest.mark.parametrize("window,k", [(60, 5), (7, 3), (8, 1)])
def test_sample_window_slots(bank, t, window, k):
    rng = np.random.default_rng(t)
    out = bank.sample(["v", "w", "v"], [t, t, t], rng, window_seconds=window, max_feats_per_second=k)
    assert out.shape == (3, window * k, C) and out.dtype == torch.float32
    for r, video in enumerate(["v", "w", "v"]):
        check_window(out[r], video, t, window, k)


def test_sample_current_second_at_slot_half_window(bank):
    out = bank.sample(["v"], [107], np.random.default_rng(0), window_seconds=4, max_feats_per_second=8)
    slots = out.reshape(4, 8, C)
    assert [int(slots[j, 0, 0]) for j in range(4)] == [105, 106, 107, 108]  # t - W//2 + j


def test_sample_unknown_video_is_an_error_naming_it_and_the_bank(bank, tmp_path):
    """mmaction2's `lfb[video_id]` raises KeyError; an all-zero window would hide a bank built for
    other videos (issue 22)."""
    rng = np.random.default_rng(0)
    with pytest.raises(BankError, match=rf"bank at {re.escape(str(tmp_path / 'bank'))} has no features for video\(s\) "
                                        r"'gone', 'missing' \(2 of 3 RoIs\).*bank.missing_videos=zeros"):
        bank.sample(["missing", "v", "gone"], [110, 110, 3], rng)
    with pytest.raises(BankError, match="'missing'"):  # a bank handed to another process keeps the mode
        pickle.loads(pickle.dumps(bank)).sample(["missing"], [110], rng)
    assert bank.sample([], [], rng).shape == (0, 300, C)
    with pytest.raises(ValueError):
        bank.sample(["v"], [1, 2], rng)


def test_sample_unknown_video_zeros_only_when_opted_out(tmp_path):
    encoded_bank(tmp_path / "bank", PERSONS)
    bank = FeatureBank.open(tmp_path / "bank", missing_videos="zeros")
    rng = np.random.default_rng(0)
    out = bank.sample(["missing", "v"], [110, 110], rng, window_seconds=8, max_feats_per_second=8)
    assert torch.all(out[0] == 0)
    check_window(out[1], "v", 110, 8, 8)  # the known video is sampled as usual
    assert torch.all(pickle.loads(pickle.dumps(bank)).sample(["missing"], [110], rng) == 0)
    with pytest.raises(BankError, match="missing_videos must be one of error, zeros, got 'skip'"):
        FeatureBank.open(tmp_path / "bank", missing_videos="skip")


def test_require_videos_names_split_videos_count_and_path(tmp_path, capsys):
    encoded_bank(tmp_path / "bank", PERSONS)
    bank = FeatureBank.open(tmp_path / "bank")
    assert bank.require_videos(["v", "w", "v"], "train") == ()
    wanted = ["v", "w"] + [f"val{i:02d}" for i in range(7)]
    with pytest.raises(BankError, match=rf"bank at {re.escape(str(tmp_path / 'bank'))} lacks 7 of the 9 val videos: 'val00', "
                                        r"'val01', 'val02', 'val03', 'val04' \(\+2 more\)"):
        bank.require_videos(wanted, "val")
    lenient = FeatureBank.open(tmp_path / "bank", missing_videos="zeros")
    assert lenient.require_videos(wanted, "val") == tuple(f"val{i:02d}" for i in range(7))
    assert "WARNING" in capsys.readouterr().out  # the opt-out is never silent


def test_sample_without_replacement_uniform_random_order(bank):
    # second 103 has 7 persons (> K=5), 115 has 3 (< K)
    rng = np.random.default_rng(0)
    reps = 4000
    out = bank.sample(["v"] * reps, [103] * reps, rng, window_seconds=1, max_feats_per_second=5)
    people = out[:, :, 1].to(torch.int64)  # [reps, 5]
    assert all(len(set(row)) == 5 for row in people.tolist())  # no duplicates
    counts = torch.bincount(people.flatten(), minlength=7).double() / reps
    assert torch.allclose(counts, torch.full((7,), 5 / 7, dtype=torch.float64), atol=0.04)
    out = bank.sample(["v"] * reps, [115] * reps, rng, window_seconds=1, max_feats_per_second=5)
    assert torch.all(out[:, 3:] == 0)
    first = torch.bincount(out[:, 0, 1].to(torch.int64), minlength=3).double() / reps
    assert torch.allclose(first, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.04)  # random order


def test_sample_deterministic_and_independent_per_roi(bank):
    a = bank.sample(["v"] * 8, [110] * 8, np.random.default_rng(7))
    b = bank.sample(["v"] * 8, [110] * 8, np.random.default_rng(7))
    assert torch.equal(a, b)
    assert not all(torch.equal(a[0], a[i]) for i in range(1, 8))  # same keyframe, independent draws
    c = bank.sample(["v"] * 8, [110] * 8, np.random.default_rng(8))
    assert not torch.equal(a, c)


def test_sample_into_out_tensor(bank):
    out = torch.full((2, 300, C), 9.0)
    got = bank.sample(["v", "w"], [110, 100], np.random.default_rng(0), out=out)
    assert got is out
    check_window(out[0], "v", 110, 60, 5)
    check_window(out[1], "w", 100, 60, 5)
    with pytest.raises(ValueError):
        bank.sample(["v"], [110], np.random.default_rng(0), out=torch.zeros(1, 300, C, dtype=torch.float16))


def test_multiple_record_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_module, "_ROWS_PER_BATCH", 5)  # seconds straddle record batches
    encoded_bank(tmp_path / "b", PERSONS)
    bank = FeatureBank.open(tmp_path / "b")
    assert len(bank._chunks) > 5
    assert bank.features_at("v", 103)[:, 1].tolist() == list(range(7))
    out = bank.sample(["v"] * 3, [105, 110, 118], np.random.default_rng(0), window_seconds=20)
    for r, t in enumerate([105, 110, 118]):
        check_window(out[r], "v", t, 20, 5)


def test_merge_split_folder_val_wins(tmp_path):
    encoded_bank(tmp_path / "both" / "train", {"a": {1: 1}, "shared": {5: 2, 6: 1}})
    encoded_bank(tmp_path / "both" / "val", {"b": {1: 3}, "shared": {7: 1}})
    bank = FeatureBank.open(tmp_path / "both")
    assert bank.videos == ("a", "b", "shared")
    assert bank.seconds_of("shared").tolist() == [7]  # val's copy replaces train's whole video
    assert bank.num_features == 1 + 3 + 1 and len(bank.manifests) == 2
    assert torch.count_nonzero(bank.sample(["shared"], [5], np.random.default_rng(0))[..., 3]) == 1
    check_window(bank.sample(["a"], [1], np.random.default_rng(0))[0], "a", 1, 60, 5, {"a": {1: 1}})


def test_merge_list_later_wins(tmp_path):
    encoded_bank(tmp_path / "x", {"v": {1: 1}, "only_x": {2: 2}})
    encoded_bank(tmp_path / "y", {"v": {3: 4}})
    assert FeatureBank.open([tmp_path / "x", tmp_path / "y"]).seconds_of("v").tolist() == [3]
    merged = FeatureBank.open([tmp_path / "y", tmp_path / "x"])
    assert merged.seconds_of("v").tolist() == [1] and merged.seconds_of("only_x").tolist() == [2]
    check_window(merged.sample(["only_x"], [2], np.random.default_rng(0))[0], "only_x", 2, 60, 5,
                 {"only_x": {2: 2}})


def test_missing_manifest_refused_and_rewrite_replaces(tmp_path):
    path = tmp_path / "bank"
    encoded_bank(path, {"v": {1: 1}}, metadata={"checkpoint": "abc"})
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["metadata"] == {"checkpoint": "abc"} and manifest["feature_dim"] == C
    old = FeatureBank.open(path)
    encoded_bank(path, {"new": {2: 2}})
    assert FeatureBank.open(path).videos == ("new",)
    assert old.features_at("v", 1).shape == (1, C)  # an open reader keeps its mapped files
    assert sorted(os.listdir(tmp_path)) == ["bank"]  # no temp folders left behind
    (path / "manifest.json").unlink()
    with pytest.raises(BankError, match="manifest"):
        FeatureBank.open(path)
    encoded_bank(path, {"again": {1: 1}})  # an incomplete bank of ours may be overwritten
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(BankError, match="not a bank"):
        encoded_bank(tmp_path / "mine", {"v": {1: 1}})
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_missing_and_empty_banks(tmp_path):
    with pytest.raises(BankError, match="no feature bank"):
        FeatureBank.open(tmp_path / "nothing")
    encoded_bank(tmp_path / "empty", {})
    bank = FeatureBank.open(tmp_path / "empty")
    assert bank.videos == () and bank.num_features == 0
    with pytest.raises(BankError, match="no features for video"):
        bank.sample(["v"], [3], np.random.default_rng(0))
    empty = FeatureBank.open(tmp_path / "empty", missing_videos="zeros")
    assert torch.all(empty.sample(["v"], [3], np.random.default_rng(0)) == 0)


def test_truncated_file_refused(tmp_path):
    encoded_bank(tmp_path / "bank", PERSONS)
    with open(tmp_path / "bank" / "features.arrow", "r+b") as f:
        f.truncate(100)
    with pytest.raises(BankError, match="features.arrow"):
        FeatureBank.open(tmp_path / "bank")


def test_feature_dim_checks(tmp_path):
    encoded_bank(tmp_path / "big", {"v": {1: 1}}, dim=16)
    with pytest.raises(BankError, match="has feature dim 16, model expects 8"):
        FeatureBank.open(tmp_path / "big", expected_dim=8)
    encoded_bank(tmp_path / "small", {"w": {1: 1}}, dim=8)
    with pytest.raises(BankError, match="different feature dims"):
        FeatureBank.open([tmp_path / "big", tmp_path / "small"])


def test_write_rejects_duplicates_and_bad_shapes(tmp_path):
    kw = dict(boxes=np.zeros((2, 4)), scores=np.zeros(2), features=np.zeros((2, 3), np.float16))
    with pytest.raises(BankError, match="duplicate"):
        write_bank(tmp_path / "b", video_ids=["v", "v"], seconds=[1, 1], person_index=[0, 0], **kw)
    with pytest.raises(BankError, match="row counts"):
        write_bank(tmp_path / "b", video_ids=["v", "v"], seconds=[1], person_index=[0, 1], **kw)


def _mapped_ranges(filename: str) -> list[tuple[int, int]]:
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(filename):
            lo, hi = line.split()[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def _rss_anon_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_features_are_memory_mapped_not_copied(tmp_path):
    n, dim = 16384, 1024  # 32 MiB of fp16 features
    rng = np.random.default_rng(0)
    write_bank(tmp_path / "big", video_ids=np.repeat([f"v{i}" for i in range(16)], n // 16),
               seconds=np.tile(np.arange(n // 16), 16), person_index=np.zeros(n, np.int64),
               boxes=np.zeros((n, 4)), scores=np.zeros(n),
               features=rng.standard_normal((n, dim), dtype=np.float32).astype(np.float16))
    before = _rss_anon_bytes()
    bank = FeatureBank.open(tmp_path / "big")
    total = sum(float(c.sum(dtype=np.float32)) for c in bank._chunks)  # touch every page
    assert np.isfinite(total) and bank.nbytes == n * dim * 2
    assert _rss_anon_bytes() - before < bank.nbytes // 4  # file-backed pages, no private copy
    view = bank.features_at("v3", 10)
    assert not view.flags.owndata and not view.flags.writeable
    addr = view.__array_interface__["data"][0]
    assert any(lo <= addr < hi for lo, hi in _mapped_ranges("features.arrow"))


def test_pickle_reopens_instead_of_copying(bank):
    data = pickle.dumps(bank)
    assert len(data) < 10_000
    again = pickle.loads(data)
    assert again.videos == bank.videos and np.array_equal(again.features_at("v", 103), bank.features_at("v", 103))


def test_file_uri(tmp_path):
    uri = (tmp_path / "bank").as_uri()
    assert uri.startswith("file://")
    encoded_bank(uri, PERSONS)
    bank = FeatureBank.open(uri)
    assert bank.videos == ("v", "w")
    check_window(bank.sample(["v"], [110], np.random.default_rng(0))[0], "v", 110, 60, 5)
    assert FeatureBank.open(str(tmp_path / "bank"), filesystem=pafs.LocalFileSystem()).num_features == \
        bank.num_features


@pytest.fixture
def s3_filesystem(monkeypatch):
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        assert host == "127.0.0.1"
        for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1",
                     "AWS_EC2_METADATA_DISABLED": "true"}.items():
            monkeypatch.setenv(k, v)
        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="x",
                               secret_key="x", region="us-east-1", allow_bucket_creation=True)
        fs.create_dir("bucket")
        yield fs, f"127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.mark.slow
def test_s3_round_trip(s3_filesystem, tmp_path, monkeypatch):
    fs, endpoint = s3_filesystem
    socket.inet_aton(endpoint.split(":")[0])  # loopback only
    encoded_bank("bucket/lfb/train", {"a": {1: 2}, "s": {3: 1}}, filesystem=fs)
    encoded_bank("bucket/lfb/val", {"s": {4: 1}}, filesystem=fs)
    cache = tmp_path / "cache"
    bank = FeatureBank.open("bucket/lfb", filesystem=fs, cache_dir=cache)
    assert bank.videos == ("a", "s") and bank.seconds_of("s").tolist() == [4]
    assert FeatureBank.open("bucket/lfb", filesystem=fs, cache_dir=cache).num_features == 3  # cache hit
    uri = f"s3://bucket/lfb/train?endpoint_override={endpoint}&scheme=http&region=us-east-1"
    assert FeatureBank.open(uri, cache_dir=cache).videos == ("a", "s")
    encoded_bank(uri, {"z": {1: 1}})  # rewrite through a URI: a new bank_id, so a fresh cache entry
    assert FeatureBank.open(uri, cache_dir=cache).videos == ("z",)
    fs.delete_file("bucket/lfb/val/manifest.json")
    with pytest.raises(BankError, match="incomplete"):
        FeatureBank.open("bucket/lfb", filesystem=fs, cache_dir=cache)
    # The build's streamed merge writes the same bytes to S3 as write_bank does locally.
    from test_bank_merge import random_parts, save_parts, write_bank_of

    from lfb_ray.bank import write_bank_parts
    from lfb_ray.bank.parts import NpzPart

    monkeypatch.setenv("LFB_RAY_CACHE", str(cache))  # the streamed write's scratch folder
    parts = random_parts(np.random.default_rng(5), n_parts=3, rows=20, dim=3, videos=3)
    local = [NpzPart(pafs.LocalFileSystem(), p) for p in save_parts(tmp_path / "parts", parts)]
    write_bank_parts("bucket/lfb/merged", local, filesystem=fs)
    write_bank_of(tmp_path / "ref", parts)
    for name in ("features.arrow", "index.arrow"):
        with fs.open_input_stream(f"bucket/lfb/merged/{name}") as f:
            assert f.read() == (tmp_path / "ref" / name).read_bytes(), name
    assert not list((cache).glob("bank-write-*"))  # the scratch folder is gone


def test_bank_read_benchmark_creates_a_missing_workdir(tmp_path, capsys):
    """`jobs/benchmark.py bank-read --workdir DIR` with DIR missing creates it (it used to die with a
    FileNotFoundError traceback); a tiny bank keeps this a few seconds."""
    from benchmarks.cli import main

    work = tmp_path / "not" / "there"
    assert main(["bank-read", "--videos", "2", "--seconds", "4", "--dim", "8", "--batches", "1", "--workers", "1",
                 "--rois", "4", "--window-seconds", "2", "--max-feats-per-second", "2", "--workdir", str(work)]) == 0
    assert work.is_dir() and "[sample]" in capsys.readouterr().out


def test_bank_build_reports_the_bytes_of_the_bank_files(tmp_path):
    """`build_bank`'s merge reports the size of the files it wrote (`BankSummary.nbytes`), not the
    feature payload: the bank line says how much disk the bank takes."""
    import io

    from lfb_ray.bank.build import merge_split_parts

    fs = pafs.LocalFileSystem()
    paths = []
    for i, vid in enumerate(["a", "b"]):
        n = 3 + i
        buf = io.BytesIO()
        np.savez(buf, video_id=np.array([vid] * n), second=np.arange(n, dtype=np.int32) + 902,
                 person_index=np.zeros(n, np.int32), box=np.tile(np.float32([0.1, 0.1, 0.5, 0.5]), (n, 1)),
                 score=np.ones(n, np.float32), feature=np.random.default_rng(i).random((n, C)).astype(np.float16),
                 keyframes=np.array(n))
        paths.append(str(tmp_path / f"part{i}.npz"))
        Path(paths[-1]).write_bytes(buf.getvalue())
    keyframes, features, nbytes = merge_split_parts(fs, paths, str(tmp_path / "bank" / "val"), {"split": "val"})
    on_disk = sum(p.stat().st_size for p in (tmp_path / "bank" / "val").rglob("*")
                  if p.is_file() and p.name != "manifest.json")  # the files the manifest lists
    assert (keyframes, features) == (7, 7)
    assert nbytes == on_disk
    assert nbytes != 7 * C * 2  # the fp16 payload alone
