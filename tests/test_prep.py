"""The prepare stage on the synthetic set: schema, timing, resume, bad videos."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import tiny_config

pytestmark = pytest.mark.ray


def _digest(root: str) -> dict[str, str]:
    out = {}
    for p in sorted([*Path(root).rglob("*.parquet"), *Path(root).rglob("*.arrow")]):
        out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_rows_match_annotations_and_schema(prepared, synthetic_root):
    from lfb_ray.data.annotations import read_annotations
    from lfb_ray.data.clips import decode_jpeg
    from lfb_ray.data.frames import open_frame_store
    from lfb_ray.data.prep import prepared_files
    from lfb_ray.data.schema import SCHEMA, row_gt

    cfg, summary = prepared
    assert summary.failures == [] and summary.videos == 3
    for split, csv in (("train", "train.csv"), ("val", "val.csv")):
        gt = read_annotations(synthetic_root / "annotations" / csv)
        tables = [pq.read_table(f) for f in prepared_files(cfg.prepared_dir, split)]
        assert all(t.schema.equals(SCHEMA) for t in tables)
        rows = [r for t in tables for r in t.to_pylist()]
        assert {(r["video_id"], r["timestamp"]) for r in rows} == set(gt)
        r = rows[0]
        boxes, labels = row_gt(r, 81)
        kf = gt[(r["video_id"], r["timestamp"])]
        assert np.allclose(boxes, kf.boxes) and np.array_equal(labels, kf.labels)
        assert len(r["ref_offsets"]) == len(r["frame_rows"]) == 64  # jitter on: every offset in [-40, 23]
        store = open_frame_store(cfg.prepared_dir, r["frames_file"])
        img = decode_jpeg(store.jpeg(r["frame_rows"][0]))
        # short_side 128 > the 120-pixel source: stored at the source's own size, not upsampled
        assert img.shape == (120, 160, 3) and (r["height"], r["width"]) == (120, 160)


def test_each_frame_is_stored_once(prepared):
    """Neighbouring keyframes' windows overlap; their shared frames are one row of the frame store."""
    import pyarrow as pa

    from lfb_ray.data.frames import open_frame_store
    from lfb_ray.data.prep import prepared_files

    cfg, _ = prepared
    for f in prepared_files(cfg.prepared_dir, "train"):
        rows = pq.read_table(f).to_pylist()
        store = open_frame_store(cfg.prepared_dir, rows[0]["frames_file"])
        refs = {(fi, fr) for r in rows for fi, fr in zip(r["frame_indices"], r["frame_rows"], strict=True)}
        frame_of_row = dict((fr, fi) for fi, fr in refs)
        assert len(frame_of_row) == len(refs)  # one row per native frame, one frame per row
        assert store.num_frames == len(frame_of_row)  # nothing stored that no keyframe uses
        assert all(store.frame_index(fr) == fi for fr, fi in list(frame_of_row.items())[:20])
        per_row = sum(len(set(r["frame_indices"])) for r in rows)
        assert per_row > 1.8 * store.num_frames  # the old layout stored each frame ~2x
        table = pa.ipc.open_file(pa.memory_map(str(Path(cfg.prepared_dir) / rows[0]["frames_file"]))).read_all()
        assert table.column("frame_index").to_pylist() == sorted(frame_of_row.values())


def test_stored_frames_are_the_videos_frames(prepared, synthetic_root):
    """The keyframe's stored frame is decord's frame 30*(t-900) of the file, not a neighbour."""
    import decord

    from lfb_ray.data.clips import decode_jpeg
    from lfb_ray.data.frames import open_frame_store
    from lfb_ray.data.prep import prepared_files

    cfg, _ = prepared
    row = pq.read_table(prepared_files(cfg.prepared_dir, "val")[0]).slice(3, 1).to_pylist()[0]
    k = row["ref_offsets"].index(0)
    idx = row["frame_indices"][k]
    assert idx == 30 * (row["timestamp"] - 900)
    vr = decord.VideoReader(str(synthetic_root / "videos" / f"{row['video_id']}.mp4"))
    store = open_frame_store(cfg.prepared_dir, row["frames_file"])
    assert store.frame_index(row["frame_rows"][k]) == idx
    got = decode_jpeg(store.jpeg(row["frame_rows"][k])).astype(int)
    err = {i: np.abs(got - vr[i].asnumpy()).mean() for i in (idx - 1, idx, idx + 1)}
    assert err[idx] < 6  # JPEG q90 of the same textured 160x120 frame (measured 4.4)
    assert err[idx] < min(err[idx - 1], err[idx + 1])  # closer than the neighbouring frames


def test_frames_stored_at_the_short_side_when_the_source_is_larger(synthetic_root, tmp_path):
    """A 160x120 source with data.short_side=96 (scale range <= 96) is stored at 128x96."""
    from lfb_ray.data.decode import stored_size
    from lfb_ray.data.prep import build_tasks, prepare_video

    assert stored_size(256, 456, 320) == (256, 456)  # AVA's 456x256 files: kept, never upsampled
    assert stored_size(720, 1280, 320) == (320, 569)
    assert stored_size(1280, 720, 320) == (569, 320)
    cfg = tiny_config(tmp_path / "w", synthetic_root, "data.short_side=96", "data.train_scale_range=[64,96]",
                      "data.train_crop_size=64")
    tasks, _ = build_tasks(cfg)
    res = prepare_video(tasks[0], str(tmp_path / "out"))
    assert res["status"] == "done", res
    row = pq.read_table(tmp_path / "out" / tasks[0].split / tasks[0].video_id / "keyframes.parquet").to_pylist()[0]
    assert (row["height"], row["width"], row["orig_height"], row["orig_width"]) == (96, 128, 120, 160)


def test_a_set_prepared_in_the_old_format_names_its_version_and_the_command(tmp_path):
    from lfb_ray.data.prep import PrepareError, prepared_files

    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 1, "videos": []}))
    with pytest.raises(PrepareError, match=r"schema version 1 .*reads schema version 2.*jobs/prepare_data.py"):
        prepared_files(str(tmp_path), "train")


def test_rerun_is_idempotent_and_resumes(prepared, synthetic_root, tmp_path):
    from lfb_ray.data.prep import prepare_dataset

    cfg, _ = prepared
    before = _digest(cfg.prepared_dir)
    # simulate an interrupted run: one video lost its commit marker and has a half-written part
    vdir = next(Path(cfg.prepared_dir, "train").iterdir())
    (vdir / "_DONE.json").unlink()
    part = vdir / "frames.arrow"
    part.write_bytes(part.read_bytes()[:100])
    s = prepare_dataset(cfg)
    assert s.skipped == 2 and s.videos == 3
    assert _digest(cfg.prepared_dir) == before


def test_bad_video_is_reported_and_others_written(synthetic_root, tmp_path, ray_local):
    from lfb_ray.data.prep import PrepareError, prepare_dataset

    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    vids = sorted((root / "videos").glob("*.mp4"))
    vids[0].write_bytes(vids[0].read_bytes()[:2000])  # truncated mp4
    cfg = tiny_config(tmp_path / "w", root)
    with pytest.raises(PrepareError, match=r"1 video\(s\) failed, more than data.failure_budget=0"):
        prepare_dataset(cfg)
    failures = json.loads((tmp_path / "w" / "prepared" / "failures.json").read_text())
    assert [f["video_id"] for f in failures] == [vids[0].stem]
    assert "cannot open as a video" in failures[0]["error"]
    manifest = json.loads((tmp_path / "w" / "prepared" / "manifest.json").read_text())
    assert sorted(v["video_id"] for v in manifest["videos"]) == sorted(v.stem for v in vids[1:])
    cfg2 = tiny_config(tmp_path / "w", root, "data.failure_budget=1")
    assert prepare_dataset(cfg2).videos == 2


def test_inputs_fingerprint_follows_the_data_not_only_the_config(tmp_path):
    """The pipeline keys its prepare stage on this: the same config over a dataset regenerated or
    edited in place must not count as up to date."""
    import os

    from lfb_ray.data.prep import build_tasks, inputs_fingerprint
    from lfb_ray.synthetic import generate_dataset

    root = tmp_path / "d"
    generate_dataset(root, num_videos=2, seconds=8, seed=0, width=64, height=48, workers=1)
    cfg = tiny_config(tmp_path / "w", root)

    def fingerprint(c):
        return inputs_fingerprint(*build_tasks(c))

    first = fingerprint(cfg)
    assert fingerprint(cfg) == first  # stable
    csv_path = root / "annotations" / "train.csv"
    rows = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join(rows[:-1]) + "\n")  # one annotation row fewer
    assert fingerprint(cfg) != first
    shutil.rmtree(root)
    generate_dataset(root, num_videos=2, seconds=8, seed=1, width=64, height=48, workers=1)  # same paths
    assert fingerprint(cfg) != first
    video = next((root / "videos").iterdir())
    before = fingerprint(cfg)
    os.utime(video, (video.stat().st_atime, video.stat().st_mtime + 10))  # a video replaced
    assert fingerprint(cfg) != before
