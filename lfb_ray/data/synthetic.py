"""Synthetic AVA-format dataset whose role labels need a long-term feature bank.

Actors move in short, visible motion segments (short-term labels) and carry a hidden role (long-term
label) that is shown only as a brief coloured cue a few times per video. The rules, sizes and files:
docs/synthetic_dataset.md.
"""

from __future__ import annotations

import colorsys
import csv
import io
import json
import os
import pickle
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

GENERATOR_VERSION = "1.4"
FPS = 30
AVA_START_SECOND = 900
CUE_HALF_FRAMES = 15  # cue visible on 31 frames (~1 s) centred on its second: 2-3 keyframe clips see it, on 1-2 of 4 frames
SPEED_RANGE = (0.11, 0.19)  # px/s as a fraction of frame width; max < 3*min keeps labels readable
EDGE_MARGIN_PX = 2


@dataclass(frozen=True)
class SyntheticClass:
    """One action class: AVA-style id, name, and family ("short_term" or "long_term")."""

    action_id: int
    name: str
    family: str


# Ids in AVA's person-movement range (short-term) and person-interaction range (long-term); all are
# among AVA's 60 evaluated ids, so evaluation code needs no special case.
MOTION_CLASSES = (
    SyntheticClass(11, "move left", "short_term"),
    SyntheticClass(12, "stand still", "short_term"),
    SyntheticClass(13, "move right", "short_term"),
)
ROLE_CLASSES = (
    SyntheticClass(64, "role A (red cue)", "long_term"),
    SyntheticClass(65, "role B (green cue)", "long_term"),
    SyntheticClass(66, "role C (blue cue)", "long_term"),
)
SHAPES = ("rectangle", "ellipse")
PATTERNS = ("hstripes", "vstripes", "checker", "diagonal", "dots")
# Actor looks come from one small pool shared by every video: (shape, pattern, hue). Each look is
# seen with every role across videos, so a look says nothing about the role and a short-term
# model cannot learn "this look -> that role" by memorising training actors; the role cue is the
# only clip-level evidence. Within a video looks are distinct, so the bank can be matched by look.
APPEARANCE_POOL = tuple((SHAPES[k % 2], PATTERNS[k % len(PATTERNS)], k / 8) for k in range(8))
# The look is also labelled (AVA pose-range ids, all evaluated), like AVA's pose classes that are
# visible in any frame. Why: the bank is only useful if its features say *whose* they are. Real
# LFB gets appearance-rich features from Kinetics pre-training; a baseline trained from scratch on
# motion and roles alone learns nothing about looks (they predict neither), so its bank could not
# be matched to an actor (measured on v1.2: LFB models at chance on no-cue keyframes).
# v1.4: an actor's size comes from its look, and a video's background from a pool of
# BACKGROUND_POOL shared by all videos of a dataset. Why: with random sizes and a background per
# video, every training actor was unique, and an LFB-NL head trained on the train bank learned each
# training actor's role by heart from its pooled bank entries (train no-cue role accuracy 0.91,
# val 0.52 at 0.87 confidence; on half of a val bank: 0.996 on that half, 0.34 on the other) instead
# of retrieving its cue seconds; that overconfidence then overrode the in-clip cue (README, issue
# #8). Now about five training actors share each (look, background) with random roles. Measured:
# this alone did not stop it (a head on half the val videos: 1.000 on them, 0.27 on the others;
# an actor's row and motion still differ), but it removes two of the unique cues.
LOOK_HEIGHT_FRACTION = tuple(0.25 + 0.08 * ((3 * k) % 8) / 7 for k in range(8))  # of the frame height
LOOK_ASPECT = tuple(0.55 + 0.30 * ((5 * k) % 8) / 7 for k in range(8))  # width / height
BACKGROUND_POOL = 4
APPEARANCE_CLASSES = tuple(
    SyntheticClass(aid, f"look {k} ({shape} {pattern})", "appearance")
    for k, (aid, (shape, pattern, _)) in enumerate(zip((1, 3, 4, 5, 6, 7, 8, 9), APPEARANCE_POOL, strict=True))
)
CLASSES = MOTION_CLASSES + ROLE_CLASSES + APPEARANCE_CLASSES
LABEL_FAMILIES = {
    "short_term": tuple(c.action_id for c in MOTION_CLASSES),
    "long_term": tuple(c.action_id for c in ROLE_CLASSES),
    "appearance": tuple(c.action_id for c in APPEARANCE_CLASSES),
}
MOTION_DIRECTION = (-1, 0, 1)  # per MOTION_CLASSES index: x velocity sign
# Saturated cue colours; actor bodies stay below saturation 0.45 so a cue never looks like a body.
ROLE_CUE_RGB = ((255, 30, 30), (30, 255, 30), (40, 90, 255))


@dataclass(frozen=True)
class MotionSegment:
    """Constant-velocity interval in AVA seconds; boundaries fall on half seconds."""

    start_s: float
    end_s: float
    action_id: int
    velocity_px_per_s: float


@dataclass(frozen=True)
class Actor:
    """Ground truth of one actor: appearance, placement, motion segments, hidden role and cues."""

    person_id: int
    shape: str
    pattern: str
    colors: tuple[tuple[int, int, int], tuple[int, int, int]]
    width_px: int
    height_px: int
    y_px: int
    x0_px: int
    role_action_id: int
    cue_seconds: tuple[int, ...]
    segments: tuple[MotionSegment, ...]
    look: int = -1  # index into APPEARANCE_POOL (labelled with APPEARANCE_CLASSES[look])


@dataclass(frozen=True)
class VideoPlan:
    """Everything drawn for one video before rendering; split is "train" or "val"."""

    video_id: str
    split: str
    seconds: int
    actors: tuple[Actor, ...]
    background: int = 0  # index into the dataset's BACKGROUND_POOL backgrounds

    @property
    def keyframes(self) -> range:
        """AVA seconds 902 .. 900+seconds-2 inclusive."""
        return range(AVA_START_SECOND + 2, AVA_START_SECOND + self.seconds - 1)


@dataclass(frozen=True)
class DatasetInfo:
    """What generate_dataset wrote."""

    out_dir: Path
    train_videos: tuple[str, ...]
    val_videos: tuple[str, ...]
    keyframes: dict[str, int]  # split -> number of annotated keyframes
    boxes: dict[str, int]  # split -> number of GT person boxes


def motion_label_at(actor: Actor, second: int) -> int:
    """Short-term action id at a keyframe: the segment containing it, which covers >= 1.5 s of [t-1, t+1]."""
    for seg in actor.segments:
        if seg.start_s <= second < seg.end_s:
            return seg.action_id
    raise ValueError(f"second {second} outside the video")


def actor_x_px(actor: Actor, num_frames: int, width: int) -> np.ndarray:
    """Left edge of the actor in pixels per frame. Returns: int array [num_frames]."""
    t = AVA_START_SECOND + np.arange(num_frames) / FPS
    x = np.full(num_frames, float(actor.x0_px))
    for seg in actor.segments:
        x += seg.velocity_px_per_s * (np.clip(t, seg.start_s, seg.end_s) - seg.start_s)
    return np.clip(np.rint(x), 0, width - actor.width_px).astype(np.int64)


def make_video_ids(seed: int, count: int) -> list[str]:
    """`count` distinct 11-character YouTube-like ids derived from the seed."""
    alphabet = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"))
    rng = np.random.default_rng([seed, 0xA7A])
    ids: list[str] = []
    while len(ids) < count:
        vid = "".join(rng.choice(alphabet, 11))
        if vid not in ids:
            ids.append(vid)
    return ids


def _plan_segments(rng: np.random.Generator, x0: float, width_px: int, frame_width: int, seconds: int):
    lo, hi = EDGE_MARGIN_PX, frame_width - width_px - EDGE_MARGIN_PX
    segments, t, x, state = [], 0.0, x0, None
    while t < seconds:
        durations = (1.5, 2.5, 3.5, 4.5) if t == 0 else (2.0, 3.0, 4.0, 5.0)
        options = []
        for s, direction in enumerate(MOTION_DIRECTION):
            if s == state:  # the velocity always changes at a boundary
                continue
            speed = round(float(rng.uniform(*SPEED_RANGE)) * frame_width, 1) if direction else 0.0
            room = x - lo if direction < 0 else hi - x if direction > 0 else np.inf
            ok = [d for d in durations if speed * min(d, seconds - t) <= room]
            if ok:
                options.append((s, direction * speed, ok))
        if not options:  # tiny frames only: nowhere to go, stay still
            options = [(1, 0.0, list(durations))]
        s, velocity, ok = options[rng.integers(len(options))]
        end = min(t + ok[rng.integers(len(ok))], float(seconds))
        segments.append(
            MotionSegment(AVA_START_SECOND + t, AVA_START_SECOND + end, MOTION_CLASSES[s].action_id, velocity)
        )
        x += velocity * (end - t)
        t, state = end, s
    return tuple(segments)


def _plan_cues(rng: np.random.Generator, seconds: int) -> tuple[int, ...]:
    """3-4 keyframe seconds, far apart (at least a 1/(n+1) share of the video between them).

    With 2-3 clips seeing each cue, about 15-20% of an actor's keyframe clips show its role:
    enough for the short-term baseline to learn "cue -> role" (so the bank carries it), while
    most keyframes can only be labelled from long-term context.
    """
    first, last = AVA_START_SECOND + 2, AVA_START_SECOND + seconds - 2
    n = int(rng.integers(3, 5))
    gap = max(2, (last - first + 1) // (n + 1))
    for _ in range(1000):
        cues = np.sort(rng.choice(np.arange(first, last + 1), size=n, replace=False))
        if np.all(np.diff(cues) >= gap):
            return tuple(int(c) for c in cues)
    return tuple(int(c) for c in np.linspace(first, last, n).round())


def plan_video(rng: np.random.Generator, video_id: str, split: str, *, seconds: int, width: int, height: int):
    """Draw the actors of one video: appearance, rows, motion segments, roles and cue seconds."""
    n = int(rng.integers(2, 4))
    looks = rng.choice(len(APPEARANCE_POOL), size=n, replace=False)
    heights = [int(round(LOOK_HEIGHT_FRACTION[int(k)] * height)) for k in looks]
    widths = [int(round(h * LOOK_ASPECT[int(k)])) for h, k in zip(heights, looks, strict=True)]
    # Stack actors vertically with random gaps so they never overlap.
    gaps = rng.dirichlet(np.ones(n + 1)) * (height - sum(heights))
    order = rng.permutation(n)
    tops, y = [0] * n, 0.0
    for k, i in enumerate(order):
        y += gaps[k]
        tops[i] = int(y)
        y += heights[i]
    roles = rng.permutation(len(ROLE_CLASSES))[:n]
    if rng.random() < 0.15:  # usually, not always, distinct roles within a video
        roles = rng.integers(len(ROLE_CLASSES), size=n)
    actors = []
    for i in range(n):
        shape, pattern, hue = APPEARANCE_POOL[int(looks[i])]
        light = colorsys.hsv_to_rgb(hue, 0.35, 0.85)
        dark = colorsys.hsv_to_rgb(hue, 0.35, 0.35)
        x0 = int(rng.integers(EDGE_MARGIN_PX, width - widths[i] - EDGE_MARGIN_PX + 1))
        actors.append(
            Actor(
                person_id=i,
                shape=shape,
                pattern=pattern,
                colors=(tuple(int(c * 255) for c in light), tuple(int(c * 255) for c in dark)),
                width_px=widths[i],
                height_px=heights[i],
                y_px=tops[i],
                x0_px=x0,
                role_action_id=ROLE_CLASSES[int(roles[i])].action_id,
                cue_seconds=_plan_cues(rng, seconds),
                segments=_plan_segments(rng, float(x0), widths[i], width, seconds),
                look=int(looks[i]),
            )
        )
    return VideoPlan(video_id, split, seconds, tuple(actors), background=int(rng.integers(BACKGROUND_POOL)))


def _sprites(actor: Actor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (mask [h,w] bool, plain sprite [h,w,3] uint8, cue sprite [h,w,3] uint8)."""
    h, w = actor.height_px, actor.width_px
    yy, xx = np.mgrid[0:h, 0:w]
    if actor.shape == "ellipse":
        mask = ((yy + 0.5 - h / 2) / (h / 2)) ** 2 + ((xx + 0.5 - w / 2) / (w / 2)) ** 2 <= 1.0
    else:
        mask = np.ones((h, w), bool)
    period = 6
    texture = {
        "hstripes": (yy // (period // 2)) % 2 == 0,
        "vstripes": (xx // (period // 2)) % 2 == 0,
        "checker": ((yy // period) + (xx // period)) % 2 == 0,
        "diagonal": ((yy + xx) // (period // 2)) % 2 == 0,
        "dots": ((yy % period) - period // 2) ** 2 + ((xx % period) - period // 2) ** 2 > 3,
    }[actor.pattern]
    sprite = np.where(texture[..., None], actor.colors[0], actor.colors[1]).astype(np.uint8)
    # Cue: a 2-px ring along the silhouette plus a central badge, in the role's colour.
    inner = mask.copy()
    for _ in range(3):
        inner[1:-1, 1:-1] = (
            inner[1:-1, 1:-1] & inner[:-2, 1:-1] & inner[2:, 1:-1] & inner[1:-1, :-2] & inner[1:-1, 2:]
        )
        inner[[0, -1], :] = False
        inner[:, [0, -1]] = False
    radius = min(h, w) / 3
    badge = (yy + 0.5 - h / 2) ** 2 + (xx + 0.5 - w / 2) ** 2 <= radius**2
    cue_rgb = ROLE_CUE_RGB[[c.action_id for c in ROLE_CLASSES].index(actor.role_action_id)]
    cue = sprite.copy()
    cue[(mask & ~inner) | badge] = cue_rgb
    return mask, sprite, cue


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Muted, smoothly varying colour field with clutter rectangles and fine grain. Returns: [H,W,3] float."""
    coarse = rng.uniform(50, 190, size=(4, 5, 3))
    ys, xs = np.linspace(0, 3, height), np.linspace(0, 4, width)
    y0, x0 = np.minimum(ys.astype(int), 2), np.minimum(xs.astype(int), 3)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    bg = (
        coarse[y0][:, x0] * (1 - fy) * (1 - fx)
        + coarse[y0 + 1][:, x0] * fy * (1 - fx)
        + coarse[y0][:, x0 + 1] * (1 - fy) * fx
        + coarse[y0 + 1][:, x0 + 1] * fy * fx
    )
    for _ in range(int(rng.integers(6, 12))):
        x1, y1 = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(8, width // 3)), int(rng.integers(8, height // 3))
        bg[y1 : y1 + h, x1 : x1 + w] = 0.6 * bg[y1 : y1 + h, x1 : x1 + w] + 0.4 * rng.uniform(40, 200, 3)
    gray = bg.mean(axis=2, keepdims=True)
    bg = 0.6 * gray + 0.4 * bg  # desaturate: saturated colours are reserved for role cues
    return bg + rng.normal(0, 8, size=bg.shape)


def render_frames(plan: VideoPlan, rng: np.random.Generator, *, width: int, height: int, seed: int = 0):
    """Yields the video's frames, uint8 [H, W, 3] RGB, frame i at AVA second 900 + i/30.

    The background is the dataset's (`seed`) pool entry `plan.background`; `rng` draws the grain.
    """
    num_frames = plan.seconds * FPS
    bg = _background(np.random.default_rng([seed, 2, plan.background]), width, height)
    noisy = [np.clip(bg + rng.normal(0, 4, bg.shape), 0, 255).astype(np.uint8) for _ in range(8)]
    noise_order = rng.integers(len(noisy), size=num_frames)
    drawn = []
    for actor in plan.actors:
        cue_frames = np.zeros(num_frames, bool)
        for c in actor.cue_seconds:
            centre = (c - AVA_START_SECOND) * FPS
            cue_frames[max(0, centre - CUE_HALF_FRAMES) : centre + CUE_HALF_FRAMES + 1] = True
        drawn.append((actor, actor_x_px(actor, num_frames, width), cue_frames, *_sprites(actor)))
    for i in range(num_frames):
        frame = noisy[noise_order[i]].copy()
        for actor, xs, cue_frames, mask, sprite, cue in drawn:
            y, x = actor.y_px, xs[i]
            region = frame[y : y + actor.height_px, x : x + actor.width_px]
            np.copyto(region, cue if cue_frames[i] else sprite, where=mask[..., None])
        yield frame


def _write_video(plan: VideoPlan, seed: int, index: int, path: Path, width: int, height: int) -> None:
    """Renders and encodes one video (H.264 yuv420p, 30 fps) to path atomically."""
    rng = np.random.default_rng([seed, 1, index])
    tmp = path.with_name(f".{path.stem}.tmp.mp4")
    with av.open(str(tmp), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = Fraction(1, FPS)
        # g=30 and no B-frames: cheap random access for clip decoding. mbtree=0: with mbtree on, this
        # libx264 build gave different bytes for identical input in ~1 of 10 runs of a 60 s video.
        stream.options = {
            "crf": "20",
            "preset": "veryfast",
            "threads": "1",
            "g": str(FPS),
            "x264-params": "mbtree=0:bframes=0",
        }
        for i, rgb in enumerate(render_frames(plan, rng, width=width, height=height, seed=seed)):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    os.replace(tmp, path)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _csv_bytes(rows: list[list]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue().encode()


def _gt_rows(plan: VideoPlan, width: int, height: int) -> tuple[list[list], dict[str, np.ndarray]]:
    """8-column AVA rows and the exact (unrounded) normalised boxes per keyframe [n_actors, 4]."""
    num_frames = plan.seconds * FPS
    xs = [actor_x_px(a, num_frames, width) for a in plan.actors]
    rows, boxes = [], {}
    for t in plan.keyframes:
        frame = (t - AVA_START_SECOND) * FPS
        key_boxes = []
        for actor, x in zip(plan.actors, xs, strict=True):
            box = (
                x[frame] / width,
                actor.y_px / height,
                (x[frame] + actor.width_px) / width,
                (actor.y_px + actor.height_px) / height,
            )
            key_boxes.append(box)
            coords = [f"{v:.3f}" for v in box]
            for action in (motion_label_at(actor, t), actor.role_action_id,
                           APPEARANCE_CLASSES[actor.look].action_id):
                rows.append([plan.video_id, f"{t:04d}", *coords, action, actor.person_id])
        boxes[f"{plan.video_id},{t:04d}"] = np.array(key_boxes)
    return rows, boxes


def _proposals(rng: np.random.Generator, gt: np.ndarray, low_score: bool) -> np.ndarray:
    """Jittered true boxes (score >= 0.9 unless low_score) plus false boxes (score < 0.9). Returns [n,5] float32."""
    out = []
    for box in gt:
        if rng.random() < 0.02:  # detector miss
            continue
        size = np.array([box[2] - box[0], box[3] - box[1]] * 2)
        sigma = 0.08 if rng.random() < 0.1 else 0.01  # mostly IoU >= 0.9, sometimes worse
        jittered = box + rng.normal(0, sigma, 4) * size
        score = rng.uniform(0.5, 0.89) if low_score else rng.uniform(0.9, 1.0)
        out.append([*jittered, score])
    for _ in range(int(rng.integers(0, 4))):
        w, h = rng.uniform(0.12, 0.3), rng.uniform(0.25, 0.33)
        x1, y1 = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
        out.append([x1, y1, x1 + w, y1 + h, rng.uniform(0.05, 0.85)])
    if not out:
        return np.zeros((0, 5), np.float32)
    arr = np.array(out)
    arr[:, :4] = np.clip(arr[:, :4], 0.0, 1.0)
    arr[:, 2] = np.maximum(arr[:, 2], arr[:, 0] + 1e-3)
    arr[:, 3] = np.maximum(arr[:, 3], arr[:, 1] + 1e-3)
    return arr[np.argsort(-arr[:, 4], kind="stable")].astype(np.float32)


def _label_map_bytes() -> bytes:
    items = [f'item {{\n  name: "{c.name}"\n  id: {c.action_id}\n}}\n' for c in CLASSES]
    return "".join(items).encode()


def generate_dataset(
    out_dir: str | os.PathLike,
    *,
    num_videos: int,
    seconds: int,
    seed: int,
    width: int = 160,
    height: int = 120,
    val_fraction: float = 0.4,
    overwrite: bool = False,
    workers: int = 1,
) -> DatasetInfo:
    """Writes a synthetic AVA-format dataset (videos, CSVs, label map, proposals, dataset.json).

    Args:
        out_dir: destination; must be missing or empty unless overwrite.
        num_videos: videos in total (>= 2), split by video into train and val.
        seconds: length of each video; keyframes are AVA seconds 902 .. 900+seconds-2.
        seed: everything (ids, content, split, proposals) is a function of the seed and sizes.
        width, height: frame size in pixels (even numbers, for yuv420p).
        val_fraction: share of videos in val (at least one video in each split).
        overwrite: allow writing into a non-empty out_dir (our files are replaced, others kept).
        workers: processes used to render and encode videos.

    Returns:
        DatasetInfo with video ids, keyframe and box counts per split.

    Raises:
        FileExistsError: out_dir is non-empty and overwrite is False.
        ValueError: sizes out of range.
    """
    if num_videos < 2 or seconds < 8 or width % 2 or height % 2 or width < 64 or height < 48:
        raise ValueError("need num_videos >= 2, seconds >= 8, even width >= 64 and even height >= 48")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty (pass overwrite=True / --overwrite)")
    (out / "videos").mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)

    ids = make_video_ids(seed, num_videos)
    num_val = min(num_videos - 1, max(1, round(val_fraction * num_videos)))
    val_idx = set(np.random.default_rng([seed, 2]).permutation(num_videos)[:num_val].tolist())
    plans = [
        plan_video(
            np.random.default_rng([seed, 0, i]),
            vid,
            "val" if i in val_idx else "train",
            seconds=seconds,
            width=width,
            height=height,
        )
        for i, vid in enumerate(ids)
    ]
    jobs = [(p, seed, i, out / "videos" / f"{p.video_id}.mp4", width, height) for i, p in enumerate(plans)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_video, *zip(*jobs, strict=True)))
    else:
        for job in jobs:
            _write_video(*job)

    meta_splits, keyframes, boxes = {}, {}, {}
    for s, split in enumerate(("train", "val")):
        split_plans = sorted((p for p in plans if p.split == split), key=lambda p: p.video_id)
        rng = np.random.default_rng([seed, 3, s])
        rows, gt = [], {}
        for p in split_plans:
            p_rows, p_gt = _gt_rows(p, width, height)
            rows += p_rows
            gt.update(p_gt)
        keys = list(gt)
        n_special = max(1, round(0.03 * len(keys)))
        special = rng.choice(len(keys), size=min(len(keys), 2 * n_special + 1), replace=False)
        low_keys = sorted(keys[i] for i in special[:n_special])
        missing_keys = sorted(keys[i] for i in special[n_special : n_special + max(1, n_special // 3)])
        excluded = sorted(
            keys[i] for i in rng.choice(len(keys), max(1, round(0.01 * len(keys))), replace=False)
        )
        proposals = {k: _proposals(rng, v, k in low_keys) for k, v in gt.items() if k not in missing_keys}
        _write_atomic(out / "annotations" / f"{split}.csv", _csv_bytes(rows))
        _write_atomic(
            out / "annotations" / f"{split}_excluded_timestamps.csv",
            _csv_bytes([k.split(",") for k in excluded]),
        )
        _write_atomic(out / "annotations" / f"{split}_proposals.pkl", pickle.dumps(proposals, protocol=4))
        keyframes[split], boxes[split] = len(keys), sum(len(v) for v in gt.values())
        meta_splits[split] = {
            "videos": [p.video_id for p in split_plans],
            "keyframes": len(keys),
            "boxes": boxes[split],
            "excluded_timestamps": excluded,
            "proposal_keys_below_0.9": low_keys,
            "proposal_keys_missing": missing_keys,
        }
    _write_atomic(out / "annotations" / "label_map.pbtxt", _label_map_bytes())

    meta = {
        "generator": "lfb_ray.data.synthetic",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "args": {
            "num_videos": num_videos,
            "seconds": seconds,
            "width": width,
            "height": height,
            "val_fraction": val_fraction,
        },
        "fps": FPS,
        "ava_start_second": AVA_START_SECOND,
        "cue_half_frames": CUE_HALF_FRAMES,
        "label_rule": {
            "short_term": "action_id of the actor's motion segment containing keyframe t "
            "(segments change on half seconds and last >= 2 s, so it covers >= 1.5 s of [t-1, t+1])",
            "long_term": "the actor's role_action_id at every keyframe; drawn as a ring + badge in "
            "role_cue_rgb only on frames within cue_half_frames of each of its cue_seconds",
            "appearance": "the action_id of the actor's look (APPEARANCE_POOL index `look`) at every keyframe",
        },
        "classes": [asdict(c) for c in CLASSES],
        "label_families": {k: list(v) for k, v in LABEL_FAMILIES.items()},
        "role_cue_rgb": {c.action_id: rgb for c, rgb in zip(ROLE_CLASSES, ROLE_CUE_RGB, strict=True)},
        "splits": meta_splits,
        "videos": [
            {
                "video_id": p.video_id,
                "split": p.split,
                "seconds": p.seconds,
                "background": p.background,
                "actors": [asdict(a) for a in p.actors],
            }
            for p in plans
        ],
    }
    _write_atomic(out / "dataset.json", (json.dumps(meta, indent=1) + "\n").encode())
    return DatasetInfo(
        out_dir=out,
        train_videos=tuple(meta_splits["train"]["videos"]),
        val_videos=tuple(meta_splits["val"]["videos"]),
        keyframes=keyframes,
        boxes=boxes,
    )


def load_actors(dataset_json: str | os.PathLike) -> dict[str, tuple[Actor, ...]]:
    """Reads the per-video ground-truth actors back from dataset.json: video_id -> actors."""
    meta = json.loads(Path(dataset_json).read_text())
    out = {}
    for v in meta["videos"]:
        actors = []
        for a in v["actors"]:
            a = dict(a)
            a["colors"] = tuple(tuple(c) for c in a["colors"])
            a["cue_seconds"] = tuple(a["cue_seconds"])
            a["segments"] = tuple(MotionSegment(**s) for s in a["segments"])
            actors.append(Actor(**a))
        out[v["video_id"]] = tuple(actors)
    return out


def dataset_matches(out_dir: str | os.PathLike, *, num_videos: int, seconds: int, seed: int, width: int = 160,
                    height: int = 120, val_fraction: float = 0.4) -> bool:
    """True if `out_dir` already holds a complete dataset generated with exactly these arguments.

    dataset.json is written last, so its presence means the other files are complete.
    """
    path = Path(out_dir) / "dataset.json"
    if not path.exists():
        return False
    meta = json.loads(path.read_text())
    want = {"num_videos": num_videos, "seconds": seconds, "width": width, "height": height,
            "val_fraction": val_fraction}
    return meta.get("version") == GENERATOR_VERSION and meta.get("seed") == seed and meta.get("args") == want
