"""What a saved model is, stored beside its weights: the "meta" of our `model.pt`.

mmaction2 checkpoints carry `meta` (config, epoch, iteration, version) and nanoGPT's carry
`model_args` and `config`. Ours carry a `CheckpointMeta` as plain data (str, int, float, lists,
dicts), so `torch.load(weights_only=True)` reads it and nothing from the file is executed. It lets
`jobs/detect.py`, `jobs/evaluate.py` and `jobs/visualize.py` run from `--checkpoint` alone, and ties
a model to the prepared data, bank and baseline it came from (their `lfb_ray.identity` ids).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lfb_ray.config import Config, config_from_dict

__all__ = ["CheckpointMeta", "code_version"]


@functools.cache
def code_version() -> dict[str, str]:
    """{"lfb_ray": package version, "git": commit of the source tree or "unknown", "torch": version}."""
    import torch

    import lfb_ray

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=os.path.dirname(os.path.abspath(lfb_ray.__file__))).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"lfb_ray": str(lfb_ray.__version__), "git": commit or "unknown", "torch": str(torch.__version__)}


@dataclass(frozen=True)
class CheckpointMeta:
    """Where a trained model came from, and the config that rebuilds and feeds it.

    Attributes:
        operator: `model.fbo` of the weights (none, avg, max, nl); Avg and Max weights are the
            same tensors, so only this tells them apart.
        epoch: training epochs behind the weights (the selected epoch with `train.save_best`).
        global_step: optimizer steps at the end of the run.
        selected_on: "best val mAP" (`train.save_best`) or "last epoch".
        val_map: the val frame-mAP@0.5 of these weights (what they were selected on), None when
            the run did not evaluate them.
        config: the run's whole config (`config_to_dict`, paths resolved): the data, bank and
            model settings a later job needs.
        inputs: `lfb_ray.identity.run_inputs` of the run: ids of the prepared data, the bank, and
            the checkpoint it started from ("init") or `model.pretrained`.
        init_checkpoint: the baseline whose backbone the run started from, "" for a run from
            `model.pretrained`.
        bank_checkpoint: the baseline that computed the bank an LFB model was trained on (from the
            bank's `build.json`), "" for the baseline or a bank that does not record it.
        run_name: the run's name (`lfb_ray.runs.run_name_for`); `mlflow_run_id` its MLflow run.
        code: `code_version()` of the trainer.
    """

    operator: str
    epoch: int
    global_step: int
    selected_on: str
    val_map: float | None
    config: dict[str, Any]
    inputs: dict[str, str] = field(default_factory=dict)
    init_checkpoint: str = ""
    bank_checkpoint: str = ""
    run_name: str = ""
    mlflow_run_id: str = ""
    code: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for `torch.save`, read back with `weights_only=True`: the JSON round trip turns
        str subclasses (torch's TorchVersion) and tuples into the builtins that loader accepts."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> CheckpointMeta:
        """The meta of a file; unknown keys (a newer writer) are ignored, missing required ones refused.

        Raises:
            ValueError: a required field is missing or the config does not parse, naming `where`.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING]
        missing = [n for n in required if n not in data]
        if missing:
            raise ValueError(f"{where}: checkpoint meta lacks {', '.join(missing)}")
        meta = cls(**{k: v for k, v in data.items() if k in names})
        if meta.val_map is not None and math.isnan(meta.val_map):
            meta = dataclasses.replace(meta, val_map=None)
        return meta

    def to_config(self) -> Config:
        """The run's `Config` (raises `ConfigError` if this lfb_ray cannot read it)."""
        return config_from_dict(self.config)

    def describe(self) -> str:
        """One line for logs: operator, epoch, selection, mAP, run and code."""
        name = "baseline" if self.operator == "none" else f"LFB-{self.operator}"
        score = f"val mAP {self.val_map:.4f}" if self.val_map is not None else "not evaluated"
        return (f"{name}, epoch {self.epoch} ({self.selected_on}, {score}), run {self.run_name or '-'}, "
                f"lfb_ray {self.code.get('lfb_ray', '?')} ({self.code.get('git', '?')[:10]})")
