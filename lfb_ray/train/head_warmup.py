"""Head warm-up on the frozen bank: train an LFB model's head (operator + `fc_cls`) with Adam on the
baseline features the bank already holds, before any end-to-end fine-tuning.

Why: the bank stores, for every person box of every train second, the baseline's RoI feature
[C] — exactly the short-term feature an LFB model that starts from the baseline's backbone
computes for that box at test time. So the head can be trained on (bank entry, sampled window)
pairs without running the backbone: about 50 ms per step of 32 boxes for the synthetic NL head
on 2 CPU cores, against about 0.7 s per training iteration of 16 clips through the backbone.
On the synthetic set the NL operator only learns to retrieve an actor's own earlier entries
(the long-term "role" labels) after ~100k such samples (docs/synthetic_study.md), which SGD
through the backbone does not reach in a CPU budget. This is linear probing before fine-tuning
(Kumar et al., ICLR 2022) with the bank as the feature cache.

Which boxes: bank entries whose box overlaps a ground-truth box of the train CSV at IoU >= 0.5
take that person's labels (multi-hot [K]); the others are not used (the detector's loss ignores
negatives too). The loss is the model's own (`LFBDetector.loss`, exclusive groups included).
"""

from __future__ import annotations

import csv
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from lfb_ray.data.clips import box_iou

__all__ = ["WarmupResult", "gt_targets", "warm_up_head"]


@dataclass(frozen=True)
class WarmupResult:
    entries: int  # bank entries matched to a GT box (the training set of the warm-up)
    steps: int
    loss_first: float  # mean loss over the first 10% of steps
    loss_last: float  # mean loss over the last 10% of steps
    seconds: float


def gt_targets(csv_path: str, video_ids: list[str], seconds: np.ndarray, boxes: np.ndarray,
               num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Match bank entries to the GT people of an AVA CSV.

    Args:
        csv_path: AVA annotation CSV (video_id, second, x1, y1, x2, y2, action_id, person_id).
        video_ids, seconds, boxes: the bank entries, [N], [N], [N, 4] normalised.
        num_classes: K; action ids >= K are dropped.

    Returns:
        rows [M] int64 (indices into the entries), targets [M, K] float32 multi-hot.
    """
    people: dict[tuple[str, int], dict[str, tuple[np.ndarray, set[int]]]] = defaultdict(dict)
    with open(csv_path, newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if len(row) < 7:
                raise ValueError(f"{csv_path} row {n}: expected at least 7 columns, got {len(row)}")
            pid = row[7] if len(row) > 7 else f"box{row[2:6]}"
            box, labels = people[(row[0], int(float(row[1])))].setdefault(pid, (np.array(row[2:6], float), set()))
            labels.add(int(row[6]))
    gt = {k: (np.stack([b for b, _ in v.values()]), [lab for _, lab in v.values()]) for k, v in people.items()}
    rows, ys = [], []
    for i, (vid, sec) in enumerate(zip(video_ids, seconds.tolist(), strict=True)):
        cand = gt.get((vid, int(sec)))
        if cand is None:
            continue
        ious = box_iou(boxes[i][None], cand[0])[0]
        j = int(ious.argmax())
        if ious[j] >= 0.5:
            y = np.zeros(num_classes, np.float32)
            y[[c for c in cand[1][j] if 0 < c < num_classes]] = 1
            rows.append(i)
            ys.append(y)
    if not rows:
        return np.zeros(0, np.int64), np.zeros((0, num_classes), np.float32)
    return np.asarray(rows, np.int64), np.stack(ys)


def warm_up_head(model, bank_split_dir: str, train_csv: str, *, steps: int, lr: float, batch: int, seed: int,
                 window_seconds: int, max_feats_per_second: int, checkpoint: str | None = None,
                 bank_device: str = "cpu", log: Callable[[str], None] = print) -> WarmupResult:
    """Train every non-backbone parameter of `model` with Adam on the bank's train entries.

    The backbone is untouched (and must be the one that computed the bank: the caller loads the
    bank's baseline checkpoint first). Dropout is active, as in training. Deterministic for a
    given `seed` and thread count on CPU. The training loop runs it on rank 0 before the DDP
    wrap, whose initial broadcast gives the other ranks the same head.

    Args:
        model: an `LFBDetector` (any operator, or none: then only `fc_cls` is trained).
        bank_split_dir: the bank's train split (local path or URI; `FeatureBank.open`).
        train_csv: the train annotation CSV, to label the entries.
        steps, lr, batch: Adam steps, learning rate, entries per step.
        checkpoint: the checkpoint the model's backbone came from; checked against the one that
            computed the bank (its sha256 in the bank manifest), since the bank's features stand
            in for the backbone's.
        bank_device: where the windows are gathered (`bank.device`, `WindowSampler`).

    Raises:
        ValueError: the bank was computed by another checkpoint, or no bank entry matches a GT
            box (wrong bank or CSV).
    """
    from lfb_ray.bank import FeatureBank
    from lfb_ray.bank.window import WindowSampler

    t0 = time.time()
    bank = FeatureBank.open(bank_split_dir, expected_dim=model.feature_channels)
    if checkpoint is not None:
        from lfb_ray.storage import file_sha256

        want, have = bank.checkpoint_sha256s(), file_sha256(checkpoint)
        if want != {have}:
            raise ValueError(f"head warm-up: the bank {bank_split_dir} was computed by checkpoint(s) with sha256 "
                             f"{sorted(want)}, but the model's backbone comes from {checkpoint} (sha256 {have}); "
                             "the bank's features only stand in for the backbone that computed them")
    vids, secs, boxes, feats = bank.entries()  # [N], [N], [N, 4], [N, C] float16 (mapped)
    rows, ys = gt_targets(train_csv, vids, secs, boxes, model.fc_cls.out_features)
    if len(rows) == 0:
        raise ValueError(f"head warm-up: no entry of the bank {bank_split_dir} overlaps a GT box of {train_csv} "
                         "at IoU >= 0.5 (is it the train split's bank?)")
    device = next(model.parameters()).device
    st_all = torch.from_numpy(np.asarray(feats[rows], dtype=np.float32))  # [M, C]
    y_all = torch.from_numpy(ys)  # [M, K]
    r_vids = [vids[i] for i in rows]
    r_secs = secs[rows]
    windows = (WindowSampler(bank, device, window_seconds=window_seconds, max_feats_per_second=max_feats_per_second,
                             mode=bank_device, log=log) if model.fbo is not None else None)
    head = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    opt = torch.optim.Adam(head, lr=lr)
    rng = np.random.default_rng(seed)
    gen_state = torch.get_rng_state()
    torch.manual_seed(seed)  # dropout masks
    was_training = model.training
    model.train()
    losses = []
    try:
        for step in range(1, steps + 1):
            pick = rng.choice(len(rows), size=min(batch, len(rows)), replace=False)
            st = st_all[pick].to(device)
            lt = windows([r_vids[i] for i in pick], r_secs[pick], rng) if windows is not None else None
            loss = model.loss(model.classify(st, lt), y_all[pick].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())  # read at the log points below, not per step (no device sync)
            if step % max(1, steps // 5) == 0 or step == steps:
                losses[:] = [float(v) for v in losses]
                log(f"[lfb_ray] head warm-up step {step}/{steps}: loss {np.mean(losses[-max(1, steps // 5):]):.4f}")
    finally:
        model.train(was_training)
        torch.set_rng_state(gen_state)
    k = max(1, steps // 10)
    return WarmupResult(entries=len(rows), steps=steps, loss_first=float(np.mean(losses[:k])),
                        loss_last=float(np.mean(losses[-k:])), seconds=time.time() - t0)
