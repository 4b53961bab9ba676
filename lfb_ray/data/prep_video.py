"""Prepare one video: decode every frame its keyframes' clips can touch once, write its frame store and
keyframe table, then its `_DONE.json` marker (what each Ray Data task of `lfb_ray.data.prep` runs, and
what `jobs/detect.py` runs in-process).

Frames are decoded in order (`lfb_ray.data.decode`), resized to `stored_size`, JPEG-encoded once
into the video's frame store (`lfb_ray.data.frames`); the keyframe table follows
`lfb_ray.data.schema`. A frame that cannot be decoded costs only the keyframes whose windows need it.
The marker, written after the files, makes the job resumable: a rerun skips a video whose marker
holds the task's hash and whose files still match the marker's checks.
"""

from __future__ import annotations

import io
import os
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lfb_ray.data.clips import encode_jpeg
from lfb_ray.data.decode import decode_frames, decode_one_pyav, frame_times, stored_size
from lfb_ray.data.frames import FrameStoreWriter
from lfb_ray.data.ids import unsafe_video_id
from lfb_ray.data.integrity import check_files, file_check
from lfb_ray.data.prep_task import PrepareTask
from lfb_ray.data.schema import FRAMES_FILE, KEYFRAMES_FILE, SCHEMA
from lfb_ray.data.timing import FrameTimes, TimingError, detect_video_start, stored_ref_offsets
from lfb_ray.storage import (
    exists,
    join,
    local_file,
    read_json,
    remove_dir,
    resolve,
    write_bytes_atomic,
    write_json_atomic,
)

__all__ = ["prepare_video"]


def _video_dir(root: str, split: str, vid: str) -> str:
    return join(root, split, vid)


def prepare_video(task: PrepareTask, out_uri: str, *, verify: bool = False) -> dict:
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
    base = {"video_id": task.video_id, "split": task.split, "path": task.path}
    why = unsafe_video_id(task.video_id) or unsafe_video_id(task.split)
    if why:  # the readers refuse such ids; this is the last line before a path is built from one
        return {**base, "status": "failed", "error": f"PrepareError: {why}", "rows": 0, "bytes": 0, "files": [],
                "keyframe_failures": []}
    vdir = _video_dir(root, task.split, task.video_id)
    done_path = join(vdir, "_DONE.json")
    redone = None
    if exists(fs, done_path):
        try:
            done = read_json(fs, done_path)
        except Exception:  # unreadable marker: redo the video
            done, redone = {}, "its _DONE.json marker cannot be read"
        if done.get("hash") == task.hash:
            checks = done.get("checks")
            if not checks:  # a marker written before checks were recorded: trusted unless verifying
                redone = "its marker has no checksums (--verify)" if verify else None
            else:
                redone = check_files(fs, vdir, checks, checksums=verify)
            if redone is None:
                return {**base, "keyframe_failures": [], **done, "status": "skipped"}
            print(f"[prepare] {task.split}/{task.video_id}: prepared files damaged ({redone}): "
                  "preparing the video again", flush=True)
    remove_dir(fs, vdir, inside=root)  # partial, stale or damaged output: redo from scratch
    try:
        with local_file(task.path) as local:  # a video on object storage: downloaded for this task only
            rows_written, nbytes, checks, kf_failures = _decode_and_write(replace(task, path=local), fs, vdir,
                                                                          f"{task.split}/{task.video_id}")
    except Exception as e:
        remove_dir(fs, vdir, inside=root)
        return {**base, "status": "failed", "error": f"{type(e).__name__}: {e}", "rows": 0, "bytes": 0,
                "files": [], "keyframe_failures": []}
    done = {"hash": task.hash, "rows": rows_written, "bytes": nbytes, "files": [KEYFRAMES_FILE, FRAMES_FILE],
            "checks": checks, "source": {"path": task.path, "size": task.size, "mtime": task.mtime},
            "keyframe_failures": kf_failures}
    write_json_atomic(fs, done_path, done)  # after its files, which write_bytes_atomic/close fsynced
    return {**base, **done, "status": "done", **({"redone": redone} if redone else {})}



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


def _decode_and_write(task: PrepareTask, fs, vdir: str, rel_dir: str) -> tuple[int, int, dict[str, dict], list[dict]]:
    """Decode every frame the video's keyframes can touch once, in order, into the frame store, and
    write the keyframe table that refers to it.

    A frame that cannot be decoded costs the keyframes whose windows hold it, not the video: they get
    no row and are returned as keyframe failures. Returns (rows, bytes written, {file name: {size,
    sha256}} of the files written (`lfb_ray.data.integrity`), keyframe failures: dicts with
    timestamp and error).
    """
    import decord

    s = task.settings
    path = task.path
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: empty file (0 bytes)")
    try:
        probe = decord.VideoReader(path, num_threads=1)
        num_frames, fps = len(probe), float(probe.get_avg_fps())
        oh, ow = probe[0].shape[:2]
        times, shift = frame_times(path, probe, fps) if num_frames > 0 and fps > 0 else (None, 0.0)
        del probe
    except Exception as e:
        raise ValueError(f"{path}: cannot open as a video (truncated, corrupt or not a video file): {e}") from e
    if num_frames <= 0 or fps <= 0 or times is None:
        raise ValueError(f"{path}: no frames or unknown fps")
    timestamps = np.array([k.timestamp for k in task.keyframes], dtype=np.int64)
    start = detect_video_start(s.video_start_second, duration_s=times.duration,
                               max_timestamp=int(timestamps.max()), video=path)
    h, w = stored_size(oh, ow, s.short_side)

    def open_reader():
        return (decord.VideoReader(path, num_threads=1) if (h, w) == (oh, ow)
                else decord.VideoReader(path, width=w, height=h, num_threads=1))

    offsets = stored_ref_offsets(s.clip_frames, s.frame_interval, s.jitter)
    frame_idx = times.indices(timestamps, offsets, video_start_second=start,
                              reference_fps=s.reference_fps)  # [K, O]
    # Each keyframe's own time must lie in the video; clipping is only for the clip's edge frames. A
    # keyframe before the start (second 1 of a clip that starts at 900) or past the end would
    # otherwise become a clip of the first or last frame repeated: it gets no row and is reported.
    centre = times.indices(timestamps, np.zeros(1, np.int64), video_start_second=start,
                           reference_fps=s.reference_fps, clip=False)[:, 0]
    file_time = timestamps - start
    before, after = file_time < 0, centre >= num_frames
    kept = ~(before | after)
    kf_failures: list[dict] = [
        {"timestamp": int(t), "error": (
            f"keyframe second {int(t)} is {'before the start' if b else 'past the end'} of {path}: file time "
            f"{int(ft)} s with the video starting at movie second {start} (data.video_start_second="
            f"{s.video_start_second}), and the video is {times.duration:.1f} s long; the keyframe has no row")}
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
            return decode_one_pyav(path, float(times.times[i]) - shift, h, w)

        for i, frame, err in decode_frames(open_reader, needed, path, fallback):
            if frame is None:
                bad[i] = err
            else:
                writer.add(i, encode_jpeg(frame, s.jpeg_quality))
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
    n_classes = s.num_classes
    rows: list[dict] = []
    for k, kf in enumerate(task.keyframes):
        n_gt = len(kf.gt_person_ids)
        if len(kf.gt_labels) != n_gt * n_classes:
            raise ValueError(f"{path}: keyframe {kf.timestamp} has {len(kf.gt_labels)} label values "
                             f"for {n_gt} boxes x {n_classes} classes")
        if not kept[k]:
            continue
        rows.append({
            "video_id": task.video_id, "timestamp": int(kf.timestamp), "split": task.split,
            "excluded": bool(kf.excluded), "ref_offsets": offsets.astype(np.int16).tolist(),
            "frame_rows": rows_of[k].tolist(), "frame_indices": frame_idx[k].astype(np.int32).tolist(),
            "frames_file": f"{rel_dir}/{FRAMES_FILE}", "height": h, "width": w, "orig_height": oh,
            "orig_width": ow, "fps": fps, "num_gt": n_gt, "gt_boxes": list(kf.gt_boxes),
            "gt_labels": list(kf.gt_labels), "gt_person_ids": list(kf.gt_person_ids),
            "num_proposals": len(kf.proposals) // 5, "proposals": list(kf.proposals),
            "proposals_missing": bool(kf.proposals_missing),
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
