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
    for command in ("eval", "prepare", "bank-build", "train", "gpu", "loader"):
        assert main([command, "--quick", "--workdir", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        assert f"[{command}" in out and "------" in out and "load average" in out, out[-3000:]
        if command == "gpu":
            assert "[gpu-train]" in out and "[gpu-bank-build]" in out and "keyframes / forward" in out, out[-3000:]
    assert "step only" in out and "loader + step" in out, out[-3000:]


def test_gpu_session_runs_its_sections_within_the_budget(tmp_path, capsys):
    """`gpu-session` (the one command for a lent GPU machine) runs each section as a subprocess, keeps
    each one's output, and skips what the budget no longer allows; here the sections without Ray."""
    from benchmarks import gpu_session

    out_dir = tmp_path / "out"
    code = gpu_session.run(prepared=None, quick=True, workdir=str(tmp_path / "work"), budget_s=400, out=str(out_dir),
                           sections=("tests", "bank-step"))
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert "[gpu-session]" in out and "tests ok" in out and "bank-step ok" in out, out[-3000:]
    assert "[bank-step]" in (out_dir / "bank-step.txt").read_text()
    assert "passed" in (out_dir / "tests.txt").read_text() or "skipped" in (out_dir / "tests.txt").read_text()
    assert gpu_session.run(prepared=None, quick=True, workdir=str(tmp_path / "work"), budget_s=5,
                           sections=("bank-step",)) == 1
    assert "bank-step skipped: budget spent" in capsys.readouterr().out


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
                    "bank-step", "loader", "gpu-session"):
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


def test_the_documented_gpu_session_command_parses(monkeypatch):
    """BENCHMARKS.md's gpu-session command line, as written, reaches `gpu_session.run` with its flags."""
    import shlex

    from benchmarks import cli, gpu_session

    text = (REPO / "BENCHMARKS.md").read_text()
    line = next(x for x in text.splitlines() if x.startswith("python jobs/benchmark.py gpu-session"))
    seen = {}
    monkeypatch.setattr(gpu_session, "run", lambda **kw: seen.update(kw) or 0)
    argv = [a.replace("$OUT", "/out") for a in shlex.split(line)[2:]]
    assert cli.main(argv) == 0
    assert seen["prepared"] == "runs/gpuwork/prepared" and seen["out"] == "/out/gpu_session"
    assert seen["budget_s"] == 480 and seen["quick"] is False
