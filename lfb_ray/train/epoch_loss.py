"""The running mean of an epoch's training loss, kept across a mid-epoch resume."""

from __future__ import annotations

import torch

__all__ = ["EpochLoss"]


class EpochLoss:
    """The running mean of an epoch's training loss, which survives a resume.

    A checkpoint inside an epoch (`train.checkpoint_every_iters`) records the sum and count of the
    losses so far (`state()`, into state.pt), and the resumed worker starts from them
    (`restore`), so `train/loss_epoch` is the mean over all of the epoch's iterations and not only
    the ones run since the resume; a resume at the epoch's last iteration, which runs none, logged
    0.0 before. It is rank 0's loss (rank 0 writes state.pt and logs), as without a resume.
    """

    def __init__(self) -> None:
        self._sum, self.count = 0.0, 0
        self._pending: torch.Tensor | None = None  # the float64 running sum, on the device, not read yet

    def add(self, loss: float | torch.Tensor) -> None:
        """Count one iteration's loss. A tensor is summed where it is, in float64, without reading
        it (no host sync per iteration); `sum` reads it when a checkpoint or the epoch's end needs
        it. The running sum starts from the host's (a Python scalar operand: no copy, no sync) and
        adds the same float32 losses in the same order as `float()`s did: the same float64 value."""
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().to(torch.float64)
            self._pending = (loss + self._sum) if self._pending is None else self._pending + loss
        else:
            self.sum = self.sum + float(loss)
        self.count += 1

    @property
    def sum(self) -> float:
        """The sum of the losses so far (reads the device-side running sum: a host sync)."""
        if self._pending is not None:
            self._sum, self._pending = float(self._pending), None
        return self._sum

    @sum.setter
    def sum(self, value: float) -> None:
        self._sum, self._pending = float(value), None

    @property
    def mean(self) -> float:
        """The mean loss; NaN when the epoch has no iteration at all (never 0.0, a real loss)."""
        return self.sum / self.count if self.count else float("nan")

    def state(self, epoch: int) -> dict:
        """What state.pt keeps: the sums of `epoch`, the epoch a checkpoint written now resumes."""
        return {"epoch": int(epoch), "sum": float(self.sum), "count": int(self.count)}

    @classmethod
    def restore(cls, saved: dict | None, epoch: int) -> EpochLoss:
        """The running loss of `epoch` when resuming: `saved` (state.pt's `epoch_loss`) if it is
        this epoch's, else empty (a checkpoint at an epoch's end, or of an older version)."""
        out = cls()
        if saved and int(saved.get("epoch", -1)) == epoch:
            out.sum, out.count = float(saved["sum"]), int(saved["count"])
        return out
