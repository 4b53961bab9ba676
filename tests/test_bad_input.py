"""Bad input: each case gets a clear error naming the input and the problem; the rest is intact."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, tiny_config

pytestmark = pytest.mark.faults


# --- videos: one prepare run with five broken videos among good ones --------------------------


@pytest.fixture(scope="module")
def broken_dataset(tmp_path_factory):
    import av

    from lfb_ray.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("broken")
    info = generate_dataset(root, num_videos=7, seconds=12, seed=3, width=128, height=96)
    vids = sorted(info.train_videos) + sorted(info.val_videos)
    videos = root / "videos"
    cases = {}
    cases["truncated"] = vids[0]
    p = videos / f"{vids[0]}.mp4"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
    cases["zero_byte"] = vids[1]
    (videos / f"{vids[1]}.mp4").write_bytes(b"")
    cases["not_a_video"] = vids[2]
    (videos / f"{vids[2]}.mp4").write_text("this is a text file, not an mp4\n" * 100)
    cases["too_short"] = vids[3]
    with av.open(str(videos / f"{vids[3]}.mp4"), "w") as out:  # 2 s: annotations reach second 910
        s = out.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = 128, 96, "yuv420p"
        for i in range(60):
            frame = av.VideoFrame.from_ndarray(np.full((96, 128, 3), i * 4, np.uint8), format="rgb24")
            for pkt in s.encode(frame):
                out.mux(pkt)
        for pkt in s.encode():
            out.mux(pkt)
    cases["missing"] = vids[4]
    (videos / f"{vids[4]}.mp4").unlink()
    good = vids[5:]
    return root, cases, good


@pytest.fixture(scope="module")
def broken_run(broken_dataset, tmp_path_factory, ray_local):
    from lfb_ray.data.prep import PrepareError, prepare_dataset

    root, cases, good = broken_dataset
    work = tmp_path_factory.mktemp("broken_work")
    cfg = tiny_config(work, root)
    with pytest.raises(PrepareError) as e:
        prepare_dataset(cfg)
    failures = json.loads((work / "prepared" / "failures.json").read_text())
    manifest = json.loads((work / "prepared" / "manifest.json").read_text())
    return cfg, str(e.value), {f["video_id"]: f["error"] for f in failures}, manifest, cases, good


@pytest.mark.ray
@pytest.mark.parametrize("case,needle", [
    ("truncated", "truncated, corrupt or not a video file"),  # PyAV writes the moov atom last
    ("zero_byte", "empty file (0 bytes)"),
    ("not_a_video", "cannot open as a video"),
    ("too_short", "shorter than its annotated timestamps"),
    ("missing", "missing video: no"),
])
def test_each_bad_video_is_named_with_its_problem(broken_run, case, needle):
    cfg, message, errors, manifest, cases, good = broken_run
    vid = cases[case]
    assert needle in errors[vid], errors[vid]
    assert vid in message  # the job's error lists every failed video


@pytest.mark.ray
def test_good_videos_are_complete_despite_bad_ones(broken_run):
    cfg, message, errors, manifest, cases, good = broken_run
    assert "5 video(s) failed, more than data.failure_budget=0" in message
    assert sorted(v["video_id"] for v in manifest["videos"]) == sorted(good)
    for v in manifest["videos"]:
        assert v["rows"] > 0 and (Path(cfg.prepared_dir) / v["files"][0]).exists()


# --- annotation files ---------------------------------------------------------------------------


@pytest.mark.parametrize("row,needle", [
    ("vid00000001,0902,0.1,0.1,0.5", "expected 7 or 8 comma-separated columns, got 5"),
    ("vid00000001,0902,0.1,abc,0.5,0.9,12,0", "y1 'abc' is not a valid float"),
    ("vid00000001,0902,0.1,nan,0.5,0.9,12,0", "NaN"),
    ("vid00000001,0902,0.1,0.1,1.5,0.9,12,0", "outside [0, 1]"),
    ("vid00000001,0902,0.6,0.1,0.5,0.9,12,0", "x1 >= x2"),
    ("vid00000001,0902,0.1,0.1,0.5,0.9,99,0", "action_id 99 is not in 1..80"),
])
def test_malformed_annotation_rows_name_file_and_line(tmp_path, row, needle):
    from lfb_ray.data.annotations import AnnotationError, read_annotation_rows

    p = tmp_path / "gt.csv"
    p.write_text("vid00000001,0902,0.1,0.1,0.5,0.9,12,0\n" + row + "\n")
    with pytest.raises(AnnotationError) as e:
        read_annotation_rows(p)
    msg = str(e.value)
    assert f"{p}:2" in msg and needle.lower() in msg.lower(), msg


def test_duplicate_rows_merge_into_one_box(tmp_path):
    from lfb_ray.data.annotations import read_annotations

    p = tmp_path / "gt.csv"
    p.write_text("v,0902,0.1,0.1,0.5,0.9,12,0\nv,0902,0.1,0.1,0.5,0.9,12,0\nv,0902,0.1,0.1,0.5,0.9,64,0\n")
    kf = read_annotations(p)[("v", 902)]
    assert kf.boxes.shape == (1, 4) and kf.labels[0, 12] == 1 and kf.labels[0, 64] == 1


def test_empty_proposals_fall_back_to_whole_frame():
    from lfb_ray.data.annotations import select_proposals

    assert select_proposals(np.zeros((0, 5), np.float32), 0.9).tolist() == [[0, 0, 1, 1, 1]]
    assert select_proposals(None, 0.9).tolist() == [[0, 0, 1, 1, 1]]


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/lfb_ray_pwned_by_test",))


def test_hostile_proposals_pickle_is_refused_not_executed(tmp_path):
    from lfb_ray.data.annotations import AnnotationError, load_proposals

    marker = Path("/tmp/lfb_ray_pwned_by_test")
    marker.unlink(missing_ok=True)
    p = tmp_path / "props.pkl"
    p.write_bytes(pickle.dumps({"v,0902": _Evil()}))
    with pytest.raises(AnnotationError, match=r"props.pkl.*(os|posix)\.system"):
        load_proposals(p)
    assert not marker.exists()


def test_checkpoint_with_unexpected_keys_or_shapes(tmp_path):
    import torch

    from lfb_ray.config import load_config
    from lfb_ray.models import CheckpointError, build_detector, load_checkpoint, save_checkpoint

    cfg = load_config(REPO / "configs" / "tiny.yaml", ["model.fbo=none"])
    sd = build_detector(cfg.model).state_dict()
    sd["extra.weight"] = torch.zeros(3)
    sd["fc_cls.weight"] = torch.zeros(81, 7)
    p = tmp_path / "bad.pt"
    save_checkpoint(sd, p)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(build_detector(cfg.model), p)
    assert "extra.weight" in str(e.value) and "fc_cls.weight" in str(e.value)


def test_config_with_unknown_key_or_wrong_type(tmp_path):
    from lfb_ray.config import ConfigError, load_config

    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: many\n")
    with pytest.raises(ConfigError, match="train.epochs: expected an integer"):
        load_config(p)
    p.write_text("trian:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) trian"):
        load_config(p)


def test_bank_with_wrong_feature_dim(tmp_path):
    from lfb_ray.bank import BankError, FeatureBank, write_bank

    write_bank(tmp_path / "b", video_ids=["v"], seconds=np.array([902]), person_index=np.array([0]),
               boxes=np.zeros((1, 4), np.float32), scores=np.ones(1, np.float32),
               features=np.zeros((1, 32), np.float16))
    with pytest.raises(BankError, match="32.*64|64.*32"):
        FeatureBank.open(tmp_path / "b", expected_dim=64)


def test_unwritable_output_fails_before_work(tmp_path):
    from lfb_ray.data.prep import prepare_dataset
    from lfb_ray.storage import StorageError

    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = tiny_config(tmp_path, tmp_path / "nodata", f"data.prepared_dir={blocker}/prepared")
    with pytest.raises(StorageError, match=f"output location {blocker}/prepared is not writable"):
        prepare_dataset(cfg)


def test_failed_part_write_leaves_no_trusted_shard(tmp_path):
    """A write that dies mid-way leaves no file under the final name and no commit marker."""
    from lfb_ray import storage

    fs, root = storage.resolve(str(tmp_path))

    class Boom(OSError):
        pass

    class FullDisk:
        """The real filesystem, except that writes die half-way (as on a full disk)."""

        def __getattr__(self, name):
            return getattr(fs, name)

        def open_output_stream(self, path, *a, **k):
            stream = fs.open_output_stream(path, *a, **k)
            stream.write(b"partial")
            stream.close()
            raise Boom("No space left on device")

    with pytest.raises(Boom):
        storage.write_bytes_atomic(FullDisk(), storage.join(root, "part-00000.parquet"), b"data" * 100)
    assert list(tmp_path.iterdir()) == []  # neither the final name nor the temporary file remains
