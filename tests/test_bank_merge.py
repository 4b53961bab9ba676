"""The bank build's merge (`merge_split_parts` -> `write_bank_parts`): streamed, byte-identical, atomic."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from lfb_ray.bank import BankError, FeatureBank, write_bank
from lfb_ray.bank import writer as writer_module
from lfb_ray.bank.build import merge_split_parts

FS = pafs.LocalFileSystem()
COLUMNS = ("video_id", "second", "person_index", "box", "score", "feature")


def random_parts(rng: np.random.Generator, n_parts: int, rows: int, dim: int, videos: int) -> list[dict]:
    """Parts whose rows interleave: videos shared between parts, each part's rows in random order."""
    keys = rng.permutation([(v, s, p) for v in range(videos) for s in range(-3, 40) for p in range(4)])
    counts = rng.multinomial(min(n_parts * rows, len(keys)), np.ones(n_parts) / n_parts)
    counts[0] = 0  # an empty part too
    parts, start = [], 0
    for n in counts:
        k = keys[start:start + n]
        start += n
        parts.append({"video_id": np.array([f"vid{v:02d}" for v in k[:, 0]]), "second": k[:, 1].astype(np.int32),
                      "person_index": k[:, 2].astype(np.int32), "box": rng.random((n, 4), dtype=np.float32),
                      "score": rng.random(n, dtype=np.float32),
                      "feature": rng.integers(0, 1 << 14, (n, dim), dtype=np.uint16).view(np.float16),
                      "keyframes": np.array(len({(a, b) for a, b, _ in k}))})
    return parts


def save_parts(folder: Path, parts: list[dict]) -> list[str]:
    """Part files as the bank build's actors write them (np.savez)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, part in enumerate(parts):
        paths.append(str(folder / f"part{i:03d}.npz"))
        np.savez(paths[-1], **part)
    return paths


def write_bank_of(path: Path, parts: list[dict], **kwargs):
    """What `write_bank` writes for all parts together: the reference of the streamed merge."""
    cat = {k: np.concatenate([p[k] for p in parts]) for k in COLUMNS}
    return write_bank(path, video_ids=cat["video_id"], seconds=cat["second"], person_index=cat["person_index"],
                      boxes=cat["box"], scores=cat["score"], features=cat["feature"], **kwargs)


def assert_same_bank(a: Path, b: Path) -> None:
    for name in ("features.arrow", "index.arrow"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    for m in (ma, mb):
        del m["bank_id"], m["created_utc"]
    assert ma == mb
    assert sorted(os.listdir(a)) == sorted(os.listdir(b)) == ["features.arrow", "index.arrow", "manifest.json"]


@pytest.mark.parametrize(("dim", "rows_per_batch"), [(3, 7), (1, 5), (8, 1 << 18), (5, 64)])
def test_streamed_merge_is_byte_identical_to_write_bank(tmp_path, monkeypatch, dim, rows_per_batch):
    """Random parts (videos spread over parts, rows in any order, an empty part), feature dims whose
    rows are not a multiple of 8 bytes (the IPC writer pads a batch with the next rows' bytes), one
    or many record batches: the same bytes as `write_bank` of all rows."""
    monkeypatch.setattr(writer_module, "_ROWS_PER_BATCH", rows_per_batch)
    rng = np.random.default_rng(dim * 1000 + rows_per_batch)
    parts = random_parts(rng, n_parts=6, rows=40, dim=dim, videos=5)
    paths = save_parts(tmp_path / "parts", parts)
    meta = {"split": "train", "checkpoint_sha256": "abc"}
    keyframes, features, nbytes = merge_split_parts(FS, paths, str(tmp_path / "streamed"), meta)
    ref = write_bank_of(tmp_path / "ref", parts, metadata=meta)
    assert_same_bank(tmp_path / "streamed", tmp_path / "ref")
    assert (features, nbytes) == (ref.num_features, ref.nbytes)
    assert keyframes == sum(int(p["keyframes"]) for p in parts)
    assert len(FeatureBank.open(tmp_path / "streamed")._chunks) == -(-features // rows_per_batch)
    assert sorted(os.listdir(tmp_path)) == ["parts", "ref", "streamed"]  # no scratch or temporary left


def test_streamed_merge_of_empty_parts_matches_write_bank(tmp_path):
    parts = random_parts(np.random.default_rng(0), n_parts=2, rows=0, dim=4, videos=1)
    merge_split_parts(FS, save_parts(tmp_path / "parts", parts), str(tmp_path / "streamed"), {})
    write_bank_of(tmp_path / "ref", parts)
    assert_same_bank(tmp_path / "streamed", tmp_path / "ref")


def test_merge_peak_memory_is_about_one_part(tmp_path):
    """The merge holds one part's features, not the split's: peak Python/numpy (tracemalloc) plus
    Arrow-pool memory under 2 parts while the split is 8 parts (the old merge held ~3x the split)."""
    dim, rows, n_parts = 2048, 1024, 8  # the model's width; one part = 4 MiB of features
    rng = np.random.default_rng(1)
    parts = []
    for i in range(n_parts):  # one video per part, rows shuffled, as the bank build writes them
        k = rng.permutation(rows)
        parts.append({"video_id": np.array([f"video{i:03d}"] * rows), "second": (900 + k // 4).astype(np.int32),
                      "person_index": (k % 4).astype(np.int32), "box": rng.random((rows, 4), dtype=np.float32),
                      "score": rng.random(rows, dtype=np.float32),
                      "feature": rng.integers(0, 1 << 14, (rows, dim), dtype=np.uint16).view(np.float16),
                      "keyframes": np.array(rows // 4)})
    part_bytes = rows * dim * 2
    paths = save_parts(tmp_path / "parts", parts)
    del parts
    pa.array(["warm-up"])  # pyarrow's first conversion imports modules (~26 MiB): not the merge's
    pool = pa.proxy_memory_pool(pa.default_memory_pool())
    default_pool = pa.default_memory_pool()
    pa.set_memory_pool(pool)
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        _, features, _ = merge_split_parts(FS, paths, str(tmp_path / "bank"), {})
        python_peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
        pa.set_memory_pool(default_pool)
    peak = python_peak + pool.max_memory()
    assert features == n_parts * rows
    print(f"merge peak {peak / 2**20:.1f} MiB")
    assert peak < 2 * part_bytes, (f"merge peak {peak / 2**20:.1f} MiB (numpy/Python {python_peak / 2**20:.1f}, "
                                   f"Arrow {pool.max_memory() / 2**20:.1f}); one part is {part_bytes / 2**20:.0f} "
                                   f"MiB, the split {n_parts * part_bytes / 2**20:.0f} MiB")
    assert FeatureBank.open(tmp_path / "bank").num_features == n_parts * rows


KILL_MIDWAY = textwrap.dedent("""
    import os, signal, sys
    import pyarrow.fs as pafs
    from lfb_ray.bank import parts, writer
    from lfb_ray.bank.build import merge_split_parts

    writer._ROWS_PER_BATCH = 16  # several record batches, so the kill lands mid-file

    read = parts.NpzPart.features
    calls = []

    def features(self):
        calls.append(self.path)
        if len(calls) == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)  # the driver dies mid-merge, features.arrow half-written
        return read(self)

    parts.NpzPart.features = features
    merge_split_parts(pafs.LocalFileSystem(), sys.argv[3:], sys.argv[1], {})
""")


@pytest.mark.faults
def test_merge_killed_midway_leaves_the_old_bank_and_a_rerun_redoes_it(tmp_path, monkeypatch):
    """SIGKILL of the merging process after some parts: no half-written bank is visible (the bank
    there before is intact and opens), and the rerun writes the complete bank."""
    monkeypatch.setattr(writer_module, "_ROWS_PER_BATCH", 16)
    rng = np.random.default_rng(2)
    old_parts, new_parts = (random_parts(rng, n_parts=5, rows=30, dim=6, videos=4) for _ in range(2))
    dest = tmp_path / "bank" / "train"
    merge_split_parts(FS, save_parts(tmp_path / "old", old_parts), str(dest), {})
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    new_paths = save_parts(tmp_path / "new", new_parts)
    script = tmp_path / "kill_midway.py"
    script.write_text(KILL_MIDWAY)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script), str(dest), "3", *new_paths], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert FeatureBank.open(dest).num_features == sum(len(p["second"]) for p in old_parts)
    merge_split_parts(FS, new_paths, str(dest), {})
    write_bank_of(tmp_path / "ref", new_parts)
    assert_same_bank(dest, tmp_path / "ref")


@pytest.mark.faults
def test_bad_parts_are_named(tmp_path):
    rng = np.random.default_rng(3)
    parts = random_parts(rng, n_parts=3, rows=10, dim=4, videos=2)
    paths = save_parts(tmp_path / "parts", parts)
    other = random_parts(rng, n_parts=2, rows=10, dim=5, videos=1)[1]
    other["video_id"] = np.array([f"x{i}" for i in range(len(other["second"]))])
    np.savez(tmp_path / "wide.npz", **other)
    with pytest.raises(BankError, match="different feature dims.*wide.npz: 5"):
        merge_split_parts(FS, [*paths, str(tmp_path / "wide.npz")], str(tmp_path / "b"), {})
    short = dict(parts[1], score=parts[1]["score"][:-1])
    np.savez(tmp_path / "short.npz", **short)
    with pytest.raises(BankError, match="short.npz: row counts differ"):
        merge_split_parts(FS, [paths[2], str(tmp_path / "short.npz")], str(tmp_path / "b"), {})
    (tmp_path / "cut.npz").write_bytes(Path(paths[1]).read_bytes()[:100])
    with pytest.raises(BankError, match="cut.npz is not a readable"):
        merge_split_parts(FS, [paths[2], str(tmp_path / "cut.npz")], str(tmp_path / "b"), {})
    assert not (tmp_path / "b").exists()
