"""Smoke test of `jobs/benchmark.py`: every subcommand runs at `--quick` size and prints its table.

Timings are printed, never asserted; the eval benchmark itself asserts that the vectorised and
reference frame-mAP agree. The fast tests check the package layout: the benchmarks live in
`benchmarks/`, outside the library, and print paths relative to the current directory.
"""

from __future__ import annotations

import re
import runpy

import pytest
from conftest import REPO


@pytest.mark.ray
@pytest.mark.slow
def test_benchmark_subcommands_quick(ray_local, tmp_path, capsys):
    main = runpy.run_path(str(REPO / "jobs" / "benchmark.py"))["main"]
    for command in ("eval", "prepare", "bank-build", "train", "gpu"):
        assert main([command, "--quick", "--workdir", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        assert f"[{command}" in out and "------" in out and "load average" in out, out[-3000:]
    assert "[gpu-train]" in out and "[gpu-bank-build]" in out and "keyframes / forward" in out, out[-3000:]


def test_bank_step_quick(tmp_path, capsys):
    """`bank-step --quick` (no Ray): the before/after rows, checked to give the same window on every path."""
    from benchmarks.cli import main

    assert main(["bank-step", "--quick", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "[bank-step]" in out and "------" in out and "load average" in out, out[-3000:]
    assert "before: sample() + copy" in out and "after, host path" in out and "of H100 step" in out
    assert "after, device path" in out or "no CUDA here" in out
    assert list(tmp_path.iterdir()) == []  # the synthetic bank's temp folder is removed


def test_library_holds_no_benchmark_code():
    """`lfb_ray` neither contains nor imports the benchmarks (they import it, not the reverse)."""
    assert not (REPO / "lfb_ray" / "bench").exists()
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "lfb_ray").rglob("*.py")
                 if "bench" in p.name or re.search(r"^\s*(from|import)\s+benchmarks\b", p.read_text(), re.M)]
    assert offenders == []


def test_help_names_every_subcommand(capsys):
    from benchmarks.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("prepare", "ava-scale", "bank-build", "train", "eval", "all", "gpu", "bank-read", "model",
                    "bank-step"):
        assert f"jobs/benchmark.py {command} " in out
    for command, flag in (("bank-read", "--max-feats-per-second"), ("model", "--device")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert flag in capsys.readouterr().out


def test_printed_paths_are_relative_inside_the_current_directory(tmp_path, monkeypatch):
    from benchmarks.table import shown

    monkeypatch.chdir(tmp_path)
    assert shown(tmp_path / "runs" / "bench" / "synthetic_8x60_seed0") == "runs/bench/synthetic_8x60_seed0"
    assert shown("runs/bench") == "runs/bench"
    outside = tmp_path.parent / "elsewhere"
    assert shown(outside) == str(outside)
    assert shown("s3://bucket/prepared") == "s3://bucket/prepared"
