"""The annotated video of `jobs/detect.py`: every frame of the requested span at the input's size and
frame rate, with each person's box, top actions and (LFB-NL) the bank seconds its attention used.

Each frame shows the keyframe second nearest to it (frames within half a second of second t show
t's boxes). Written with PyAV (H.264; yuv420p, or yuv444p when a side is odd, which 4:2:0 cannot
hold). The audio is not copied.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
from PIL import Image, ImageDraw

from lfb_ray.visualize import PRED_COLOURS, _font, _label, _short

__all__ = ["FrameOverlay", "PersonOverlay", "write_annotated_video"]

CHUNK = 64  # frames decoded per decord request


@dataclass
class PersonOverlay:
    box: np.ndarray  # [4] normalised
    track: int
    labels: list[tuple[str, float]]  # top actions above the drawing threshold
    bank_seconds: list[int] = field(default_factory=list)  # LFB-NL: the seconds most attended


@dataclass
class FrameOverlay:
    second: int
    persons: list[PersonOverlay]


def _draw(img: Image.Image, ov: FrameOverlay | None, font, small) -> None:
    draw = ImageDraw.Draw(img)
    w, h = img.size
    if ov is None:
        return
    draw.text((3, 2), f"t={ov.second}s  persons {len(ov.persons)}", fill=(255, 255, 255), font=small,
              stroke_width=1, stroke_fill=(0, 0, 0))
    used: set[int] = set()
    for p in ov.persons:
        c = p.track % len(PRED_COLOURS)  # a track keeps its colour, unless another box of the frame has it
        while c in used and len(used) < len(PRED_COLOURS):
            c = (c + 1) % len(PRED_COLOURS)
        used.add(c)
        colour = PRED_COLOURS[c]
        x1, y1, x2, y2 = (np.asarray(p.box, np.float64) * [w, h, w, h]).tolist()
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=2 if min(w, h) >= 240 else 1)
        lines = [f"#{p.track} " + (f"{_short(p.labels[0][0], 14)} {p.labels[0][1]:.2f}" if p.labels else "")]
        lines += [f"{_short(n, 14)} {s:.2f}" for n, s in p.labels[1:]]
        if p.bank_seconds:
            lines.append("bank " + " ".join(f"{s}s" for s in p.bank_seconds))
        step = small.size + 3 if hasattr(small, "size") else 12
        top = y2 + 1 if y2 + 1 + step * len(lines) <= h else y1 - step * len(lines) - 1  # below, else above
        if top < 0:
            top = y2 - step * len(lines)  # no room outside: inside the box's bottom
        for i, text in enumerate(lines):
            _label(draw, (x1, top + step * i), text, colour, small)


def write_annotated_video(path: str, video: str, frame_idx: np.ndarray, fps: float,
                          overlays: dict[int, FrameOverlay], frame_seconds: np.ndarray,
                          progress=None) -> tuple[int, int, int]:
    """Decode frames `frame_idx` of `video` (native size), draw the overlay of each frame's keyframe
    second (`frame_seconds[i]`, a key of `overlays`, or none drawn) and encode them at `fps`.

    Returns:
        (frames written, width, height).
    """
    import av
    import decord

    vr = decord.VideoReader(video, num_threads=1)
    h, w = vr[0].shape[:2] if len(frame_idx) else (0, 0)
    rate = Fraction(fps).limit_denominator(1001)
    size = min(w, h)
    font, small = _font(max(10, size // 24)), _font(max(9, size // 28))
    tmp = f"{path}.tmp.mp4"
    n = 0
    with av.open(tmp, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p" if w % 2 == 0 and h % 2 == 0 else "yuv444p"
        stream.time_base = 1 / rate
        stream.options = {"crf": "20", "preset": "veryfast"}
        for c0 in range(0, len(frame_idx), CHUNK):
            idx = frame_idx[c0:c0 + CHUNK]
            batch = vr.get_batch(idx.tolist()).asnumpy()
            for j, rgb in enumerate(batch):
                img = Image.fromarray(rgb)
                _draw(img, overlays.get(int(frame_seconds[c0 + j])), font, small)
                frame = av.VideoFrame.from_ndarray(np.asarray(img), format="rgb24")
                frame.pts = n
                container.mux(stream.encode(frame))
                n += 1
            if progress is not None:
                progress(len(idx))
        container.mux(stream.encode(None))
    os.replace(tmp, path)
    return n, w, h
