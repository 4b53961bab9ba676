"""The prepare stage on real video files: 23.976-30 fps, a late video start, variable frame rate,
undecodable frames. Every frame shows its own presentation time in pixels, so a test reads back
which frame prepare stored for each reference offset, and checks it is the frame shown nearest the
offset's time.

Time convention checked here (`lfb_ray.data.timing`): movie time = pts - the container's start time
(the earliest start of any stream), as ffmpeg (`-ss`, which cut AVA's clips) and players count it.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import tiny_config

W, H, BLOCK = 128, 96, 16  # 8 x 6 blocks of 16x16 pixels: 24 bits of time in ms + their complement
BITS = 24


def draw_ms(ms: int) -> np.ndarray:
    """[H, W, 3] uint8: bit b of `ms` and its complement as black/white 16x16 blocks (aligned to
    H.264 macroblocks and JPEG blocks, so encoding leaves them readable)."""
    bits = [(ms >> b) & 1 for b in range(BITS)]
    cells = np.array(bits + [1 - x for x in bits], np.uint8).reshape(H // BLOCK, W // BLOCK) * 255
    return np.repeat(np.kron(cells, np.ones((BLOCK, BLOCK), np.uint8))[:, :, None], 3, axis=2)


def read_ms(img: np.ndarray) -> int:
    """The time drawn by `draw_ms`, from a decoded frame; fails if the code is not intact."""
    g = img.astype(np.float32).mean(axis=2).reshape(H // BLOCK, BLOCK, W // BLOCK, BLOCK)
    bits = (g[:, 4:12, :, 4:12].mean(axis=(1, 3)) > 127).astype(int).ravel()
    assert np.array_equal(bits[BITS:], 1 - bits[:BITS]), "frame code damaged"
    return int(sum(int(b) << i for i, b in enumerate(bits[:BITS])))


def write_video(path: Path, pts_s: np.ndarray, *, rate: Fraction, audio_from: float | None = None,
                gop: int = 12) -> None:
    """An H.264 mp4 whose frame i has presentation time `pts_s[i]` (seconds) and shows it in ms.

    `audio_from`: also write a silent AAC stream starting at that pts (then the container starts
    there when it is earlier than the video). No B-frames, a keyframe every `gop` frames.
    """
    import av

    tb = Fraction(1, 90000)
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=rate)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.time_base = tb
        s.codec_context.time_base = tb
        s.options = {"crf": "16", "preset": "ultrafast", "threads": "1", "g": str(gop),
                     "x264-params": "bframes=0:scenecut=0"}
        a = c.add_stream("aac", rate=8000) if audio_from is not None else None
        for t in pts_s:
            f = av.VideoFrame.from_ndarray(draw_ms(int(round(t * 1000))), format="rgb24")
            f.pts, f.time_base = int(round(t / tb)), tb
            c.mux(s.encode(f))
        c.mux(s.encode())
        if a is not None:
            for k in range(0, int(8000 * (pts_s[-1] - audio_from + 1)), 1024):
                af = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
                af.sample_rate, af.time_base = 8000, Fraction(1, 8000)
                af.pts = k + int(round(audio_from * 8000))
                c.mux(a.encode(af))
            c.mux(a.encode())


def container_start(path: Path) -> float:
    import av

    with av.open(str(path)) as c:
        return c.start_time / 1e6


def make_dataset(root: Path, videos: dict[str, tuple[np.ndarray, dict]], keyframes: dict[str, list[int]]):
    """videos/<id>.mp4 (`write_video(pts, **kwargs)`) and an AVA-format train.csv, one box each."""
    (root / "videos").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    for vid, (pts, kw) in videos.items():
        write_video(root / "videos" / f"{vid}.mp4", pts, **kw)
    rows = [f"{vid},{t:04d},0.1,0.1,0.5,0.9,12,0" for vid, ts in keyframes.items() for t in ts]
    (root / "annotations" / "train.csv").write_text("\n".join(rows) + "\n")


def config(tmp_path: Path, root: Path, *overrides: str):
    return tiny_config(tmp_path / "work", root, "data.val_csv=", "data.train_exclusions=", "data.val_exclusions=",
                       "data.train_proposals=", "data.val_proposals=", *overrides)


def prepare(tmp_path: Path, root: Path, *overrides: str) -> tuple[dict[str, dict], str]:
    """prepare_video on every task (no Ray); {video_id: summary}, output folder."""
    from lfb_ray.data.prep import build_tasks, prepare_video

    tasks, failures = build_tasks(config(tmp_path, root, *overrides))
    assert failures == []
    out = str(tmp_path / "prepared")
    return {t.video_id: prepare_video(t, out) for t in tasks}, out


def stored_rows(out: str, vid: str) -> list[dict]:
    from lfb_ray.data.clips import decode_jpeg
    from lfb_ray.data.frames import open_frame_store

    rows = pq.read_table(Path(out) / "train" / vid / "keyframes.parquet").to_pylist()
    for r in rows:
        store = open_frame_store(out, r["frames_file"])
        r["shown_ms"] = [read_ms(decode_jpeg(store.jpeg(fr))) for fr in r["frame_rows"]]
    return rows


def check_nearest(rows: list[dict], pts_s: np.ndarray, start_second: int, zero: float) -> None:
    """Each offset's stored frame is a frame shown nearest its movie time (keyframe second - start
    + offset / 30), within half a frame of it where the video has frames on both sides."""
    movie = np.asarray(pts_s) - zero  # movie time of every frame of the file
    assert rows
    for r in rows:
        for o, shown, idx in zip(r["ref_offsets"], r["shown_ms"], r["frame_indices"], strict=True):
            target = r["timestamp"] - start_second + o / 30
            got = (shown / 1000) - zero
            best = np.abs(movie - target).min()
            assert abs(got - target) <= best + 0.0015, (
                f"keyframe {r['timestamp']} offset {o}: stored the frame shown at {got:.3f} s (index {idx}), "
                f"the nearest to {target:.3f} s is {best:.4f} s away")
            j = int(np.argmin(np.abs(movie - got)))
            assert abs(movie[j] - got) < 0.0015 and j == idx  # frame_indices names the same frame
            if movie[0] <= target <= movie[-1]:
                gap = np.diff(movie)[min(max(np.searchsorted(movie, target) - 1, 0), len(movie) - 2)]
                assert abs(got - target) <= gap / 2 + 0.0015


def cfr(rate: Fraction, seconds: float, first: float = 0.0) -> np.ndarray:
    return first + np.arange(int(seconds * rate)) / float(rate)


# --- constant frame rates, trimmed clips and full movies ----------------------------------------


@pytest.mark.parametrize("rate,layout", [
    (Fraction(24000, 1001), "trimmed"), (Fraction(24), "trimmed"), (Fraction(25), "trimmed"),
    (Fraction(30000, 1001), "trimmed"), (Fraction(30), "trimmed"),
    (Fraction(24000, 1001), "full"), (Fraction(25), "full"),
])
def test_constant_rate_stores_the_nearest_frame(tmp_path, rate, layout):
    # trimmed: AVA seconds 902.. at file time t-900 (detected: the 14 s file cannot hold second 902
    # as a full movie); full: seconds 2.. at file time t (data.video_start_second detection, < 900)
    start = 900 if layout == "trimmed" else 0
    pts = cfr(rate, 14)
    root = tmp_path / "data"
    make_dataset(root, {"v": (pts, {"rate": rate})}, {"v": list(range(start + 2, start + 14))})
    res, out = prepare(tmp_path, root)
    assert res["v"]["status"] == "done" and res["v"]["rows"] == 12, res
    check_nearest(stored_rows(out, "v"), pts, start, zero=0.0)


# --- a video stream that does not start at pts 0 ------------------------------------------------


def test_video_only_file_with_late_first_pts_counts_from_its_first_frame(tmp_path):
    """The first frame has pts 1.0 s and nothing starts earlier: ffmpeg and players show it at
    0:00, and so does decord; movie second 902 of a trimmed clip is 2 s after it."""
    rate = Fraction(25)
    pts = cfr(rate, 14, first=1.0)
    root = tmp_path / "data"
    make_dataset(root, {"v": (pts, {"rate": rate})}, {"v": list(range(902, 914))})
    assert container_start(root / "videos" / "v.mp4") == pytest.approx(1.0)
    res, out = prepare(tmp_path, root)
    assert res["v"]["status"] == "done", res
    check_nearest(stored_rows(out, "v"), pts, 900, zero=1.0)


@pytest.mark.parametrize("rate,first", [(Fraction(30000, 1001), 1.0), (Fraction(24), 0.5)])
def test_video_starting_after_the_audio_is_shifted_by_its_start(tmp_path, rate, first):
    """Audio from pts 0, video from `first`: the file starts at 0 (container start time), so the
    video's first frame is at movie time `first`, not 0 (decord alone counts from the video's own
    first frame, which would take every frame `first` seconds too late)."""
    pts = cfr(rate, 14, first=first)
    root = tmp_path / "data"
    make_dataset(root, {"v": (pts, {"rate": rate, "audio_from": 0.0})}, {"v": list(range(902, 914))})
    assert container_start(root / "videos" / "v.mp4") == pytest.approx(0.0, abs=1e-3)
    res, out = prepare(tmp_path, root)
    assert res["v"]["status"] == "done", res
    check_nearest(stored_rows(out, "v"), pts, 900, zero=0.0)


# --- variable frame rate ------------------------------------------------------------------------


def _vfr_jitter(seed: int, seconds: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    steps = rng.choice([1 / 60, 1 / 30, 1 / 30, 1 / 20, 1 / 15], size=int(seconds * 40))
    pts = np.concatenate([[0.0], np.cumsum(steps)])
    return np.round(pts[pts < seconds] * 1000) / 1000  # whole ms, as drawn


def _vfr_switch(seconds: float) -> np.ndarray:
    """24 fps for the first half, then 30 fps (a telecined film with a video-rate segment)."""
    a = np.arange(0, seconds / 2, 1 / 24)
    b = a[-1] + 1 / 24 + np.arange(0, seconds / 2, 1 / 30)
    return np.round(np.concatenate([a, b]) * 1000) / 1000


@pytest.mark.parametrize("kind", ["jitter", "switch", "jitter_late_start"])
def test_variable_rate_stores_the_frame_shown_nearest(tmp_path, kind):
    pts = _vfr_switch(16) if kind == "switch" else _vfr_jitter(0, 16)
    kw: dict = {"rate": Fraction(30)}
    if kind == "jitter_late_start":
        pts = pts + 0.7
        kw["audio_from"] = 0.0
    root = tmp_path / "data"
    make_dataset(root, {"v": (pts, kw)}, {"v": list(range(902, 915))})
    res, out = prepare(tmp_path, root)
    assert res["v"]["status"] == "done" and res["v"]["rows"] == 13, res
    check_nearest(stored_rows(out, "v"), pts, 900, zero=0.0)


# --- undecodable frames -------------------------------------------------------------------------


def _packets(path: Path) -> list[tuple[float, int, int, bool]]:
    """(pts s, file offset, size, keyframe) of every video packet, in pts order."""
    import av

    with av.open(str(path)) as c:
        st = c.streams.video[0]
        out = [(float(p.pts * st.time_base), p.pos, p.size, p.is_keyframe) for p in c.demux(st) if p.size]
    return sorted(out)


def _zero_packets(path: Path, which: list[int]) -> None:
    """Overwrite the payload of video packets `which` with zeros: decord fails on them and on the
    frames after them up to the next keyframe (they are decoded from the broken one)."""
    pk = _packets(path)
    data = bytearray(path.read_bytes())
    for i in which:
        _, pos, size, _ = pk[i]
        data[pos:pos + size] = bytes(size)
    path.write_bytes(bytes(data))


@pytest.fixture
def corrupt_dataset(tmp_path):
    """Two 16 s 25 fps videos (keyframe every second); `bad` has two broken P-frame packets."""
    rate = Fraction(25)
    pts = cfr(rate, 16)
    root = tmp_path / "data"
    seconds = list(range(902, 916))
    make_dataset(root, {"bad": (pts, {"rate": rate, "gop": 25}), "good": (pts, {"rate": rate, "gop": 25})},
                 {"bad": seconds, "good": seconds})
    broken = [163, 307]  # movie 6.52 s and 12.28 s; P-frames (keyframes at multiples of 25)
    assert not any(_packets(root / "videos" / "bad.mp4")[i][3] for i in broken)
    _zero_packets(root / "videos" / "bad.mp4", broken)
    # frames decoded from a broken packet: from it to the next keyframe
    lost = np.concatenate([np.arange(b, (b // 25 + 1) * 25) for b in broken])
    return root, pts, seconds, broken, lost


@pytest.mark.faults
def test_undecodable_frames_cost_only_the_keyframes_that_need_them(tmp_path, corrupt_dataset):
    root, pts, seconds, broken, lost = corrupt_dataset
    res, out = prepare(tmp_path, root)
    bad = res["bad"]
    assert bad["status"] == "done" and res["good"]["status"] == "done", bad
    failed = {f["timestamp"]: f["error"] for f in bad["keyframe_failures"]}
    rows = stored_rows(out, "bad")
    assert sorted(failed) + [r["timestamp"] for r in rows] != [] and len(failed) + len(rows) == len(seconds)
    window = {t: (t - 900 + np.arange(-40, 24) / 30) for t in seconds}  # every stored offset's time
    needs = {t: np.round(window[t] * 25).astype(int) for t in seconds}  # their frames at 25 fps
    must_drop = {t for t in seconds if np.isin(broken, needs[t]).any()}  # needs a broken packet's frame
    may_drop = {t for t in seconds if np.isin(lost, needs[t]).any()}  # needs a frame decoded from one
    assert must_drop <= set(failed) <= may_drop, (sorted(failed), sorted(must_drop), sorted(may_drop))
    assert len(failed) < len(seconds) // 2  # most of the video survives
    for err in failed.values():
        assert "cannot be decoded" in err and "bad.mp4" in err and "frames " in err, err
    check_nearest(rows, pts, 900, zero=0.0)  # the kept keyframes are complete and right
    assert res["good"]["keyframe_failures"] == [] and res["good"]["rows"] == len(seconds)
    # the store holds no frame that only a dropped keyframe needed
    from lfb_ray.data.frames import open_frame_store

    store = open_frame_store(out, rows[0]["frames_file"])
    assert store.num_frames == len({i for r in rows for i in r["frame_indices"]})

    # the job's failure report names each lost keyframe with its video and second
    from lfb_ray.config import resolve_paths
    from lfb_ray.data.prep import PrepareError, _finish

    cfg = resolve_paths(config(tmp_path, root, f"data.prepared_dir={out}"))
    with pytest.raises(PrepareError, match=r"1 video\(s\) failed \(1 of them lost only some keyframes") as e:
        _finish(cfg, out, list(res.values()), [], 0.0)
    report = json.loads((Path(out) / "failures.json").read_text())
    assert {(f["video_id"], f["timestamp"]) for f in report} == {("bad", t) for t in failed}
    assert all(f["split"] == "train" and f["path"].endswith("bad.mp4") for f in report)
    for t in failed:
        assert f"train/bad keyframe {t}: frames " in str(e.value)
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    assert {v["video_id"]: v["rows"] for v in manifest["videos"]} == {"bad": len(rows), "good": len(seconds)}
    cfg1 = resolve_paths(config(tmp_path, root, f"data.prepared_dir={out}", "data.failure_budget=1"))
    assert len(_finish(cfg1, out, list(res.values()), [], 0.0).failures) == len(failed)


@pytest.mark.faults
def test_a_resumed_run_reports_the_lost_keyframes_again(tmp_path, corrupt_dataset):
    root, *_ = corrupt_dataset
    first, _ = prepare(tmp_path, root)
    again, _ = prepare(tmp_path, root)
    assert again["bad"]["status"] == "skipped"
    assert again["bad"]["keyframe_failures"] == first["bad"]["keyframe_failures"] != []


@pytest.mark.faults
def test_lost_keyframes_keep_their_video_in_the_bank_coverage(tmp_path, corrupt_dataset):
    """failures.json entries of single keyframes do not remove the video from the bank's list."""
    from lfb_ray.bank.coverage import split_videos
    from lfb_ray.config import resolve_paths
    from lfb_ray.data.prep import _finish

    root, *_ = corrupt_dataset
    res, out = prepare(tmp_path, root)
    cfg = resolve_paths(config(tmp_path, root, f"data.prepared_dir={out}", "data.failure_budget=1"))
    assert len(_finish(cfg, out, list(res.values()), [], 0.0).failures) > 0
    assert split_videos(cfg, "train") == ["bad", "good"]


@pytest.mark.faults
def test_a_video_broken_everywhere_still_fails_as_a_whole(tmp_path):
    """Today's behaviour for a whole bad video stays: truncated files and files whose frames all
    fail to decode are failed videos with the same messages, not a pile of keyframe failures."""
    rate = Fraction(25)
    pts = cfr(rate, 14)
    root = tmp_path / "data"
    make_dataset(root, {v: (pts, {"rate": rate}) for v in ("cut", "dead", "rotten")},
                 {v: list(range(902, 914)) for v in ("cut", "dead", "rotten")})
    p = root / "videos" / "cut.mp4"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
    _zero_packets(root / "videos" / "dead.mp4", list(range(1, len(pts))))  # only frame 0 is intact
    _zero_packets(root / "videos" / "rotten.mp4", list(range(40, len(pts))))  # broken from 1.6 s on
    res, out = prepare(tmp_path, root)
    assert res["cut"]["status"] == "failed" and "cannot open as a video" in res["cut"]["error"]
    assert res["dead"]["status"] == "failed" and "corrupt" in res["dead"]["error"], res["dead"]
    rotten = res["rotten"]
    assert rotten["status"] == "failed" and not rotten.get("keyframe_failures"), rotten
    # decord's read-ahead thread meets the broken packets either while the video is opened (frame 0
    # and the timing probe) or while its frames are decoded, depending on thread timing: both fail
    # the whole video, naming it, as truncated or corrupt.
    assert "rotten.mp4" in rotten["error"] and "corrupt" in rotten["error"], rotten
    assert ("decoding frames" in rotten["error"] and "(truncated or corrupt video?)" in rotten["error"]) or \
        "cannot open as a video (truncated, corrupt or not a video file)" in rotten["error"], rotten
    assert not any((Path(out) / "train" / v).exists() for v in ("cut", "dead", "rotten"))
