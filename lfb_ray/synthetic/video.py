"""Encodes a planned video to mp4, with encoder settings chosen so the bytes repeat for a seed."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from lfb_ray.storage import atomic_path
from lfb_ray.synthetic.classes import FPS
from lfb_ray.synthetic.render import render_frames
from lfb_ray.synthetic.scene import VideoPlan


def write_video(plan: VideoPlan, seed: int, index: int, path: Path, width: int, height: int) -> None:
    """Renders and encodes one video (H.264 yuv420p, 30 fps) to path atomically."""
    rng = np.random.default_rng([seed, 1, index])
    with atomic_path(path, suffix=".mp4") as tmp, av.open(tmp, "w", format="mp4") as container:
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
