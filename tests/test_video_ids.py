"""Video ids become output paths: each must be one safe path component, refused where it enters.

The case that lost data: a videos folder holding `...mp4` (stem `..`) and annotation rows for video id
`..`. The second prepare run removed `prepared/train/..` = the whole prepared folder, three committed
videos of an earlier run included, then died in pyarrow.
"""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
from conftest import tiny_config

pytestmark = pytest.mark.faults


@pytest.mark.parametrize("vid", ["..", ".", ".hidden", "a/b", "a\\b", "x\x00y", "tab\there", "v" * 201, ""])
def test_unsafe_ids(vid):
    from lfb_ray.data.ids import unsafe_video_id

    assert unsafe_video_id(vid)


@pytest.mark.parametrize("vid", ["-5KQ66BBWC4", "053oq2xB3oU", "syn_0001", "a.b", "x" * 200])
def test_ava_ids_are_fine(vid):
    from lfb_ray.data.ids import unsafe_video_id

    assert unsafe_video_id(vid) is None


def test_a_csv_row_with_an_unsafe_id_is_refused_naming_the_line(tmp_path):
    from lfb_ray.data.annotations import AnnotationError, read_annotations, read_exclusions

    csv = tmp_path / "train.csv"
    csv.write_text("abc,0902,0.1,0.1,0.5,0.5,12,0\n..,0903,0.1,0.1,0.5,0.5,12,0\n")
    with pytest.raises(AnnotationError, match=r"train.csv:2: video id '\.\.' starts with '\.'"):
        read_annotations(csv, num_classes=81)
    excl = tmp_path / "excluded.csv"
    excl.write_text("abc,0902\nx/y,0903\n")
    with pytest.raises(AnnotationError, match=r"excluded.csv:2: video id 'x/y' contains '/'"):
        read_exclusions(excl)


def test_a_proposal_key_with_an_unsafe_id_is_refused(tmp_path):
    from lfb_ray.data.annotations import AnnotationError, load_proposals

    path = tmp_path / "proposals.pkl"
    path.write_bytes(pickle.dumps({"abc,0902": np.zeros((1, 5), np.float32), "..,0903": np.zeros((1, 5))}))
    with pytest.raises(AnnotationError, match=r"proposals.pkl: key '\.\.,0903': video id '\.\.'"):
        load_proposals(path)


def test_the_reported_case_keeps_the_committed_videos(synthetic_root, tmp_path):
    """`...mp4` + rows for `..`: refused when the annotations are read, before any output is touched."""
    from lfb_ray.data.annotations import AnnotationError
    from lfb_ray.data.prep import build_tasks

    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    first = next((root / "videos").iterdir())
    shutil.copy2(first, root / "videos" / f"...{first.suffix}")
    csv = root / "annotations" / "train.csv"
    row = csv.read_text().splitlines()[0].split(",")
    csv.write_text(csv.read_text() + ",".join([".."] + row[1:]) + "\n")
    committed = tmp_path / "work" / "prepared" / "train" / "v1"
    committed.mkdir(parents=True)
    (committed / "_DONE.json").write_text("{}")
    cfg = tiny_config(tmp_path / "work", root)
    with pytest.raises(AnnotationError, match=r"train.csv:\d+: video id '\.\.'"):
        build_tasks(cfg)
    assert (committed / "_DONE.json").exists()


def test_prepare_video_never_removes_outside_its_folder(tmp_path, capsys):
    """The last line of defence: a task whose id escapes its split folder fails alone."""
    from lfb_ray.config import Config
    from lfb_ray.data.prep import prepare_video
    from lfb_ray.data.prep_task import PrepareTask, PrepSettings

    committed = tmp_path / "prepared" / "train" / "v1"
    committed.mkdir(parents=True)
    (committed / "_DONE.json").write_text(json.dumps({"hash": "h"}))
    task = PrepareTask(split="train", video_id="..", path="x.mp4", size=0, mtime=0, keyframes=(),
                       settings=PrepSettings.from_config(Config()), hash="h")
    out = prepare_video(task, str(tmp_path / "prepared"))
    assert out["status"] == "failed" and "video id '..'" in out["error"]
    assert (committed / "_DONE.json").exists()


def test_remove_dir_refuses_a_path_outside_the_root(tmp_path):
    from pyarrow import fs as pafs

    from lfb_ray.storage import StorageError, remove_dir

    (tmp_path / "out" / "a").mkdir(parents=True)
    local = pafs.LocalFileSystem()
    for bad in (f"{tmp_path}/out/a/../..", f"{tmp_path}/out", f"{tmp_path}/out/."):
        with pytest.raises(StorageError, match="not inside the output folder"):
            remove_dir(local, bad, inside=f"{tmp_path}/out")
    assert (tmp_path / "out" / "a").exists()
    remove_dir(local, f"{tmp_path}/out/a", inside=f"{tmp_path}/out")
    assert not (tmp_path / "out" / "a").exists()


def test_a_video_file_with_an_unsafe_name_is_skipped_and_named(tmp_path, capsys):
    from lfb_ray.data.prep import find_videos

    (tmp_path / "ok.mp4").write_bytes(b"x")
    (tmp_path / "...mp4").write_bytes(b"x")
    assert list(find_videos(str(tmp_path))) == ["ok"]
    assert "...mp4 skipped: video id '..'" in capsys.readouterr().out


def test_detect_refuses_an_unsafe_video_id(tmp_path):
    from lfb_ray.detect.run import DetectError, detect_video

    with pytest.raises(DetectError, match=r"--video-id: video id 'a/\.\./x' contains '/'"):
        detect_video(str(tmp_path / "v.mp4"), str(tmp_path / "m.pt"), str(tmp_path / "out"), video_id="a/../x")

