"""The repository's documents stand on their own: no file cites a document or path outside the
repository, and the user documents name no scratch (`/tmp`) run folders nobody else can rerun."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUTSIDE = re.compile(r"LFB_SPEC|ECOSYSTEM\.md|STACK_NOTES|SYNTHETIC_AVA|/work/|\.\./shared")
# Ray's own address file is a fact about Ray, not a run folder of ours.
SCRATCH = re.compile(r"/tmp/(?!ray/ray_current_cluster)")


def _tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=REPO, capture_output=True, text=True, check=True)
    return [REPO / p for p in out.stdout.split()]


def test_no_file_cites_anything_outside_the_repository():
    files = [p for p in _tracked("*.py", "*.md", "*.yaml", "*.sh", "*.txt", "*.toml", ".ci/run") if p.is_file()]
    assert len(files) > 50
    hits = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in files if p.name != "test_docs.py"
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if OUTSIDE.search(line)]
    assert not hits, "\n".join(hits)


def test_user_documents_name_no_scratch_folders():
    docs = [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md")),
            *sorted((REPO / "research").glob("*"))]
    hits = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in docs if p.is_file()
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if SCRATCH.search(line)]
    assert not hits, "\n".join(hits)


def test_readme_submission_is_the_one_docs_cluster_tests():
    """README's cluster command is docs/cluster.md's "Submit, watch, resume" submission (which the
    job-submission integration test runs), option for option."""
    from doc_commands import job_submits, user_submit

    readme = job_submits((REPO / "README.md").read_text())
    assert len(readme) == 1
    assert readme[0] == user_submit()
