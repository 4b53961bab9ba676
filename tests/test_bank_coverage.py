"""Training and evaluation refuse a bank that lacks videos they read (issue 22: no silent zeros).

The fast tests check `open_checked` and the evaluation job's driver-side check on a hand-written
dataset; the `ray` test runs a real `fit` whose workers must refuse the bank before training.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from conftest import tiny_config

from lfb_ray.bank import BankError, FeatureBank, write_bank
from lfb_ray.bank.coverage import open_checked, split_videos
from lfb_ray.config import ConfigError

pytestmark = pytest.mark.faults

TRAIN = ["tr_a", "tr_b", "tr_c"]
VAL = ["va_a", "va_b"]


def write_csv(path, videos):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{v},0902,0.1,0.1,0.5,0.5,12,0\n{v},0903,0.2,0.1,0.6,0.5,12,0\n" for v in videos))


def small_bank(path, videos, dim=8):
    write_bank(path, video_ids=list(videos), seconds=np.full(len(videos), 902), person_index=np.zeros(len(videos), np.int64),
               boxes=np.zeros((len(videos), 4)), scores=np.ones(len(videos)),
               features=np.ones((len(videos), dim)))


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "data"
    write_csv(root / "annotations" / "train.csv", TRAIN)
    write_csv(root / "annotations" / "val.csv", VAL)
    return root


def config(tmp_path, root, *overrides):
    return tiny_config(tmp_path / "work", root, f"bank.path={tmp_path / 'bank'}", *overrides)


def test_split_videos_are_the_csv_videos_less_prepare_failures(tmp_path, dataset):
    cfg = config(tmp_path, dataset)
    assert split_videos(cfg, "train") == TRAIN and split_videos(cfg, "val") == VAL
    prepared = tmp_path / "work" / "prepared"
    prepared.mkdir(parents=True)
    (prepared / "failures.json").write_text(json.dumps([
        {"split": "train", "video_id": "tr_b", "path": None, "error": "missing video"},
        {"split": "val", "video_id": "tr_c", "path": None, "error": "other split: not subtracted from train"},
        {"split": "train", "video_id": "tr_a", "path": "tr_a.mp4", "timestamp": 905,
         "error": "one keyframe lost to undecodable frames: the video has rows, so it stays"}]))
    assert split_videos(cfg, "train") == ["tr_a", "tr_c"]
    assert split_videos(config(tmp_path, dataset, "data.val_csv="), "val") == []
    with pytest.raises(ValueError, match="unknown split 'test'"):
        split_videos(cfg, "test")


def test_open_checked_refuses_a_bank_without_a_splits_videos(tmp_path, dataset):
    small_bank(tmp_path / "bank" / "train", TRAIN)
    small_bank(tmp_path / "bank" / "val", ["va_a"])
    cfg = config(tmp_path, dataset)
    assert isinstance(open_checked(cfg, ("train",)), FeatureBank)
    with pytest.raises(BankError, match=rf"bank at {re.escape(str(tmp_path / 'bank'))} lacks 1 of the 2 val "
                                        r"videos: 'va_b'\..*bank.missing_videos=zeros"):
        open_checked(cfg, ("train", "val"))
    bank = open_checked(config(tmp_path, dataset, "bank.missing_videos=zeros"), ("train", "val"))
    assert bank.missing_videos == "zeros"  # the opt-out, passed on to sample()


def test_missing_videos_setting_is_typed(tmp_path, dataset):
    with pytest.raises(ConfigError, match=r"bank.missing_videos: 'skip' is not allowed; allowed values: "
                                          r"'error', 'zeros'"):
        config(tmp_path, dataset, "bank.missing_videos=skip")


def test_evaluation_refuses_the_bank_before_any_work(tmp_path, dataset):
    """`infer_split` (the evaluation job with a checkpoint) checks on the driver, before Ray Data or
    the checkpoint are touched: the checkpoint here does not even exist."""
    from lfb_ray.inference import infer_split

    small_bank(tmp_path / "bank" / "train", TRAIN + VAL[:1])  # val videos only in the train sub-bank: fine
    small_bank(tmp_path / "bank" / "val", [])
    cfg = config(tmp_path, dataset, "model.fbo=nl")
    with pytest.raises(BankError, match=r"lacks 1 of the 2 val videos: 'va_b'"):
        infer_split(cfg, str(tmp_path / "no_such.pt"), str(tmp_path / "out.csv"))


@pytest.mark.ray
def test_training_refuses_a_bank_without_a_val_video(prepared, tmp_path):
    """A real `fit` of an LFB model: its workers open the bank first and refuse it, naming the video."""
    from lfb_ray.models import build_detector
    from lfb_ray.train import fit

    cfg0, _ = prepared
    cfg = tiny_config(cfg0.workdir, cfg0.data.root, "model.fbo=avg", f"bank.path={tmp_path / 'bank'}",
                      "train.max_failures=0", "train.max_iters_per_epoch=1", "tracking.enabled=false",
                      f"train.storage_path={tmp_path / 'ray'}")
    train, val = split_videos(cfg, "train"), split_videos(cfg, "val")
    assert train and val
    dim = build_detector(cfg.model).feature_channels
    small_bank(tmp_path / "bank" / "train", train, dim=dim)
    small_bank(tmp_path / "bank" / "val", val[1:], dim=dim)
    with pytest.raises(Exception, match=rf"lacks 1 of the {len(val)} val videos: '{re.escape(val[0])}'") as e:
        fit(cfg)
    assert "BankError" in str(e.value) or isinstance(e.value, BankError)
