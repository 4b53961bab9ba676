"""Look at a model's detections on one video: GT and predicted boxes drawn on its keyframes, as a
PNG grid and a short MP4, and, for LFB-NL models, which bank seconds the non-local attention used.

Runs in-process from the prepared shards (plain pyarrow, no Ray): the rows are scored by
`lfb_ray.inference.predict_keyframes`, the inference job's `predict_batch` path; this module draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from lfb_ray.config import Config
from lfb_ray.inference import KeyframePrediction, predict_keyframes
from lfb_ray.storage import atomic_path

__all__ = ["Visualization", "bank_seconds", "read_video_rows", "render_tile", "visualize_video"]

GT_COLOUR = (40, 220, 60)
PRED_COLOURS = ((255, 140, 0), (230, 60, 230), (0, 200, 255), (255, 230, 0), (255, 70, 70), (150, 120, 255))
IDLE_BAR = (110, 110, 110)
MAX_STRIP_BOXES = 3  # timeline rows per tile (highest-scoring predicted boxes)
TOP_SECONDS = 3  # highlighted and labelled bank seconds per timeline row
VIDEO_FPS = 2  # one keyframe per 0.5 s in the MP4


def bank_seconds(t: int | np.ndarray, slots: int | np.ndarray, *, window_seconds: int,
                 max_feats_per_second: int) -> np.ndarray:
    """AVA second held by bank slot `s` of keyframe `t`: `t - W//2 + s // K` (`FeatureBank.sample`)."""
    return np.asarray(t) - window_seconds // 2 + np.asarray(slots) // max_feats_per_second


def read_video_rows(cfg: Config, video_id: str, split: str = "val") -> list[dict]:
    """The prepared rows of one video (all schema columns), sorted by keyframe second.

    Raises:
        PrepareError: nothing prepared for the split.
        ValueError: the video is not in the split.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lfb_ray.data.prep import prepared_files
    from lfb_ray.storage import resolve

    files = prepared_files(cfg.prepared_dir, split)  # layout <split>/<video_id>/keyframes.parquet
    mine = [f for f in files if f.rstrip("/").split("/")[-2] == video_id]
    if not mine:
        known = sorted({f.rstrip("/").split("/")[-2] for f in files})
        raise ValueError(f"video {video_id!r} is not in the prepared {split} split; it has {len(known)} videos: "
                         f"{', '.join(known[:10])}{' ...' if len(known) > 10 else ''}")
    fs, _ = resolve(cfg.prepared_dir)
    tables = []
    for f in mine:
        with fs.open_input_file(f) as fh:
            tables.append(pq.read_table(fh))
    rows = pa.concat_tables(tables).to_pylist()
    return sorted(rows, key=lambda r: int(r["timestamp"]))


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, colour: tuple, font) -> None:
    """Text on a filled box of `colour`, clamped inside the image."""
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    w, h = x1 - x0 + 4, y1 - y0 + 3
    width, height = draw.im.size  # the image being drawn on
    x = min(max(0, xy[0]), width - w)
    y = min(max(0, xy[1]), height - h)
    draw.rectangle((x, y, x + w, y + h), fill=colour)
    dark = sum(colour[:3]) > 380
    draw.text((x + 2 - x0, y + 1 - y0), text, fill=(0, 0, 0) if dark else (255, 255, 255), font=font)


def _short(name: str, n: int = 18) -> str:
    return name if len(name) <= n else name[:n - 1] + "…"


def _top_labels(scores: np.ndarray, classes: np.ndarray, top_k: int, score_thr: float) -> list[tuple[int, float]]:
    """The `top_k` best (class, score) among `classes` (label-map ids) with score > `score_thr`."""
    order = classes[np.argsort(-scores[classes], kind="stable")[:top_k]]
    return [(int(c), float(scores[c])) for c in order if scores[c] > score_thr]


def render_tile(kp: KeyframePrediction, *, label_names: dict[int, str], top_k: int = 3,
                score_thr: float = 0.3, tile_width: int = 480, window_seconds: int | None = None) -> Image.Image:
    """Draw one keyframe: header, GT (green) and predicted boxes, and NL timelines below.

    Layout (top to bottom): a 20 px header; the frame scaled to `tile_width`; when
    `window_seconds` is given, a caption and `MAX_STRIP_BOXES` timeline rows (one per predicted
    box, in its colour: one bar per window second, height = attention mass, the top-3 seconds
    highlighted and labelled, a white tick at the keyframe second). The height depends only on
    the frame size and `window_seconds`, so all tiles of a video have the same size.
    """
    font, small = _font(12), _font(10)
    h0, w0 = kp.image.shape[:2]
    fw, fh = tile_width, int(round(h0 * tile_width / w0))
    header, strip_row, caption = 20, 30, 16
    strips = caption + MAX_STRIP_BOXES * strip_row if window_seconds else 0
    tile = Image.new("RGB", (fw, header + fh + strips), (25, 25, 25))
    tile.paste(Image.fromarray(kp.image).resize((fw, fh), Image.BILINEAR), (0, header))
    draw = ImageDraw.Draw(tile)
    scale = np.array([fw, fh, fw, fh], np.float32)

    classes = np.array(sorted(c for c in label_names if 0 < c < kp.scores.shape[1]), np.int64)
    drawn = []  # (box index, labels) of predicted boxes with a label above the threshold, best first
    best_score = kp.scores[:, classes].max(axis=1) if len(kp.scores) and len(classes) else np.zeros(len(kp.scores))
    for b in np.argsort(-best_score, kind="stable"):
        labels = _top_labels(kp.scores[b], classes, top_k, score_thr)
        if labels:
            drawn.append((int(b), labels))
    draw.text((4, 3), f"{kp.video_id}  t={kp.timestamp}s   GT {len(kp.gt_boxes)}   pred {len(drawn)}"
                      f"/{len(kp.boxes)}", fill=(235, 235, 235), font=font)

    for box, labels in zip(kp.gt_boxes, kp.gt_labels):
        x1, y1, x2, y2 = (box * scale).tolist()
        draw.rectangle((x1, header + y1, x2, header + y2), outline=GT_COLOUR, width=2)
        for i, c in enumerate(labels):
            _label(draw, (x1, header + y1 + 1 + 13 * i), "GT " + _short(label_names.get(c, str(c))), GT_COLOUR, small)
    for n, (b, labels) in enumerate(drawn):
        colour = PRED_COLOURS[n % len(PRED_COLOURS)]
        x1, y1, x2, y2 = (kp.boxes[b] * scale).tolist()
        draw.rectangle((x1 + 1, header + y1 + 1, x2 - 1, header + y2 - 1), outline=colour, width=2)
        for i, (c, s) in enumerate(labels):
            text = f"{n + 1}: {_short(label_names.get(c, str(c)))} {s:.2f}"
            _label(draw, (x1, header + y2 - 13 * (len(labels) - i)), text, colour, small)

    if window_seconds:
        y = header + fh
        w = window_seconds
        draw.text((4, y + 2), f"NL attention over the bank, t{-(w // 2):+d}..t{w - 1 - w // 2:+d} s"
                              f" (layer 1; top {TOP_SECONDS} s labelled)", fill=(200, 200, 200), font=small)
        y += caption
        left, right = 22, fw - 52
        bar_w = (right - left) / w
        for n, (b, _) in enumerate(drawn[:MAX_STRIP_BOXES]):
            colour = PRED_COLOURS[n % len(PRED_COLOURS)]
            top = y + n * strip_row
            draw.text((4, top + 12), f"{n + 1}", fill=colour, font=font)
            mass, pad = kp.attention[b] if kp.attention is not None else (np.zeros(w), 1.0)
            best = [int(j) for j in np.argsort(-mass, kind="stable")[:TOP_SECONDS] if mass[j] > 0]
            peak = max(float(mass.max()), 1e-12)
            base = top + strip_row - 2
            for j in range(w):
                height = (strip_row - 16) * float(mass[j]) / peak
                x = left + j * bar_w
                draw.rectangle((x + 0.5, base - max(height, 1.0), x + bar_w - 0.5, base),
                               fill=colour if j in best else IDLE_BAR)
            xt = left + (w // 2 + 0.5) * bar_w  # the keyframe's own second
            draw.line((xt, top + 14, xt, base), fill=(255, 255, 255), width=1)
            end = 0.0
            for j in sorted(best):  # window second j is t - W//2 + j; labels nudged right, no overlap
                text = f"{kp.timestamp - w // 2 + j}s"
                x = max(left + (j + 0.5) * bar_w - draw.textlength(text, font=small) / 2 - 2, end + 1)
                _label(draw, (x, top + 1), text, colour, small)
                end = x + draw.textlength(text, font=small) + 4
            draw.text((right + 4, top + 12), f"pad {100 * pad:.0f}%", fill=(170, 170, 170), font=small)
    return tile


@dataclass
class Visualization:
    png: str
    mp4: str
    timestamps: list[int]  # keyframe seconds shown, in order
    tile_size: tuple[int, int]  # (width, height) of one tile
    grid_shape: tuple[int, int]  # (rows, columns)


def _write_mp4(path: str, tiles: list[Image.Image]) -> None:
    import av

    w, h = tiles[0].size
    w2, h2 = w + w % 2, h + h % 2  # yuv420p needs even sizes
    with atomic_path(path, suffix=".mp4") as tmp, av.open(tmp, mode="w") as container:
        stream = container.add_stream("libx264", rate=VIDEO_FPS)
        stream.width, stream.height, stream.pix_fmt = w2, h2, "yuv420p"
        for t in tiles:
            canvas = Image.new("RGB", (w2, h2))
            canvas.paste(t, (0, 0))
            frame = av.VideoFrame.from_ndarray(np.asarray(canvas), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def visualize_video(cfg: Config, checkpoint: str, video_id: str, *, split: str = "val", out_dir: str = "",
                    max_keyframes: int = 16, top_k: int = 3, score_thr: float = 0.3, columns: int = 4,
                    tile_width: int = 480, device: str | None = None) -> Visualization:
    """Run the model on up to `max_keyframes` keyframes of a video and draw them.

    Keyframes are spread evenly over the video. Writes `<out_dir>/<video>_grid.png` (tiles
    row-major, `columns` wide) and `<out_dir>/<video>.mp4` (H.264, one keyframe per 0.5 s).
    `out_dir` defaults to `<workdir>/visualize`.

    Raises:
        ValueError: the video is not in the split, or `max_keyframes` < 1.
    """
    from lfb_ray.data.annotations import read_label_map
    from lfb_ray.models.device import load_model

    if max_keyframes < 1:
        raise ValueError(f"max_keyframes must be >= 1, got {max_keyframes}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = read_video_rows(cfg, video_id, split)
    keep = np.unique(np.linspace(0, len(rows) - 1, min(max_keyframes, len(rows))).round().astype(int))
    rows = [rows[i] for i in keep]
    model = load_model(cfg, checkpoint, dev)
    windows = None
    if cfg.model.uses_bank:
        from lfb_ray.bank import FeatureBank
        from lfb_ray.bank.window import WindowSampler

        windows = WindowSampler.for_config(FeatureBank.open(cfg.bank_dir, expected_dim=model.feature_channels),
                                           dev, cfg.bank)
    preds = predict_keyframes(model, rows, cfg, windows=windows, device=dev, seed=cfg.train.seed)
    names = read_label_map(cfg.data_path(cfg.data.label_map))
    window = cfg.bank.window_seconds if cfg.model.fbo == "nl" else None
    tiles = [render_tile(p, label_names=names, top_k=top_k, score_thr=score_thr, tile_width=tile_width,
                         window_seconds=window) for p in preds]

    out = Path(out_dir or Path(cfg.workdir) / "visualize")
    out.mkdir(parents=True, exist_ok=True)
    tw, th = tiles[0].size
    cols = min(columns, len(tiles))
    nrows = -(-len(tiles) // cols)
    grid = Image.new("RGB", (cols * tw, nrows * th), (0, 0, 0))
    for i, t in enumerate(tiles):
        grid.paste(t, ((i % cols) * tw, (i // cols) * th))
    png, mp4 = str(out / f"{video_id}_grid.png"), str(out / f"{video_id}.mp4")
    with atomic_path(png, suffix=".png") as tmp:
        grid.save(tmp)
    _write_mp4(mp4, tiles)
    return Visualization(png=png, mp4=mp4, timestamps=[p.timestamp for p in preds], tile_size=(tw, th),
                         grid_shape=(nrows, cols))
