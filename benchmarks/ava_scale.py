"""The prepared format at AVA size: storage, bytes read per clip, prepare cost and loader speed.

Input: synthetic AVA-format videos at AVA's stored resolution (456x256, 30 fps) and length (15
minutes = 897 keyframes each at the default size), generated once under `--workdir`; temporal
jitter on, as in the seed configs. Measured in one run, each against the others:

  (v2) this code's format: `prepare_video` (frame store + keyframe table), in-process;
  (v1) the previous format, every keyframe row holding its own 64 JPEGs (kept here, as a writer
       only, so that the comparison stays rerunnable);
  (raw) mmaction2's route: every frame of the video extracted to a JPEG file at the same size
       (what `tools/data/ava/extract_rgb_frames_ffmpeg.sh` leaves on disk), 4 read per clip;
  (dec) one sequential decode of the frames the keyframes need, no JPEG and no writing: the floor.

Reported: bytes per keyframe on disk, bytes read per training clip (4 KiB pages of the memory map
for v2, the whole row for v1 — Parquet reads a row's `frames` value whole — and 4 whole files for
raw) against the JPEG bytes of the 4 frames the clip uses, prepare wall and CPU seconds against
(dec), train-loader clips/s per CPU core (read + JPEG decode + the train transform, 1 thread, warm
page cache) and the extrapolation of each format to AVA v2.1 (299 videos x 897 keyframes).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from benchmarks.table import Measure, cpu_count, format_table, machine_line, ratio, shown

if TYPE_CHECKING:
    from lfb_ray.data.prep_task import PrepareTask

__all__ = ["run"]

SIZES = {"quick": (2, 60), "default": (2, 900)}  # (videos, seconds per video)
AVA_KEYFRAMES = 299 * 897  # AVA v2.1: 235 train + 64 val videos, keyframes at seconds 902..1798
WIDTH, HEIGHT = 456, 256  # AVA's stored resolution (mmaction2 rawframes: short side 256)
CLIPS_TIMED = 200  # training clips per loader measurement
PAGE = 4096  # bytes of a memory page


def _config(workdir: Path, root: Path):
    from benchmarks.prepare import bench_config

    # The AVA seed recipe's data settings (configs/baseline.yaml) on the synthetic videos.
    return bench_config("baseline", workdir, root, "data.train_csv=annotations/train.csv",
                        "data.val_csv=annotations/val.csv",
                        "data.train_exclusions=annotations/train_excluded_timestamps.csv",
                        "data.val_exclusions=annotations/val_excluded_timestamps.csv",
                        "data.label_map=annotations/label_map.pbtxt",
                        "data.train_proposals=annotations/train_proposals.pkl",
                        "data.val_proposals=annotations/val_proposals.pkl",
                        f"data.prepared_dir={workdir / 'v2'}")


def _dataset(workdir: Path, videos: int, seconds: int) -> Path:
    from lfb_ray.synthetic import dataset_matches, generate_dataset

    root = workdir / f"ava_like_{videos}x{seconds}_{WIDTH}x{HEIGHT}"
    if not dataset_matches(root, num_videos=videos, seconds=seconds, seed=0):
        with Measure() as m:
            generate_dataset(root, num_videos=videos, seconds=seconds, seed=0, width=WIDTH, height=HEIGHT,
                             overwrite=True, workers=min(cpu_count(), videos))
        print(f"generated {videos} videos x {seconds} s at {WIDTH}x{HEIGHT} in {shown(root)} ({m.wall_s:.0f} s)", flush=True)
    return root


_PLANS: dict[str, dict] = {}


def _plan(task: PrepareTask) -> dict:
    """`prep`'s decode plan of a video (stored size, frame indices per keyframe), computed once."""
    from benchmarks.prepare import _video_plan

    if task.path not in _PLANS:
        _PLANS[task.path] = _video_plan(task)
    return _PLANS[task.path]


# --- (v1) the previous format: 64 JPEGs inside every keyframe row


def _write_v1(task: PrepareTask, out: Path) -> tuple[int, int]:
    """The v1 prepare of one video (16 keyframes decoded together, each unique frame of a chunk
    encoded once, every row storing its own copies, 256 rows per Parquet part). Returns (rows, bytes)."""
    import decord
    import pyarrow as pa
    import pyarrow.parquet as pq

    from benchmarks.prepare import v1_schema
    from lfb_ray.data.clips import encode_jpeg

    s, plan = task.settings, _plan(task)
    vr = decord.VideoReader(task.path, width=plan["w"], height=plan["h"], num_threads=1)
    rows, parts, nbytes = [], 0, 0
    out.mkdir(parents=True, exist_ok=True)
    idx = plan["frame_idx"]
    for c0 in range(0, len(idx), 16):
        chunk = idx[c0:c0 + 16]
        needed = np.unique(chunk)
        decoded = vr.get_batch(needed.tolist()).asnumpy()
        jpeg = {int(i): encode_jpeg(decoded[j], s.jpeg_quality) for j, i in enumerate(needed)}
        for k, fidx in enumerate(chunk):
            kf = task.keyframes[c0 + k]
            uniq, slot = np.unique(fidx, return_inverse=True)
            rows.append({"video_id": task.video_id, "timestamp": int(kf.timestamp),
                         "ref_offsets": plan["offsets"].astype(np.int16).tolist(),
                         "frame_slot": slot.astype(np.int16).tolist(), "frame_indices": uniq.astype(np.int32).tolist(),
                         "frames": [jpeg[int(i)] for i in uniq], "gt_boxes": kf.gt_boxes,
                         "gt_labels": kf.gt_labels, "proposals": kf.proposals})
        while len(rows) >= 256 or (rows and c0 + 16 >= len(idx)):
            path = out / f"part-{parts:05d}.parquet"
            pq.write_table(pa.Table.from_pylist(rows[:256], schema=v1_schema()), path, compression="none")
            nbytes += path.stat().st_size
            parts, rows = parts + 1, rows[256:]
    return len(idx), nbytes


# --- (raw) mmaction2's rawframes


def _write_rawframes(task: PrepareTask, out: Path) -> tuple[int, int]:
    """Every frame of the video as img_%05d.jpg at the stored size. Returns (files, bytes)."""
    import decord
    from PIL import Image

    s, plan = task.settings, _plan(task)
    vr = decord.VideoReader(task.path, width=plan["w"], height=plan["h"], num_threads=1)
    out.mkdir(parents=True, exist_ok=True)
    n, nbytes = len(vr), 0
    for c0 in range(0, n, 128):
        frames = vr.get_batch(list(range(c0, min(n, c0 + 128)))).asnumpy()
        for j, f in enumerate(frames):
            path = out / f"img_{c0 + j + 1:05d}.jpg"
            Image.fromarray(f).save(path, format="JPEG", quality=s.jpeg_quality)
            nbytes += path.stat().st_size
    return n, nbytes


def _sequential_decode(tasks: list[PrepareTask]) -> int:
    from benchmarks.prepare import _sequential_decode as seq

    return seq(tasks)


# --- readers: one training clip each, 1 thread


def _clip_requests(tasks: list[PrepareTask], cfg, count: int) -> list[tuple[int, int, np.ndarray]]:
    """(task index, keyframe index, the 4 jittered reference offsets' positions) of `count` random clips."""
    from lfb_ray.data.clips import ClipSpec, pick_clip_frames

    spec = ClipSpec.from_config(cfg.data)
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        t = int(rng.integers(len(tasks)))
        k = int(rng.integers(len(tasks[t].keyframes)))
        out.append((t, k, pick_clip_frames(_plan(tasks[t])["offsets"], spec, rng)))
    return out


def _transform(frames: np.ndarray, cfg, rng) -> np.ndarray:
    from lfb_ray.data.clips import ClipSpec, train_transform

    clip, _ = train_transform(frames, np.array([[0.2, 0.2, 0.6, 0.9]], np.float32), ClipSpec.from_config(cfg.data), rng)
    return clip


def _read_v2(cfg, tasks, requests) -> dict:
    import pyarrow.parquet as pq

    from lfb_ray.data.clips import decode_jpeg
    from lfb_ray.data.frames import open_frame_store

    tables = {}
    for t in {r[0] for r in requests}:
        task = tasks[t]
        tables[t] = pq.read_table(Path(cfg.prepared_dir) / task.split / task.video_id / "keyframes.parquet",
                                  columns=["frame_rows", "frames_file"]).to_pylist()
    rng = np.random.default_rng(1)
    pages = used = 0
    with Measure() as m:
        for t, k, pos in requests:
            row = tables[t][k]
            store = open_frame_store(cfg.prepared_dir, row["frames_file"])
            rows = np.asarray(row["frame_rows"], np.int64)[pos]
            frames = np.stack([decode_jpeg(store.jpeg(int(r))) for r in rows])
            _transform(frames, cfg, rng)
            used += sum(store.jpeg(int(r)).size for r in rows)
            pages += _pages_touched(store, rows)
    return {"measure": m, "read_bytes": pages * PAGE, "used_bytes": used}


def _pages_touched(store, rows: np.ndarray) -> int:
    """4 KiB pages of the frame store's mapping that reading `rows` touches (their JPEG bytes): the
    bytes a reader actually pulls from disk."""
    touched: set[int] = set()
    for r in np.unique(np.asarray(rows, dtype=np.int64)):
        buf = store.jpeg(int(r))
        touched.update(range(buf.address // PAGE, (buf.address + max(buf.size, 1) - 1) // PAGE + 1))
    return len(touched)


def _read_v1(v1_dir: Path, tasks, requests, cfg) -> dict:
    """v1 clips: the row's whole `frames` value is read (Ray Data read every row of every file each
    epoch); here the read is the file's row group, its cost spread over the rows it holds."""
    import pyarrow.parquet as pq

    from lfb_ray.data.clips import decode_jpeg

    rng = np.random.default_rng(1)
    read = 0
    files = {t: sorted((v1_dir / tasks[t].video_id).glob("*.parquet")) for t in {r[0] for r in requests}}
    with Measure() as m:
        for t, k, pos in requests:
            f = files[t][k // 256]
            pf = pq.ParquetFile(f)
            table = pf.read_row_group(0)
            row = table.slice(k % 256, 1).to_pylist()[0]
            slots = np.asarray(row["frame_slot"], np.int64)[pos]
            frames = np.stack([decode_jpeg(row["frames"][s]) for s in slots])
            _transform(frames, cfg, rng)
            read += sum(len(b) for b in row["frames"])
    # the row-group read of 256 rows per clip overstates v1's CPU: subtract all but 1/256 of it
    with Measure() as rg:
        for t, k, _ in requests:
            pq.ParquetFile(files[t][k // 256]).read_row_group(0)
    return {"measure": m, "read_group": rg, "read_bytes": read}


def _read_raw(raw_dir: Path, tasks, requests, cfg) -> dict:
    from lfb_ray.data.clips import decode_jpeg

    rng = np.random.default_rng(1)
    read = 0
    with Measure() as m:
        for t, k, pos in requests:
            plan = _plan(tasks[t])
            idx = plan["frame_idx"][k][pos]
            datas = []
            for i in idx:
                with open(raw_dir / tasks[t].video_id / f"img_{int(i) + 1:05d}.jpg", "rb") as f:
                    datas.append(f.read())
            frames = np.stack([decode_jpeg(d) for d in datas])
            _transform(frames, cfg, rng)
            read += sum(-(-len(d) // 4096) * 4096 for d in datas)
    return {"measure": m, "read_bytes": read}


def run(*, quick: bool = False, workdir: str | Path = "runs/bench") -> str:
    """Run the AVA-size format benchmark; prints and returns its table."""
    from lfb_ray.data.prep import build_tasks, prepare_video

    workdir = Path(workdir).resolve()
    videos, seconds = SIZES["quick" if quick else "default"]
    print(machine_line(), flush=True)
    load0 = os.getloadavg()[0]
    root = _dataset(workdir, videos, seconds)
    work = workdir / "ava_scale_bench"
    shutil.rmtree(work, ignore_errors=True)
    cfg = _config(work, root)
    tasks, failures = build_tasks(cfg)
    if failures:
        raise RuntimeError(f"AVA-size benchmark input is incomplete: {failures}")
    keyframes = sum(len(t.keyframes) for t in tasks)
    for t in tasks:  # decode plans once (they probe the video), outside the timed sections
        _plan(t)

    with Measure() as seq:
        seq_frames = _sequential_decode(tasks)
    with Measure() as v2:
        v2_bytes = 0
        for task in tasks:
            r = prepare_video(task, str(work / "v2"))
            assert r["status"] == "done", r
            v2_bytes += r["bytes"]
    with Measure() as v1:
        v1_bytes = sum(_write_v1(t, work / "v1" / t.video_id)[1] for t in tasks)
    with Measure() as raw:
        raw_files, raw_bytes = 0, 0
        for t in tasks:
            n, b = _write_rawframes(t, work / "raw" / t.video_id)
            raw_files, raw_bytes = raw_files + n, raw_bytes + b
    v2_frames = int(sum(len(np.unique(_plan(t)["frame_idx"])) for t in tasks))

    requests = _clip_requests(tasks, cfg, CLIPS_TIMED)
    r2 = _read_v2(cfg, tasks, requests)
    r1 = _read_v1(work / "v1", tasks, requests, cfg)
    rr = _read_raw(work / "raw", tasks, requests, cfg)
    n = len(requests)
    used = r2["used_bytes"] / n
    v1_cpu = r1["measure"].cpu_s - r1["read_group"].cpu_s * (1 - 1 / 256)  # one row's share of its group read
    load1 = os.getloadavg()[0]

    def tb(per_kf: float) -> str:
        return f"{per_kf * AVA_KEYFRAMES / 1e12:.3f}"

    def core_h(cpu_s: float) -> str:
        return f"{cpu_s / keyframes * AVA_KEYFRAMES / 3600:.1f}"

    rows = [
        ["(v2) frame store + keyframe table", v2_bytes / keyframes / 1e6, r2["read_bytes"] / n / 1e3,
         ratio(r2["read_bytes"] / n, used), v2.wall_s, v2.cpu_s, ratio(v2.cpu_s, seq.cpu_s),
         n / r2["measure"].cpu_s, tb(v2_bytes / keyframes), core_h(v2.cpu_s)],
        ["(v1) 64 JPEGs in every keyframe row", v1_bytes / keyframes / 1e6, r1["read_bytes"] / n / 1e3,
         ratio(r1["read_bytes"] / n, used), v1.wall_s, v1.cpu_s, ratio(v1.cpu_s, seq.cpu_s),
         n / v1_cpu, tb(v1_bytes / keyframes), core_h(v1.cpu_s)],
        ["(raw) mmaction2 rawframes, all frames", raw_bytes / keyframes / 1e6, rr["read_bytes"] / n / 1e3,
         ratio(rr["read_bytes"] / n, used), raw.wall_s, raw.cpu_s, ratio(raw.cpu_s, seq.cpu_s),
         n / rr["measure"].cpu_s, tb(raw_bytes / keyframes), core_h(raw.cpu_s)],
        ["(dec) sequential decode of needed frames", "-", "-", "-", seq.wall_s, seq.cpu_s, "x1.00", "-", "-",
         core_h(seq.cpu_s)],
    ]
    notes = [
        f"bytes per keyframe v2 / v1: {ratio(v2_bytes, v1_bytes)} (target <= x0.5); v2 / rawframes: "
        f"{ratio(v2_bytes, raw_bytes)} (target <= x1.0)",
        f"bytes read per clip / JPEG bytes of its 4 frames ({used / 1e3:.1f} kB): v2 {ratio(r2['read_bytes'] / n, used)} "
        f"(target <= x1.25), v1 {ratio(r1['read_bytes'] / n, used)}",
        f"prepare CPU v2 / sequential decode: {ratio(v2.cpu_s, seq.cpu_s)} (target <= x1.5); v2 / v1: "
        f"{ratio(v2.cpu_s, v1.cpu_s)}; wall v2 / decode {ratio(v2.wall_s, seq.wall_s)}",
        f"frames decoded: sequential {seq_frames}, v2 stored {v2_frames} (each once), rawframes {raw_files} "
        f"(every frame of the videos); keyframes {keyframes}",
        f"loader clips/s per core = {n} random jittered training clips: read + 4 JPEG decodes + rescale/crop, "
        f"1 thread, warm page cache (v1: its row group's read counted at 1/256 per clip)",
        f"AVA v2.1 = {AVA_KEYFRAMES} keyframes: TB and prepare core-hours scale the per-keyframe numbers",
        f"load average {load0:.1f} at start, {load1:.1f} at end",
    ]
    table = format_table(
        f"[ava-scale] {videos} synthetic videos x {seconds} s at {WIDTH}x{HEIGHT}, 30 fps, jitter on, "
        f"JPEG q{cfg.data.jpeg_quality}, stored at the source size (data.short_side {cfg.data.short_side})",
        ["format", "MB/keyframe", "kB read/clip", "read / used", "prepare wall s", "prepare CPU s",
         "CPU vs (dec)", "clips/s/core", "AVA v2.1 TB", "AVA core-h"],
        rows, notes)
    print(table, flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return table
