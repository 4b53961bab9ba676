"""`train.save_best`: the result of a run is its best evaluated epoch, not its last.

mmaction2 0.x trains the LFB models with `evaluation = dict(interval=1, save_best='mAP@0.5IOU')`:
every evaluation that beats the best val frame-mAP so far saves `best_mAP@0.5IOU_epoch_N.pth`, and
that checkpoint is the one users test and extract banks from. Here rank 0 keeps a CPU copy of the
best weights, writes it into every Ray Train checkpoint (`best.pt`, so a resumed run and Ray's
`num_to_keep` cannot lose it), and the run's final `model.pt` and result metrics are those of the
best epoch (`best/epoch`; the last epoch's mAP stays as `last/val/mAP`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

__all__ = ["BEST_FILE", "BestEpoch"]

BEST_FILE = "best.pt"


@dataclass
class BestEpoch:
    """The best evaluated epoch so far: its number (epochs done; 0 = the starting model), its val
    metrics (`val/*`) and a CPU copy of the model's state dict."""

    epoch: int = -1
    metrics: dict = field(default_factory=dict)
    state: dict | None = None

    @property
    def mAP(self) -> float:  # the metric's name
        return float(self.metrics.get("val/mAP", float("nan")))

    def offer(self, epoch: int, val_metrics: dict, model: torch.nn.Module) -> bool:
        """Keep `model`'s weights if `val_metrics["val/mAP"]` beats the best so far (strictly: on a
        tie the earlier epoch stays, as mmaction2's `>` rule). A NaN mAP (no GT) is never best."""
        m = float(val_metrics.get("val/mAP", float("nan")))
        if math.isnan(m) or (self.state is not None and not m > self.mAP):
            return False
        self.epoch = int(epoch)
        self.metrics = {k: v for k, v in val_metrics.items() if k.startswith("val/") and isinstance(v, (int, float, str))}
        self.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return True

    def result_metrics(self, last: dict) -> dict:
        """The final report's metrics: the last epoch's, with `val/*` replaced by the best epoch's."""
        if self.state is None:
            return dict(last)
        out = {k: v for k, v in last.items() if not k.startswith("val/")}
        out.update(self.metrics)
        out["best/epoch"] = self.epoch
        if "val/mAP" in last:
            out["last/val/mAP"] = last["val/mAP"]
        return out

    def save(self, directory: str) -> None:
        """Write `best.pt` into a checkpoint directory (nothing while no epoch was evaluated)."""
        if self.state is not None:
            torch.save({"epoch": self.epoch, "metrics": self.metrics, "model": self.state},
                       os.path.join(directory, BEST_FILE))

    @classmethod
    def load(cls, directory: str) -> BestEpoch:
        """The best epoch stored in a checkpoint directory (an empty one if it holds none)."""
        path = os.path.join(directory, BEST_FILE)
        if not os.path.exists(path):
            return cls()
        d = torch.load(path, map_location="cpu", weights_only=True)
        return cls(epoch=int(d["epoch"]), metrics=dict(d["metrics"]), state=d["model"])
