"""What the driver hands every training worker (`RunArgs`, Ray Train's `train_loop_config["run"]`)
and what the run's `model.pt` records of it (`model_meta`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from lfb_ray.config import Config, config_to_dict
from lfb_ray.models.card import CheckpointMeta
from lfb_ray.redaction import redact_text

__all__ = ["RunArgs", "model_meta"]


@dataclass(frozen=True)
class RunArgs:
    """What the driver hands every worker (`train_loop_config={"run": RunArgs(...)}` of
    `lfb_ray.train.driver.fit`; Ray Train pickles it as it is)."""

    cfg: Config  # the run's config, paths resolved
    results_dir: str  # where the val result CSVs go (a local path or URI)
    iters_per_epoch: int  # the epoch length of the lr schedule
    mlflow_run_id: str | None = None  # None: no tracking
    init_checkpoint: str | None = None  # the trained detector whose backbone a new run starts from
    # What the run's model.pt records it came from (`CheckpointMeta`): run_name, mlflow_run_id,
    # inputs, bank_checkpoint.
    provenance: Mapping = field(default_factory=dict)

    @property
    def epochs(self) -> int:
        """Epochs of this run: `train.finetune_epochs` when it starts from a trained detector (and
        that is not -1), else `train.epochs`."""
        tc = self.cfg.train
        return tc.finetune_epochs if self.init_checkpoint and tc.finetune_epochs >= 0 else tc.epochs


def model_meta(args: RunArgs, *, epoch: int, global_step: int, val_map: float | None, best: bool) -> CheckpointMeta:
    """The `CheckpointMeta` of the run's `model.pt`: what it is and what it came from
    (`args.provenance`, set by `lfb_ray.train.driver`); credentials in URIs are not stored."""
    from lfb_ray.models.card import code_version
    from lfb_ray.redaction import redact_obj

    cfg, prov = args.cfg, args.provenance
    return CheckpointMeta(
        operator=cfg.model.fbo, epoch=int(epoch), global_step=int(global_step),
        selected_on="best val mAP" if best else "last epoch",
        val_map=None if val_map is None or math.isnan(float(val_map)) else float(val_map),
        config=redact_obj(config_to_dict(cfg)), inputs=dict(prov.get("inputs") or {}),
        init_checkpoint=redact_text(args.init_checkpoint or ""),
        bank_checkpoint=str(prov.get("bank_checkpoint") or ""), run_name=prov.get("run_name", ""),
        mlflow_run_id=prov.get("mlflow_run_id", ""), code=code_version())
