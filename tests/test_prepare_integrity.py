"""Prepared data is checked before it is trusted again, and keyframes outside their video are reported.

A rerun used to skip a video on its `_DONE.json` hash alone: a `frames.arrow` cut in half was trusted
forever, and the reader's advice ("rerun jobs/prepare_data.py") skipped it again. One video is
prepared here without Ray (`prepare_video`, what each Ray Data task runs).
"""

from __future__ import annotations

import json
import shutil
import time

import pytest
from conftest import tiny_config

pytestmark = pytest.mark.faults


@pytest.fixture
def one_video(synthetic_root, tmp_path):
    """(task, prepared root, the video's folder, its first summary, {file: bytes} as first written)."""
    from lfb_ray.data.prep import build_tasks, prepare_video

    cfg = tiny_config(tmp_path / "work", synthetic_root)
    tasks, _ = build_tasks(cfg)
    task = tasks[0]
    out = str(tmp_path / "prepared")
    first = prepare_video(task, out)
    assert first["status"] == "done"
    vdir = tmp_path / "prepared" / task.split / task.video_id
    return task, out, vdir, first, {f: (vdir / f).read_bytes() for f in ("frames.arrow", "keyframes.parquet")}


def test_the_marker_holds_the_sizes_and_checksums_of_what_it_commits(one_video):
    import hashlib

    task, out, vdir, first, data = one_video
    marker = json.loads((vdir / "_DONE.json").read_text())
    for name, blob in data.items():
        assert marker["checks"][name] == {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}


def test_a_frame_store_cut_in_half_is_prepared_again_byte_identical(one_video, capsys):
    from lfb_ray.data.frames import FrameStore, FrameStoreError
    from lfb_ray.data.prep import prepare_video

    task, out, vdir, first, data = one_video
    (vdir / "frames.arrow").write_bytes(data["frames.arrow"][: len(data["frames.arrow"]) // 2])
    with pytest.raises(FrameStoreError, match=r"--verify"):  # the reader names the command that repairs it
        FrameStore(str(vdir / "frames.arrow"))
    again = prepare_video(task, out)  # no --verify needed: the size differs
    assert again["status"] == "done" and "frames.arrow has" in again["redone"]
    assert "preparing the video again" in capsys.readouterr().out
    assert {f: (vdir / f).read_bytes() for f in data} == data
    store = FrameStore(str(vdir / "frames.arrow"))
    assert all(len(store.jpeg(r)) for r in range(store.num_frames))
    assert prepare_video(task, out)["status"] == "skipped"


def test_a_changed_byte_is_found_by_verify(one_video):
    from lfb_ray.data.prep import prepare_video

    task, out, vdir, first, data = one_video
    blob = bytearray(data["frames.arrow"])
    blob[len(blob) // 2] ^= 0xFF
    (vdir / "frames.arrow").write_bytes(bytes(blob))
    assert prepare_video(task, out)["status"] == "skipped"  # sizes alone cannot see it
    again = prepare_video(task, out, verify=True)
    assert again["status"] == "done" and "SHA-256" in again["redone"]
    assert (vdir / "frames.arrow").read_bytes() == data["frames.arrow"]


def test_a_marker_without_checks_is_redone_when_verifying(one_video):
    from lfb_ray.data.prep import prepare_video

    task, out, vdir, first, data = one_video
    marker = json.loads((vdir / "_DONE.json").read_text())
    marker.pop("checks")
    (vdir / "_DONE.json").write_text(json.dumps(marker))
    assert prepare_video(task, out)["status"] == "skipped"
    assert "no checksums" in prepare_video(task, out, verify=True)["redone"]


def test_the_pipeline_finds_damaged_videos_from_the_manifest(one_video, tmp_path):
    from lfb_ray.data.prep import _finish, damaged_videos

    task, out, vdir, first, data = one_video
    _finish(tiny_config(tmp_path / "work", tmp_path), out, [first], [], time.time())
    assert damaged_videos(out) == []
    (vdir / "keyframes.parquet").unlink()
    assert damaged_videos(out) == [f"{task.split}/{task.video_id}: keyframes.parquet is missing"]
    shutil.rmtree(vdir)
    assert len(damaged_videos(out)) == 1


def test_a_keyframe_before_the_video_start_is_a_reported_failure_not_a_clip_of_frame_0(synthetic_root, tmp_path):
    """A row at second 1 of a clip that starts at 900 was clipped to frame 0 without a word."""
    import pyarrow.parquet as pq

    from lfb_ray.data.prep import build_tasks, prepare_video

    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    csv = root / "annotations" / "train.csv"
    first = csv.read_text().splitlines()[0].split(",")
    vid = first[0]
    csv.write_text(csv.read_text() + ",".join([vid, "0001"] + first[2:]) + "\n")
    cfg = tiny_config(tmp_path / "work", root)
    tasks, _ = build_tasks(cfg)
    (task,) = [t for t in tasks if t.video_id == vid and t.split == "train"]
    out = prepare_video(task, str(tmp_path / "prepared"))
    assert out["status"] == "done"
    (failure,) = out["keyframe_failures"]
    assert failure["timestamp"] == 1 and "is before the start of" in failure["error"]
    assert "file time -899 s" in failure["error"]
    rows = pq.read_table(tmp_path / "prepared" / "train" / vid / "keyframes.parquet").to_pydict()
    assert 1 not in rows["timestamp"] and len(rows["timestamp"]) == len(task.keyframes) - 1


@pytest.mark.ray
def test_a_full_disk_stops_prepare_without_a_false_marker_and_the_rerun_is_byte_identical(prepared, synthetic_root,
                                                                                           tmp_path):
    """A real ENOSPC: the prepared folder on a tmpfs of half the set's size. The job fails naming "No
    space left"; every marker left names complete files; after space is freed the rerun completes the
    set, byte-identical to a run that had space (the session's `prepared` fixture)."""
    import hashlib
    import subprocess
    from pathlib import Path

    from lfb_ray.data.prep import prepare_dataset

    ref_cfg, _ = prepared
    ref = Path(ref_cfg.prepared_dir)
    files = sorted(p.relative_to(ref) for p in ref.glob("*/*/*") if p.name in ("frames.arrow", "keyframes.parquet"))
    total = sum((ref / f).stat().st_size for f in files)
    mnt = tmp_path / "small"
    mnt.mkdir()
    size_kb = max(64, total // 2 // 1024)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
    try:
        cfg = tiny_config(tmp_path / "work", synthetic_root, f"data.prepared_dir={mnt}/prepared")
        with pytest.raises(Exception) as e:
            prepare_dataset(cfg)
        failures = mnt / "prepared" / "failures.json"
        said = str(e.value) + (failures.read_text() if failures.exists() else "")
        assert "No space left" in said, said
        for marker in (mnt / "prepared").glob("*/*/_DONE.json"):
            checks = json.loads(marker.read_text())["checks"]
            for name, want in checks.items():
                blob = (marker.parent / name).read_bytes()
                assert len(blob) == want["size"] and hashlib.sha256(blob).hexdigest() == want["sha256"]
        assert not list((mnt / "prepared").rglob("*.tmp-*"))

        subprocess.run(["mount", "-o", f"remount,size={4 * total // 1024 + 1024}k", str(mnt)], check=True)
        summary = prepare_dataset(cfg)
        assert not summary.failures
        assert {f: (mnt / "prepared" / f).read_bytes() for f in files} == {f: (ref / f).read_bytes() for f in files}
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
