"""What a run prints for a person to read: training progress inside an epoch, and the closing
summary of a job's outputs. Ray-free (the Ray side, Ray Data's progress bars, is `lfb_ray.cli`).

Rule for the progress lines (rank 0 only): a line at the iterations where the loop reads the loss
anyway (every `train.log_every_iters`, so they add no host sync), thinned out when stdout is not a
terminal (a log file, `ray job submit`) to at most `LINES_PER_EPOCH` lines per epoch. The Ray
workers' own stdout is never a terminal, so the driver says what its stdout is through the
`INTERACTIVE_ENV` variable it hands to them (`lfb_ray.cli.init_ray`).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from lfb_ray.redaction import redact_text

__all__ = ["INTERACTIVE_ENV", "LINES_PER_EPOCH", "JobSummary", "driver_is_interactive", "format_duration",
           "mlflow_ui_command", "pipeline_summary", "progress_every", "progress_line", "stdout_is_terminal"]

INTERACTIVE_ENV = "LFB_RAY_INTERACTIVE"  # "1": the driver's stdout is a terminal
LINES_PER_EPOCH = 20  # non-interactive: an AVA epoch (~2,000 iterations at 10 per log) prints every 100


def stdout_is_terminal(stream=None) -> bool:
    """Whether `stream` (sys.stdout) is a terminal a person watches, as opposed to a file or pipe."""
    stream = sys.stdout if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a replaced stream without isatty, or a closed one
        return False


def driver_is_interactive() -> bool:
    """In a Ray worker: whether the driver that started the job prints to a terminal (`INTERACTIVE_ENV`)."""
    return os.environ.get(INTERACTIVE_ENV, "") == "1"


def progress_every(log_every_iters: int, iters_per_epoch: int, interactive: bool) -> int:
    """Global steps between two progress lines: `log_every_iters` in a terminal; otherwise the
    smallest multiple of it that prints at most `LINES_PER_EPOCH` lines in an epoch of
    `iters_per_epoch` (a line at each global step divisible by it, except the epoch's last
    iteration, which prints the epoch's own line), wherever the epoch's first global step falls.

    Always a multiple of `log_every_iters`, so a progress line falls on an iteration whose loss the
    loop reads for MLflow anyway (no extra host sync)."""
    if log_every_iters < 1:
        raise ValueError(f"train.log_every_iters must be >= 1, got {log_every_iters}")
    # The N-1 iterations before an epoch's last hold at most ceil((N-1)/every) multiples of `every`.
    steps = max(iters_per_epoch - 1, 1)
    return log_every_iters * (1 if interactive else math.ceil(steps / (LINES_PER_EPOCH * log_every_iters)))


def format_duration(seconds: float) -> str:
    """`2h05m`, `12m30s` or `45s`: an ETA a person reads at a glance (`?` when unknown)."""
    if seconds != seconds or seconds < 0 or math.isinf(seconds):
        return "?"
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def progress_line(name: str, epoch: int, epochs: int, it: int, iters: int, *, loss: float, lr: float,
                  clips_per_s: float, eta_s: float) -> str:
    """One progress line inside an epoch, e.g.
    `[lfb_ray] nl epoch 3/20 iter 400/2000: loss 0.4123, lr 0.150000, 42.1 clips/s, epoch ETA 12m30s`.

    Args:
        epoch: 1-based epoch; `it`: iterations of the epoch done so far (1-based), of `iters`.
        eta_s: seconds until the epoch's last iteration at the rate seen so far.
    """
    return (f"[lfb_ray] {name} epoch {epoch}/{epochs} iter {it}/{iters}: loss {loss:.4f}, lr {lr:.6f}, "
            f"{clips_per_s:.1f} clips/s, epoch ETA {format_duration(eta_s)}")


def mlflow_ui_command(tracking_uri: str) -> str:
    """The command that opens the MLflow UI on `tracking_uri`, credentials redacted. A local
    store (a sqlite file, a folder) is read by `mlflow ui` itself; a tracking server has its own UI."""
    uri = redact_text(tracking_uri)
    if uri.startswith(("http://", "https://")):
        return f"open {uri} (the MLflow tracking server's UI)"
    return f"mlflow ui --backend-store-uri {uri}"


@dataclass(frozen=True)
class JobSummary:
    """The few lines a job ends with: what it wrote, where, and how to look at it.

    Attributes:
        job: the job's name (`train`, `pipeline`, ...).
        outputs: (what, path or URI) pairs, in the order printed.
        tracking_uri: the MLflow store of the job's runs; "" when tracking is off.
    """

    job: str
    outputs: Sequence[tuple[str, str]]
    tracking_uri: str = ""

    def lines(self) -> list[str]:
        """The summary, credentials redacted: a header, one line per output, the MLflow UI command."""
        out = [f"[{self.job}] outputs:"]
        width = max([len(what) for what, _ in self.outputs] + [len("MLflow UI")])
        out += [f"  {what:<{width}}  {redact_text(where)}" for what, where in self.outputs]
        if self.tracking_uri:
            out.append(f"  {'MLflow UI':<{width}}  {mlflow_ui_command(self.tracking_uri)}")
        return out

    def print(self) -> None:
        print("\n".join(self.lines()), flush=True)


def pipeline_summary(cfg) -> JobSummary:
    """Where a finished pipeline's results are (`lfb_ray.pipeline.run_pipeline` with the config
    `cfg`): its work folder and, with tracking on, the comparison table and plot and the MLflow UI."""
    from lfb_ray.storage import join_uri

    outputs = [("work folder (stage records: pipeline.json)", cfg.workdir)]
    if cfg.tracking.enabled:
        out = join_uri(cfg.workdir, "comparison")
        outputs += [("table", join_uri(out, "comparison.md") + " (and comparison.csv)"),
                    ("plot", join_uri(out, "comparison.png"))]
    return JobSummary("pipeline", outputs, cfg.tracking_uri if cfg.tracking.enabled else "")
