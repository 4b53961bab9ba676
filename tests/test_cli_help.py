"""`--help` of the jobs: instant (no torch or Ray imported before parsing) and readable (the usage
examples of the docstring one per line, not reflowed into one paragraph)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO

PROBE = r'''
import runpy, sys
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit:
    pass
print("HEAVY", sorted(m for m in ("torch", "ray", "decord") if m in sys.modules))
'''


@pytest.mark.parametrize("job", ["train", "build_bank", "prepare_data", "pipeline"])
def test_help_is_instant_and_keeps_the_examples_on_their_lines(job):
    r = subprocess.run([sys.executable, "-c", PROBE, f"jobs/{job}.py"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout  # nothing heavy imported to print the help
    examples = [ln.strip() for ln in r.stdout.splitlines() if ln.strip().startswith(("python jobs/", "ray job submit"))]
    assert len(examples) >= 2 and all(ln.count(f"jobs/{job}.py") == 1 for ln in examples), r.stdout
