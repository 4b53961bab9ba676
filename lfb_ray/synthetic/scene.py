"""What one video shows, drawn before any pixel: actors, their rows, motion segments, roles and cues.

The plan is the ground truth that both the renderer and the annotation writers read, so the labels
and the frames cannot disagree.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

from lfb_ray.synthetic.classes import (
    APPEARANCE_POOL,
    AVA_START_SECOND,
    BACKGROUND_POOL,
    EDGE_MARGIN_PX,
    FPS,
    LOOK_ASPECT,
    LOOK_HEIGHT_FRACTION,
    MOTION_CLASSES,
    MOTION_DIRECTION,
    ROLE_CLASSES,
    SPEED_RANGE,
)


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
    """Motion segments covering the video that keep the actor inside the frame. Why half-second
    boundaries and >= 2 s segments: each keyframe's clip [t-1, t+1] is then mostly one motion."""
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
