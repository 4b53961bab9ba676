"""`data.max_keyframes_per_split`: the smoke overrides' "few keyframes" and "capped val".

One rule (`first_keyframes`: the first N keyframes by video id, then second) decides what prepare
prepares, which videos the bank must hold (`split_videos`) and which GT val mAP is scored against,
so the three agree; 0 keeps everything.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import REPO, tiny_config

from lfb_ray.config import ConfigError, load_config
from lfb_ray.data.annotations import cap_annotation_rows, first_keyframes, read_annotation_rows


def test_first_keyframes_orders_by_video_then_second():
    keys = [("b", 903), ("a", 905), ("b", 902), ("a", 902)]
    assert first_keyframes(keys, 3) == {("a", 902), ("a", 905), ("b", 902)}
    assert first_keyframes(keys, 0) == set(keys)
    assert first_keyframes(keys, 10) == set(keys)


def test_the_cap_is_a_config_key_in_every_config_and_in_the_smoke_overrides():
    from lfb_ray.preflight import SMOKE_OVERRIDES

    for path in sorted((REPO / "configs").glob("*.yaml")):
        assert load_config(path).data.max_keyframes_per_split == 0, path.name  # all keyframes
    cfg = load_config(REPO / "configs" / "baseline.yaml", list(SMOKE_OVERRIDES))
    assert cfg.data.max_keyframes_per_split > 0
    with pytest.raises(ConfigError, match="max_keyframes_per_split"):
        load_config(REPO / "configs" / "baseline.yaml", ["data.max_keyframes_per_split=-1"])


def test_a_capped_run_is_another_run():
    from lfb_ray.runs import run_name_for

    cfg = load_config(REPO / "configs" / "tiny.yaml")
    capped = load_config(REPO / "configs" / "tiny.yaml", ["data.max_keyframes_per_split=4"])
    assert run_name_for(cfg) != run_name_for(capped)


def test_prepare_coverage_and_val_gt_keep_the_same_keyframes(tmp_path):
    from lfb_ray.bank.coverage import split_videos
    from lfb_ray.data.prep import build_tasks
    from lfb_ray.synthetic import generate_dataset

    root = tmp_path / "d"
    generate_dataset(root, num_videos=4, seconds=8, seed=0, width=64, height=48, val_fraction=0.5, workers=1)
    full = tiny_config(tmp_path / "w", root)
    tasks, _ = build_tasks(full)
    for split in ("train", "val"):
        per_video = {t.video_id: len(t.keyframes) for t in tasks if t.split == split}
        assert len(per_video) == 2 and min(per_video.values()) > 2  # enough to cap within one video

    capped = tiny_config(tmp_path / "w", root, "data.max_keyframes_per_split=3")
    ctasks, _ = build_tasks(capped)
    for split, csv in (("train", "train.csv"), ("val", "val.csv")):
        rows = read_annotation_rows(root / "annotations" / csv)
        expect = sorted(first_keyframes(zip(rows.video_ids.tolist(), rows.timestamps.tolist()), 3))
        got = sorted((t.video_id, k.timestamp) for t in ctasks if t.split == split for k in t.keyframes)
        assert got == expect and len(got) == 3
        # the bank need only hold the videos that keep a keyframe (one here: all 3 are in the first)
        assert split_videos(capped, split) == sorted({v for v, _ in expect})
        assert len(split_videos(full, split)) == 2
        # val mAP is scored against the GT of exactly those keyframes
        gt = cap_annotation_rows(rows, 3)
        assert sorted(set(zip(gt.video_ids.tolist(), gt.timestamps.tolist()))) == expect
        assert np.array_equal(gt.boxes, rows.boxes[np.isin(rows.line_numbers, gt.line_numbers)])
        assert cap_annotation_rows(rows, 0) is rows
