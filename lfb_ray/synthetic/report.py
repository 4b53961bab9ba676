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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lfb_ray.synthetic.classes import LABEL_FAMILIES
from lfb_ray.synthetic.dataset import load_actors
from lfb_ray.synthetic.scene import Actor

__all__ = ["BankProbe", "RoleAccuracy", "bank_probe", "find_result_csvs", "matched_entries", "read_bank_split",
           "role_accuracy"]


@dataclass(frozen=True)
class RoleAccuracy:
    """Role hits and GT boxes, apart for keyframes whose clip shows the cue and those where it does not."""

    cue_correct: int
    cue_total: int
    nocue_correct: int
    nocue_total: int

    @property
    def cue(self) -> float:
        return _ratio(self.cue_correct, self.cue_total)

    @property
    def nocue(self) -> float:
        return _ratio(self.nocue_correct, self.nocue_total)


def _ratio(ok: int, n: int) -> float:
    return ok / n if n else float("nan")


def _cue_in_clip(actor: Actor, second: int) -> bool:
    """Whether the 2-second clip at `second` can show the actor's role cue (the rule above)."""
    return any(abs(c - second) <= 1 for c in actor.cue_seconds)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a [4], b [N, 4] -> [N]."""
    ix = np.clip(np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0]), 0, None)
    iy = np.clip(np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1]), 0, None)
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter)


def role_accuracy(dataset_dir: str | os.PathLike, result_csv: str | os.PathLike, split: str = "val") -> RoleAccuracy:
    """Role accuracy of one result CSV, split by whether the actor's cue is inside the clip."""
    roles = tuple(LABEL_FAMILIES["long_term"])
    actors = load_actors(Path(dataset_dir) / "dataset.json")
    gt = _gt_boxes(Path(dataset_dir), split, roles)
    det: dict[tuple[str, int], dict[tuple, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    with open(result_csv, newline="") as f:
        for row in csv.reader(f):
            if int(row[6]) in roles:
                det[row[0], int(row[1])][tuple(float(v) for v in row[2:6])][int(row[6])] = float(row[7])
    counts = np.zeros((2, 2), np.int64)  # [cue in clip?, correct?]
    for (vid, t), people in gt.items():
        boxes = list(det.get((vid, t), {}))
        for box, role, pid in people:
            if not boxes:
                continue
            ious = _iou(box, np.array(boxes))
            best = int(ious.argmax())
            if ious[best] < 0.5:
                continue
            scores = det[vid, t][boxes[best]]
            pred = max(roles, key=lambda c: scores.get(c, -np.inf))
            cue = _cue_in_clip(actors[vid][pid], t)
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


@dataclass(frozen=True)
class BankProbe:
    """What the baseline's bank holds, read with the baseline's own classifier (accuracies, counts)."""

    role_cue: dict[str, tuple[float, int]]  # split -> (role acc of entries at the actor's cue seconds, n)
    role_nocue: dict[str, tuple[float, int]]  # split -> (role acc of the other entries, n)
    look_val: tuple[float, int]  # look (identity) accuracy of val entries
    oracle_val: dict[str, tuple[float, int]]  # reader -> (role acc on val no-cue keyframes, n)


def _gt_boxes(dataset_dir: Path, split: str, ids: tuple[int, ...]) -> dict:
    gt: dict[tuple[str, int], list[tuple[np.ndarray, int, int]]] = defaultdict(list)
    with open(dataset_dir / "annotations" / f"{split}.csv", newline="") as f:
        for row in csv.reader(f):
            if int(row[6]) in ids:
                gt[row[0], int(row[1])].append((np.array(row[2:6], float), int(row[6]), int(row[7])))
    return gt


def read_bank_split(split_dir: str | os.PathLike):
    """A bank split's `features.arrow`: (the Arrow table, its features as float32 [N, C])."""
    import pyarrow.ipc as ipc

    with ipc.open_file(str(Path(split_dir) / "features.arrow")) as reader:
        table = reader.read_all()
    return table, np.stack(table.column("feature").to_numpy(zero_copy_only=False)).astype(np.float32)


def matched_entries(table, gt: dict) -> Iterator[tuple[int, str, int, tuple]]:
    """Bank rows matched to a GT person: (row, video id, second, GT item) for each row of `table`
    whose box has IoU >= 0.5 with one of `gt[(video id, second)]` (items whose first element is the
    box [4]), paired with the best-overlapping item."""
    for i, (vid, sec, box) in enumerate(zip(table.column("video_id").to_pylist(), table.column("second").to_pylist(),
                                            table.column("box").to_pylist(), strict=True)):
        cands = gt.get((vid, sec), [])
        if not cands:
            continue
        ious = _iou(np.asarray(box, float), np.stack([c[0] for c in cands]))
        j = int(ious.argmax())
        if ious[j] >= 0.5:
            yield i, vid, sec, cands[j]


def bank_probe(dataset_dir: str | os.PathLike, bank_dir: str | os.PathLike,
               classifier: tuple[np.ndarray, np.ndarray]) -> BankProbe:
    """Apply the baseline's `fc_cls` to every bank entry matched (IoU >= 0.5) to a GT actor.

    Answers "does the bank hold each actor's role, and can an entry be told whose it is?" apart
    from whether an LFB head learns to use it. Oracle readers for val keyframes without the cue:
    the mean role probability over bank entries of the same actor (all seconds, or only its cue
    seconds), and over all actors of the video (what an operator that cannot match identity gets).

    Args:
        bank_dir: the bank folder with `train/` and `val/` (`features.arrow` each).
        classifier: (weight [num_classes, C], bias [num_classes]) of the baseline's `fc_cls`, the
            detector that computed the bank (`lfb_ray.models.checkpoint.read_classifier`).
    """
    dataset_dir = Path(dataset_dir)
    weight, bias = classifier
    roles, looks = list(LABEL_FAMILIES["long_term"]), list(LABEL_FAMILIES["appearance"])
    actors = load_actors(dataset_dir / "dataset.json")
    role_cue, role_nocue = {}, {}
    look = (0, 0)
    oracle: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for split in ("train", "val"):
        gt = _gt_boxes(dataset_dir, split, tuple(roles))
        table, feats = read_bank_split(Path(bank_dir) / split)
        logits = feats @ weight.T + bias  # [N, num_classes]
        counts = np.zeros((2, 2), np.int64)  # [at cue second?, correct?]
        look_ok = look_n = 0
        own: dict[tuple[str, int], list[tuple[int, np.ndarray]]] = defaultdict(list)
        video: dict[str, list[np.ndarray]] = defaultdict(list)
        for i, vid, sec, (_, role, pid) in matched_entries(table, gt):
            actor = actors[vid][pid]
            at_cue = _cue_in_clip(actor, sec)
            counts[int(at_cue), int(roles[int(np.argmax(logits[i, roles]))] == role)] += 1
            if split == "val":
                look_ok += looks[int(np.argmax(logits[i, looks]))] == looks[actor.look]
                look_n += 1
                p = np.exp(logits[i, roles] - logits[i, roles].max())
                own[vid, pid].append((sec, p / p.sum()))
                video[vid].append(p / p.sum())
        role_cue[split] = (_ratio(int(counts[1, 1]), int(counts[1].sum())), int(counts[1].sum()))
        role_nocue[split] = (_ratio(int(counts[0, 1]), int(counts[0].sum())), int(counts[0].sum()))
        if split == "val":
            look = (_ratio(look_ok, look_n), look_n)
            for (vid, t), cands in gt.items():
                for _, role, pid in cands:
                    actor = actors[vid][pid]
                    if _cue_in_clip(actor, t):
                        continue
                    readers = {
                        "same actor, all seconds": [p for _, p in own[vid, pid]],
                        "same actor, its cue seconds": [p for s, p in own[vid, pid] if _cue_in_clip(actor, s)],
                        "all actors of the video": video[vid],
                    }
                    for name, ps in readers.items():
                        if ps:
                            oracle[name][0] += int(roles[int(np.argmax(np.mean(ps, axis=0)))] == role)
                            oracle[name][1] += 1
    return BankProbe(role_cue, role_nocue, look,
                     {k: (_ratio(ok, n), n) for k, (ok, n) in oracle.items()})
