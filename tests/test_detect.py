"""jobs/detect.py (lfb_ray.detect): action detection on a video file, in-process, on the tiny synthetic set.

Random-weight tiny models (configs/tiny.yaml: SlowOnly-18 width 8, LFB-NL, window 20 s) saved as
checkpoints; the synthetic val video with its FAIR-format proposals.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, tiny_config

from lfb_ray.detect import DetectError, detect_video

SPAN = (902, 914)  # the val video's annotated keyframes (16 s video, AVA time 900..915)


def _job():
    spec = importlib.util.spec_from_file_location("detect_job", REPO / "jobs" / "detect.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


@pytest.fixture(scope="module")
def env(synthetic_root, tmp_path_factory):
    from lfb_ray.data.annotations import read_annotation_rows
    from lfb_ray.models import build_detector, save_checkpoint

    d = tmp_path_factory.mktemp("detect")
    cfg = tiny_config(d / "work", synthetic_root)
    assert cfg.model.fbo == "nl"
    torch.manual_seed(0)
    nl = build_detector(cfg.model)
    with torch.no_grad():  # a non-trivial classifier: scores away from 0.5
        nl.fc_cls.weight.normal_(0, 0.3)
    save_checkpoint(nl.state_dict(), d / "nl.pt")
    base = build_detector(dataclasses.replace(cfg.model, fbo="none"))
    save_checkpoint(base.state_dict(), d / "base.pt")
    wide = build_detector(dataclasses.replace(cfg.model, fbo="none", base_channels=16))  # 128-d features
    save_checkpoint(wide.state_dict(), d / "base_wide.pt")
    video_id = str(read_annotation_rows(Path(cfg.data.root) / cfg.data.val_csv).video_ids[0])
    video = Path(cfg.data.root) / "videos" / f"{video_id}.mp4"
    props = Path(cfg.data.root) / cfg.data.val_proposals
    return {"cfg": cfg, "dir": d, "nl": str(d / "nl.pt"), "base": str(d / "base.pt"),
            "base_wide": str(d / "base_wide.pt"), "video_id": video_id, "video": str(video), "props": str(props)}


def _run(env, out, **kw):
    args = {"config": env["cfg"], "bank_checkpoint": env["base"], "persons": env["props"], "progress": False,
            "log": lambda *_: None}
    args.update(kw)
    return detect_video(kw.pop("video", env["video"]), kw.pop("checkpoint", env["nl"]), str(out),
                        **{k: v for k, v in args.items() if k not in ("video", "checkpoint")})


def test_scores_equal_the_evaluation_path(env, tmp_path):
    """The CSV's scores are those of prepare -> decode_test_rows -> collate_test -> predict_batch on
    the prepared val video with the same bank; the bank equals the bank job's for the same keyframes."""
    from lfb_ray.bank import FeatureBank
    from lfb_ray.bank.build import BankExtractor
    from lfb_ray.bank.window import WindowSampler
    from lfb_ray.data.annotations import read_result_rows
    from lfb_ray.data.dataset import RAW_COLUMNS, collate_test, decode_test_rows
    from lfb_ray.data.prep import build_tasks, prepare_video
    from lfb_ray.inference import load_model, predict_batch

    cfg = env["cfg"]
    res = _run(env, tmp_path / "out", start=SPAN[0], end=SPAN[1], render=False)
    assert res.span == SPAN and res.persons > 0 and res.mp4 is None

    # The evaluation path: the prepare job's task for the val video (with its jitter offsets), in-process.
    tasks, _ = build_tasks(cfg)
    task = next(t for t in tasks if t.split == "val" and t.video_id == env["video_id"])
    prepared = tmp_path / "prepared"
    assert prepare_video(task, str(prepared))["status"] == "done"
    import pyarrow.parquet as pq

    kf_path = prepared / "val" / env["video_id"] / "keyframes.parquet"
    rows = sorted(pq.read_table(kf_path).to_pylist(), key=lambda r: r["timestamp"])
    assert [r["timestamp"] for r in rows] == list(range(SPAN[0], SPAN[1] + 1))
    run_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, prepared_dir=str(prepared)))

    # Bank: the bank job's extractor on the prepared rows == the bank detect built.
    base_cfg = dataclasses.replace(run_cfg, model=run_cfg.model.baseline())
    job_bank = BankExtractor(base_cfg, env["base"], parts_dir="")._extract(str(kf_path))
    bank = FeatureBank.open(tmp_path / "out" / "bank", expected_dim=64)
    for s in range(SPAN[0], SPAN[1] + 1):
        mine = bank.features_at(env["video_id"], s).astype(np.float32)
        theirs = job_bank["feature"][job_bank["second"] == s].astype(np.float32)
        np.testing.assert_allclose(mine, theirs, rtol=0, atol=2e-3)
        assert len(mine) >= 1

    model = load_model(run_cfg, env["nl"])
    batch = collate_test(decode_test_rows({c: [r[c] for r in rows] for c in RAW_COLUMNS}, data=cfg.data,
                                          prepared_uri=str(prepared), score_thr=cfg.data.val_person_score_thr),
                         cfg.data.mean, cfg.data.std)
    windows = WindowSampler.for_config(bank, "cpu", cfg.bank)
    pred = predict_batch(model, batch, windows=windows, rng=np.random.default_rng(0), device=torch.device("cpu"))
    det = read_result_rows(res.csv)

    def key(t, b):  # the eval box of a CSV row: same second, same box to the CSV's 6 decimals
        hit = np.flatnonzero((pred.seconds == t) & (np.abs(pred.boxes - b).max(axis=1) < 2e-6))
        assert len(hit) == 1
        return int(hit[0])

    matched = set()
    for t, b, a, s in zip(det.timestamps, det.boxes, det.action_ids, det.scores, strict=True):
        i = key(t, b)
        matched.add(i)
        assert abs(pred.scores[i, a] - s) < 1e-5
    # Every eval box at or above the person threshold is in the CSV (the rest are the evaluator's
    # fallbacks: the best box of a keyframe whose boxes all score lower, or a whole-frame box).
    props = {int(r["timestamp"]): np.asarray(r["proposals"], np.float32).reshape(-1, 5) for r in rows
             if not r["proposals_missing"]}  # a key missing from the pickle: the stored whole-frame box
    persons = sum(int((p[:, 4] >= cfg.data.val_person_score_thr).sum()) for p in props.values())
    assert len(matched) == persons == res.persons
    assert len(det) == persons * 80  # every class of every person (eval.action_thr 0)

    # The short-term column: the baseline's scores on the same boxes, through the same path.
    short = read_result_rows(res.short_term_csv)
    np.testing.assert_array_equal(short.boxes, det.boxes)
    base = load_model(dataclasses.replace(run_cfg, model=dataclasses.replace(cfg.model, fbo="none")), env["base"])
    pb = predict_batch(base, batch, rng=np.random.default_rng(0), device=torch.device("cpu"))
    for t, b, a, s in zip(short.timestamps, short.boxes, short.action_ids, short.scores, strict=True):
        assert abs(pb.scores[key(t, b), a] - s) < 1e-5

    doc = json.loads(Path(res.tracks_json).read_text())
    n_boxes = sum(len(t["boxes"]) for t in doc["tracks"])
    assert n_boxes == persons and 2 <= len(doc["tracks"]) < persons  # boxes linked across seconds
    entry = doc["tracks"][0]["boxes"][0]
    assert len(entry["top_actions"]) == 3 and len(entry["bank_seconds"]) >= 1
    assert all(abs(x["second"] - entry["second"]) <= cfg.bank.window_seconds // 2 for x in entry["bank_seconds"])


def test_mp4_has_the_input_frames(env, tmp_path):
    import decord

    from lfb_ray.detect.render import Layout

    src = decord.VideoReader(env["video"])
    size = Layout.for_source(src[0].shape[1], src[0].shape[0]).size
    res = _run(env, tmp_path / "all")
    out = decord.VideoReader(res.mp4)
    assert len(out) == len(src) and out[0].shape[1::-1] == size  # the whole video, drawn at the layout's size
    assert out.get_avg_fps() == pytest.approx(src.get_avg_fps())
    # A span: the frames within half a second of its keyframes (AVA time = file time + 900).
    res = _run(env, tmp_path / "span", start=905, end=907, checkpoint=env["base"], bank_checkpoint=None)
    out = decord.VideoReader(res.mp4)
    t = np.arange(len(src)) / src.get_avg_fps() + 900
    assert len(out) == int(((t >= 904.5) & (t < 907.5)).sum()) == 90 and out[0].shape[1::-1] == size
    assert res.short_term_csv is None and not (tmp_path / "span" / "bank").exists()  # a baseline: no bank


MAX_LABEL_COVER = 0.03  # the most of the person boxes' area that labels may hide


def _label_cover(frame: np.ndarray, src: np.ndarray, boxes: np.ndarray) -> tuple[int, int]:
    """(pixels inside the person `boxes` where `frame` differs from `src` upscaled to the frame's
    height by more than compression noise, pixels inside the boxes). A 5 px ring along every box's
    edges (the outlines) is left out of both."""
    from PIL import Image

    h = frame.shape[0]
    w = round(src.shape[1] * h / src.shape[0])
    ref = np.asarray(Image.fromarray(src).resize((w, h), Image.Resampling.BILINEAR)).astype(np.int16)
    diff = np.abs(frame[:, :w].astype(np.int16) - ref).max(axis=2) > 48
    inside = np.zeros((h, w), bool)
    ring = np.zeros((h, w), bool)
    for x1, y1, x2, y2 in np.round(np.asarray(boxes) * [w, h, w, h]).astype(int):
        inside[max(y1, 0):y2, max(x1, 0):x2] = True
        ring[max(y1 - 5, 0):y2 + 5, max(x1 - 5, 0):x2 + 5] = True
        ring[max(y1 + 5, 0):y2 - 5, max(x1 + 5, 0):x2 - 5] = False
    keep = inside & ~ring
    return int((diff & keep).sum()), int(keep.sum())


def test_mp4_of_a_small_source_is_upscaled_and_its_labels_leave_the_persons_visible(env, tmp_path):
    """The 160x120 synthetic video is drawn at 640x480 (short side 480, aspect kept) with the text
    beside it: on every keyframe's own frame, at most MAX_LABEL_COVER of the person boxes' area
    differs from the upscaled source (box outlines left out)."""
    import decord

    src = decord.VideoReader(env["video"])
    assert src[0].shape[:2] == (120, 160)
    res = _run(env, tmp_path / "out", draw_thr=0.0)  # every top action drawn: the most text there can be
    out = decord.VideoReader(res.mp4)
    assert out[0].shape[0] == 480 and out[0].shape[1] >= 640
    doc = json.loads(Path(res.tracks_json).read_text())
    by_second: dict[int, list] = {}
    for tr in doc["tracks"]:
        for e in tr["boxes"]:
            by_second.setdefault(e["second"], []).append(e["box"])
    assert max(len(b) for b in by_second.values()) >= 2  # frames with several persons among them
    t = np.arange(len(src)) / src.get_avg_fps() + 900
    covered = total = 0
    for s, boxes in by_second.items():
        i = int(np.argmin(np.abs(t - s)))
        c, n = _label_cover(out[i].asnumpy(), src[i].asnumpy(), np.array(boxes))
        covered, total = covered + c, total + n
    print(f"labels cover {covered / total:.2%} of the person boxes ({covered} of {total} px)")
    assert total > 0 and covered / total <= MAX_LABEL_COVER


def test_frame_png_is_the_mp4s_frame(env, tmp_path, capsys):
    """`--frame-png S` writes keyframe S's frame as the mp4 draws it; a second outside the span is
    refused before any work."""
    import decord
    from PIL import Image

    job = _job()
    common = ["--video", env["video"], "--checkpoint", env["base"], "--persons", env["props"],
              "--config", str(REPO / "configs" / "tiny.yaml"), f"data.root={env['cfg'].data.root}",
              "--start", "905", "--end", "907", "--quiet"]
    assert job.main([*common, "--out", str(tmp_path / "o"), "--frame-png", "906"]) == 0
    png = tmp_path / "o" / f"{env['video_id']}_906.png"
    assert str(png) in capsys.readouterr().out
    still = np.asarray(Image.open(png).convert("RGB")).astype(np.int16)
    out = decord.VideoReader(str(tmp_path / "o" / f"{env['video_id']}_detections.mp4"))
    t = np.arange(len(out)) / out.get_avg_fps() + 904.5  # the span's frames start half a second before 905
    frame = out[int(np.argmin(np.abs(t - 906)))].asnumpy().astype(np.int16)
    assert still.shape == frame.shape and np.abs(still - frame).mean() < 3  # the same picture, less H.264's loss
    assert job.main([*common, "--out", str(tmp_path / "bad"), "--frame-png", "930"]) == 2
    assert "--frame-png 930: not a keyframe second of the span 905..907" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_panel_truncates_a_crowded_frame():
    """Twelve persons with three actions each on a 160x120 frame: the text goes to the panel, cut
    to its width, its overflow in one "+N more rows" row; the picture keeps its size."""
    from lfb_ray.detect.render import (
        FrameOverlay,
        Layout,
        PersonOverlay,
        _cached_font,
        draw_frame,
        panel_rows,
    )

    layout = Layout.for_source(160, 120)
    assert (layout.frame_w, layout.frame_h) == (640, 480) and layout.size[0] % 2 == 0
    persons = [PersonOverlay(box=np.array([0.05 * i, 0.1, 0.05 * i + 0.2, 0.9]), track=i, bank_seconds=[900, 905],
                             labels=[("a rather long action name, longer than a row", 0.9), ("stand", 0.5),
                                     ("talk", 0.4)]) for i in range(12)]
    ov = FrameOverlay(second=905, persons=persons)
    rows = panel_rows(ov, [(0, 0, 0)] * 12, layout)
    assert len(rows) == layout.panel_rows < 1 + 12 * 4
    assert rows[-1][0] == f"+{1 + 12 * 4 - layout.panel_rows + 1} more rows"
    font = _cached_font(layout.text_px)
    assert all(font.getlength(text) <= layout.panel_w - 2 * layout.pad for text, _ in rows)
    assert rows[1][0].startswith("#0 a rather long") and rows[1][0].endswith("… 0.90")  # cut, score kept
    img = draw_frame(np.full((120, 160, 3), 90, np.uint8), ov, layout)
    assert img.size == layout.size
    panel = np.asarray(img)[:, layout.frame_w:]
    assert (panel != panel[0, 0]).any(axis=2).sum() > 1000  # text drawn in the panel


@pytest.mark.slow
def test_detector_path_end_to_end(env, tmp_path, capsys):
    """A random torchvision detector finds no one (a clear line, empty outputs); one biased towards
    'person' finds boxes that go through the whole path."""
    from torchvision.models.detection import fasterrcnn_resnet50_fpn_v2

    torch.manual_seed(0)
    det = fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None)
    weights = tmp_path / "detector.pth"
    torch.save(det.state_dict(), weights)
    job = _job()
    common = ["--video", env["video"], "--checkpoint", env["nl"], "--bank-checkpoint", env["base"],
              "--config", str(REPO / "configs" / "tiny.yaml"), f"data.root={env['cfg'].data.root}",
              "--detector-weights", str(weights), "--detector-min-size", "160", "--start", "905", "--end", "906",
              "--video-start-second", "900", "--quiet"]
    assert job.main([*common, "--out", str(tmp_path / "none")]) == 0
    out = capsys.readouterr().out
    assert "no person found" in out
    assert (tmp_path / "none" / "detections.csv").read_text() == ""
    assert json.loads((tmp_path / "none" / "tracks.json").read_text())["tracks"] == []
    assert (tmp_path / "none" / f"{env['video_id']}_detections.mp4").exists()

    with torch.no_grad():
        det.roi_heads.box_predictor.cls_score.bias[1] = 20.0  # every RoI a confident person
    torch.save(det.state_dict(), weights)
    assert job.main([*common, "--out", str(tmp_path / "some")]) == 0
    rows = (tmp_path / "some" / "detections.csv").read_text().splitlines()
    assert rows and all(r.split(",")[1] in ("905", "906") for r in rows)
    assert (tmp_path / "some" / "bank" / "manifest.json").exists()


# ---------------------------------------------------------------------------------------------
# Bad inputs: each a DetectError with a message that says what is wrong (exit code 2 from the job)


def test_missing_video(env, tmp_path):
    with pytest.raises(DetectError, match="no such file"):
        _run(env, tmp_path, video=str(tmp_path / "nope.mp4"))


def test_corrupt_video(env, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(np.random.default_rng(0).bytes(20000))
    with pytest.raises(DetectError, match="cannot open as a video"):
        _run(env, tmp_path / "o", video=str(bad))
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(Path(env["video"]).read_bytes()[:3000])  # truncated: header only
    with pytest.raises(DetectError, match="cannot open as a video"):
        _run(env, tmp_path / "o", video=str(cut))


def test_not_a_checkpoint(env, tmp_path):
    junk = tmp_path / "model.pt"
    junk.write_text("not a checkpoint\n")
    with pytest.raises(DetectError, match="is not a model checkpoint"):
        _run(env, tmp_path / "o", checkpoint=str(junk))


def test_detector_weights_as_checkpoint(env, tmp_path):
    fake = tmp_path / "detector.pth"  # the key layout of torchvision's detector, tiny tensors
    torch.save({"backbone.body.conv1.weight": torch.zeros(1), "rpn.head.conv.0.0.weight": torch.zeros(1),
                "roi_heads.box_predictor.cls_score.weight": torch.zeros(1)}, fake)
    with pytest.raises(DetectError, match="torchvision object-detector state dict.*--detector-weights"):
        _run(env, tmp_path / "o", checkpoint=str(fake))
    with pytest.raises(DetectError, match="torchvision object-detector"):
        _run(env, tmp_path / "o", bank_checkpoint=str(fake))


def test_checkpoint_as_detector_weights(env, tmp_path):
    with pytest.raises(DetectError, match="not a fasterrcnn_resnet50_fpn_v2 state dict.*--checkpoint"):
        _run(env, tmp_path / "o", persons=None, detector_weights=env["nl"])


def test_bank_checkpoint_feature_dim_mismatch(env, tmp_path):
    with pytest.raises(DetectError, match="computes 128-d features.*64-d"):
        _run(env, tmp_path / "o", bank_checkpoint=env["base_wide"])
    assert not (tmp_path / "o").exists()  # refused before any work


def test_lfb_model_needs_a_baseline_bank_checkpoint(env, tmp_path):
    with pytest.raises(DetectError, match="pass --bank-checkpoint"):
        _run(env, tmp_path / "o", bank_checkpoint=None)
    with pytest.raises(DetectError, match="is an LFB-nl model; the bank is computed by the short-term baseline"):
        _run(env, tmp_path / "o", bank_checkpoint=env["nl"])


def test_no_person_source(env, tmp_path):
    with pytest.raises(DetectError, match=r"--persons .*--detector-weights .*fasterrcnn_resnet50_fpn_v2_coco"):
        _run(env, tmp_path / "o", persons=None)


def test_persons_file_without_the_video(env, tmp_path):
    with pytest.raises(DetectError, match="has no boxes for video 'other'.*--video-id"):
        _run(env, tmp_path / "o", video_id="other")


def test_span_outside_the_video(env, tmp_path):
    with pytest.raises(DetectError, match="no keyframe second of the video in that span.*900..915"):
        _run(env, tmp_path / "o", start=950, end=960)


def test_job_exit_code_and_message(env, tmp_path, capsys):
    code = _job().main(["--video", str(tmp_path / "nope.mp4"), "--checkpoint", env["nl"], "--out", str(tmp_path)])
    assert code == 2 and "error: --video" in capsys.readouterr().err


def test_persons_csv_and_tracks():
    import tempfile

    from lfb_ray.detect.persons import _read_csv_boxes
    from lfb_ray.detect.tracks import link_tracks

    with tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False) as f:
        f.write("v,0902,0.1,0.1,0.3,0.9,11,1\nv,0902,0.1,0.1,0.3,0.9,64,1\nv,0902,0.5,0.1,0.7,0.9,12,2\n"
                "v,0903,0.1,0.1,0.3,0.9,0.75\n")
    boxes = _read_csv_boxes(f.name)
    assert sorted(boxes) == [("v", 902), ("v", 903)]
    assert boxes[("v", 902)].shape == (2, 5) and boxes[("v", 903)][0, 4] == pytest.approx(0.75)
    Path(f.name).unlink()
    ids = link_tracks([1, 2, 3, 5], [np.array([[0, 0, .2, .2], [.5, .5, .9, .9]]), np.array([[.52, .5, .9, .9]]),
                                     np.array([[0, 0, .2, .2], [.55, .5, .92, .9]]), np.array([[0, 0, .2, .2]])])
    assert [i.tolist() for i in ids] == [[0, 1], [1], [2, 1], [3]]  # a gap of 1 s ends a track (max_gap=1)
    # A box that moves on: IoU 0.25 with its last position, 0.82 with where it was heading.
    ids = link_tracks([1, 2, 3], [np.array([[0, 0, .2, 1]]), np.array([[.1, 0, .3, 1]]), np.array([[.22, 0, .42, 1]])],
                      iou_thr=0.3)
    assert [i.tolist() for i in ids] == [[0], [0], [0]]


def test_mmaction2_checkpoints_without_config(env, tmp_path):
    """mmaction2-layout files, raw and after jobs/convert_checkpoint.py: the layout is read from the
    weights (no --config: lfb_ray's defaults for data and bank), and the scores equal those of our file."""
    from lfb_ray.data.annotations import read_result_rows
    from lfb_ray.models import build_detector, convert_checkpoint, load_checkpoint, to_mmaction2_state_dict

    cfg = env["cfg"]
    for name, fbo in (("nl", "nl"), ("base", "none")):
        m = build_detector(dataclasses.replace(cfg.model, fbo=fbo))
        load_checkpoint(m, env[name])
        torch.save({"state_dict": to_mmaction2_state_dict(m), "meta": {"epoch": 20}}, tmp_path / f"{name}.pth")
        convert_checkpoint(tmp_path / f"{name}.pth", tmp_path / f"{name}_conv.pt")
    span = {"start": 905, "end": 906, "render": False, "config": None}
    ours = read_result_rows(_run(env, tmp_path / "ours", **span).csv)
    raw = read_result_rows(_run(env, tmp_path / "raw", checkpoint=str(tmp_path / "nl.pth"),
                                bank_checkpoint=str(tmp_path / "base.pth"), **span).csv)
    conv = read_result_rows(_run(env, tmp_path / "conv", checkpoint=str(tmp_path / "nl_conv.pt"),
                                 bank_checkpoint=str(tmp_path / "base_conv.pt"), **span).csv)
    assert len(ours) > 0
    for other in (raw, conv):
        np.testing.assert_array_equal(other.boxes, ours.boxes)
        np.testing.assert_array_equal(other.scores, ours.scores)


def test_a_self_describing_checkpoint_needs_no_config_and_no_bank_checkpoint(env, tmp_path):
    """A model.pt that carries its meta (config + the baseline it was trained from) runs with
    `--checkpoint` alone and scores what the explicit `--config --bank-checkpoint` run scores."""
    from lfb_ray.config import config_to_dict
    from lfb_ray.data.annotations import read_result_rows
    from lfb_ray.models.card import CheckpointMeta
    from lfb_ray.models.checkpoint import read_checkpoint_file, save_checkpoint

    cfg = env["cfg"]
    # An LFB run that did not start from the baseline's weights names its bank's baseline only.
    meta = CheckpointMeta(operator="nl", epoch=1, global_step=2, selected_on="last epoch", val_map=None,
                          config=config_to_dict(cfg), bank_checkpoint=env["base"])
    path = tmp_path / "nl_meta.pt"
    save_checkpoint(read_checkpoint_file(env["nl"]), path, source="lfb_ray nl epoch 1", meta=meta)
    span = {"start": 905, "end": 906, "render": False}
    want = read_result_rows(_run(env, tmp_path / "explicit", **span).csv)
    got = read_result_rows(_run(env, tmp_path / "alone", checkpoint=str(path), config=None, bank_checkpoint=None,
                                **span).csv)
    assert len(want) > 0
    np.testing.assert_array_equal(got.boxes, want.boxes)
    np.testing.assert_array_equal(got.scores, want.scores)
