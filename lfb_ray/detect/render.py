"""The annotated video of `jobs/detect.py`: every frame of the requested span at the input's frame
rate, with each person's box in its track's colour, and a side panel listing each person's top
actions and (LFB-NL) the bank seconds its attention used.

Readable at any source size: a source whose short side is under `MIN_SHORT_SIDE` is upscaled to
it (aspect kept), and the text goes to a panel beside the frame, so that only a small `#track`
tag above each box is drawn on the picture and the people stay visible. Each frame shows the
keyframe second nearest to it (frames within half a second of second t show t's boxes). Written
with PyAV (H.264, yuv420p: every side is even). The audio is not copied.
"""

from __future__ import annotations

import functools
import io
import os
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
from PIL import Image, ImageDraw

from lfb_ray.storage import atomic_path
from lfb_ray.visualize import PRED_COLOURS, _font, _label, _short

__all__ = ["FrameOverlay", "Layout", "PersonOverlay", "draw_frame", "overlay_layer", "panel_rows", "write_annotated_video", "write_frame_png"]

CHUNK = 64  # frames decoded per decord request
MIN_SHORT_SIDE = 480  # smaller sources are upscaled to this short side
PANEL_BG = (24, 24, 24)


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


def _even(x: float) -> int:
    return max(2, int(round(x / 2)) * 2)


@dataclass(frozen=True)
class Layout:
    """Where things go in an output frame of `size` = (frame_w + panel_w, frame_h).

    The source frame (src_w x src_h) is resized to frame_w x frame_h (upscaled when its short side
    is under `MIN_SHORT_SIDE`, never downscaled) at the left; the text panel is panel_w wide at the
    right. `text_px` and `tag_px` are the panel's and the box tags' font sizes.
    """

    src_w: int
    src_h: int
    frame_w: int
    frame_h: int
    panel_w: int
    text_px: int
    tag_px: int

    @classmethod
    def for_source(cls, w: int, h: int, min_short_side: int = MIN_SHORT_SIDE) -> Layout:
        scale = max(1.0, min_short_side / max(1, min(w, h)))
        fw, fh = _even(w * scale), _even(h * scale)
        text_px = max(12, fh // 34)
        return cls(src_w=w, src_h=h, frame_w=fw, frame_h=fh, panel_w=_even(max(17 * text_px, fh * 0.5)),
                   text_px=text_px, tag_px=max(10, fh // 44))

    @property
    def size(self) -> tuple[int, int]:
        return self.frame_w + self.panel_w, self.frame_h

    @property
    def pad(self) -> int:
        return max(4, self.text_px // 2)

    @property
    def row_px(self) -> int:
        return self.text_px + 4

    @property
    def panel_rows(self) -> int:
        return max(1, (self.frame_h - self.pad) // self.row_px)


@functools.lru_cache(maxsize=8)
def _cached_font(size: int):
    return _font(size)


def _colours(persons: list[PersonOverlay]) -> list[tuple[int, int, int]]:
    """A track keeps its colour, unless another box of the frame already has it."""
    used: set[int] = set()
    out = []
    for p in persons:
        c = p.track % len(PRED_COLOURS)
        while c in used and len(used) < len(PRED_COLOURS):
            c = (c + 1) % len(PRED_COLOURS)
        used.add(c)
        out.append(PRED_COLOURS[c])
    return out


def _tag_xy(box: tuple[float, float, float, float], tag_h: int, frame_h: int) -> tuple[float, float]:
    """Top-left of a box's `#track` tag: above the box, else below it, else inside its top edge."""
    x1, y1, x2, y2 = box
    if y1 - tag_h - 1 >= 0:
        return x1, y1 - tag_h - 1
    if y2 + 1 + tag_h <= frame_h:
        return x1, y2 + 1
    return x1 + 2, y1 + 2


def _fit(prefix: str, name: str, suffix: str, font, width: float) -> str:
    """`prefix + name + suffix`, the name shortened (with an ellipsis) until the row is at most `width` px."""
    for n in range(len(name), 0, -1):
        row = prefix + _short(name, n) + suffix
        if font.getlength(row) <= width:
            return row
    return prefix + _short(name, 1) + suffix


def panel_rows(ov: FrameOverlay, colours: list[tuple], layout: Layout) -> list[tuple[str, tuple | None]]:
    """The panel's (text, colour) rows: a header, then per person `#track` and its first action on
    a tag of its colour, its other actions and (LFB-NL) its bank seconds below. Action names are cut
    to the panel's width; rows past its height become one "+N more rows" row."""
    font = _cached_font(layout.text_px)
    width = layout.panel_w - 2 * layout.pad - 4  # a tag's fill adds 4 px
    rows: list[tuple[str, tuple | None]] = [(f"t={ov.second}s  persons {len(ov.persons)}", None)]
    for p, colour in zip(ov.persons, colours, strict=True):
        head = f"#{p.track} "
        if not p.labels:
            rows.append((head + "(none above --draw-thr)", colour))
        for i, (name, score) in enumerate(p.labels):
            rows.append((_fit(head if i == 0 else "   ", name, f" {score:.2f}", font, width), colour if i == 0 else None))
        if p.bank_seconds:
            rows.append(("   bank " + " ".join(f"{s}s" for s in p.bank_seconds), None))
    fit = layout.panel_rows
    if len(rows) > fit:
        rows = rows[:fit - 1] + [(f"+{len(rows) - fit + 1} more rows", None)]
    return rows


def overlay_layer(ov: FrameOverlay, layout: Layout) -> Image.Image:
    """What `ov` adds to a frame, as an RGBA image of `layout.size`: the boxes and `#track` tags
    (transparent elsewhere over the picture) and the opaque panel with its `panel_rows`. Drawn once
    per keyframe second and pasted on each of its frames (text rendering costs more than the paste)."""
    layer = Image.new("RGBA", layout.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    w, h = layout.frame_w, layout.frame_h
    draw.rectangle((w, 0, layout.size[0], h), fill=PANEL_BG)
    text, tag = _cached_font(layout.text_px), _cached_font(layout.tag_px)
    colours = _colours(ov.persons)
    line_w = max(2, h // 240)
    tag_h = draw.textbbox((0, 0), "#0", font=tag)[3] + 3
    for p, colour in zip(ov.persons, colours, strict=True):
        box = tuple((np.asarray(p.box, np.float64) * [w, h, w, h]).tolist())
        draw.rectangle(box, outline=colour, width=line_w)
        x, y = _tag_xy(box, tag_h, h)
        _label(draw, (x, y), f"#{p.track}", colour, tag)
    for i, (s, colour) in enumerate(panel_rows(ov, colours, layout)):
        xy = (w + layout.pad, layout.pad + i * layout.row_px)
        if colour is None:
            draw.text(xy, s, fill=(235, 235, 235), font=text)
        else:
            _label(draw, xy, s, colour, text)
    return layer


def _flat_layer(layer: Image.Image, frame_w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(panel RGB [H, panel_w, 3], and over the picture: drawn pixel indices, alpha [k, 1], RGB [k, 3])
    of a layer, to put them on each frame with numpy (cheaper than PIL's masked paste)."""
    rgba = np.asarray(layer)
    pic = np.ascontiguousarray(rgba[:, :frame_w]).reshape(-1, 4)
    idx = np.flatnonzero(pic[:, 3])
    return rgba[:, frame_w:, :3], idx, pic[idx, 3:].astype(np.float32) / 255, pic[idx, :3].astype(np.float32)


def draw_frame(rgb: np.ndarray, ov: FrameOverlay | None, layout: Layout, layer=None) -> Image.Image:
    """One output frame: `rgb` (uint8 [src_h, src_w, 3]) resized into `layout`, with the
    `overlay_layer` of `ov` on it (`layer`: that layer's `_flat_layer`, drawn before)."""
    frame = Image.fromarray(rgb)
    if frame.size != (layout.frame_w, layout.frame_h):
        frame = frame.resize((layout.frame_w, layout.frame_h), Image.Resampling.BILINEAR)
    pic = np.array(frame)
    if ov is None:
        panel = np.full((layout.frame_h, layout.panel_w, 3), PANEL_BG, np.uint8)
    else:
        panel, idx, alpha, colour = layer if layer is not None else _flat_layer(overlay_layer(ov, layout),
                                                                               layout.frame_w)
        flat = pic.reshape(-1, 3)
        flat[idx] = (colour * alpha + flat[idx] * (1 - alpha) + 0.5).astype(np.uint8)
    return Image.fromarray(np.concatenate([pic, panel], axis=1))


def write_annotated_video(path: str, video: str, frame_idx: np.ndarray, fps: float,
                          overlays: dict[int, FrameOverlay], frame_seconds: np.ndarray,
                          progress=None) -> tuple[int, int, int]:
    """Decode frames `frame_idx` of `video`, draw each with the overlay of its keyframe second
    (`frame_seconds[i]`, a key of `overlays`, or none drawn) by `draw_frame`, and encode them at `fps`.

    Returns:
        (frames written, width, height) of the written video (`Layout.size`).
    """
    import av
    import decord

    vr = decord.VideoReader(video, num_threads=1)
    h, w = vr[0].shape[:2]
    layout = Layout.for_source(w, h)
    rate = Fraction(fps).limit_denominator(1001)
    layers: dict[int, tuple] = {}  # keyframe second -> its overlay_layer, flattened
    n = 0
    with atomic_path(path, suffix=".mp4") as tmp, av.open(tmp, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height = layout.size
        stream.pix_fmt = "yuv420p"
        stream.time_base = 1 / rate
        stream.options = {"crf": "20", "preset": "veryfast"}
        for c0 in range(0, len(frame_idx), CHUNK):
            idx = frame_idx[c0:c0 + CHUNK]
            batch = vr.get_batch(idx.tolist()).asnumpy()
            for j, rgb in enumerate(batch):
                second = int(frame_seconds[c0 + j])
                ov = overlays.get(second)
                if ov is not None and second not in layers:
                    layers[second] = _flat_layer(overlay_layer(ov, layout), layout.frame_w)
                img = draw_frame(rgb, ov, layout, layers.get(second))
                frame = av.VideoFrame.from_ndarray(np.asarray(img), format="rgb24")
                frame.pts = n
                container.mux(stream.encode(frame))
                n += 1
            if progress is not None:
                progress(len(idx))
        container.mux(stream.encode(None))
    return (n, *layout.size)


def write_frame_png(path: str, video: str, frame_index: int, overlay: FrameOverlay | None) -> None:
    """Frame `frame_index` of `video`, drawn as in the mp4, as a lossless PNG (written atomically)."""
    import decord

    from lfb_ray.storage import resolve, write_bytes_atomic

    rgb = decord.VideoReader(video, num_threads=1)[int(frame_index)].asnumpy()
    img = draw_frame(rgb, overlay, Layout.for_source(rgb.shape[1], rgb.shape[0]))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    fs, local = resolve(os.path.abspath(path))
    write_bytes_atomic(fs, local, buf.getvalue())
