"""Smoke test of `jobs/benchmark.py`: every subcommand runs at `--quick` size and prints its table.

Timings are printed, never asserted; the eval benchmark itself asserts that the vectorised and
reference frame-mAP agree.
"""

from __future__ import annotations

import runpy

import pytest
from conftest import REPO

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_benchmark_subcommands_quick(ray_local, tmp_path, capsys):
    main = runpy.run_path(str(REPO / "jobs" / "benchmark.py"))["main"]
    for command in ("eval", "prepare", "bank-build", "train", "gpu"):
        assert main([command, "--quick", "--workdir", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        assert f"[{command}" in out and "------" in out and "load average" in out, out[-3000:]
    assert "[gpu-train]" in out and "[gpu-bank-build]" in out and "keyframes / forward" in out, out[-3000:]
