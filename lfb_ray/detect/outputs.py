"""The files `jobs/detect.py` writes from its scores: the AVA result CSVs, `tracks.json`, the
annotated mp4 and an optional PNG still (docs/detect.md, "Outputs").

`detect_video` hands over one `Detections` record (what was found) and one `OutputOptions`
(how to write it); nothing here runs a model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from lfb_ray.config import Config
from lfb_ray.data.timing import FrameTimes
from lfb_ray.detect.errors import DetectError
from lfb_ray.detect.progress import bar as progress_bar

if TYPE_CHECKING:
    from lfb_ray.inference import KeyframePrediction

__all__ = ["Detections", "OutputOptions", "WrittenOutputs", "write_outputs"]

NL_TOP_SECONDS = 3  # bank seconds listed per person (those with at least 1% of the attention)


@dataclass(frozen=True, eq=False)
class Detections:
    """What detect found in one span of one video, ready to be written.

    `preds` and `short` map a keyframe second to `lfb_ray.inference.KeyframePrediction`
    (boxes [n, 4] normalised, scores [n, num_classes]); seconds without persons are absent.
    `short` (LFB models) holds the baseline's scores for the same boxes, else it is empty.
    """

    video: str
    video_id: str
    cfg: Config  # the run's config: `model` is the scored model; data/bank/eval settings
    seconds: tuple[int, ...]  # the span's keyframe seconds (AVA time), increasing
    preds: Mapping[int, KeyframePrediction]
    short: Mapping[int, KeyframePrediction]
    times: FrameTimes  # the video's frame times (file time)
    video_start_second: int  # AVA second of file time 0
    start: int | None  # the requested span (None: the video's first / last second)
    end: int | None
    model: dict  # {"checkpoint", "fbo", "bank_checkpoint"} as tracks.json names them
    persons_source: str  # the --persons file, or "detector WEIGHTS"


@dataclass(frozen=True)
class OutputOptions:
    """How to write: the job's `--top-k`, `--draw-thr`, `--track-iou`, `--no-video`, `--frame-png`."""

    top_k: int = 3
    draw_thr: float = 0.3
    track_iou: float = 0.2
    render: bool = True
    frame_png: int | None = None  # keyframe second whose annotated frame is also saved as a PNG
    progress: bool = True


@dataclass(frozen=True)
class WrittenOutputs:
    csv: str
    short_csv: str | None
    tracks_json: str
    mp4: str | None
    png: str | None
    persons: int  # person boxes written, all seconds together


def _top(scores: np.ndarray, classes: np.ndarray, names: dict, k: int, thr: float = -1.0) -> list[dict]:
    order = classes[np.argsort(-scores[classes], kind="stable")[:k]]
    return [{"action_id": int(c), "name": names.get(int(c), str(int(c))), "score": round(float(scores[c]), 6)}
            for c in order if scores[c] > thr]


def label_names(cfg: Config) -> dict[int, str]:
    """Class id -> name from the config's label map, or "action N" when it has none."""
    from lfb_ray.data.annotations import read_label_map

    path = cfg.data_path(cfg.data.label_map)
    n = cfg.model.num_classes
    if path and os.path.isfile(path):
        names = {c: s for c, s in read_label_map(path).items() if 0 < c < n}
        if names:
            return names
    return {c: f"action {c}" for c in range(1, n)}


def _per_second(det: Detections) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Boxes [n_s, 4] and scores [n_s, C] of every second of the span (n_s = 0 without persons)."""
    n_cls = det.cfg.model.num_classes
    boxes, scores = [], []
    for s in det.seconds:
        kp = det.preds.get(s)
        boxes.append(kp.boxes if kp is not None else np.zeros((0, 4), np.float32))
        scores.append(kp.scores if kp is not None else np.zeros((0, n_cls), np.float32))
    return boxes, scores


def _write_csvs(det: Detections, out_dir: str, boxes: list[np.ndarray],
                scores: list[np.ndarray]) -> tuple[str, str | None]:
    from lfb_ray.evaluation.results import write_results_csv

    n_cls = det.cfg.model.num_classes
    vids = [det.video_id] * sum(len(b) for b in boxes)
    ts = np.repeat(list(det.seconds), [len(b) for b in boxes])
    cat_b = np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32)
    cat_s = np.concatenate(scores) if scores else np.zeros((0, n_cls), np.float32)
    thr = det.cfg.eval.action_thr
    csv = os.path.join(out_dir, "detections.csv")
    write_results_csv(csv, vids, ts, cat_b, cat_s, action_thr=thr)
    if det.cfg.model.fbo == "none":
        return csv, None
    short_csv = os.path.join(out_dir, "detections_short_term.csv")
    short = [det.short[s].scores if s in det.short else np.zeros((0, n_cls), np.float32) for s in det.seconds]
    st = np.concatenate(short) if short else np.zeros((0, n_cls), np.float32)
    write_results_csv(short_csv, vids, ts, cat_b, st.reshape(-1, n_cls), action_thr=thr)
    return csv, short_csv


def _tracks_and_overlays(det: Detections, opts: OutputOptions, boxes: list[np.ndarray], scores: list[np.ndarray],
                         names: dict[int, str]) -> tuple[dict[int, dict], dict]:
    """The tracks of `tracks.json` (track id -> entry) and each second's `FrameOverlay`."""
    from lfb_ray.detect.render import FrameOverlay, PersonOverlay
    from lfb_ray.detect.tracks import link_tracks

    classes = np.array(sorted(names), np.int64)
    secs = list(det.seconds)
    ids = link_tracks(secs, boxes, iou_thr=opts.track_iou)
    half = det.cfg.bank.window_seconds // 2
    tracks: dict[int, dict] = {}
    overlays = {}
    for s, b, sc, tid in zip(secs, boxes, scores, ids, strict=True):
        kp = det.preds.get(s)
        persons = []
        for j in range(len(b)):
            entry = {"second": s, "box": [round(float(v), 6) for v in b[j]],
                     "top_actions": _top(sc[j], classes, names, opts.top_k)}
            bank_secs = []
            if kp is not None and kp.attention is not None:
                mass, pad = kp.attention[j]
                best = [int(x) for x in np.argsort(-mass, kind="stable")[:NL_TOP_SECONDS] if mass[x] >= 0.01]
                bank_secs = sorted(s - half + x for x in best)
                entry["bank_seconds"] = [{"second": s - half + x, "attention": round(float(mass[x]), 6)}
                                         for x in best]
                entry["attention_on_padding"] = round(float(pad), 6)
            if s in det.short:
                entry["short_term_top_actions"] = _top(det.short[s].scores[j], classes, names, opts.top_k)
            tracks.setdefault(int(tid[j]), {"track": int(tid[j]), "boxes": []})["boxes"].append(entry)
            persons.append(PersonOverlay(box=b[j], track=int(tid[j]), bank_seconds=bank_secs,
                                         labels=[(a["name"], a["score"]) for a in entry["top_actions"]
                                                 if a["score"] > opts.draw_thr]))
        overlays[s] = FrameOverlay(second=s, persons=persons)
    for tr in tracks.values():  # a track's top actions: the mean score over its seconds
        js = [secs.index(e["second"]) for e in tr["boxes"]]
        rows = [np.flatnonzero(ids[i] == tr["track"])[0] for i in js]
        mean = np.mean([scores[i][r] for i, r in zip(js, rows, strict=True)], axis=0)
        tr.update(first_second=tr["boxes"][0]["second"], last_second=tr["boxes"][-1]["second"],
                  top_actions=_top(mean, classes, names, opts.top_k))
        tr["boxes"] = tr.pop("boxes")  # keep the boxes last in the JSON
    return tracks, overlays


def _write_tracks_json(det: Detections, opts: OutputOptions, out_dir: str, tracks: dict[int, dict],
                       boxes: list[np.ndarray], short_csv: str | None) -> str:
    from lfb_ray.storage import resolve, write_bytes_atomic

    doc = {"video": os.path.abspath(det.video), "video_id": det.video_id,
           "video_start_second": det.video_start_second, "seconds": [det.seconds[0], det.seconds[-1]],
           "model": det.model, "persons": det.persons_source,
           "person_score_thr": det.cfg.data.val_person_score_thr,
           "short_term": ("scores of the baseline that computed the bank (--bank-checkpoint), same boxes"
                          if short_csv else None),
           "track_linking": (f"greedy IoU >= {opts.track_iou} with each track's box of the previous second, or "
                             "that box moved at the track's velocity"),
           "seconds_without_persons": [s for s, b in zip(det.seconds, boxes, strict=True) if not len(b)],
           "tracks": [tracks[i] for i in sorted(tracks)]}
    path = os.path.join(out_dir, "tracks.json")
    fs, local = resolve(os.path.abspath(path))
    write_bytes_atomic(fs, local, json.dumps(doc, indent=1).encode())
    return path


def frame_png_error(second: int, seconds) -> str | None:
    """Why `--frame-png SECOND` cannot be drawn (not a keyframe second of the span), else None."""
    if int(second) in {int(s) for s in seconds}:
        return None
    return (f"--frame-png {second}: not a keyframe second of the span {int(seconds[0])}..{int(seconds[-1])} "
            "(AVA time, as --start/--end)")


def _render(det: Detections, opts: OutputOptions, out_dir: str, overlays: dict) -> tuple[str | None, str | None]:
    from lfb_ray.detect.render import write_annotated_video, write_frame_png

    ava = det.times.times + det.video_start_second  # AVA time of each frame
    mp4 = png = None
    if opts.render:
        lo = -np.inf if det.start is None else det.start - 0.5
        hi = np.inf if det.end is None else det.end + 0.5
        idx = np.flatnonzero((ava >= lo) & (ava < hi))
        frame_seconds = np.floor(ava[idx] + 0.5).astype(np.int64)  # each frame shows its nearest keyframe second
        mp4 = os.path.join(out_dir, f"{det.video_id}_detections.mp4")
        with progress_bar(len(idx), "render", "frame", opts.progress) as bar:
            write_annotated_video(mp4, det.video, idx, det.times.fps, overlays, frame_seconds, progress=bar.update)
    if opts.frame_png is not None:
        why = frame_png_error(opts.frame_png, det.seconds)
        if why:
            raise DetectError(why)
        s = int(opts.frame_png)
        png = os.path.join(out_dir, f"{det.video_id}_{s}.png")
        write_frame_png(png, det.video, int(np.argmin(np.abs(ava - s))), overlays.get(s))
    return mp4, png


def write_outputs(det: Detections, out_dir: str, opts: OutputOptions) -> WrittenOutputs:
    """Write the CSVs, `tracks.json`, and (per `opts`) the annotated mp4 and PNG under `out_dir`."""
    boxes, scores = _per_second(det)
    csv, short_csv = _write_csvs(det, out_dir, boxes, scores)
    tracks, overlays = _tracks_and_overlays(det, opts, boxes, scores, label_names(det.cfg))
    tracks_json = _write_tracks_json(det, opts, out_dir, tracks, boxes, short_csv)
    mp4, png = _render(det, opts, out_dir, overlays)
    return WrittenOutputs(csv=csv, short_csv=short_csv, tracks_json=tracks_json, mp4=mp4, png=png,
                          persons=int(sum(len(b) for b in boxes)))
