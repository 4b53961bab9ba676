"""Action detection on any video (`jobs/detect.py`): person boxes once per second, the video's own
long-term feature bank, the LFB model's scores for every person at every second, and the outputs
(AVA result CSV, per-person tracks JSON, annotated mp4).

Everything runs in this process (no Ray cluster) and through the project's own code paths:

1. decode: the requested seconds become one prepare task per chunk of keyframes
   (`lfb_ray.data.prep.prepare_video`, the prepare job's per-video function, without temporal
   jitter) in a work folder under `--out`; clips are then read exactly as the bank and evaluation
   jobs read them (same frame timing, stored size, JPEG quality and test transform).
2. persons: the proposals file's boxes, or torchvision's detector on each keyframe's frame
   (native size); persons are the boxes at `data.val_person_score_thr` or above.
3. bank (LFB models only): the baseline over every keyframe of the span, by
   `lfb_ray.bank.build.BankExtractor` (the bank job's actor class, called in-process, one chunk at a
   time; proposals at `bank.person_score_thr` with the bank job's fallbacks), written with
   `write_bank` and opened as `FeatureBank`. A Ray actor pool for long videos is not implemented.
4. scores: `lfb_ray.visualize.predict_keyframes` (`decode_test_rows` -> `collate_test` ->
   `predict_batch`, the evaluation path, plus the NL attention) with the LFB model and the bank;
   beside them, for LFB models, the short-term scores of the baseline that computed the bank
   (the same boxes through the same path without a bank). Not the LFB model with an empty bank:
   its head never saw an all-zero window, so those scores would be neither the model's nor a
   short-term detector's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lfb_ray.config import Config, config_to_dict
from lfb_ray.detect.errors import DetectError

__all__ = ["DetectResult", "detect_video"]

KEYFRAMES_PER_PART = 32  # keyframes per prepare task / bank part (the progress step of those stages)
DETECTOR_BATCH = 2  # keyframe images per detector forward


@dataclass
class DetectResult:
    csv: str
    tracks_json: str
    mp4: str | None
    short_term_csv: str | None
    keyframes: int  # keyframe seconds scored or found without persons
    persons: int  # person boxes scored, all seconds together
    seconds: float  # wall time
    stage_seconds: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    span: tuple = (0, 0)

    def line(self) -> str:
        kps = self.keyframes / max(self.seconds, 1e-9)
        return (f"detect: {self.keyframes} keyframes ({self.span[0]}..{self.span[1]}), {self.persons} person boxes, "
                f"{self.seconds:.1f} s ({kps:.2f} keyframes/s; "
                + ", ".join(f"{k} {v:.1f} s" for k, v in self.stage_seconds.items()) + f") -> {Path(self.csv).parent}")


def _bar(total: int, desc: str, unit: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                mininterval=1.0)


def _probe(video: str):
    """(decord reader, FrameTimes, shift) of a video file, or a DetectError saying why not."""
    import decord

    from lfb_ray.data.prep import _frame_times, _short_error

    if not os.path.isfile(video):
        raise DetectError(f"--video {video}: no such file")
    if os.path.getsize(video) == 0:
        raise DetectError(f"--video {video}: empty file (0 bytes)")
    try:
        vr = decord.VideoReader(video, num_threads=1)
        n, fps = len(vr), float(vr.get_avg_fps())
        if n <= 0 or not fps > 0:
            raise ValueError(f"{n} frames at {fps} fps")
        times, shift = _frame_times(video, vr, fps)
        vr[0]  # the first frame decodes
    except Exception as e:  # noqa: BLE001 - decord raises its own error types
        raise DetectError(f"--video {video}: cannot open as a video (truncated, corrupt or not a video file): "
                          f"{_short_error(e)}") from None
    return vr, times, shift


def _video_start(arg: int | None, cfg: Config, given_config: bool, boxes: dict | None, duration: float) -> int:
    """AVA second at file time 0: the argument, else the config's data.video_start_second (>= 0),
    else 900 when a proposals file names seconds >= 900 only and the video is shorter than that
    (AVA's trimmed clips, the synthetic set), else 0."""
    if arg is not None:
        return int(arg)
    if given_config and cfg.data.video_start_second >= 0:
        return cfg.data.video_start_second
    if boxes and min(boxes) >= 900 and duration < 900:
        return 900
    return 0


def _keyframe_seconds(times, vstart: int, start: int | None, end: int | None, reference_fps: float) -> np.ndarray:
    """Integer seconds (AVA time) whose own frame exists, within [start, end]."""
    file_s = np.arange(0, int(np.ceil(times.duration)) + 1, dtype=np.int64)
    centre = times.indices(file_s + vstart, np.zeros(1, np.int64), video_start_second=vstart,
                           reference_fps=reference_fps, clip=False)[:, 0]
    ok = (centre < times.num_frames) & (file_s + 0.5 / times.fps >= times.first)
    secs = file_s[ok] + vstart
    if not len(secs):
        raise DetectError("the video has no whole second with a frame")
    lo = secs[0] if start is None else start
    hi = secs[-1] if end is None else end
    keep = secs[(secs >= lo) & (secs <= hi)]
    if lo > hi or not len(keep):
        raise DetectError(f"--start {lo} --end {hi}: no keyframe second of the video in that span; its seconds are "
                          f"{secs[0]}..{secs[-1]} (AVA time: file time + {vstart}, see --video-start-second)")
    return keep


def _load_detector(cfg_run, weights, device, min_size):
    from lfb_ray.detect.persons import PersonDetector

    return PersonDetector(weights, score_thr=min(cfg_run.data.val_person_score_thr, cfg_run.bank.person_score_thr),
                          device=device, min_size=min_size)


def _prepare_parts(video: str, video_id: str, seconds: np.ndarray, raw: dict, cfg_run: Config, work: str,
                   progress: bool, notes: list) -> list[list[dict]]:
    """Decode the clips of `seconds` into the work folder, `KEYFRAMES_PER_PART` keyframes per prepare
    task; returns each part's keyframe rows (sorted by second)."""
    import pyarrow.parquet as pq

    from lfb_ray.data.prep import _prep_settings, prepare_video

    settings = _prep_settings(cfg_run)
    st = os.stat(video)
    mp = cfg_run.data.max_proposals
    parts = []
    with _bar(len(seconds), "decode", "keyframe", progress) as bar:
        for p0 in range(0, len(seconds), KEYFRAMES_PER_PART):
            chunk = seconds[p0:p0 + KEYFRAMES_PER_PART]
            kfs = [{"timestamp": int(t), "excluded": False, "gt_boxes": [], "gt_labels": [], "gt_person_ids": [],
                    "proposals": (raw[t][:mp].ravel().tolist() if raw.get(t) is not None else [0.0, 0.0, 1.0, 1.0, 1.0]),
                    "proposals_missing": raw.get(t) is None} for t in chunk.tolist()]
            task = {"split": f"part{p0 // KEYFRAMES_PER_PART:05d}", "video_id": video_id, "path": os.path.abspath(video),
                    "source": {"size": st.st_size, "mtime": int(st.st_mtime)}, "keyframes": kfs, "settings": settings}
            task["hash"] = hashlib.sha256(json.dumps(task, sort_keys=True).encode()).hexdigest()[:16]
            summary = prepare_video(task, work)
            if summary["status"] == "failed":
                raise DetectError(f"--video {video}: {summary['error']}")
            for f in summary.get("keyframe_failures") or []:
                notes.append(f"second {f['timestamp']} skipped: {f['error']}")
            path = os.path.join(work, task["split"], video_id, "keyframes.parquet")
            rows = sorted(pq.read_table(path).to_pylist(), key=lambda r: int(r["timestamp"]))
            parts.append(rows)
            bar.update(len(chunk))
    return parts


def _top(scores: np.ndarray, classes: np.ndarray, names: dict, k: int, thr: float = -1.0) -> list[dict]:
    order = classes[np.argsort(-scores[classes], kind="stable")[:k]]
    return [{"action_id": int(c), "name": names.get(int(c), str(int(c))), "score": round(float(scores[c]), 6)}
            for c in order if scores[c] > thr]


def detect_video(video: str, checkpoint: str, out_dir: str, *, config: Config | None = None,
                 bank_checkpoint: str | None = None, persons: str | None = None, detector_weights: str | None = None,
                 start: int | None = None, end: int | None = None, video_id: str | None = None,
                 video_start_second: int | None = None, device: str | None = None, top_k: int = 3,
                 draw_thr: float = 0.3, track_iou: float = 0.2, detector_min_size: int = 800,
                 render: bool = True, keep_work: bool = False, progress: bool = True, log=print) -> DetectResult:
    """Detect the actions of every person at every second of `video` (see the module docstring).

    Args:
        config: the model's training config (data/bank/eval settings, exclusive label groups);
            None = the defaults of `lfb_ray.config` (the AVA seed recipe) and a layout read from
            the checkpoint.
        start, end: first and last keyframe second (AVA time: file second + video start second),
            inclusive; default the whole video.

    Raises:
        DetectError: a bad input, with what to do about it.
    """
    import torch

    from lfb_ray.detect.checkpoints import checkpoint_model_config, read_state, saved_meta

    t0 = time.time()
    stages: dict[str, float] = {}
    notes: list[str] = []
    given = config is not None
    cfg = config or Config()
    from lfb_ray.data.ids import unsafe_video_id

    why = unsafe_video_id(video_id) if video_id is not None else None
    if why:  # it names output files and folders: checked before any work
        raise DetectError(f"--video-id: {why}")
    vr, times, _shift = _probe(video)
    video_id = video_id or Path(video).stem
    why = unsafe_video_id(video_id)
    if why:
        raise DetectError(f"--video {video}: {why}; pass a --video-id")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    # -- models (cheap; before any decoding)
    read_state(checkpoint, "--checkpoint")  # a named error for a missing or foreign file first
    meta = saved_meta(checkpoint, "--checkpoint")
    if meta is not None:
        log(f"detect: --checkpoint is {meta.describe()}")
        if not given:  # the model's own config: its operator, label groups, bank and data settings
            cfg, given = meta.to_config(), True
        if not bank_checkpoint and meta.operator != "none" and meta.init_checkpoint:
            bank_checkpoint = meta.init_checkpoint
            notes.append(f"--bank-checkpoint: the baseline --checkpoint was trained from ({bank_checkpoint})")
    model_cfg = checkpoint_model_config(checkpoint, "--checkpoint", cfg.model if given else None, notes=notes)
    lfb = model_cfg.fbo != "none"
    if not lfb and given and cfg.model.fbo != "none" and not cfg.model.exclusive_groups_in_baseline \
            and model_cfg.exclusive_groups:
        # A short-term model with an LFB config: the baseline, trained without the groups (the
        # control, trained with them, is run with its own config, model.fbo=none).
        model_cfg = dataclasses.replace(model_cfg, exclusive_groups=())
        notes.append("a short-term model with an LFB config: scored as the baseline, without model.exclusive_groups "
                     "(model.exclusive_groups_in_baseline=false); for the control pass model.fbo=none")
    base_cfg = None
    if lfb:
        if not bank_checkpoint:
            raise DetectError(f"--checkpoint {checkpoint} is an LFB-{model_cfg.fbo} model: pass --bank-checkpoint "
                              "BASELINE.pt, the short-term baseline (model.fbo=none) that computed its bank")
        base = dataclasses.replace(cfg.model, fbo="none", exclusive_groups=(
            cfg.model.exclusive_groups if cfg.model.exclusive_groups_in_baseline else ())) if given else None
        base_cfg = checkpoint_model_config(bank_checkpoint, "--bank-checkpoint", base, notes=notes)
        if base_cfg.fbo != "none":
            raise DetectError(f"--bank-checkpoint {bank_checkpoint} is an LFB-{base_cfg.fbo} model; the bank is "
                              "computed by the short-term baseline (model.fbo=none) the LFB model was trained with")
    elif bank_checkpoint:
        notes.append(f"--checkpoint {checkpoint} is a short-term model (fbo=none): no bank, "
                     f"--bank-checkpoint {bank_checkpoint} is not used")

    boxes_file = None
    if persons:
        from lfb_ray.detect.persons import load_person_boxes

        boxes_file = load_person_boxes(persons, video_id)
    elif not detector_weights:
        from lfb_ray.detect.persons import missing_persons_message

        raise DetectError(missing_persons_message())
    vstart = _video_start(video_start_second, cfg, given, boxes_file, times.duration)
    seconds = _keyframe_seconds(times, vstart, start, end, cfg.data.reference_fps)
    work = os.path.join(os.path.abspath(out_dir), "_work")
    cfg_run = dataclasses.replace(cfg, model=model_cfg, data=dataclasses.replace(
        cfg.data, prepared_dir=os.path.join(work, "prepared"), temporal_jitter=False, video_start_second=vstart))
    model, baseline = _load_models(cfg_run, checkpoint, base_cfg, bank_checkpoint, dev)
    detector = _load_detector(cfg_run, detector_weights, dev, detector_min_size) if not persons else None
    os.makedirs(out_dir, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    log(f"detect: {video} ({video_id}), {times.num_frames} frames at {times.fps:.3f} fps, keyframe seconds "
        f"{seconds[0]}..{seconds[-1]} ({len(seconds)}), model LFB-{model_cfg.fbo} on {dev}")
    stages["load"] = time.time() - t0

    # -- persons
    t = time.time()
    thr = cfg_run.data.val_person_score_thr
    if boxes_file is not None:
        raw = {int(s): boxes_file.get(int(s)) for s in seconds}
    else:
        raw = {}
        centre = times.indices(seconds, np.zeros(1, np.int64), video_start_second=vstart,
                               reference_fps=cfg.data.reference_fps)[:, 0]
        with _bar(len(seconds), "persons", "keyframe", progress) as bar:
            for i in range(0, len(seconds), DETECTOR_BATCH):
                frames = list(vr.get_batch(centre[i:i + DETECTOR_BATCH].tolist()).asnumpy())
                for s, b in zip(seconds[i:i + DETECTOR_BATCH].tolist(), detector(frames), strict=True):
                    raw[s] = b
                bar.update(len(frames))
        del detector
    person_boxes = {s: (b[b[:, 4] >= thr][:cfg.data.max_proposals] if b is not None else np.zeros((0, 5), np.float32))
                    for s, b in raw.items()}
    n_persons = sum(len(b) for b in person_boxes.values())
    stages["persons"] = time.time() - t
    if n_persons == 0:
        log(f"detect: no person found in {video} at seconds {seconds[0]}..{seconds[-1]} "
            f"(no box with a person score >= {thr}); writing empty outputs")

    # -- decode (prepare), bank, scores
    preds, short, rows_all = {}, {}, []
    bank = None
    try:
        if n_persons:
            t = time.time()
            parts = _prepare_parts(video, video_id, seconds, raw, cfg_run, cfg_run.prepared_dir, progress, notes)
            rows_all = [r for p in parts for r in p]
            stages["decode"] = time.time() - t
            if lfb:
                t = time.time()
                bank = _build_bank(cfg_run, base_cfg, bank_checkpoint, parts, os.path.join(out_dir, "bank"),
                                   model.feature_channels, progress)
                stages["bank"] = time.time() - t
            t = time.time()
            scored = [r for r in rows_all if len(person_boxes[int(r["timestamp"])])]
            preds = _score(model, scored, cfg_run, bank, dev, progress, "score")
            if lfb:
                cfg_base = dataclasses.replace(cfg_run, model=base_cfg)
                short = _score(baseline, scored, cfg_base, None, dev, progress, "short-term")
            stages["score"] = time.time() - t
        t = time.time()
        result = _write_outputs(video, video_id, out_dir, cfg_run, seconds, preds, short, times, vstart, start, end,
                                top_k=top_k, draw_thr=draw_thr, track_iou=track_iou, render=render,
                                progress=progress, model_desc={"checkpoint": os.path.abspath(checkpoint),
                                                               "fbo": model_cfg.fbo,
                                                               "bank_checkpoint": (os.path.abspath(bank_checkpoint)
                                                                                   if lfb else None)},
                                persons_source=persons or f"detector {detector_weights}")
        stages["write"] = time.time() - t
    finally:
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)
    lost = len(seconds) - len(rows_all) if n_persons else 0
    if lost:
        notes.append(f"{lost} keyframe seconds could not be decoded (see the notes above)")
    for n in notes:
        log(f"detect: note: {n}")
    res = DetectResult(csv=result["csv"], tracks_json=result["json"], mp4=result["mp4"],
                       short_term_csv=result["short_csv"], keyframes=len(seconds), persons=result["persons"],
                       seconds=time.time() - t0, stage_seconds=stages, notes=notes,
                       span=(int(seconds[0]), int(seconds[-1])))
    return res


def _load_models(cfg_run: Config, checkpoint: str, base_cfg, bank_checkpoint: str | None, dev):
    from lfb_ray.inference import load_model
    from lfb_ray.models.checkpoint import CheckpointError

    def load(cfg, path, flag):
        try:
            return load_model(cfg, path, dev)
        except CheckpointError as e:
            lines = str(e).splitlines()
            raise DetectError(f"{flag} {path} does not load into the model it describes: "
                              + " ".join(ln.strip()[:300] for ln in lines[:4])) from None

    model = load(cfg_run, checkpoint, "--checkpoint")
    baseline = None
    if base_cfg is not None:
        baseline = load(dataclasses.replace(cfg_run, model=base_cfg), bank_checkpoint, "--bank-checkpoint")
        if baseline.feature_channels != model.feature_channels:
            raise DetectError(
                f"--bank-checkpoint {bank_checkpoint} computes {baseline.feature_channels}-d features (depth "
                f"{base_cfg.depth}, width {base_cfg.base_channels}), but the LFB model --checkpoint {checkpoint} reads "
                f"a bank of {model.feature_channels}-d features: pass the baseline it was trained with")
    return model, baseline


def _build_bank(cfg_run: Config, base_cfg, bank_checkpoint: str, parts: list[list[dict]], bank_dir: str,
                expected_dim: int, progress: bool):
    """The bank of the span: `BankExtractor._extract` (the bank job's per-part function) on each
    part's keyframe table, merged with `write_bank`."""
    from lfb_ray.bank import FeatureBank, write_bank
    from lfb_ray.bank.build import BankExtractor, file_sha256

    d = config_to_dict(cfg_run)
    d["model"] = dataclasses.asdict(base_cfg)
    d["model"]["exclusive_groups"] = [list(g) for g in base_cfg.exclusive_groups]
    extractor = BankExtractor(d, bank_checkpoint, parts_dir="")
    keys = ("video_id", "second", "person_index", "box", "score", "feature")
    acc = {k: [] for k in keys}
    with _bar(sum(len(p) for p in parts), "bank", "keyframe", progress) as bar:
        for rows in parts:
            if not rows:
                continue
            path = os.path.join(cfg_run.prepared_dir, str(rows[0]["frames_file"]).rsplit("/", 1)[0], "keyframes.parquet")
            arrays = extractor._extract(path)
            for k in keys:
                acc[k].append(arrays[k])
            bar.update(len(rows))
    cat = {k: np.concatenate(v) for k, v in acc.items()}
    write_bank(bank_dir, video_ids=cat["video_id"], seconds=cat["second"], person_index=cat["person_index"],
               boxes=cat["box"], scores=cat["score"], features=cat["feature"],
               metadata={"checkpoint_sha256": file_sha256(bank_checkpoint), "built_by": "jobs/detect.py",
                         "person_score_thr": cfg_run.bank.person_score_thr})
    return FeatureBank.open(bank_dir, expected_dim=expected_dim)


def _score(model, rows: list[dict], cfg_run: Config, bank, dev, progress: bool, desc: str) -> dict:
    """{second: KeyframePrediction} for `rows`, `eval.batch_size` keyframes per `predict_keyframes` call."""
    from lfb_ray.visualize import predict_keyframes

    out = {}
    step = max(1, cfg_run.eval.batch_size)
    with _bar(len(rows), desc, "keyframe", progress) as bar:
        for i in range(0, len(rows), step):
            for kp in predict_keyframes(model, rows[i:i + step], cfg_run, bank=bank, device=dev,
                                        seed=cfg_run.train.seed + i):
                out[kp.timestamp] = kp
            bar.update(len(rows[i:i + step]))
    return out


def _label_names(cfg_run: Config) -> dict[int, str]:
    from lfb_ray.data.annotations import read_label_map

    path = cfg_run.data_path(cfg_run.data.label_map)
    n = cfg_run.model.num_classes
    if path and os.path.isfile(path):
        names = {c: s for c, s in read_label_map(path).items() if 0 < c < n}
        if names:
            return names
    return {c: f"action {c}" for c in range(1, n)}


def _write_outputs(video, video_id, out_dir, cfg_run, seconds, preds, short, times, vstart, start, end, *, top_k,
                   draw_thr, track_iou, render, progress, model_desc, persons_source) -> dict:
    from lfb_ray.detect.render import FrameOverlay, PersonOverlay, write_annotated_video
    from lfb_ray.detect.tracks import link_tracks
    from lfb_ray.evaluation.results import write_results_csv

    names = _label_names(cfg_run)
    classes = np.array(sorted(names), np.int64)
    secs = [int(s) for s in seconds]
    n_cls = cfg_run.model.num_classes
    empty = (np.zeros((0, 4), np.float32), np.zeros((0, n_cls), np.float32))

    def get(p, s):
        return (p[s].boxes, p[s].scores) if s in p else empty

    boxes = [get(preds, s)[0] for s in secs]
    scores = [get(preds, s)[1] for s in secs]
    vids = [video_id] * sum(len(b) for b in boxes)
    ts = np.repeat(secs, [len(b) for b in boxes])
    cat_b = np.concatenate(boxes) if boxes else empty[0]
    cat_s = np.concatenate(scores) if scores else empty[1]
    csv = os.path.join(out_dir, "detections.csv")
    write_results_csv(csv, vids, ts, cat_b, cat_s, action_thr=cfg_run.eval.action_thr)
    short_csv = None
    if cfg_run.model.fbo != "none":
        short_csv = os.path.join(out_dir, "detections_short_term.csv")
        st = np.concatenate([get(short, s)[1] for s in secs]) if secs else empty[1]
        write_results_csv(short_csv, vids, ts, cat_b, st.reshape(-1, st.shape[-1]) if len(st) else empty[1],
                          action_thr=cfg_run.eval.action_thr)

    ids = link_tracks(secs, boxes, iou_thr=track_iou)
    w = cfg_run.bank.window_seconds
    tracks: dict[int, dict] = {}
    overlays: dict[int, FrameOverlay] = {}
    for s, b, sc, tid in zip(secs, boxes, scores, ids, strict=True):
        kp = preds.get(s)
        persons = []
        for j in range(len(b)):
            entry = {"second": s, "box": [round(float(v), 6) for v in b[j]],
                     "top_actions": _top(sc[j], classes, names, top_k)}
            bank_secs = []
            if kp is not None and kp.attention is not None:
                mass, pad = kp.attention[j]
                # the 3 most attended seconds, those with at least 1% of the attention
                best = [int(x) for x in np.argsort(-mass, kind="stable")[:3] if mass[x] >= 0.01]
                bank_secs = sorted(s - w // 2 + x for x in best)
                entry["bank_seconds"] = [{"second": s - w // 2 + x, "attention": round(float(mass[x]), 6)}
                                         for x in best]
                entry["attention_on_padding"] = round(float(pad), 6)
            if s in short:
                entry["short_term_top_actions"] = _top(short[s].scores[j], classes, names, top_k)
            tr = tracks.setdefault(int(tid[j]), {"track": int(tid[j]), "boxes": []})
            tr["boxes"].append(entry)
            persons.append(PersonOverlay(box=b[j], track=int(tid[j]), bank_seconds=bank_secs,
                                         labels=[(a["name"], a["score"]) for a in entry["top_actions"]
                                                 if a["score"] > draw_thr]))
        overlays[s] = FrameOverlay(second=s, persons=persons)
    for tr in tracks.values():
        js = [secs.index(e["second"]) for e in tr["boxes"]]
        rows = [np.flatnonzero(ids[i] == tr["track"])[0] for i in js]
        mean = np.mean([scores[i][r] for i, r in zip(js, rows, strict=True)], axis=0)
        tr.update(first_second=tr["boxes"][0]["second"], last_second=tr["boxes"][-1]["second"],
                  top_actions=_top(mean, classes, names, top_k))
        tr["boxes"] = tr.pop("boxes")  # keep the boxes last in the JSON
    doc = {"video": os.path.abspath(video), "video_id": video_id, "video_start_second": vstart,
           "seconds": [secs[0], secs[-1]], "model": model_desc, "persons": persons_source,
           "person_score_thr": cfg_run.data.val_person_score_thr,
           "short_term": ("scores of the baseline that computed the bank (--bank-checkpoint), same boxes"
                          if short_csv else None),
           "track_linking": (f"greedy IoU >= {track_iou} with each track's box of the previous second, or that box "
                             "moved at the track's velocity"),
           "seconds_without_persons": [s for s, b in zip(secs, boxes, strict=True) if not len(b)],
           "tracks": [tracks[i] for i in sorted(tracks)]}
    js_path = os.path.join(out_dir, "tracks.json")
    with open(js_path + ".tmp", "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(js_path + ".tmp", js_path)

    mp4 = None
    if render:
        ava = times.times + vstart  # AVA time of each frame
        lo = -np.inf if start is None else start - 0.5
        hi = np.inf if end is None else end + 0.5
        idx = np.flatnonzero((ava >= lo) & (ava < hi))
        frame_seconds = np.floor(ava[idx] + 0.5).astype(np.int64)
        mp4 = os.path.join(out_dir, f"{video_id}_detections.mp4")
        with _bar(len(idx), "render", "frame", progress) as bar:
            write_annotated_video(mp4, video, idx, times.fps, overlays, frame_seconds, progress=bar.update)
    return {"csv": csv, "short_csv": short_csv, "json": js_path, "mp4": mp4, "persons": int(len(cat_b))}
