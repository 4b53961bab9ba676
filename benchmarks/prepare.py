"""Benchmark of the prepare stage against the decoder limit and a naive per-keyframe loader.

On a synthetic set (generated once into the work folder, then reused) it measures, in one run:
  (a) the prepare job (Ray Data, one task per video) with N = all CPUs, and (d) with 1 CPU (not at
      `--quick`), each in its own subprocess with its own local Ray cluster (`ray.init(num_cpus=...)`);
  (e) the job's per-video function `prepare_video` called in-process, one video after another;
  (b) one in-process, single-thread, in-order decode of every needed frame (decord, resized as the
      job does; no JPEG, no writing): the decoder limit;
  (c) a naive loader: one fresh `get_batch` per keyframe of that keyframe's stored frames, with the
      same JPEG + Parquet work as the job, and decode-only; plus the 4-frame train-time variant.
Also the data-generation helpers the other benchmarks reuse (`synthetic_root`, `prepared_config`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from benchmarks.table import Measure, cpu_count, format_table, machine_line, ratio, shown
from lfb_ray.config import Config, load_config, resolve_paths

if TYPE_CHECKING:
    from lfb_ray.data.prep_task import PrepareTask

__all__ = ["bench_config", "main_child", "prepared_config", "run", "synthetic_root", "v1_schema"]

REPO = Path(__file__).resolve().parents[1]
SIZES = {"quick": (3, 20), "default": (8, 60)}  # (videos, seconds per video)
RESULT_PREFIX = "BENCH_RESULT "


def synthetic_root(workdir: str | Path, *, videos: int, seconds: int, seed: int = 0) -> Path:
    """The synthetic AVA set of this size under `workdir`, generated on first use and then reused."""
    from lfb_ray.synthetic import dataset_matches, generate_dataset

    root = Path(workdir) / f"synthetic_{videos}x{seconds}_seed{seed}"
    if not dataset_matches(root, num_videos=videos, seconds=seconds, seed=seed):
        with Measure() as m:
            generate_dataset(root, num_videos=videos, seconds=seconds, seed=seed, overwrite=True,
                             workers=min(cpu_count(), videos))
        print(f"generated {videos} synthetic videos x {seconds} s in {shown(root)} ({m.wall_s:.0f} s)", flush=True)
    return root


def v1_schema():
    """The Arrow schema of the v1 prepared rows (each keyframe row carrying its own JPEG frames): the
    format the v2 frame stores replaced, kept here as the baseline of `prepare` and `ava-scale`."""
    import pyarrow as pa

    return pa.schema([("video_id", pa.string()), ("timestamp", pa.int32()), ("ref_offsets", pa.list_(pa.int16())),
                      ("frame_slot", pa.list_(pa.int16())), ("frame_indices", pa.list_(pa.int32())),
                      ("frames", pa.list_(pa.binary())), ("gt_boxes", pa.list_(pa.float32())),
                      ("gt_labels", pa.list_(pa.uint8())), ("proposals", pa.list_(pa.float32()))])


def bench_config(config: str, workdir: str | Path, data_root: str | Path, *overrides: str) -> Config:
    """`configs/<config>.yaml` pointed at `data_root`, writing under `workdir`, MLflow off."""
    return resolve_paths(load_config(REPO / "configs" / f"{config}.yaml",
                                     [f"workdir={workdir}", f"data.root={data_root}", "tracking.enabled=false",
                                      *overrides]))


def prepared_config(config: str, workdir: str | Path, *, videos: int, seconds: int,
                    overrides: tuple[str, ...] = ()) -> Config:
    """A config whose prepared set exists: generate + prepare (resumable, so reruns are quick).

    Needs a running Ray cluster. The prepared folder depends only on the data settings, which
    `tiny.yaml` and `synthetic.yaml` share, so all benchmarks reuse one.
    """
    from lfb_ray.data.prep import prepare_dataset

    root = synthetic_root(workdir, videos=videos, seconds=seconds)
    cfg = bench_config(config, workdir, root, f"data.prepared_dir={Path(workdir) / f'prepared_{root.name}'}",
                       *overrides)
    summary = prepare_dataset(cfg)
    if summary.skipped < summary.videos:
        print(summary.line(), flush=True)
    return cfg


# --- the job, in a subprocess with its own Ray cluster


def main_child(spec_json: str) -> None:
    """Subprocess entry: start Ray with `num_cpus`, run each prepare config, print one JSON line."""
    import ray

    from benchmarks import start_local_ray
    from lfb_ray.data.prep import prepare_dataset

    spec = json.loads(spec_json)
    with Measure() as start:
        start_local_ray(spec["num_cpus"])

    @ray.remote(num_cpus=1)
    def warm() -> None:  # start the task workers and import what the job's tasks import
        import decord  # noqa: F401

        import lfb_ray.data.prep  # noqa: F401

    ray.get([warm.remote() for _ in range(spec["num_cpus"])])
    runs = []
    for overrides in spec["runs"]:
        cfg = bench_config("synthetic", spec["workdir"], spec["data_root"], *overrides)
        shutil.rmtree(cfg.prepared_dir, ignore_errors=True)
        with Measure(tree=True) as m:
            s = prepare_dataset(cfg)
        runs.append({"overrides": overrides, "wall_s": m.wall_s, "cpu_s": m.cpu_s, "keyframes": s.keyframes,
                     "bytes": s.bytes, "videos": s.videos})
    ray.shutdown()
    print(RESULT_PREFIX + json.dumps({"num_cpus": spec["num_cpus"], "ray_start_s": start.wall_s, "runs": runs}),
          flush=True)


def _run_job(num_cpus: int, workdir: Path, data_root: Path, runs: list[list[str]]) -> dict:
    spec = {"num_cpus": num_cpus, "workdir": str(workdir), "data_root": str(data_root), "runs": runs}
    code = "import sys; from benchmarks.prepare import main_child; main_child(sys.argv[1])"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=1800)
    for line in out.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError(f"prepare job with {num_cpus} CPUs failed (exit {out.returncode}):\n"
                       f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


# --- the in-process baselines


def _video_plan(task: PrepareTask) -> dict:
    """What `prep_video._decode_and_write` decides for one video: size, frame indices per keyframe."""
    import decord

    from lfb_ray.data.decode import stored_size
    from lfb_ray.data.timing import detect_video_start, frame_indices_for, stored_ref_offsets

    s = task.settings
    probe = decord.VideoReader(task.path, num_threads=1)
    num_frames, fps = len(probe), float(probe.get_avg_fps())
    oh, ow = probe[0].shape[:2]
    del probe
    timestamps = np.array([k.timestamp for k in task.keyframes], dtype=np.int64)
    start = detect_video_start(s.video_start_second, duration_s=num_frames / fps,
                               max_timestamp=int(timestamps.max()), video=task.path)
    h, w = stored_size(oh, ow, s.short_side)
    offsets = stored_ref_offsets(s.clip_frames, s.frame_interval,
                                 tuple(s.jitter) if s.jitter else None)
    idx = frame_indices_for(timestamps, offsets, video_start_second=start, native_fps=fps,
                            num_frames=num_frames, reference_fps=s.reference_fps)
    return {"h": h, "w": w, "oh": oh, "ow": ow, "fps": fps, "start": start, "num_frames": num_frames,
            "offsets": offsets, "frame_idx": idx, "timestamps": timestamps}


def _sequential_decode(tasks: list[PrepareTask]) -> int:
    """(b): every needed frame of each video exactly once, in order; returns frames decoded."""
    import decord

    n = 0
    for task in tasks:
        plan = _video_plan(task)
        vr = decord.VideoReader(task.path, width=plan["w"], height=plan["h"], num_threads=1)
        needed = np.unique(plan["frame_idx"])
        for c0 in range(0, len(needed), 256):  # bounded memory, still one forward pass
            n += len(vr.get_batch(needed[c0:c0 + 256].tolist()).asnumpy())
    return n


def _naive_rows(task: PrepareTask, plan: dict, k: int, fidx: np.ndarray, frames: np.ndarray, quality: int) -> dict:
    """A per-keyframe row for keyframe k holding its own JPEGs (the v1 layout of
    `benchmarks.ava_scale`; no sharing between keyframes)."""
    from lfb_ray.data.clips import encode_jpeg

    kf = task.keyframes[k]
    uniq, slot = np.unique(fidx, return_inverse=True)
    return {"video_id": task.video_id, "timestamp": int(kf.timestamp),
            "ref_offsets": plan["offsets"].astype(np.int16).tolist(),
            "frame_slot": slot.astype(np.int16).tolist(), "frame_indices": uniq.astype(np.int32).tolist(),
            "frames": [encode_jpeg(f, quality) for f in frames], "gt_boxes": kf.gt_boxes,
            "gt_labels": kf.gt_labels, "proposals": kf.proposals}


def _per_keyframe(tasks: list[PrepareTask], out_dir: Path | None, train_clip: bool = False) -> tuple[int, int]:
    """(c): a fresh `get_batch` per keyframe. With `out_dir`, also JPEG + Parquet rows of its own frames.

    `train_clip` decodes only the 4 jittered clip frames a train-time loader would read (one epoch).

    Returns:
        (frames requested from the decoder, bytes written).
    """
    import decord
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lfb_ray.data.timing import clip_ref_offsets, frame_indices_for

    rng = np.random.default_rng(0)
    n, nbytes = 0, 0
    for task in tasks:
        s = task.settings
        plan = _video_plan(task)
        vr = decord.VideoReader(task.path, width=plan["w"], height=plan["h"], num_threads=1)
        rows: list[dict] = []
        parts = 0
        for k in range(len(plan["timestamps"])):
            if train_clip:
                base = clip_ref_offsets(s.clip_frames, s.frame_interval)
                jitter = rng.integers(s.jitter[0], s.jitter[1] + 1, len(base)) if s.jitter else 0
                fidx = frame_indices_for(plan["timestamps"][k:k + 1], base + jitter,
                                         video_start_second=plan["start"], native_fps=plan["fps"],
                                         num_frames=plan["num_frames"], reference_fps=s.reference_fps)[0]
            else:
                fidx = plan["frame_idx"][k]
            uniq = np.unique(fidx)
            frames = vr.get_batch(uniq.tolist()).asnumpy()
            n += len(frames)
            if out_dir is None:
                continue
            rows.append(_naive_rows(task, plan, k, fidx, frames, s.jpeg_quality))
            last = k + 1 == len(plan["timestamps"])
            if len(rows) >= 256 or (last and rows):
                vdir = out_dir / task.split / task.video_id
                vdir.mkdir(parents=True, exist_ok=True)
                path = vdir / f"part-{parts:05d}.parquet"
                pq.write_table(pa.Table.from_pylist(rows, schema=v1_schema()), path, compression="none")
                nbytes += path.stat().st_size
                parts, rows = parts + 1, []
    return n, nbytes


def _job_frames(tasks: list[PrepareTask]) -> int:
    """Frames the job decodes: every frame any keyframe of the video needs, once."""
    return int(sum(len(np.unique(_video_plan(task)["frame_idx"])) for task in tasks))


def run(*, quick: bool = False, workdir: str | Path = "runs/bench") -> str:
    """Run the prepare benchmark; prints and returns its table."""
    from lfb_ray.data.prep import build_tasks, prepare_video

    workdir = Path(workdir).resolve()
    videos, seconds = SIZES["quick" if quick else "default"]
    print(machine_line(), flush=True)
    load0 = os.getloadavg()[0]
    root = synthetic_root(workdir, videos=videos, seconds=seconds)
    work = workdir / "prepare_bench"
    shutil.rmtree(work, ignore_errors=True)
    n_cpu = cpu_count()
    on = [f"data.prepared_dir={work / 'job_jitter'}"]
    off = [f"data.prepared_dir={work / 'job_nojitter'}", "data.temporal_jitter=false"]
    jobs = {1: _run_job(1, work, root, [on])} if n_cpu > 1 and not quick else {}  # scaling: default size only
    jobs[n_cpu] = _run_job(n_cpu, work, root, [on, off])
    tasks, _ = build_tasks(bench_config("synthetic", work, root))
    keyframes = sum(len(t.keyframes) for t in tasks)

    with Measure() as inproc:
        for task in tasks:
            assert prepare_video(task, str(work / "inprocess"))["status"] == "done"
    with Measure() as seq:
        seq_frames = _sequential_decode(tasks)
    with Measure() as naive_full:
        naive_frames, naive_bytes = _per_keyframe(tasks, work / "naive")
    with Measure() as naive_dec:
        _per_keyframe(tasks, None)
    with Measure() as train_dec:
        train_frames, _ = _per_keyframe(tasks, None, train_clip=True)
    load1 = os.getloadavg()[0]

    job = jobs[n_cpu]["runs"][0]
    rows = [[f"(a) prepare job, Ray Data, {n_cpu} CPUs", "decode+resize, JPEG, Parquet, Ray", _job_frames(tasks),
             job["wall_s"], job["cpu_s"], keyframes / job["wall_s"], "x1.00", "x1.00"]]
    if 1 in jobs:
        j1 = jobs[1]["runs"][0]
        rows.append(["(d) prepare job, Ray Data, 1 CPU", "same", _job_frames(tasks), j1["wall_s"], j1["cpu_s"],
                     keyframes / j1["wall_s"], ratio(j1["wall_s"], job["wall_s"]), ratio(j1["cpu_s"], job["cpu_s"])])
    for name, what, frames, m in (
        ("(e) the job's prepare_video, in-process", "same, 1 thread, no Ray", _job_frames(tasks), inproc),
        ("(b) sequential decode, 1 thread", "decode+resize only", seq_frames, seq),
        ("(c) per-keyframe get_batch + JPEG + write", "JPEG per keyframe row", naive_frames, naive_full),
        ("(c) per-keyframe get_batch, decode only", "decode+resize only", naive_frames, naive_dec),
        ("(c') train-time loader, 4 frames/keyframe", "decode only, one epoch", train_frames, train_dec),
    ):
        rows.append([name, what, frames, m.wall_s, m.cpu_s, keyframes / m.wall_s, ratio(m.wall_s, job["wall_s"]),
                     ratio(m.cpu_s, job["cpu_s"])])
    nojit = jobs[n_cpu]["runs"][1]
    notes = [
        f"job (a) / decoder limit (b): wall {ratio(job['wall_s'], seq.wall_s)} (target <= x1.5), "
        f"CPU {ratio(job['cpu_s'], seq.cpu_s)}; the job's own code without Ray (e) / (b): "
        f"wall {ratio(inproc.wall_s, seq.wall_s)}, CPU {ratio(inproc.cpu_s, seq.cpu_s)}",
        f"naive (c, same JPEG+write) / job (a): wall {ratio(naive_full.wall_s, job['wall_s'])} (target >= x3), "
        f"CPU {ratio(naive_full.cpu_s, job['cpu_s'])}; decode-only (c) / (b): "
        f"wall {ratio(naive_dec.wall_s, seq.wall_s)}, CPU {ratio(naive_dec.cpu_s, seq.cpu_s)}",
    ]
    if 1 in jobs:
        speedup = jobs[1]["runs"][0]["wall_s"] / job["wall_s"]
        notes.append(f"Ray scaling 1 -> {n_cpu} CPUs: speedup x{speedup:.2f}, efficiency "
                     f"{100 * speedup / n_cpu:.0f}% ({videos} videos = {videos} tasks)")
    notes += [
        f"bytes per keyframe: jitter on {job['bytes'] / max(job['keyframes'], 1) / 1e3:.1f} kB, off "
        f"{nojit['bytes'] / max(nojit['keyframes'], 1) / 1e3:.1f} kB (data.temporal_jitter=false); naive (c) wrote "
        f"{naive_bytes / max(keyframes, 1) / 1e3:.1f} kB/keyframe",
        "Ray start (not in the job rows): " + ", ".join(f"{n} CPU(s) {j['ray_start_s']:.1f} s" for n, j in jobs.items()),
        "job CPU s = the driver + Ray processes (raylet, workers); (b)/(c) are one in-process thread",
        f"frames = frames requested from decord; keyframes = {keyframes}; load average "
        f"{load0:.1f} at start, {load1:.1f} at end",
    ]
    table = format_table(
        f"[prepare] {videos} synthetic videos x {seconds} s (160x120, 30 fps, GOP 30), short side 120, "
        f"jitter on",
        ["measurement", "includes", "frames", "wall s", "CPU s", "keyframes/s", "wall vs (a)", "CPU vs (a)"],
        rows, notes)
    print(table, flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return table
