"""The prepare stage: AVA videos + annotations → per-video frame stores and keyframe tables, with Ray Data.

One Ray task per (split, video) decodes, in order and once, every frame that any keyframe's clip
can touch (`decord.VideoReader.get_batch` over sorted unique indices, in bounded chunks — never one
seek per clip), resizes them to the stored size (`stored_size`: `data.short_side`, or the source's
size when smaller), JPEG-encodes each frame once into the video's frame store and writes the
video's keyframe table (schema in `lfb_ray.data.schema`). Each video commits with a `_DONE.json`
marker written after its files, which makes the job resumable and idempotent: a rerun skips videos
whose marker matches the task (config, source file size/mtime, annotations) and redoes the rest
from scratch. A bad video is recorded in `failures.json` and skipped; a frame that cannot be decoded
costs only the keyframes whose windows need it (each recorded in `failures.json` with its
`timestamp`; the video's other keyframes are written). The job fails only when more videos than
`data.failure_budget` failed as a whole or lost keyframes. Frame times follow
`lfb_ray.data.timing` (movie time = pts minus the container's start; variable-rate files by each
frame's presentation time).

Layout under `prepared_dir`:
    manifest.json                      written last: schema version, config, per-video entries
    failures.json                      videos (and single keyframes) that could not be prepared, with reasons
    <split>/<video_id>/frames.arrow    each needed frame once (Arrow IPC, one record batch per frame)
    <split>/<video_id>/keyframes.parquet   one row per annotated keyframe, frame rows per offset
    <split>/<video_id>/_DONE.json
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lfb_ray.config import Config, resolve_paths
from lfb_ray.data import annotations as ann
from lfb_ray.data.clips import encode_jpeg
from lfb_ray.data.frames import FrameStoreWriter
from lfb_ray.data.ids import unsafe_video_id
from lfb_ray.data.integrity import check_files, file_check
from lfb_ray.data.schema import FRAMES_FILE, KEYFRAMES_FILE, SCHEMA, SCHEMA_VERSION
from lfb_ray.data.timing import FrameTimes, TimingError, detect_video_start, stored_ref_offsets
from lfb_ray.redaction import RedactedMessage, redact_text
from lfb_ray.storage import (
    exists,
    is_uri,
    join,
    join_uri,
    local_file,
    read_json,
    remove_dir,
    resolve,
    write_bytes_atomic,
    write_json_atomic,
)

__all__ = ["PrepareError", "PrepareSummary", "build_tasks", "damaged_videos", "find_videos", "prepare_dataset", "prepare_video",
           "prepared_files"]

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm")
FRAMES_PER_DECODE = 128  # frames decoded together: bounds memory, still one in-order pass


class PrepareError(RedactedMessage, RuntimeError):
    """The prepare job failed (too many bad videos, unusable output location)."""


@dataclass
class PrepareSummary:
    videos: int = 0
    skipped: int = 0
    keyframes: int = 0
    bytes: int = 0
    seconds: float = 0.0
    failures: list[dict] = field(default_factory=list)

    def line(self) -> str:
        kf = max(self.keyframes, 1)
        return (f"prepare: {self.videos} videos ({self.skipped} already done), {self.keyframes} keyframes, "
                f"{self.bytes / 1e9:.3f} GB ({self.bytes / kf / 1e3:.1f} kB/keyframe), {self.seconds:.1f} s, "
                f"{len(self.failures)} failed")


def _prep_settings(cfg: Config) -> dict:
    """The config values that change prepared bytes; part of every task's identity."""
    d = cfg.data
    return {"schema_version": SCHEMA_VERSION, "clip_frames": d.clip_frames, "frame_interval": d.frame_interval,
            "reference_fps": d.reference_fps, "jitter": [d.jitter_min, d.jitter_max] if d.temporal_jitter else None,
            "short_side": d.short_side, "jpeg_quality": d.jpeg_quality,
            "video_start_second": d.video_start_second, "max_proposals": d.max_proposals,
            "num_classes": d.num_classes}


def find_videos(videos_dir: str) -> dict[str, tuple[str, int, int]]:
    """{video id: (path or URI, size in bytes, mtime in s)} of the video files in `videos_dir`, a
    local folder or a URI (`s3://bucket/ava/videos?...`: the files are then downloaded, one at a time,
    by the task that decodes them)."""
    import pyarrow.fs as pafs

    fs, inner = resolve(videos_dir)
    if fs.get_file_info(inner).type != pafs.FileType.Directory:
        raise PrepareError(f"videos folder {videos_dir} does not exist")
    out: dict[str, tuple[str, int, int]] = {}
    infos = sorted(fs.get_file_info(pafs.FileSelector(inner)), key=lambda i: i.base_name)
    for info in infos:
        name = Path(info.base_name)  # (not os.path.splitext, for which '...mp4' has no extension)
        stem, ext = name.stem, name.suffix
        if info.type != pafs.FileType.File or ext.lower() not in VIDEO_EXTENSIONS:
            continue
        path = join_uri(videos_dir, info.base_name) if is_uri(videos_dir) else os.path.join(videos_dir, info.base_name)
        why = unsafe_video_id(stem)
        if why:  # no annotation row can name it (the readers refuse such ids): say so, skip it
            print(f"[prepare] WARNING: {redact_text(path.partition('?')[0])} skipped: {why}", flush=True)
            continue
        mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
        out.setdefault(stem, (path, int(info.size or 0), int(mtime)))
    return out


def build_tasks(cfg: Config) -> tuple[list[dict], list[dict]]:
    """Read annotations and list one task per (split, video); missing videos become failures.

    Returns:
        (tasks, failures). A task is plain JSON-able data: split, video_id, path, source
        fingerprint, keyframes with GT and proposals, and the task hash.
    """
    d = cfg.data
    videos = find_videos(cfg.data_path(d.videos_dir))
    settings = _prep_settings(cfg)
    tasks, failures = [], []
    for split, csv_path, excl_path, prop_path in (
        ("train", d.train_csv, d.train_exclusions, d.train_proposals),
        ("val", d.val_csv, d.val_exclusions, d.val_proposals),
    ):
        if not csv_path:
            continue
        keyframes = ann.read_annotations(cfg.data_path(csv_path), num_classes=d.num_classes)
        if d.max_keyframes_per_split:  # the smoke overrides: a few keyframes of each split
            keep = ann.first_keyframes(keyframes, d.max_keyframes_per_split)
            keyframes = {k: v for k, v in keyframes.items() if k in keep}
        excluded = ann.read_exclusions(cfg.data_path(excl_path)) if excl_path else set()
        proposals = ann.load_proposals(cfg.data_path(prop_path)) if prop_path else {}
        by_video: dict[str, list] = {}
        for (vid, ts), kf in keyframes.items():
            by_video.setdefault(vid, []).append((ts, kf))
        for vid, items in sorted(by_video.items()):
            if vid not in videos:
                failures.append({"split": split, "video_id": vid, "path": None,
                                 "error": f"missing video: no {vid}.mp4/.mkv/.webm in {d.videos_dir} "
                                          f"for {len(items)} annotated keyframes"})
                continue
            path, size, mtime = videos[vid]
            kfs = []
            for ts, kf in sorted(items, key=lambda x: x[0]):
                props = proposals.get((vid, ts))
                kfs.append({
                    "timestamp": ts, "excluded": (vid, ts) in excluded,
                    "gt_boxes": kf.boxes.ravel().tolist(),
                    "gt_labels": [int(x) for x in kf.labels.ravel()],
                    "gt_person_ids": [int(x) for x in kf.person_ids],
                    "proposals": (props[: d.max_proposals].ravel().tolist() if props is not None
                                  else [0.0, 0.0, 1.0, 1.0, 1.0]),
                    "proposals_missing": props is None,
                })
            task = {"split": split, "video_id": vid, "path": path,
                    "source": {"size": size, "mtime": mtime}, "keyframes": kfs,
                    "settings": settings}
            # Hashed with the file's name, not where the dataset lies: the same data read from another
            # directory (a moved project, another node's mount point) is the same task.
            task["hash"] = hashlib.sha256(json.dumps({**task, "path": Path(path).name},
                                                     sort_keys=True).encode()).hexdigest()[:16]
            tasks.append(task)
    return tasks, failures


def inputs_fingerprint(tasks: list[dict], failures: list[dict]) -> str:
    """A short hash of everything the prepare stage reads, from `build_tasks`' output: annotations,
    proposals, each video's size and mtime, the prepare settings, and the missing videos.

    Why: the pipeline skips a stage whose key is unchanged; keyed on the config alone, a dataset
    regenerated or edited in place (same paths) would keep its stale prepared rows. With this in
    the key, prepare runs again (on the same tasks: `prepare_dataset(cfg, built=...)`), and its
    per-video markers redo exactly the videos that changed.
    """
    h = hashlib.sha256()
    for t in sorted(tasks, key=lambda t: (t["split"], t["video_id"])):
        h.update(f"{t['split']}/{t['video_id']}:{t['hash']};".encode())
    h.update(json.dumps(failures, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _video_dir(root: str, split: str, vid: str) -> str:
    return join(root, split, vid)


def prepare_video(task: dict, out_uri: str, *, verify: bool = False) -> dict:
    """Decode one video and write its keyframe rows; never raises for bad input.

    A video whose marker matches the task is skipped only if its files still match the marker's
    sizes (and, with `verify`, SHA-256s: `lfb_ray.data.integrity`); otherwise it is redone, and
    the summary's `redone` says why.

    Returns:
        summary dict: video_id, split, status ("done" | "skipped" | "failed"), rows, bytes, files,
        checks, error (for failures), keyframe_failures (keyframes of a done or skipped video left
        without a row because frames of their window cannot be decoded: timestamp and error each;
        kept in the `_DONE.json` marker, so a resumed run reports them again).
    """
    fs, root = resolve(out_uri)
    base = {"video_id": task["video_id"], "split": task["split"], "path": task["path"]}
    why = unsafe_video_id(task["video_id"]) or unsafe_video_id(task["split"])
    if why:  # the readers refuse such ids; this is the last line before a path is built from one
        return {**base, "status": "failed", "error": f"PrepareError: {why}", "rows": 0, "bytes": 0, "files": [],
                "keyframe_failures": []}
    vdir = _video_dir(root, task["split"], task["video_id"])
    done_path = join(vdir, "_DONE.json")
    redone = None
    if exists(fs, done_path):
        try:
            done = read_json(fs, done_path)
        except Exception:  # unreadable marker: redo the video
            done, redone = {}, "its _DONE.json marker cannot be read"
        if done.get("hash") == task["hash"]:
            checks = done.get("checks")
            if not checks:  # a marker written before checks were recorded: trusted unless verifying
                redone = "its marker has no checksums (--verify)" if verify else None
            else:
                redone = check_files(fs, vdir, checks, checksums=verify)
            if redone is None:
                return {**base, "keyframe_failures": [], **done, "status": "skipped"}
            print(f"[prepare] {task['split']}/{task['video_id']}: prepared files damaged ({redone}): "
                  "preparing the video again", flush=True)
    remove_dir(fs, vdir, inside=root)  # partial, stale or damaged output: redo from scratch
    try:
        with local_file(task["path"]) as local:  # a video on object storage: downloaded for this task only
            rows_written, nbytes, checks, kf_failures = _decode_and_write({**task, "path": local}, fs, vdir,
                                                                          f"{task['split']}/{task['video_id']}")
    except Exception as e:
        remove_dir(fs, vdir, inside=root)
        return {**base, "status": "failed", "error": f"{type(e).__name__}: {e}", "rows": 0, "bytes": 0,
                "files": [], "keyframe_failures": []}
    done = {"hash": task["hash"], "rows": rows_written, "bytes": nbytes, "files": [KEYFRAMES_FILE, FRAMES_FILE],
            "checks": checks, "source": {"path": task["path"], **task["source"]}, "keyframe_failures": kf_failures}
    write_json_atomic(fs, done_path, done)  # after its files, which write_bytes_atomic/close fsynced
    return {**base, **done, "status": "done", **({"redone": redone} if redone else {})}


def stored_size(orig_h: int, orig_w: int, short_side: int) -> tuple[int, int]:
    """(height, width) frames are stored at: short side `data.short_side`, or the source's own size
    when that is smaller (never upsampled at prepare time; `load_config` makes sure `short_side` is
    at least the largest train-time scale, so training never upsamples stored frames either)."""
    short = min(short_side, orig_h, orig_w)
    if orig_h <= orig_w:
        return short, int(round(orig_w * short / orig_h))
    return int(round(orig_h * short / orig_w)), short


def _stream_start_shift(path: str) -> float:
    """Movie time of the video stream's first frame: its start time minus the container's (the
    earliest start of any stream), as ffmpeg and players count time; 0 when either is unknown.
    decord counts frame times from the video stream's own first frame, so this is added to them."""
    import av

    try:
        with av.open(path) as c:
            st = c.streams.video[0]
            if st.start_time is None or c.start_time is None:
                return 0.0
            return max(0.0, float(st.start_time * st.time_base) - c.start_time / 1e6)
    except Exception:  # decord opened the file; without PyAV's view, keep decord's clock
        return 0.0


def _frame_times(path: str, vr, fps: float) -> tuple[FrameTimes, float]:
    """Every frame's movie time (`lfb_ray.data.timing`), from decord's per-frame timestamps, and the
    shift from decord's clock (seconds since the video stream's first frame) to movie time."""
    n = len(vr)
    ts = np.asarray(vr.get_frame_timestamp(range(n)), dtype=np.float64).reshape(n, -1)[:, 0]
    ts = ts - ts[0] if len(ts) else ts
    shift = _stream_start_shift(path)
    return FrameTimes(ts + shift, fps), shift


def _decode_one_pyav(path: str, stream_time: float, height: int, width: int) -> np.ndarray:
    """The frame shown at `stream_time` (seconds since the video stream's first frame), decoded with
    PyAV from the keyframe before it, skipping packets the decoder refuses; RGB [height, width, 3].

    Why: decord fails a whole request when any packet it has read ahead is broken, so frames shortly
    before a broken packet are lost to it although nothing they depend on is damaged.

    Raises:
        ValueError: the frame is not produced, or it is decoded from a broken packet since the last
            keyframe (its picture would be wrong).
    """
    import av

    with av.open(path) as c:
        st = c.streams.video[0]
        st.thread_type = "NONE"
        tb = float(st.time_base)
        zero = float(st.start_time * st.time_base) if st.start_time is not None else 0.0
        target = zero + stream_time
        c.seek(int(target / tb), stream=st, backward=True, any_frame=False)
        broken = None
        for packet in c.demux(st):
            try:
                frames = packet.decode()
            except av.error.FFmpegError as e:
                broken = f"{type(e).__name__}: {e}"
                continue
            for f in frames:
                if f.key_frame:
                    broken = None
                if f.pts is None:
                    continue
                t = f.pts * tb
                if abs(t - target) < 2e-3:
                    if broken:
                        raise ValueError(f"decoded from a broken packet before it ({broken})")
                    return f.to_ndarray(format="rgb24", width=width, height=height)
                if t > target:
                    raise ValueError(f"no frame at {stream_time:.3f} s (next one at {t - zero:.3f} s)")
    raise ValueError(f"no frame at {stream_time:.3f} s (end of stream)")


def _short_error(e: BaseException) -> str:
    """One line of an exception: decord's messages are multi-line C++ traces."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith("Stack trace")]
    text = lines[0] if lines else ""
    return f"{type(e).__name__}: {text[:300]}"


def _decode_frames(open_reader, frames: np.ndarray, path: str, fallback):
    """Decode `frames` (sorted unique indices) in order, in chunks of FRAMES_PER_DECODE, with decord.

    A chunk that fails is split in halves down to single frames; a single frame that fails is
    decoded by `fallback(index)` (PyAV) instead, and recorded as undecodable when that fails too.
    The decord reader is opened afresh after a failure (a failed decode can leave it failing the
    next request). Yields (frame index, [h, w, 3] array or None, error or None) in frame order.

    Raises:
        ValueError: more than max(FRAMES_PER_DECODE, a quarter of `frames`) frames are undecodable:
            the video is broken as a whole, not in a few places (and bisecting all of it would cost
            a decode per frame).
    """
    state = {"vr": open_reader(), "failed": 0}
    limit = max(FRAMES_PER_DECODE, len(frames) // 4)

    def run(chunk: np.ndarray):
        try:
            decoded = state["vr"].get_batch(chunk.tolist()).asnumpy()  # [n, h, w, 3], in order
        except Exception as e:  # decord raises its own error types
            if len(chunk) > 1:
                mid = len(chunk) // 2
                yield from run(chunk[:mid])
                yield from run(chunk[mid:])
                return
            state["vr"] = open_reader()
            i = int(chunk[0])
            try:
                yield i, fallback(i), None
            except Exception as e2:
                state["failed"] += 1
                if state["failed"] > limit:
                    raise ValueError(f"{path}: decoding frames failed at frame {i} and {limit} other frames "
                                     f"(truncated or corrupt video?): {_short_error(e)}") from e
                yield i, None, f"{_short_error(e2)} (decord: {_short_error(e)})"
            return
        for j, i in enumerate(chunk):
            yield int(i), decoded[j], None

    for c0 in range(0, len(frames), FRAMES_PER_DECODE):
        yield from run(frames[c0:c0 + FRAMES_PER_DECODE])


def _compact_store(fs, path: str, keep: np.ndarray) -> dict:
    """Rewrite the frame store at `path` with only the frames in `keep` (sorted frame indices), after
    keyframes were dropped; returns its new {size, sha256}. Copies JPEG bytes, decodes nothing."""
    import pyarrow.ipc as ipc

    with fs.open_input_file(path) as fh:
        table = ipc.open_file(fh).read_all()
    index = table.column("frame_index").to_numpy()
    writer = FrameStoreWriter(fs, path)
    try:
        jpegs = table.column("jpeg")
        for row in np.flatnonzero(np.isin(index, keep)):
            writer.add(int(index[row]), jpegs[int(row)].as_py())
        writer.close()
        return writer.check
    except BaseException:
        writer.abort()
        raise


def _decode_and_write(task: dict, fs, vdir: str, rel_dir: str) -> tuple[int, int, dict[str, dict], list[dict]]:
    """Decode every frame the video's keyframes can touch once, in order, into the frame store, and
    write the keyframe table that refers to it.

    A frame that cannot be decoded costs the keyframes whose windows hold it, not the video: they get
    no row and are returned as keyframe failures. Returns (rows, bytes written, {file name: {size,
    sha256}} of the files written (`lfb_ray.data.integrity`), keyframe failures: dicts with
    timestamp and error).
    """
    import decord

    s = task["settings"]
    path = task["path"]
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: empty file (0 bytes)")
    try:
        probe = decord.VideoReader(path, num_threads=1)
        num_frames, fps = len(probe), float(probe.get_avg_fps())
        oh, ow = probe[0].shape[:2]
        times, shift = _frame_times(path, probe, fps) if num_frames > 0 and fps > 0 else (None, 0.0)
        del probe
    except Exception as e:
        raise ValueError(f"{path}: cannot open as a video (truncated, corrupt or not a video file): {e}") from e
    if num_frames <= 0 or fps <= 0 or times is None:
        raise ValueError(f"{path}: no frames or unknown fps")
    timestamps = np.array([k["timestamp"] for k in task["keyframes"]], dtype=np.int64)
    start = detect_video_start(s["video_start_second"], duration_s=times.duration,
                               max_timestamp=int(timestamps.max()), video=path)
    h, w = stored_size(oh, ow, s["short_side"])

    def open_reader():
        return (decord.VideoReader(path, num_threads=1) if (h, w) == (oh, ow)
                else decord.VideoReader(path, width=w, height=h, num_threads=1))

    offsets = stored_ref_offsets(s["clip_frames"], s["frame_interval"],
                                 tuple(s["jitter"]) if s["jitter"] else None)
    frame_idx = times.indices(timestamps, offsets, video_start_second=start,
                              reference_fps=s["reference_fps"])  # [K, O]
    # Each keyframe's own time must lie in the video; clipping is only for the clip's edge frames. A
    # keyframe before the start (second 1 of a clip that starts at 900) or past the end would
    # otherwise become a clip of the first or last frame repeated: it gets no row and is reported.
    centre = times.indices(timestamps, np.zeros(1, np.int64), video_start_second=start,
                           reference_fps=s["reference_fps"], clip=False)[:, 0]
    file_time = timestamps - start
    before, after = file_time < 0, centre >= num_frames
    kept = ~(before | after)
    kf_failures: list[dict] = [
        {"timestamp": int(t), "error": (
            f"keyframe second {int(t)} is {'before the start' if b else 'past the end'} of {path}: file time "
            f"{int(ft)} s with the video starting at movie second {start} (data.video_start_second="
            f"{s['video_start_second']}), and the video is {times.duration:.1f} s long; the keyframe has no row")}
        for t, ft, b, a in zip(timestamps, file_time, before, after) if b or a]
    if not kept.any():
        raise TimingError(f"{path}: every annotated keyframe lies outside the video (seconds "
                          f"{int(timestamps.min())}-{int(timestamps.max())}, video start {start}, "
                          f"{times.duration:.1f} s long)")
    needed = np.unique(frame_idx[kept])  # each frame once, however many keyframe windows share it
    store_path = join(vdir, FRAMES_FILE)
    writer = FrameStoreWriter(fs, store_path)
    bad: dict[int, str] = {}
    try:
        def fallback(i: int) -> np.ndarray:
            return _decode_one_pyav(path, float(times.times[i]) - shift, h, w)

        for i, frame, err in _decode_frames(open_reader, needed, path, fallback):
            if frame is None:
                bad[i] = err
            else:
                writer.add(i, encode_jpeg(frame, s["jpeg_quality"]))
        writer.close()
        frames_check = writer.check
    except BaseException:
        writer.abort()
        raise
    if bad:
        bad_idx = np.array(sorted(bad), dtype=np.int64)
        for k in np.flatnonzero(kept):
            hit = np.intersect1d(frame_idx[k], bad_idx)
            if len(hit):
                kept[k] = False
                kf_failures.append({"timestamp": int(timestamps[k]), "error": (
                    f"frames {_ranges(hit)} of {path} (movie time {_ranges_s(hit, times)}) cannot be decoded: "
                    f"{bad[int(hit[0])]}; the keyframe's clip window needs them, so it has no row")})
        if not kept.any():
            raise ValueError(f"{path}: decoding frames failed for every keyframe (truncated or corrupt video?): "
                             f"{len(bad)} undecodable frames {_ranges(bad_idx)}: {bad[int(bad_idx[0])]}")
        stored = np.setdiff1d(needed, bad_idx)
        keep = np.unique(frame_idx[kept])
        if len(keep) < len(stored):  # frames only the dropped keyframes used: not kept
            frames_check = _compact_store(fs, store_path, keep)
        needed = keep
    rows_of = np.searchsorted(needed, frame_idx).astype(np.int32)  # [K, O] rows in the store
    n_classes = s["num_classes"]
    rows: list[dict] = []
    for k, kf in enumerate(task["keyframes"]):
        n_gt = len(kf["gt_person_ids"])
        if len(kf["gt_labels"]) != n_gt * n_classes:
            raise ValueError(f"{path}: keyframe {kf['timestamp']} has {len(kf['gt_labels'])} label values "
                             f"for {n_gt} boxes x {n_classes} classes")
        if not kept[k]:
            continue
        rows.append({
            "video_id": task["video_id"], "timestamp": int(kf["timestamp"]), "split": task["split"],
            "excluded": bool(kf["excluded"]), "ref_offsets": offsets.astype(np.int16).tolist(),
            "frame_rows": rows_of[k].tolist(), "frame_indices": frame_idx[k].astype(np.int32).tolist(),
            "frames_file": f"{rel_dir}/{FRAMES_FILE}", "height": h, "width": w, "orig_height": oh,
            "orig_width": ow, "fps": fps, "num_gt": n_gt, "gt_boxes": kf["gt_boxes"],
            "gt_labels": kf["gt_labels"], "gt_person_ids": kf["gt_person_ids"],
            "num_proposals": len(kf["proposals"]) // 5, "proposals": kf["proposals"],
            "proposals_missing": bool(kf["proposals_missing"]),
        })
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), buf)
    table = buf.getvalue()
    write_bytes_atomic(fs, join(vdir, KEYFRAMES_FILE), table)
    checks = {KEYFRAMES_FILE: file_check(table), FRAMES_FILE: frames_check}
    return len(rows), frames_check["size"] + len(table), checks, kf_failures


def _ranges(idx: np.ndarray) -> str:
    """'100-107, 200' for sorted frame indices."""
    out, i = [], 0
    idx = [int(x) for x in idx]
    while i < len(idx):
        j = i
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        out.append(f"{idx[i]}" if i == j else f"{idx[i]}-{idx[j]}")
        i = j + 1
    return ", ".join(out)


def _ranges_s(idx: np.ndarray, times: FrameTimes) -> str:
    """Movie-time span of sorted frame indices, for messages: '7.480-7.920 s'."""
    t = times.times[np.asarray(idx, dtype=np.int64)]
    return f"{t.min():.3f} s" if len(t) == 1 else f"{t.min():.3f}-{t.max():.3f} s"


def _prepare_batch(batch: dict, out_uri: str, verify: bool = False) -> dict:
    """Ray Data UDF: one task JSON per row in, one summary JSON per row out."""
    return {"summary": np.array([json.dumps(prepare_video(json.loads(t), out_uri, verify=verify))
                                 for t in batch["task"]], dtype=object)}


def prepare_dataset(cfg: Config, built: tuple[list[dict], list[dict]] | None = None, *,
                    verify: bool = False) -> PrepareSummary:
    """Run the prepare stage with Ray Data (call `ray.init` first, or Ray starts a local cluster).

    `built`: `build_tasks(cfg)`'s output when the caller already has it (the pipeline, which keys
    its stage on `inputs_fingerprint` of it), so annotations and proposals are read once.
    `verify`: recompute the SHA-256 of every committed video's files (sizes are always checked)
    and prepare again the videos whose files do not match (`jobs/prepare_data.py --verify`).

    Raises:
        PrepareError: more videos failed than `data.failure_budget` allows (everything else is
            still written), or the annotations are malformed.
    """
    import ray

    from lfb_ray.storage import check_writable

    t0 = time.time()
    cfg = resolve_paths(cfg)
    out_uri = cfg.prepared_dir
    check_writable(out_uri)
    tasks, failures = built if built is not None else build_tasks(cfg)
    failures = list(failures)  # extended below; the caller's list stays as it was
    summaries: list[dict] = []
    if tasks:
        ds = ray.data.from_items([{"task": json.dumps(t)} for t in tasks], override_num_blocks=len(tasks))
        ds = ds.map_batches(_prepare_batch, batch_size=1, fn_kwargs={"out_uri": out_uri, "verify": verify},
                            num_cpus=1)
        summaries = [json.loads(r["summary"]) for r in ds.take_all()]
    return _finish(cfg, out_uri, summaries, failures, t0)


def keyframe_failures(summary: dict) -> list[dict]:
    """failures.json entries for the keyframes a prepared video lost to undecodable frames."""
    return [{"split": summary["split"], "video_id": summary["video_id"], "path": summary["path"],
             "timestamp": int(f["timestamp"]), "error": f["error"]}
            for f in summary.get("keyframe_failures") or []]


def _finish(cfg: Config, out_uri: str, summaries: list[dict], failures: list[dict], t0: float) -> PrepareSummary:
    """Write failures.json and the manifest from the per-video summaries; apply the failure budget."""
    summaries = sorted(summaries, key=lambda r: (r["split"], r["video_id"]))
    failures = failures + [{k: r[k] for k in ("split", "video_id", "path", "error")}
                           for r in summaries if r["status"] == "failed"]
    ok = [r for r in summaries if r["status"] != "failed"]
    failures += [f for r in ok for f in keyframe_failures(r)]
    fs, root = resolve(out_uri)
    write_json_atomic(fs, join(root, "failures.json"), failures)
    manifest = {
        "schema_version": SCHEMA_VERSION, "settings": _prep_settings(cfg),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "videos": [{"split": r["split"], "video_id": r["video_id"], "rows": r["rows"], "bytes": r["bytes"],
                    "files": [join(r["split"], r["video_id"], f) for f in r["files"]], "hash": r["hash"],
                    "source": r.get("source"), "checks": r.get("checks")}
                   for r in ok],
    }
    write_json_atomic(fs, join(root, "manifest.json"), manifest)
    summary = PrepareSummary(videos=len(ok), skipped=sum(r["status"] == "skipped" for r in ok),
                             keyframes=sum(r["rows"] for r in ok), bytes=sum(r["bytes"] for r in ok),
                             seconds=time.time() - t0, failures=failures)
    # The budget counts videos: a whole video that failed, or one that lost keyframes.
    failed_videos = list(dict.fromkeys((f["split"], f["video_id"]) for f in failures))
    if len(failed_videos) > cfg.data.failure_budget:
        lines = "\n".join(f"  {f['split']}/{f['video_id']}"
                          + (f" keyframe {f['timestamp']}" if f.get("timestamp") is not None else "")
                          + f": {f['error']}" for f in failures)
        partly = sum(all(f.get("timestamp") is not None for f in failures if (f["split"], f["video_id"]) == v)
                     for v in failed_videos)
        part = f" ({partly} of them lost only some keyframes, their other keyframes are written)" if partly else ""
        raise PrepareError(f"{len(failed_videos)} video(s) failed{part}, more than data.failure_budget="
                           f"{cfg.data.failure_budget} (details in {join(out_uri, 'failures.json')}); "
                           f"the other {len(ok) - partly} videos were written:\n{lines}")
    return summary


def damaged_videos(prepared_uri: str, *, checksums: bool = False) -> list[str]:
    """`split/video_id: why` of each video of the manifest whose files do not match their recorded
    sizes (and SHA-256s with `checksums`); [] when all match or the set has no manifest. Cheap
    without checksums (one metadata call per file): the pipeline runs it before trusting a prepare
    stage it would skip."""
    try:
        manifest = read_manifest(prepared_uri)
    except PrepareError:
        return []
    fs, root = resolve(prepared_uri)
    out = []
    for v in manifest["videos"]:
        if v.get("checks"):
            why = check_files(fs, join(root, v["split"], v["video_id"]), v["checks"], checksums=checksums)
            if why:
                out.append(f"{v['split']}/{v['video_id']}: {why}")
    return out


def read_manifest(prepared_uri: str) -> dict:
    """The prepared set's manifest, checked for this code's schema version.

    Raises:
        PrepareError: no manifest (prepare has not finished), or a set prepared in another format,
            with the command that prepares it again.
    """
    fs, root = resolve(prepared_uri)
    mpath = join(root, "manifest.json")
    if not exists(fs, mpath):
        raise PrepareError(f"{prepared_uri} has no manifest.json: run jobs/prepare_data.py first")
    manifest = read_json(fs, mpath)
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        old = " (version 1 kept each keyframe's 64 JPEGs inside its row)" if version == 1 else ""
        raise PrepareError(
            f"{prepared_uri} was prepared with schema version {version}{old}; this lfb_ray reads schema "
            f"version {SCHEMA_VERSION} (each frame stored once in a per-video frame store). Prepare it again "
            f"with `python jobs/prepare_data.py --config <your config>` (it rewrites every video in place) "
            f"or point data.prepared_dir at a new folder")
    return manifest


def prepared_files(prepared_uri: str, split: str, *, allow_empty: bool = False) -> list[str]:
    """Keyframe tables (`keyframes.parquet`) of one split, from the manifest, as full paths in the
    prepared filesystem; each row's `frames_file` names its frame store.

    Raises:
        PrepareError: no manifest, another schema version, or (unless `allow_empty`) no rows for
            the split.
    """
    _, root = resolve(prepared_uri)
    manifest = read_manifest(prepared_uri)
    files = [join(root, f) for v in manifest["videos"] if v["split"] == split for f in v["files"]
             if f.endswith(KEYFRAMES_FILE)]
    if not files and not allow_empty:
        raise PrepareError(f"{prepared_uri}: no prepared {split} rows")
    return files
