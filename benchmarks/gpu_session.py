"""Everything a lent GPU machine should measure, in one command within a time budget (default 8 min).

    python jobs/benchmark.py gpu-session --prepared DIR [--budget-s 480] [--out DIR]

Sections, in order of what they tell (each a subprocess of `jobs/benchmark.py`, given the time that
is left; one that fails or runs out of time is reported and the next one runs):

1. tests: `pytest -m gpu` (bf16 + channels-last forward/backward, DDP over nccl, batched bank
   extraction, the device-path LFB window equal to the host's with no sync per step);
2. bank-step: the bank's cost on the critical path of one LFB iteration at the AVA shape, host
   path vs the bank held on the GPU;
3. loader: training clips/s with the real decode + collate feeding the step vs the step alone;
4. gpu: training-step clips/s (R50, fp32 / bf16 / channels-last) and bank-build keyframes/s.

With `--out`, each section's output is also written to `<out>/<section>.txt` (BENCHMARKS.md says how
these were produced). Without CUDA every section still runs (the smoke test does this at `--quick`):
the tests skip and the tables hold CPU rows.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["SECTIONS", "run"]

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("tests", "bank-step", "loader", "gpu")
MIN_SECTION_S = 20  # a section that would get less than this is skipped, not started


def _command(section: str, *, quick: bool, prepared: str | None, workdir: str) -> list[str]:
    if section == "tests":
        return [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                str(REPO / "tests" / "test_gpu.py"), str(REPO / "tests" / "test_bank_window.py")]
    cmd = [sys.executable, str(REPO / "jobs" / "benchmark.py"), section, "--workdir", workdir]
    if quick:
        cmd.append("--quick")
    if prepared and section in ("loader", "gpu"):
        cmd += ["--prepared", prepared]
    return cmd


def run(*, prepared: str | None, quick: bool = False, workdir: str = "runs/bench", budget_s: float = 480.0,
        out: str | None = None, sections: tuple[str, ...] = SECTIONS) -> int:
    """Run `sections` one after another within `budget_s`; print a summary. 0 when all passed."""
    t_start = time.perf_counter()
    results = []
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    for section in sections:
        left = budget_s - (time.perf_counter() - t_start)
        if left < MIN_SECTION_S:
            results.append((section, "skipped: budget spent", 0.0))
            continue
        cmd = _command(section, quick=quick, prepared=prepared, workdir=workdir)
        print(f"=== {section}: {' '.join(cmd[1:])} (up to {left:.0f} s)", flush=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=left)
            text, status = proc.stdout + proc.stderr, "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired as e:
            text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            status = "stopped: budget spent"
        print(text, flush=True)
        if out:
            Path(out, f"{section}.txt").write_text(text)
        results.append((section, status, time.perf_counter() - t0))
    print(f"[gpu-session] {time.perf_counter() - t_start:.0f} s of a {budget_s:.0f} s budget: "
          + "; ".join(f"{s} {st} ({secs:.0f} s)" for s, st, secs in results), flush=True)
    return 0 if all(st == "ok" for _, st, _ in results) else 1
