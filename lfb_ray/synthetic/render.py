"""Frames of one planned video: background, actor sprites and the role cue on its cue frames."""

from __future__ import annotations

import numpy as np

from lfb_ray.synthetic.classes import AVA_START_SECOND, CUE_HALF_FRAMES, FPS, ROLE_CLASSES, ROLE_CUE_RGB
from lfb_ray.synthetic.scene import Actor, VideoPlan, actor_x_px


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
