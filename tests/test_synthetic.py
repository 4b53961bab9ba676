"""Tests for the synthetic AVA-format generator: format, generative rule, cue rendering, determinism."""

import csv
import json
import pickle
import re
from pathlib import Path

import decord
import numpy as np
import pytest

from lfb_ray.synthetic import LABEL_FAMILIES, generate_dataset

VIDEOS, SECONDS, WIDTH, HEIGHT, SEED = 3, 12, 128, 96, 7
SPLITS = ("train", "val")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("syn") / "ava"
    generate_dataset(out, num_videos=VIDEOS, seconds=SECONDS, seed=SEED, width=WIDTH, height=HEIGHT)
    return out


def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def load_meta(root: Path) -> dict:
    return json.loads((root / "dataset.json").read_text())


def actors_by_video(meta: dict) -> dict[str, dict[int, dict]]:
    return {v["video_id"]: {a["person_id"]: a for a in v["actors"]} for v in meta["videos"]}


def decode(path: Path) -> np.ndarray:
    vr = decord.VideoReader(str(path))
    return vr.get_batch(range(len(vr))).asnumpy()


def test_videos_decode(dataset):
    meta = load_meta(dataset)
    assert len(meta["videos"]) == VIDEOS
    for v in meta["videos"]:
        assert re.fullmatch(r"[A-Za-z0-9_-]{11}", v["video_id"])
        vr = decord.VideoReader(str(dataset / "videos" / f"{v['video_id']}.mp4"))
        assert len(vr) == 30 * SECONDS
        assert vr.get_avg_fps() == pytest.approx(30.0)
        assert vr[0].shape == (HEIGHT, WIDTH, 3)


def test_split_by_video(dataset):
    meta = load_meta(dataset)
    train, val = set(meta["splits"]["train"]["videos"]), set(meta["splits"]["val"]["videos"])
    assert train and val and not train & val
    assert train | val == {v["video_id"] for v in meta["videos"]}
    for split, videos in (("train", train), ("val", val)):
        assert {r[0] for r in read_rows(dataset / "annotations" / f"{split}.csv")} == videos


def test_csv_and_label_map(dataset):
    pbtxt = (dataset / "annotations" / "label_map.pbtxt").read_text()
    label_ids = {int(m) for m in re.findall(r"^  id: (\d+)$", pbtxt, re.M)}
    assert len(re.findall(r'^  name: "[^"]+"$', pbtxt, re.M)) == len(label_ids)
    assert label_ids == set().union(*LABEL_FAMILIES.values())
    for split in SPLITS:
        rows = read_rows(dataset / "annotations" / f"{split}.csv")
        assert rows and all(len(r) == 8 for r in rows)
        persons: dict[tuple, list[int]] = {}
        for vid, ts, *box, action, person in rows:
            assert re.fullmatch(r"\d{4}", ts) and 902 <= int(ts) <= 900 + SECONDS - 2
            assert all(re.fullmatch(r"[01]\.\d{3}", b) for b in box)
            x1, y1, x2, y2 = map(float, box)
            assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
            assert int(action) in label_ids
            persons.setdefault((vid, ts, person, *box), []).append(int(action))
        for actions in persons.values():  # identical boxes: one label of each family
            assert sorted(actions) == sorted({next(a for a in actions if a in fam) for fam in LABEL_FAMILIES.values()})
        keyframes = {(vid, int(ts)) for vid, ts, *_ in persons}
        videos = {vid for vid, _ in keyframes}
        assert keyframes == {(v, t) for v in videos for t in range(902, 900 + SECONDS - 1)}


def test_labels_follow_generative_rule(dataset):
    meta = load_meta(dataset)
    actors = actors_by_video(meta)
    max_speed = max(
        abs(s["velocity_px_per_s"]) for v in meta["videos"] for a in v["actors"] for s in a["segments"]
    )
    for split in SPLITS:
        boxes = {}
        for vid, ts, *box, action, person in read_rows(dataset / "annotations" / f"{split}.csv"):
            actor, t, action = actors[vid][int(person)], int(ts), int(action)
            if action in LABEL_FAMILIES["long_term"]:
                assert action == actor["role_action_id"]
                continue
            if action in LABEL_FAMILIES["appearance"]:
                assert action == LABEL_FAMILIES["appearance"][actor["look"]]
                looks = [a["look"] for a in actors[vid].values()]
                assert len(set(looks)) == len(looks)  # distinct looks within a video
                continue
            (segment,) = [s for s in actor["segments"] if s["start_s"] <= t < s["end_s"]]
            assert action == segment["action_id"]
            boxes[vid, int(person), t] = (np.array(box, float), action)
        # The boxes move as labelled: the segment covers >= 1.5 s of [t-1, t+1].
        for (vid, person, t), (_, action) in boxes.items():
            if (vid, person, t - 1) not in boxes or (vid, person, t + 1) not in boxes:
                continue
            dx = (boxes[vid, person, t + 1][0][0] - boxes[vid, person, t - 1][0][0]) * WIDTH
            direction = LABEL_FAMILIES["short_term"].index(action) - 1  # left, still, right
            if direction:
                assert np.sign(dx) == direction
            else:
                assert abs(dx) <= 0.5 * max_speed + 1


def cue_pixels(frame: np.ndarray, box: np.ndarray, rgb: list[int]) -> int:
    x1, y1, x2, y2 = np.round(box * [WIDTH, HEIGHT, WIDTH, HEIGHT]).astype(int)
    crop = frame[y1:y2, x1:x2].astype(int)
    return int((np.abs(crop - rgb).max(axis=2) < 70).sum())


def test_cues_recorded_and_rendered(dataset):
    meta = load_meta(dataset)
    actors = actors_by_video(meta)
    rows = read_rows(dataset / "annotations" / "train.csv") + read_rows(dataset / "annotations" / "val.csv")
    boxes = {(vid, int(p), int(ts)): np.array(b, float) for vid, ts, *b, _, p in rows}
    for v in meta["videos"]:
        frames = decode(dataset / "videos" / f"{v['video_id']}.mp4")
        for a in v["actors"]:
            rgb = meta["role_cue_rgb"][str(a["role_action_id"])]
            assert 3 <= len(a["cue_seconds"]) <= 4
            for t in range(902, 900 + SECONDS - 1):
                count = cue_pixels(frames[30 * (t - 900)], boxes[v["video_id"], a["person_id"], t], rgb)
                area = a["width_px"] * a["height_px"]
                if t in a["cue_seconds"]:
                    assert count > 0.08 * area, (v["video_id"], a["person_id"], t)
                elif min(abs(t - c) for c in a["cue_seconds"]) >= 1:
                    assert count < 0.02 * area, (v["video_id"], a["person_id"], t)
    assert actors


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_proposals_and_excluded(dataset):
    meta = load_meta(dataset)
    for split in SPLITS:
        with open(dataset / "annotations" / f"{split}_proposals.pkl", "rb") as f:
            proposals = pickle.load(f)
        rows = read_rows(dataset / "annotations" / f"{split}.csv")
        gt_keys = {f"{r[0]},{r[1]}" for r in rows}
        assert set(proposals) < gt_keys  # some keyframes missing: whole-frame fallback
        assert set(meta["splits"][split]["proposal_keys_missing"]) == gt_keys - set(proposals)
        for key, arr in proposals.items():
            assert re.fullmatch(r"[A-Za-z0-9_-]{11},\d{4}", key)
            assert arr.dtype == np.float32 and arr.ndim == 2 and arr.shape[1] == 5
            assert np.all((arr >= 0) & (arr <= 1)) and np.all(arr[:, 2] > arr[:, 0])
        low = [k for k, a in proposals.items() if len(a) == 0 or a[:, 4].max() < 0.9]
        assert set(meta["splits"][split]["proposal_keys_below_0.9"]) <= set(low) and low
        matched = total = 0
        for vid, ts, *box, _, _ in rows[::2]:
            arr = proposals.get(f"{vid},{ts}")
            if arr is None:
                continue
            total += 1
            strong = arr[arr[:, 4] >= 0.9]
            matched += any(box_iou(np.array(box, float), p) >= 0.9 for p in strong[:, :4])
        assert matched >= 0.6 * total  # ~0.87 expected; small sample
        assert any((a[:, 4] < 0.9).any() for a in proposals.values())  # false boxes below threshold
        excluded = read_rows(dataset / "annotations" / f"{split}_excluded_timestamps.csv")
        assert excluded and all(len(r) == 2 and f"{r[0]},{r[1]}" in gt_keys for r in excluded)


def test_deterministic_and_seeded(dataset, tmp_path):
    same = tmp_path / "same"
    generate_dataset(same, num_videos=VIDEOS, seconds=SECONDS, seed=SEED, width=WIDTH, height=HEIGHT)
    files = sorted(p.relative_to(dataset) for p in dataset.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(same) for p in same.rglob("*") if p.is_file())
    for rel in files:
        if rel.suffix == ".mp4":
            assert np.array_equal(decode(dataset / rel), decode(same / rel)), rel
        else:
            assert (dataset / rel).read_bytes() == (same / rel).read_bytes(), rel
    other = tmp_path / "other"
    generate_dataset(other, num_videos=2, seconds=8, seed=SEED + 1, width=64, height=48)
    assert load_meta(other)["videos"][0]["video_id"] != load_meta(dataset)["videos"][0]["video_id"]
    assert (other / "annotations" / "train.csv").read_bytes() != (
        dataset / "annotations" / "train.csv"
    ).read_bytes()


def test_refuses_non_empty_dir(dataset):
    with pytest.raises(FileExistsError):
        generate_dataset(dataset, num_videos=2, seconds=8, seed=0, width=64, height=48)


def test_job_if_missing_skips_the_same_and_refuses_a_different_dataset(dataset, capsys):
    """README command 1 reruns the generator with --if-missing: same args do nothing; a dataset of
    other sizes (e.g. an older demo default) is a clear error, not a traceback."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("make_synthetic_ava", REPO / "jobs" / "make_synthetic_ava.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    base = ["--out", str(dataset), "--videos", str(VIDEOS), "--seconds", str(SECONDS), "--seed", str(SEED),
            "--width", str(WIDTH), "--height", str(HEIGHT), "--if-missing",
            "--val-fraction", str(load_meta(dataset)["args"]["val_fraction"])]
    assert job.main(base) == 0
    assert "already generated" in capsys.readouterr().out
    assert job.main(base[:2] + ["--videos", str(VIDEOS + 1), "--if-missing"]) == 2
    err = capsys.readouterr().err
    assert str(dataset) in err and "different synthetic dataset" in err and "--overwrite" in err


def test_actors_are_not_unique_within_the_training_set(tmp_path):
    """v1.4: an actor's size is its look's and a video's background is one of a shared pool, so
    size and background no longer make each training actor unique (an NL head learned training
    actors' roles by heart: README, issue #8; this alone did not stop it); the first frames of two
    videos with the same background agree away from the actors."""
    from lfb_ray.synthetic import BACKGROUND_POOL

    out = tmp_path / "many"
    generate_dataset(out, num_videos=12, seconds=8, seed=3, width=64, height=48, workers=1)
    meta = load_meta(out)
    size_of_look: dict[int, set] = {}
    for v in meta["videos"]:
        assert 0 <= v["background"] < BACKGROUND_POOL
        for a in v["actors"]:
            size_of_look.setdefault(a["look"], set()).add((a["width_px"], a["height_px"]))
    assert all(len(s) == 1 for s in size_of_look.values()), size_of_look
    by_bg: dict[int, list[str]] = {}
    for v in meta["videos"]:
        by_bg.setdefault(v["background"], []).append(v)
    a, b = next(vs for vs in by_bg.values() if len(vs) >= 2)[:2]
    fa, fb = (decode(out / "videos" / f"{v['video_id']}.mp4")[0].astype(int) for v in (a, b))
    free = np.ones(fa.shape[:2], bool)
    for v in (a, b):
        for actor in v["actors"]:
            y, x = actor["y_px"], actor["x0_px"]  # where the actor is at frame 0
            free[max(0, y - 2): y + actor["height_px"] + 2, max(0, x - 2): x + actor["width_px"] + 2] = False
    assert free.sum() > 0.05 * free.size
    assert np.abs(fa - fb)[free].mean() < 12  # same background up to grain and compression
    other = next(vs[0] for k, vs in by_bg.items() if k != a["background"])
    fo = decode(out / "videos" / f"{other['video_id']}.mp4")[0].astype(int)
    assert np.abs(fa - fo)[free].mean() > np.abs(fa - fb)[free].mean() + 5
