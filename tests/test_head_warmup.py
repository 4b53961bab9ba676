"""Head warm-up on the frozen bank: GT matching, what is trained, the checkpoint check, config."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lfb_ray.bank import FeatureBank, write_bank
from lfb_ray.config import ConfigError, ModelConfig, TrainConfig
from lfb_ray.models import build_detector, save_checkpoint
from lfb_ray.storage import file_sha256
from lfb_ray.train.head_warmup import gt_targets, warm_up_head

SMALL = {"depth": 18, "base_channels": 8, "latent_channels": 16, "num_classes": 6}  # C = 64
BOX_A, BOX_B = [0.1, 0.1, 0.4, 0.9], [0.6, 0.1, 0.9, 0.9]


def _csv(path, rows) -> str:
    path.write_text("".join(",".join(map(str, r)) + "\n" for r in rows))
    return str(path)


def test_gt_targets_match_by_iou_and_collect_every_label(tmp_path) -> None:
    csv_path = _csv(tmp_path / "train.csv", [
        ("v", 902, *BOX_A, 1, 0), ("v", 902, *BOX_A, 4, 0),  # person 0: labels 1 and 4
        ("v", 902, *BOX_B, 2, 1),
        ("w", 903, *BOX_A, 9, 0),  # id >= num_classes: dropped
    ])
    boxes = np.array([BOX_A, [0.1, 0.12, 0.4, 0.9], BOX_B, [0.0, 0.0, 0.05, 0.05], BOX_A, BOX_A], np.float32)
    rows, ys = gt_targets(csv_path, ["v", "v", "v", "v", "v", "w"], np.array([902, 902, 902, 902, 903, 903]),
                          boxes, 6)
    assert rows.tolist() == [0, 1, 2, 5]  # row 3 overlaps nothing, row 4's second has no GT
    assert ys[0].nonzero()[0].tolist() == [1, 4] and ys[1].tolist() == ys[0].tolist()
    assert ys[2].nonzero()[0].tolist() == [2] and not ys[3].any()


def _bank_and_csv(tmp_path, checkpoint_sha: str):
    """Two actors per video; actor A has label 1 and features around +1, actor B label 2 around -1."""
    rng = np.random.default_rng(0)
    vids, secs, pidx, boxes, feats, csv_rows = [], [], [], [], [], []
    for v in ("vid_a", "vid_b", "vid_c"):
        for s in range(902, 912):
            for p, (box, sign, label) in enumerate([(BOX_A, 1.0, 1), (BOX_B, -1.0, 2)]):
                vids.append(v), secs.append(s), pidx.append(p), boxes.append(box)
                feats.append(sign + 0.3 * rng.standard_normal(64))
                csv_rows.append((v, s, *box, label, p))
    write_bank(tmp_path / "bank" / "train", video_ids=vids, seconds=np.array(secs), person_index=np.array(pidx),
               boxes=np.array(boxes), scores=np.ones(len(vids)), features=np.array(feats),
               metadata={"checkpoint_sha256": checkpoint_sha})
    return str(tmp_path / "bank" / "train"), _csv(tmp_path / "train.csv", csv_rows)


@pytest.mark.parametrize("fbo", ["none", "avg", "nl"])
def test_warm_up_trains_the_head_only(tmp_path, fbo) -> None:
    torch.manual_seed(0)
    model = build_detector(ModelConfig(**SMALL, fbo=fbo))
    ckpt = tmp_path / "base.pt"
    save_checkpoint(model.state_dict(), ckpt)
    bank_dir, csv_path = _bank_and_csv(tmp_path, file_sha256(str(ckpt)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = warm_up_head(model, bank_dir, csv_path, steps=60, lr=1e-2, batch=16, seed=0, window_seconds=4,
                       max_feats_per_second=2, checkpoint=str(ckpt), log=lambda m: None)
    after = model.state_dict()
    assert res.entries == 60 and res.steps == 60
    assert res.loss_last < 0.7 * res.loss_first
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("backbone."))
    assert not torch.equal(before["fc_cls.weight"], after["fc_cls.weight"])
    if fbo == "nl":
        assert not torch.equal(before["fbo.non_local_layer_1.lt_feat_conv.conv.weight"],
                               after["fbo.non_local_layer_1.lt_feat_conv.conv.weight"])
    # Same seed, same start: the same head (DDP ranks that all run it agree).
    again = build_detector(ModelConfig(**SMALL, fbo=fbo))
    again.load_state_dict(before)
    warm_up_head(again, bank_dir, csv_path, steps=60, lr=1e-2, batch=16, seed=0, window_seconds=4,
                 max_feats_per_second=2, log=lambda m: None)
    assert all(torch.equal(after[k], v) for k, v in again.state_dict().items())


def test_warm_up_refuses_a_bank_of_another_checkpoint(tmp_path) -> None:
    model = build_detector(ModelConfig(**SMALL, fbo="avg"))
    ckpt = tmp_path / "base.pt"
    save_checkpoint(model.state_dict(), ckpt)
    bank_dir, csv_path = _bank_and_csv(tmp_path, "0" * 64)
    with pytest.raises(ValueError, match="computed by checkpoint"):
        warm_up_head(model, bank_dir, csv_path, steps=1, lr=1e-3, batch=4, seed=0, window_seconds=4,
                     max_feats_per_second=2, checkpoint=str(ckpt))


def test_warm_up_without_matching_entries_names_the_files(tmp_path) -> None:
    model = build_detector(ModelConfig(**SMALL, fbo="avg"))
    bank_dir, _ = _bank_and_csv(tmp_path, "x")
    other = _csv(tmp_path / "other.csv", [("nope", 902, *BOX_A, 1, 0)])
    with pytest.raises(ValueError, match="other.csv"):
        warm_up_head(model, bank_dir, other, steps=1, lr=1e-3, batch=4, seed=0, window_seconds=4,
                     max_feats_per_second=2)


def test_bank_entries_follow_video_ownership_of_merged_banks(tmp_path) -> None:
    kw = {"person_index": np.array([0, 0]), "scores": np.ones(2), "boxes": np.tile(BOX_A, (2, 1))}
    write_bank(tmp_path / "a", video_ids=["v", "w"], seconds=np.array([1, 2]), features=np.full((2, 3), 1.0), **kw)
    write_bank(tmp_path / "b", video_ids=["w", "x"], seconds=np.array([5, 6]), features=np.full((2, 3), 2.0), **kw)
    vids, secs, boxes, feats = FeatureBank.open([tmp_path / "a", tmp_path / "b"]).entries()
    got = sorted(zip(vids, secs.tolist(), feats[:, 0].tolist(), strict=True))
    assert got == [("v", 1, 1.0), ("w", 5, 2.0), ("x", 6, 2.0)]  # "w" of bank a is shadowed by bank b
    assert boxes.shape == (3, 4) and feats.dtype == np.float16


@pytest.mark.parametrize("kw", [{"head_warmup_steps": -1}, {"head_warmup_lr": 0.0}, {"head_warmup_batch": 0},
                                {"finetune_epochs": -2}])
def test_warmup_config_is_validated(kw) -> None:
    with pytest.raises(ConfigError):
        TrainConfig(**kw)


def test_flush_denormals_zeroes_subnormal_math_on_its_thread() -> None:
    """The train loop's CPU setting: subnormal inputs and results become 0 (the NL warm-up ran
    4.5x slower without it). Run on fresh threads so the test process's own state is untouched."""
    import threading

    from lfb_ray.train.recipe import flush_denormals

    tiny = torch.finfo(torch.float32).tiny  # smallest normal float32, 1.18e-38
    got = {}

    def work(flush: bool) -> None:
        if flush:
            got["supported"] = flush_denormals()
        x = torch.full((4,), tiny / 8)  # subnormal
        got[flush] = float((x * 1.0).sum())

    for flush in (False, True):
        t = threading.Thread(target=work, args=(flush,))
        t.start()
        t.join()
    assert got[False] > 0.0
    if got["supported"]:
        assert got[True] == 0.0
    else:  # not x86 with SSE3: torch cannot set the mode
        pytest.skip("this CPU cannot flush subnormals")
