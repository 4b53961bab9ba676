"""Inference: test-time scores for every proposal box of a keyframe, with the bank for LFB models.

`predict_batch` is the one code path used by the training job's val metric and by the
stand-alone inference job (`infer_split`, a Ray Data actor pool). The device helpers and
`load_model` (our checkpoints and mmaction2 `.pth` files, read safely) are
`lfb_ray.models.device`'s, re-exported here.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from lfb_ray.config import Config, resolve_paths
from lfb_ray.data.clips import decode_jpeg
from lfb_ray.data.dataset import RAW_COLUMNS, collate_test, decode_test_rows
from lfb_ray.data.schema import row_gt
from lfb_ray.models.device import autocast_for, best_device, load_model, to_model_layout
from lfb_ray.predictions import Predictions

if TYPE_CHECKING:
    from lfb_ray.bank.window import WindowSampler
    from lfb_ray.data.batches import TestBatch

__all__ = ["InferenceResult", "KeyframePrediction", "Predictions", "autocast_for", "infer_split", "keyframe_image",
           "load_model", "predict_batch", "predict_keyframes", "second_attention", "to_model_layout",
           "write_and_evaluate"]


@torch.no_grad()
def predict_batch(model: torch.nn.Module, batch: TestBatch, *, windows: WindowSampler | None = None,
                  rng: np.random.Generator, device: torch.device, amp: str = "auto") -> Predictions:
    """Scores of every RoI of a `collate_test` batch: sigmoid, softmax within the model's
    exclusive label groups (`LFBDetector.scores`).

    Clips of one frame size go through the network together, each size on its own and cut back to
    its own size (`batch.sizes`): zero padding to the batch's largest frame would change the
    features of boxes near the bottom/right edge (the convolutions see the padding), so a val RoI
    would score differently from its own bank entry and with its batch neighbours. AVA's videos
    come in several aspect ratios, so a test batch often mixes sizes.

    Args:
        windows: the LFB window of each RoI (LFB models; None for the baseline), gathered where the
            bank lives (`bank.device`), as in training: `WindowSampler.for_config(bank, device, cfg.bank)`,
            built once per model, not per batch (on a GPU it holds the bank in device memory).
        rng: the bank-sampling generator (`windows` draws from it).

    Returns:
        the `Predictions` of the batch's R RoIs, in batch order (scores [R, num_classes]).
    """
    model.eval()
    core = getattr(model, "module", model)
    rois_all = batch.rois
    lt_all = windows(batch.roi_video_ids, batch.roi_seconds, rng) if windows is not None else None  # [R, W*K, C]
    b = len(batch.clip)
    sizes = np.asarray(batch.sizes, np.int64).reshape(b, 2)
    roi_clip = rois_all[:, 0].long().numpy() if len(rois_all) else np.zeros(0, np.int64)
    scores = None
    for hw in np.unique(sizes, axis=0):
        idx = np.flatnonzero((sizes == hw).all(1))  # the clips of this size, in batch order
        sel = np.flatnonzero(np.isin(roi_clip, idx))
        if not len(sel):
            continue
        h, w = int(hw[0]), int(hw[1])
        clip = to_model_layout(batch.clip[torch.from_numpy(idx)][..., :h, :w].to(device, non_blocking=True))
        rois = rois_all[torch.from_numpy(sel)].clone()
        rois[:, 0] = torch.from_numpy(np.searchsorted(idx, roi_clip[sel]).astype(np.float32))  # batch index in the group
        lt = (lt_all.index_select(0, torch.from_numpy(sel).to(lt_all.device, non_blocking=True)).to(device)
              if lt_all is not None else None)
        with autocast_for(device, amp):
            s = core.scores(model(clip, rois.to(device), lt)).float().cpu()
        if scores is None:
            scores = torch.zeros(len(rois_all), s.shape[1])
        scores[torch.from_numpy(sel)] = s
    if scores is None:  # no RoI in the batch
        scores = torch.zeros(0, core.fc_cls.out_features)
    return Predictions(video_ids=list(batch.roi_video_ids), seconds=np.asarray(batch.roi_seconds),
                       boxes=np.asarray(batch.boxes, dtype=np.float32), scores=scores.numpy())


def second_attention(attention: np.ndarray, filled: np.ndarray, *, window_seconds: int,
                     max_feats_per_second: int) -> tuple[np.ndarray, float]:
    """Attention mass per window second, from per-slot weights.

    Args:
        attention: [S] softmax weights of one RoI over its bank slots, S = W * K.
        filled: [S] bool, the slot holds a bank feature (not zero padding).

    Returns:
        mass float64 [W] (second j is `t - W//2 + j`; only filled slots count) and the mass on
        padding slots, which the unmasked softmax also spends (`NonLocalLayer`).
    """
    w, k = window_seconds, max_feats_per_second
    a = np.asarray(attention, np.float64).reshape(w, k)  # [W, K]: slot s -> (s // K, s % K)
    f = np.asarray(filled, bool).reshape(w, k)
    return (a * f).sum(axis=1), float(a[~f].sum())


def keyframe_image(row: dict, prepared_uri: str) -> np.ndarray:
    """The stored keyframe (reference offset 0, else the nearest stored offset) as uint8 [H, W, 3]."""
    from lfb_ray.data.frames import open_frame_store

    offsets = np.asarray(row["ref_offsets"], np.int64)
    pos = int(np.argmin(np.abs(offsets)))
    store = open_frame_store(prepared_uri, str(row["frames_file"]))
    return decode_jpeg(store.jpeg(int(row["frame_rows"][pos])))


@dataclass
class KeyframePrediction:
    """Everything drawn on one keyframe tile.

    Attributes:
        attention: per box, the (mass [W], padding mass) of `second_attention`; None unless fbo=nl.
    """

    video_id: str
    timestamp: int
    image: np.ndarray  # uint8 [H, W, 3] stored keyframe
    gt_boxes: np.ndarray  # [G, 4] normalised
    gt_labels: list[list[int]]  # [G] label ids of each GT box
    boxes: np.ndarray  # [n, 4] normalised proposals above the person threshold
    scores: np.ndarray  # [n, num_classes] sigmoid scores (column 0 unused)
    attention: list[tuple[np.ndarray, float]] | None = None


@torch.no_grad()
def predict_keyframes(model: torch.nn.Module, rows: list[dict], cfg: Config, *, windows=None,
                      device: torch.device | str = "cpu", seed: int = 0) -> list[KeyframePrediction]:
    """Score every proposal of `rows` (prepared rows) and, for fbo=nl, read the NL attention.

    `windows` is the LFB models' `WindowSampler` (built once by the caller), None for a baseline.

    The attention comes from the inputs the operator saw in that same forward (a temporary
    forward hook on `model.fbo`), recomputed by `FBONonLocal.attention` for layer 1.
    """
    from lfb_ray.models.fbo import FBONonLocal

    device = torch.device(device)
    model.eval()
    rng = np.random.default_rng(seed)
    nl = isinstance(getattr(model, "fbo", None), FBONonLocal)
    w, k = cfg.bank.window_seconds, cfg.bank.max_feats_per_second
    out: list[KeyframePrediction] = []
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (st, lt) inputs of the operator, per forward
    hook = model.fbo.register_forward_hook(lambda m, args, y: seen.append(args)) if nl else None
    try:
        step = max(1, cfg.eval.batch_size)
        for i in range(0, len(rows), step):
            chunk = rows[i:i + step]
            batch = collate_test(decode_test_rows({c: [r[c] for r in chunk] for c in RAW_COLUMNS},
                                                  data=cfg.data, prepared_uri=cfg.prepared_dir,
                                                  score_thr=cfg.data.val_person_score_thr),
                                 cfg.data.mean, cfg.data.std)
            seen.clear()
            pred = predict_batch(model, batch, windows=windows, rng=rng, device=device, amp=cfg.train.amp)
            per_box = None
            if nl:
                st, lt = seen[0]
                attn = model.fbo.attention(st.float(), lt.float()).cpu().numpy()  # [R, W*K]
                filled = lt.abs().amax(dim=-1).ne(0).cpu().numpy()  # [R, W*K]; padding slots are all zero
                per_box = [second_attention(a, f, window_seconds=w, max_feats_per_second=k)
                           for a, f in zip(attn, filled)]
            for j, row in enumerate(chunk):
                sel = np.flatnonzero(batch.roi_batch == j)
                gt_boxes, gt_multi_hot = row_gt(row, cfg.data.num_classes)
                out.append(KeyframePrediction(
                    video_id=str(row["video_id"]), timestamp=int(row["timestamp"]), image=keyframe_image(row, cfg.prepared_dir),
                    gt_boxes=gt_boxes, gt_labels=[np.flatnonzero(h).tolist() for h in gt_multi_hot],
                    boxes=pred.boxes[sel], scores=pred.scores[sel],
                    attention=[per_box[s] for s in sel] if per_box is not None else None))
    finally:
        if hook is not None:
            hook.remove()
    return out


@dataclass
class InferenceResult:
    csv_path: str
    metrics: dict
    num_boxes: int
    seconds: float


def write_and_evaluate(cfg: Config, pred: Predictions, csv_path: str) -> dict:
    """Write the AVA result CSV and compute frame-mAP against the val GT.

    Returns:
        {"mAP": float, "group_mAP": {...}, "per_class": {...}, "protocol_mAP": {"official": float,
        "mmaction2": float}} (NaN possible per class); "mAP" is `eval.protocol`'s.
    """
    from lfb_ray.data.annotations import (
        cap_annotation_rows,
        read_annotation_rows,
        read_exclusions,
        read_label_map,
        read_result_rows,
    )
    from lfb_ray.evaluation import evaluate_frame_map
    from lfb_ray.evaluation.results import write_results_csv

    os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
    write_results_csv(csv_path, pred.video_ids, pred.seconds, pred.boxes, pred.scores,
                      action_thr=cfg.eval.action_thr)
    label_map = read_label_map(cfg.data_path(cfg.data.label_map))
    # The GT of the keyframes that were prepared (all, unless data.max_keyframes_per_split caps them).
    gt = cap_annotation_rows(read_annotation_rows(cfg.data_path(cfg.data.val_csv)), cfg.data.max_keyframes_per_split)
    det = read_result_rows(csv_path)
    excl = read_exclusions(cfg.data_path(cfg.data.val_exclusions)) if cfg.data.val_exclusions else set()
    res = evaluate_frame_map(gt, det, label_map, excl, protocol=cfg.eval.protocol)
    # Both protocols' mAP (the other costs one more vectorised pass): mmaction2's published LFB
    # numbers come from its own evaluator, so `jobs/compare.py --protocols` can set runs beside them.
    by_protocol = {cfg.eval.protocol: res.mAP}
    for other in ("official", "mmaction2"):
        if other not in by_protocol:
            by_protocol[other] = evaluate_frame_map(gt, det, label_map, excl, protocol=other).mAP
    return {"mAP": res.mAP, "group_mAP": dict(res.group_mAP), "per_class": dict(res.per_class),
            "protocol_mAP": by_protocol}


class _Predictor:
    """Ray Data actor: loads the model (and bank) once, scores test batches."""

    def __init__(self, cfg: Config, checkpoint: str, seed: int):
        self.cfg = cfg
        self.device = best_device()
        self.model = load_model(self.cfg, checkpoint, self.device)
        self.windows = None
        if self.cfg.model.uses_bank:
            from lfb_ray.bank import FeatureBank
            from lfb_ray.bank.window import WindowSampler

            bank = FeatureBank.open(self.cfg.bank_dir, expected_dim=self.model.feature_channels,
                                    missing_videos=self.cfg.bank.missing_videos)
            self.windows = WindowSampler.for_config(bank, self.device, self.cfg.bank)
        self.rng = np.random.default_rng(seed)

    def __call__(self, batch: dict) -> dict:
        from lfb_ray.data.dataset import collate_test

        return predict_batch(self.model, collate_test(batch, self.cfg.data.mean, self.cfg.data.std),
                             windows=self.windows, rng=self.rng, device=self.device, amp=self.cfg.train.amp).to_rows()


def infer_split(cfg: Config, checkpoint: str, csv_path: str, *, split: str = "val") -> InferenceResult:
    """Score every proposal of a split with a Ray Data actor pool, write the CSV, evaluate.

    GPU actors when the cluster has GPUs (one GPU each), CPU actors otherwise.
    """
    import ray

    from lfb_ray.data.dataset import decode_test_rows, read_split
    from lfb_ray.storage import is_uri

    t0 = time.time()
    cfg = resolve_paths(cfg)
    if cfg.model.uses_bank:  # before any work: a bank without some of the split's videos is refused
        from lfb_ray.bank.coverage import open_checked

        open_checked(cfg, (split,))
    if not is_uri(checkpoint):  # the actors run in other directories; a URI stays as it is
        checkpoint = os.path.abspath(checkpoint)
    gpus = ray.cluster_resources().get("GPU", 0)
    ds = read_split(cfg, split, drop_excluded=False).map_batches(
        decode_test_rows, batch_size=cfg.eval.batch_size, num_cpus=1,
        fn_kwargs={"data": cfg.data, "prepared_uri": cfg.prepared_dir,
                   "score_thr": cfg.data.val_person_score_thr})
    ds = ds.map_batches(
        _Predictor, batch_size=cfg.eval.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, int(gpus) or cfg.bank.max_actors)),
        num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1,
        fn_constructor_kwargs={"cfg": cfg, "checkpoint": checkpoint,
                               "seed": cfg.train.seed})
    rows = ds.take_all()
    metrics = write_and_evaluate(cfg, Predictions.from_rows(rows), csv_path)
    return InferenceResult(csv_path=csv_path, metrics=metrics, num_boxes=len(rows), seconds=time.time() - t0)
