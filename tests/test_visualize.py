"""lfb_ray.visualize (slot -> second mapping, tiles, the PNG/MP4 of one video) and the NL attention
weights `lfb_ray.inference.predict_keyframes` reads."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lfb_ray.bank import FeatureBank, write_bank
from lfb_ray.inference import KeyframePrediction, second_attention
from lfb_ray.models.fbo import FBONonLocal
from lfb_ray.visualize import GT_COLOUR, MAX_STRIP_BOXES, bank_seconds, render_tile

REPO = Path(__file__).resolve().parents[1]


def test_bank_seconds_formula():
    w, k = 20, 5
    slots = np.array([0, 4, 5, 49, 50, 54, 55, 99])
    assert bank_seconds(100, slots, window_seconds=w, max_feats_per_second=k).tolist() == \
        [90, 90, 91, 99, 100, 100, 101, 109]  # the keyframe's own second starts at slot W//2 * K
    assert bank_seconds(np.array([[5], [7]]), np.array([[0, 3]]), window_seconds=3, max_feats_per_second=1).tolist() \
        == [[4, 7], [6, 9]]


def test_bank_seconds_match_feature_bank_sample(tmp_path):
    """Each filled slot of `FeatureBank.sample` holds a feature of the second `bank_seconds` names."""
    seconds = np.repeat(np.arange(900, 930), 3)[::2]  # 1-2 features per second, some seconds alone
    seconds = seconds[seconds != 912]  # a missing second
    person = np.concatenate([np.arange(n) for n in np.unique(seconds, return_counts=True)[1]])
    n = len(seconds)
    write_bank(tmp_path / "bank", video_ids=["v"] * n, seconds=seconds, person_index=person,
               boxes=np.full((n, 4), np.nan), scores=np.full(n, np.nan),
               features=np.stack([seconds - 800, person + 1], axis=1).astype(np.float32))
    bank = FeatureBank.open(tmp_path / "bank")
    w, k, t = 9, 3, np.array([903, 913, 926])
    lt = bank.sample(["v"] * 3, t, np.random.default_rng(0), window_seconds=w, max_feats_per_second=k).numpy()
    filled = lt[:, :, 1] > 0  # [R, W*K]
    expected = bank_seconds(t[:, None], np.arange(w * k)[None], window_seconds=w, max_feats_per_second=k)
    np.testing.assert_array_equal(lt[:, :, 0][filled] + 800, expected[filled])
    assert filled.any(axis=1).all() and not filled.all()


def test_second_attention_sums_slots_per_second():
    a = np.arange(1, 13, dtype=np.float64)
    a /= a.sum()
    filled = np.ones(12, bool)
    filled[[2, 7, 8]] = False  # K=3: second 0 slot 2, second 2 slots 1-2
    mass, pad = second_attention(a, filled, window_seconds=4, max_feats_per_second=3)
    np.testing.assert_allclose(mass, np.array([1 + 2, 4 + 5 + 6, 7, 10 + 11 + 12]) / 78)
    assert pad == pytest.approx((3 + 8 + 9) / 78)
    assert mass.sum() + pad == pytest.approx(1.0)


@pytest.mark.parametrize("layer", [1, 2])
def test_nl_attention_is_the_layer_softmax(layer):
    torch.manual_seed(0)
    fbo = FBONonLocal(in_channels=8, latent_channels=6, num_layers=2).eval()
    with torch.no_grad():  # non-trivial LN affine and biases (init has 1/0)
        for p in fbo.parameters():
            p.add_(0.1 * torch.randn_like(p))
    st, lt = torch.randn(5, 8), torch.randn(5, 12, 8)
    lt[:, 7:] = 0  # padding slots take softmax mass too
    before = {k: v.clone() for k, v in fbo.state_dict().items()}
    with torch.no_grad():
        attn = fbo.attention(st, lt, layer=layer)
        assert attn.shape == (5, 12)
        torch.testing.assert_close(attn.sum(dim=1), torch.ones(5))

        def lin(conv, x):
            return F.linear(x, conv.weight.flatten(1), conv.bias)

        s, lr = lin(fbo.st_feat_conv, st), lin(fbo.lt_feat_conv, lt)
        if layer == 2:
            s = s + fbo.non_local_layer_1(s, lr)
        nl = fbo.get_submodule(f"non_local_layer_{layer}")
        theta, phi = lin(nl.st_feat_conv.conv, s), lin(nl.lt_feat_conv.conv, lr)  # [N, L], [N, S, L]
        expected = torch.softmax(torch.einsum("nl,nsl->ns", theta, phi) / 6 ** 0.5, dim=1)
    torch.testing.assert_close(attn, expected)
    assert not fbo.training and all(torch.equal(v, fbo.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError):
        fbo.attention(st, lt, layer=3)


def _keyframe(window: int | None) -> KeyframePrediction:
    scores = np.full((2, 81), 0.05, np.float32)
    scores[0, [3, 7]] = [0.9, 0.6]
    scores[1, 12] = 0.8
    attention = None
    if window:
        mass = np.zeros(window)
        mass[[1, 4, 9]] = [0.2, 0.5, 0.1]
        attention = [(mass, 0.2), (mass[::-1].copy(), 0.2)]
    return KeyframePrediction(
        video_id="vid", timestamp=910, image=np.full((120, 160, 3), 60, np.uint8),
        gt_boxes=np.array([[0.1, 0.1, 0.4, 0.9]], np.float32), gt_labels=[[3]],
        boxes=np.array([[0.12, 0.1, 0.4, 0.88], [0.5, 0.2, 0.9, 0.9]], np.float32), scores=scores,
        attention=attention)


def test_render_tile_size_and_gt_colour():
    names = {3: "walk", 7: "stand", 12: "sit"}
    plain = render_tile(_keyframe(None), label_names=names, tile_width=320)
    assert plain.size == (320, 20 + 240)
    tile = render_tile(_keyframe(10), label_names=names, tile_width=320, window_seconds=10)
    assert tile.size == (320, 20 + 240 + 16 + 30 * MAX_STRIP_BOXES)
    pixels = np.asarray(tile)
    assert (pixels == GT_COLOUR).all(axis=-1).sum() > 100  # green GT box and label


@pytest.mark.ray
def test_visualize_video_writes_png_and_mp4(prepared, tmp_path):
    """Random-weight LFB-NL model + random bank on the prepared val video: decodable PNG and MP4."""
    import av

    from lfb_ray.data.annotations import read_annotation_rows
    from lfb_ray.models import build_detector, save_checkpoint
    from lfb_ray.visualize import read_video_rows, visualize_video

    base, _ = prepared
    cfg = dataclasses.replace(base, bank=dataclasses.replace(base.bank, path=str(tmp_path / "bank")))
    assert cfg.model.fbo == "nl"
    video = str(read_annotation_rows(Path(cfg.data.root) / cfg.data.val_csv).video_ids[0])
    rows = read_video_rows(cfg, video, "val")
    assert [r["timestamp"] for r in rows] == sorted(r["timestamp"] for r in rows) and len(rows) > 4

    torch.manual_seed(0)
    model = build_detector(cfg.model)
    save_checkpoint(model.state_dict(), tmp_path / "model.pt")
    secs = np.repeat([r["timestamp"] for r in rows], 2)
    rng = np.random.default_rng(0)
    write_bank(cfg.bank_dir, video_ids=[video] * len(secs), seconds=secs, person_index=np.tile([0, 1], len(rows)),
               boxes=np.full((len(secs), 4), np.nan), scores=np.full(len(secs), np.nan),
               features=rng.standard_normal((len(secs), model.feature_channels)).astype(np.float32))

    vis = visualize_video(cfg, str(tmp_path / "model.pt"), video, out_dir=str(tmp_path / "vis"), max_keyframes=6,
                          score_thr=0.0, tile_width=320)
    assert len(vis.timestamps) == 6 and vis.grid_shape == (2, 4)
    tw, th = vis.tile_size
    assert tw == 320 and th == 20 + 240 + 16 + 30 * MAX_STRIP_BOXES  # 160x120 frames
    with Image.open(vis.png) as im:
        assert im.size == (4 * tw, 2 * th)
    with av.open(vis.mp4) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    assert len(frames) == 6 and frames[0].shape == (th + th % 2, tw + tw % 2, 3)

    spec = importlib.util.spec_from_file_location("visualize_job", REPO / "jobs" / "visualize.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    out = tmp_path / "job"
    assert job.main(["--config", str(REPO / "configs" / "tiny.yaml"), f"workdir={cfg.workdir}",
                     f"data.root={cfg.data.root}", f"bank.path={cfg.bank_dir}", "--checkpoint",
                     str(tmp_path / "model.pt"), "--video", video, "--out", str(out), "--max-keyframes", "2"]) == 0
    assert (out / f"{video}_grid.png").exists() and (out / f"{video}.mp4").exists()
    assert job.main(["--config", str(REPO / "configs" / "tiny.yaml"), f"workdir={cfg.workdir}",
                     f"data.root={cfg.data.root}", "--checkpoint", str(tmp_path / "model.pt"),
                     "--video", "no_such_video"]) == 1
