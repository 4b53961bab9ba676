"""Action detection on any video (`jobs/detect.py`): person boxes once per second, the video's own
long-term feature bank, the LFB model's scores for every person at every second, and the outputs
(AVA result CSV, per-person tracks JSON, annotated mp4).

Everything runs in this process (no Ray cluster) and through the project's own code paths;
`detect_video`'s numbered steps:

1. inputs: the video, its id, the models (`lfb_ray.detect.checkpoints.choose_models`), the persons'
   source and the span, all checked before any decoding.
2. load: the model, its baseline (LFB models) and the person detector, onto the device.
3. persons: the proposals file's boxes, or torchvision's detector on each keyframe's frame
   (native size); persons are the boxes at `data.val_person_score_thr` or above.
4. decode: the requested seconds become one prepare task per chunk of keyframes
   (`lfb_ray.data.prep_video.prepare_video`, the prepare job's per-video function, without temporal
   jitter) in a work folder under `--out`; clips are then read exactly as the bank and evaluation
   jobs read them (same frame timing, stored size, JPEG quality and test transform).
5. bank (LFB models only): the baseline over every keyframe of the span, by
   `lfb_ray.bank.build.BankExtractor` (the bank job's actor class, called in-process, one chunk at a
   time; proposals at `bank.person_score_thr` with the bank job's fallbacks), written with
   `write_bank` and opened as `FeatureBank`. A Ray actor pool for long videos is not implemented.
6. scores: `lfb_ray.inference.predict_keyframes` (`decode_test_rows` -> `collate_test` ->
   `predict_batch`, the evaluation path, plus the NL attention) with the LFB model and the bank;
   beside them, for LFB models, the short-term scores of the baseline that computed the bank
   (the same boxes through the same path without a bank). Not the LFB model with an empty bank:
   its head never saw an all-zero window, so those scores would be neither the model's nor a
   short-term detector's.
7. outputs: one `lfb_ray.detect.outputs.Detections` record to `write_outputs`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lfb_ray.config import Config
from lfb_ray.detect.errors import DetectError
from lfb_ray.detect.progress import bar as progress_bar

__all__ = ["DetectResult", "detect_video"]

KEYFRAMES_PER_PART = 32  # keyframes per prepare task / bank part (the progress step of those stages)
DETECTOR_BATCH = 2  # keyframe images per detector forward


@dataclass
class DetectResult:
    csv: str
    tracks_json: str
    mp4: str | None
    png: str | None  # --frame-png's still
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


def _probe(video: str):
    """(decord reader, FrameTimes, shift) of a video file, or a DetectError saying why not."""
    import decord

    from lfb_ray.data.decode import frame_times, short_error

    if not os.path.isfile(video):
        raise DetectError(f"--video {video}: no such file")
    if os.path.getsize(video) == 0:
        raise DetectError(f"--video {video}: empty file (0 bytes)")
    try:
        vr = decord.VideoReader(video, num_threads=1)
        n, fps = len(vr), float(vr.get_avg_fps())
        if n <= 0 or not fps > 0:
            raise ValueError(f"{n} frames at {fps} fps")
        times, shift = frame_times(video, vr, fps)
        vr[0]  # the first frame decodes
    except Exception as e:  # decord raises its own error types
        raise DetectError(f"--video {video}: cannot open as a video (truncated, corrupt or not a video file): "
                          f"{short_error(e)}") from None
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

    from lfb_ray.data.prep_task import KeyframeTask, PrepareTask, PrepSettings
    from lfb_ray.data.prep_video import prepare_video

    settings = PrepSettings.from_config(cfg_run)
    st = os.stat(video)
    mp = cfg_run.data.max_proposals
    parts = []
    with progress_bar(len(seconds), "decode", "keyframe", progress) as bar:
        for p0 in range(0, len(seconds), KEYFRAMES_PER_PART):
            chunk = seconds[p0:p0 + KEYFRAMES_PER_PART]
            kfs = tuple(KeyframeTask.build(int(t), raw.get(t), mp) for t in chunk.tolist())
            task = PrepareTask(split=f"part{p0 // KEYFRAMES_PER_PART:05d}", video_id=video_id,
                               path=os.path.abspath(video), size=st.st_size, mtime=int(st.st_mtime), keyframes=kfs,
                               settings=settings).with_hash(full_path=True)
            summary = prepare_video(task, work)
            if summary["status"] == "failed":
                raise DetectError(f"--video {video}: {summary['error']}")
            for f in summary.get("keyframe_failures") or []:
                notes.append(f"second {f['timestamp']} skipped: {f['error']}")
            path = os.path.join(work, task.split, video_id, "keyframes.parquet")
            rows = sorted(pq.read_table(path).to_pylist(), key=lambda r: int(r["timestamp"]))
            parts.append(rows)
            bar.update(len(chunk))
    return parts


def detect_video(video: str, checkpoint: str, out_dir: str, *, config: Config | None = None,
                 bank_checkpoint: str | None = None, persons: str | None = None, detector_weights: str | None = None,
                 start: int | None = None, end: int | None = None, video_id: str | None = None,
                 video_start_second: int | None = None, device: str | None = None, top_k: int = 3,
                 draw_thr: float = 0.3, track_iou: float = 0.2, detector_min_size: int = 800,
                 render: bool = True, frame_png: int | None = None, keep_work: bool = False, progress: bool = True,
                 log=print) -> DetectResult:
    """Detect the actions of every person at every second of `video` (see the module docstring).

    Args:
        config: the model's training config (data/bank/eval settings, exclusive label groups);
            None = the config saved in the checkpoint, else the defaults of `lfb_ray.config` (the
            AVA seed recipe) and a layout read from the checkpoint.
        start, end: first and last keyframe second (AVA time: file second + video start second),
            inclusive; default the whole video.
        frame_png: a keyframe second of the span whose annotated frame is also written as a PNG.

    Raises:
        DetectError: a bad input, with what to do about it.
    """
    import torch

    from lfb_ray.detect.checkpoints import choose_models
    from lfb_ray.detect.outputs import Detections, OutputOptions, frame_png_error, write_outputs

    t0 = time.time()
    stages: dict[str, float] = {}
    notes: list[str] = []

    # 1. Inputs, all checked before any decoding: the video, its id, the models, the persons' source, the span.
    vr, times, video_id = _open_video(video, video_id)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    choice = choose_models(checkpoint, bank_checkpoint, config, notes=notes, log=log)
    cfg = choice.cfg
    boxes_file = _person_boxes_file(persons, detector_weights, video_id)
    vstart = _video_start(video_start_second, cfg, choice.given, boxes_file, times.duration)
    seconds = _keyframe_seconds(times, vstart, start, end, cfg.data.reference_fps)
    why = frame_png_error(frame_png, seconds) if frame_png is not None else None
    if why:
        raise DetectError(why)
    work = os.path.join(os.path.abspath(out_dir), "_work")
    # The class count is the checkpoint's (its classifier's rows), for the data readers too.
    cfg_run = dataclasses.replace(cfg, model=choice.model, data=dataclasses.replace(
        cfg.data, prepared_dir=os.path.join(work, "prepared"), temporal_jitter=False, video_start_second=vstart,
        num_classes=choice.model.num_classes))

    # 2. Load the models (and the person detector) onto the device.
    model, baseline = _load_models(cfg_run, checkpoint, choice.baseline, choice.bank_checkpoint, dev)
    detector = _load_detector(cfg_run, detector_weights, dev, detector_min_size) if not persons else None
    os.makedirs(out_dir, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    log(f"detect: {video} ({video_id}), {times.num_frames} frames at {times.fps:.3f} fps, keyframe seconds "
        f"{seconds[0]}..{seconds[-1]} ({len(seconds)}), model LFB-{choice.model.fbo} on {dev}")
    stages["load"] = time.time() - t0

    # 3. Persons: each second's boxes at data.val_person_score_thr or above.
    t = time.time()
    if boxes_file is not None:
        raw = {int(s): boxes_file.get(int(s)) for s in seconds}
    else:
        raw = _detect_persons(detector, vr, times, seconds, vstart, cfg.data.reference_fps, progress)
        del detector
    thr = cfg_run.data.val_person_score_thr
    person_boxes = {s: (b[b[:, 4] >= thr][:cfg.data.max_proposals] if b is not None else np.zeros((0, 5), np.float32))
                    for s, b in raw.items()}
    n_persons = sum(len(b) for b in person_boxes.values())
    stages["persons"] = time.time() - t
    if n_persons == 0:
        log(f"detect: no person found in {video} at seconds {seconds[0]}..{seconds[-1]} "
            f"(no box with a person score >= {thr}); writing empty outputs")

    preds, short, rows_all = {}, {}, []
    try:
        if n_persons:
            # 4. Decode the span's clips with the prepare job's own function.
            t = time.time()
            parts = _prepare_parts(video, video_id, seconds, raw, cfg_run, cfg_run.prepared_dir, progress, notes)
            rows_all = [r for p in parts for r in p]
            stages["decode"] = time.time() - t
            # 5. The video's bank (LFB models): the baseline over every keyframe of the span.
            bank = None
            if choice.lfb:
                t = time.time()
                bank = _build_bank(cfg_run, choice.baseline, choice.bank_checkpoint, parts,
                                   os.path.join(out_dir, "bank"), model.feature_channels, progress)
                stages["bank"] = time.time() - t
            # 6. Scores: the model with the bank, and beside it the baseline's short-term scores.
            t = time.time()
            scored = [r for r in rows_all if len(person_boxes[int(r["timestamp"])])]
            preds = _score(model, scored, cfg_run, bank, dev, progress, "score")
            if choice.lfb:
                short = _score(baseline, scored, dataclasses.replace(cfg_run, model=choice.baseline), None, dev,
                               progress, "short-term")
            stages["score"] = time.time() - t
        # 7. Outputs: CSVs, tracks.json, the annotated mp4 (and PNG).
        t = time.time()
        found = Detections(
            video=video, video_id=video_id, cfg=cfg_run, seconds=tuple(int(s) for s in seconds), preds=preds,
            short=short, times=times, video_start_second=vstart, start=start, end=end,
            model={"checkpoint": os.path.abspath(checkpoint), "fbo": choice.model.fbo,
                   "bank_checkpoint": os.path.abspath(choice.bank_checkpoint) if choice.lfb else None},
            persons_source=persons or f"detector {detector_weights}")
        written = write_outputs(found, out_dir, OutputOptions(top_k=top_k, draw_thr=draw_thr, track_iou=track_iou,
                                                              render=render, frame_png=frame_png, progress=progress))
        stages["write"] = time.time() - t
    finally:
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)
    lost = len(seconds) - len(rows_all) if n_persons else 0
    if lost:
        notes.append(f"{lost} keyframe seconds could not be decoded (see the notes above)")
    for n in notes:
        log(f"detect: note: {n}")
    return DetectResult(csv=written.csv, tracks_json=written.tracks_json, mp4=written.mp4, png=written.png,
                        short_term_csv=written.short_csv, keyframes=len(seconds), persons=written.persons,
                        seconds=time.time() - t0, stage_seconds=stages, notes=notes,
                        span=(int(seconds[0]), int(seconds[-1])))


def _open_video(video: str, video_id: str | None):
    """(decord reader, FrameTimes, video id) of `video`; the id (default: the file name) must be safe,
    since it names output files and folders."""
    from lfb_ray.data.ids import unsafe_video_id

    why = unsafe_video_id(video_id) if video_id is not None else None
    if why:
        raise DetectError(f"--video-id: {why}")
    vr, times, _shift = _probe(video)
    video_id = video_id or Path(video).stem
    why = unsafe_video_id(video_id)
    if why:
        raise DetectError(f"--video {video}: {why}; pass a --video-id")
    return vr, times, video_id


def _person_boxes_file(persons: str | None, detector_weights: str | None, video_id: str) -> dict | None:
    """The `--persons` file's boxes of this video ({second: [n, 5]}), or None with --detector-weights."""
    from lfb_ray.detect.persons import load_person_boxes, missing_persons_message

    if persons:
        return load_person_boxes(persons, video_id)
    if not detector_weights:
        raise DetectError(missing_persons_message())
    return None


def _detect_persons(detector, vr, times, seconds: np.ndarray, vstart: int, reference_fps: float,
                    progress: bool) -> dict:
    """{second: [n, 5] boxes and scores} of the detector on each keyframe's own frame (native size)."""
    raw = {}
    centre = times.indices(seconds, np.zeros(1, np.int64), video_start_second=vstart,
                           reference_fps=reference_fps)[:, 0]
    with progress_bar(len(seconds), "persons", "keyframe", progress) as bar:
        for i in range(0, len(seconds), DETECTOR_BATCH):
            frames = list(vr.get_batch(centre[i:i + DETECTOR_BATCH].tolist()).asnumpy())
            for s, b in zip(seconds[i:i + DETECTOR_BATCH].tolist(), detector(frames), strict=True):
                raw[s] = b
            bar.update(len(frames))
    return raw


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
    from lfb_ray.bank.build import BankExtractor
    from lfb_ray.storage import file_sha256

    extractor = BankExtractor(dataclasses.replace(cfg_run, model=base_cfg), bank_checkpoint, parts_dir="")
    keys = ("video_id", "second", "person_index", "box", "score", "feature")
    acc = {k: [] for k in keys}
    with progress_bar(sum(len(p) for p in parts), "bank", "keyframe", progress) as bar:
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
    from lfb_ray.bank.window import WindowSampler
    from lfb_ray.inference import predict_keyframes

    windows = WindowSampler.for_config(bank, dev, cfg_run.bank) if bank is not None else None

    out = {}
    step = max(1, cfg_run.eval.batch_size)
    with progress_bar(len(rows), desc, "keyframe", progress) as bar:
        for i in range(0, len(rows), step):
            for kp in predict_keyframes(model, rows[i:i + step], cfg_run, windows=windows, device=dev,
                                        seed=cfg_run.train.seed + i):
                out[kp.timestamp] = kp
            bar.update(len(rows[i:i + step]))
    return out
