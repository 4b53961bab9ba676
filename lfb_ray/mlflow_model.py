"""A run's result as an MLflow model: the selected `model.pt`, exported with `torch.export` (pt2).

MLflow 3 users expect a logged model per run (Models column, `mlflow.pytorch.load_model`), its
metrics attached, optionally registered. The export is `torch.export`'s pt2 format, which
`mlflow.pytorch.load_model` reads without unpickling Python objects (pickled models would need
`weights_only=False`). The logged module is `ScoringModel`: normalised clips, RoIs and (LFB
models) the sampled bank window in, per-class scores out, the same scores `lfb_ray.inference`
writes to the result CSV for the same inputs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from lfb_ray.config import Config

__all__ = ["ScoringModel", "example_inputs", "log_run_model", "logged_model_of"]

#: Where the model is logged in its run ("name" of `mlflow.pytorch.log_model`).
MODEL_NAME = "model"


class ScoringModel(nn.Module):
    """`LFBDetector` -> scores, for export: sigmoid per class, softmax within exclusive groups.

    Inputs (float32):
        clips [B, 3, T, H, W] normalised frames (`DataConfig.mean/std`), H and W multiples of 16;
        rois [R, 5] (clip index, x1, y1, x2, y2) in input pixels;
        lt_feats [R, S, C] the sampled bank window per RoI (LFB models only).

    Returns:
        scores [R, num_classes] float32.
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector.eval()

    def forward(self, clips: torch.Tensor, rois: torch.Tensor, lt_feats: torch.Tensor | None = None) -> torch.Tensor:
        return self.detector.scores(self.detector(clips, rois, lt_feats)).float()


def example_inputs(cfg: Config, feature_channels: int) -> list[np.ndarray]:
    """A small input of every shape `ScoringModel` takes, with every free dimension > 1 (torch.export
    fixes size-1 dimensions): 2 clips of 64x80, 3 RoIs, a bank window of 2 seconds x
    `bank.max_feats_per_second` (LFB models)."""
    rng = np.random.default_rng(0)
    clips = rng.standard_normal((2, 3, cfg.data.clip_frames, 64, 80)).astype(np.float32)
    rois = np.array([[0, 4, 4, 40, 60], [1, 8, 2, 70, 62], [0, 30, 10, 78, 50]], np.float32)
    out = [clips, rois]
    if cfg.model.uses_bank:
        window = 2 * max(cfg.bank.max_feats_per_second, 1)
        out.append(rng.standard_normal((3, max(window, 2), feature_channels)).astype(np.float32))
    return out


def _signature(example: list[np.ndarray], num_classes: int):
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    names = ("clips", "rois", "lt_feats")
    dyn = {"clips": (-1, 3, example[0].shape[2], -1, -1), "rois": (-1, 5), "lt_feats": (-1, -1, example[-1].shape[-1])}
    inputs = Schema([TensorSpec(np.dtype(np.float32), dyn[n], n) for n in names[:len(example)]])
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes), "scores")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def log_run_model(cfg: Config, run_id: str, model_path: str, metrics: Mapping[str, float], *,
                  registered_model: str = "") -> str:
    """Log `model_path` (our `model.pt`, a path or URI) as the MLflow model of run `run_id`.

    The model carries the checkpoint's meta (`lfb_ray.models.card.CheckpointMeta`) as metadata, the
    run's final numeric metrics as its params (val mAPs, epoch, ...); with `registered_model` a new
    version of that registered model is created.

    Returns:
        the model's URI (`models:/<model id>`), loadable with `mlflow.pytorch.load_model`.
    """
    import mlflow

    from lfb_ray.models.checkpoint import read_meta
    from lfb_ray.models.device import load_model
    from lfb_ray.storage import checkpoint_file
    from lfb_ray.tracking import redact, setup_mlflow_env

    detector = load_model(cfg, model_path, "cpu")
    example = example_inputs(cfg, detector.feature_channels)
    meta = read_meta(checkpoint_file(model_path))
    numeric = {k: float(v) for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
    setup_mlflow_env(cfg.tracking_uri)
    mlflow.set_tracking_uri(cfg.tracking_uri)
    with mlflow.start_run(run_id=run_id, log_system_metrics=False):
        info = mlflow.pytorch.log_model(
            ScoringModel(detector), name=MODEL_NAME, signature=_signature(example, cfg.model.num_classes),
            input_example=tuple(example), serialization_format="pt2",
            registered_model_name=registered_model or None,
            metadata={"lfb_ray": redact("meta", meta.to_dict()) if meta else {}},
            tags={"lfb_ray.operator": cfg.model.fbo}, pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
        if numeric:  # as the model's params: logging them as metrics again would repeat run metric steps
            mlflow.log_model_params({k: f"{v:.6g}" for k, v in sorted(numeric.items())}, model_id=info.model_id)
    return info.model_uri


def logged_model_of(tracking_uri: str, run_id: str) -> str | None:
    """The URI of the MLflow model run `run_id` logged as `MODEL_NAME`, or None."""
    import mlflow

    run = mlflow.MlflowClient(tracking_uri).get_run(run_id)
    mlflow.set_tracking_uri(tracking_uri)
    found = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id],
                                        filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_NAME}'",
                                        output_format="list")
    return found[0].model_uri if found else None
