"""The prepare stage: AVA videos + annotations → per-video frame stores and keyframe tables, with Ray Data.

One Ray task per (split, video) (`lfb_ray.data.prep_task.PrepareTask`, run by
`lfb_ray.data.prep_video.prepare_video`) decodes, in order and once, every frame that any keyframe's clip
can touch (`decord.VideoReader.get_batch` over sorted unique indices, in bounded chunks — never one
seek per clip: `lfb_ray.data.decode`), resizes them to the stored size (`decode.stored_size`: `data.short_side`, or the source's
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
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lfb_ray.config import Config, resolve_paths
from lfb_ray.data import annotations as ann
from lfb_ray.data.ids import unsafe_video_id
from lfb_ray.data.integrity import check_files
from lfb_ray.data.prep_task import KeyframeTask, PrepareTask, PrepSettings
from lfb_ray.data.prep_video import prepare_video
from lfb_ray.data.schema import KEYFRAMES_FILE, SCHEMA_VERSION
from lfb_ray.redaction import RedactedMessage, redact_text
from lfb_ray.storage import exists, is_uri, join, join_uri, read_json, resolve, write_json_atomic

__all__ = ["PrepareError", "PrepareSummary", "build_tasks", "damaged_videos", "find_videos", "prepare_dataset", "prepare_video",
           "prepared_data_id", "prepared_files"]

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm")


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


def build_tasks(cfg: Config) -> tuple[list[PrepareTask], list[dict]]:
    """Read annotations and list one task per (split, video); missing videos become failures.

    Returns:
        (tasks, failures): hashed `PrepareTask`s (keyframes with GT and proposals), and JSON-able
        failures.json entries (split, video_id, path None, error).
    """
    d = cfg.data
    videos = find_videos(cfg.data_path(d.videos_dir))
    settings = PrepSettings.from_config(cfg)
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
            kfs = tuple(KeyframeTask.build(ts, proposals.get((vid, ts)), d.max_proposals,
                                           excluded=(vid, ts) in excluded, gt=kf)
                        for ts, kf in sorted(items, key=lambda x: x[0]))
            tasks.append(PrepareTask(split=split, video_id=vid, path=path, size=size, mtime=mtime, keyframes=kfs,
                                     settings=settings).with_hash())
    return tasks, failures


def inputs_fingerprint(tasks: list[PrepareTask], failures: list[dict]) -> str:
    """A short hash of everything the prepare stage reads, from `build_tasks`' output: annotations,
    proposals, each video's size and mtime, the prepare settings, and the missing videos.

    Why: the pipeline skips a stage whose key is unchanged; keyed on the config alone, a dataset
    regenerated or edited in place (same paths) would keep its stale prepared rows. With this in
    the key, prepare runs again (on the same tasks: `prepare_dataset(cfg, built=...)`), and its
    per-video markers redo exactly the videos that changed.
    """
    h = hashlib.sha256()
    for t in sorted(tasks, key=lambda t: (t.split, t.video_id)):
        h.update(f"{t.split}/{t.video_id}:{t.hash};".encode())
    h.update(json.dumps(failures, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _prepare_batch(batch: dict, out_uri: str, verify: bool = False) -> dict:
    """Ray Data UDF: one task JSON per row in, one summary JSON per row out (rows are plain columns;
    the typed task lives only inside the UDF)."""
    return {"summary": np.array([json.dumps(prepare_video(PrepareTask.from_dict(json.loads(t)), out_uri,
                                                          verify=verify))
                                 for t in batch["task"]], dtype=object)}


def prepare_dataset(cfg: Config, built: tuple[list[PrepareTask], list[dict]] | None = None, *,
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
        ds = ray.data.from_items([{"task": json.dumps(t.to_dict())} for t in tasks], override_num_blocks=len(tasks))
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
        "schema_version": SCHEMA_VERSION, "settings": PrepSettings.from_config(cfg).to_dict(),
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


def prepared_data_id(prepared_uri: str) -> str:
    """Content identity (16 hex digits) of the prepared set at `prepared_uri`, from its manifest: per
    video its split, id, task hash, rows and files, plus the schema version and prepare settings; not
    the creation time, so preparing the same inputs again keeps the id (`lfb_ray.identity`).

    Raises:
        PrepareError: no readable manifest (prepare has not finished there).
    """
    m = read_manifest(prepared_uri)
    videos = sorted((v["split"], v["video_id"], v["hash"], v["rows"], sorted(v["files"])) for v in m["videos"])
    key = {"schema": m.get("schema_version"), "settings": m.get("settings"), "videos": videos}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


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
