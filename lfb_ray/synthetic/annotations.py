"""AVA-format annotation files of a split: GT CSV, excluded timestamps, proposals, and the label map.

Written from the video plans, not from the rendered frames, so boxes match the pixels exactly.
"""

from __future__ import annotations

import csv
import io
import pickle
from pathlib import Path

import numpy as np

from lfb_ray.storage import resolve, write_bytes_atomic
from lfb_ray.synthetic.classes import APPEARANCE_CLASSES, AVA_START_SECOND, CLASSES, FPS
from lfb_ray.synthetic.scene import VideoPlan, actor_x_px, motion_label_at


def write_atomic(path: Path, data: bytes) -> None:
    """A generated file appears whole or not at all, so an interrupted run is never mistaken for a dataset."""
    fs, resolved = resolve(str(path))
    write_bytes_atomic(fs, resolved, data)


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


def label_map_bytes() -> bytes:
    items = [f'item {{\n  name: "{c.name}"\n  id: {c.action_id}\n}}\n' for c in CLASSES]
    return "".join(items).encode()


def write_split(out: Path, split: str, plans: list[VideoPlan], rng: np.random.Generator, *, width: int,
                height: int) -> dict:
    """Writes `annotations/{split}.csv`, `{split}_excluded_timestamps.csv` and `{split}_proposals.pkl`.

    `plans` are the split's videos sorted by id; `rng` draws which keyframes get low-scoring or no
    proposals and which are excluded. Returns the split's entry of dataset.json.
    """
    rows, gt = [], {}
    for p in plans:
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
    write_atomic(out / "annotations" / f"{split}.csv", _csv_bytes(rows))
    write_atomic(
        out / "annotations" / f"{split}_excluded_timestamps.csv",
        _csv_bytes([k.split(",") for k in excluded]),
    )
    write_atomic(out / "annotations" / f"{split}_proposals.pkl", pickle.dumps(proposals, protocol=4))
    return {
        "videos": [p.video_id for p in plans],
        "keyframes": len(keys),
        "boxes": sum(len(v) for v in gt.values()),
        "excluded_timestamps": excluded,
        "proposal_keys_below_0.9": low_keys,
        "proposal_keys_missing": missing_keys,
    }
