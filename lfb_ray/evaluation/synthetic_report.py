"""Where the bank helps on the synthetic set: role accuracy with and without the cue in the clip.

frame-mAP mixes keyframes whose 2-second clip shows the actor's role cue (any short-term model can
read the role there) with keyframes where only long-term context can tell it. This report splits
them, from the generator's ground truth (`dataset.json`) and a run's val result CSV:

    for each val GT box, the detection with the highest IoU (>= 0.5) predicts the role with the
    highest score among the role classes; it is right if that is the actor's role.
    "cue in clip": one of the actor's cue seconds c has |c - t| <= 1 (the cue lasts ~1 s and
    the test clip spans t-1.07 s .. t+0.53 s), else "no cue".

Chance on "no cue" is about 1/3 (three roles, usually distinct within a video).
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["RoleAccuracy", "role_accuracy", "find_result_csvs"]


@dataclass(frozen=True)
class RoleAccuracy:
    cue_correct: int
    cue_total: int
    nocue_correct: int
    nocue_total: int

    @property
    def cue(self) -> float:
        return self.cue_correct / self.cue_total if self.cue_total else float("nan")

    @property
    def nocue(self) -> float:
        return self.nocue_correct / self.nocue_total if self.nocue_total else float("nan")


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a [4], b [N, 4] -> [N]."""
    ix = np.clip(np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0]), 0, None)
    iy = np.clip(np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1]), 0, None)
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter)


def role_accuracy(dataset_dir: str | os.PathLike, result_csv: str | os.PathLike, split: str = "val") -> RoleAccuracy:
    """Role accuracy of one result CSV, split by whether the actor's cue is inside the clip."""
    from lfb_ray.data.synthetic import LABEL_FAMILIES, load_actors

    roles = tuple(LABEL_FAMILIES["long_term"])
    actors = load_actors(Path(dataset_dir) / "dataset.json")
    gt: dict[tuple[str, int], dict[int, tuple[np.ndarray, int]]] = defaultdict(dict)
    with open(Path(dataset_dir) / "annotations" / f"{split}.csv", newline="") as f:
        for row in csv.reader(f):
            if int(row[6]) in roles:
                gt[row[0], int(row[1])][int(row[7])] = (np.array(row[2:6], float), int(row[6]))
    det: dict[tuple[str, int], dict[tuple, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    with open(result_csv, newline="") as f:
        for row in csv.reader(f):
            if int(row[6]) in roles:
                det[row[0], int(row[1])][tuple(float(v) for v in row[2:6])][int(row[6])] = float(row[7])
    counts = np.zeros((2, 2), np.int64)  # [cue in clip?, correct?]
    for (vid, t), people in gt.items():
        boxes = list(det.get((vid, t), {}))
        for pid, (box, role) in people.items():
            if not boxes:
                continue
            ious = _iou(box, np.array(boxes))
            best = int(ious.argmax())
            if ious[best] < 0.5:
                continue
            scores = det[vid, t][boxes[best]]
            pred = max(roles, key=lambda c: scores.get(c, -np.inf))
            cue = any(abs(c - t) <= 1 for c in actors[vid][pid].cue_seconds)
            counts[int(cue), int(pred == role)] += 1
    return RoleAccuracy(int(counts[1, 1]), int(counts[1].sum()), int(counts[0, 1]), int(counts[0].sum()))


def find_result_csvs(workdir: str | os.PathLike) -> dict[str, Path]:
    """run name -> its last val result CSV under `<workdir>/results/<run>/`."""
    out = {}
    for run in sorted(Path(workdir, "results").glob("*")):
        csvs = sorted(run.glob("val_results_epoch*.csv"))
        if csvs:
            out[run.name] = csvs[-1]
    return out
