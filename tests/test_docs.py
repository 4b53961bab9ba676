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
    """The tracked files that match; a tracked file missing from the checkout is a failure, not a pass."""
    out = subprocess.run(["git", "ls-files", *patterns], cwd=REPO, capture_output=True, text=True, check=True)
    files = [REPO / p for p in out.stdout.split()]
    missing = [str(p.relative_to(REPO)) for p in files if not p.is_file()]
    assert not missing, f"tracked but missing: {missing}"
    return files


def test_no_file_cites_anything_outside_the_repository():
    files = _tracked("*.py", "*.md", "*.yaml", "*.sh", "*.txt", "*.toml", ".ci/run")
    assert len(files) > 50
    hits = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in files if p.name != "test_docs.py"
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if OUTSIDE.search(line)]
    assert not hits, "\n".join(hits)


def test_user_documents_name_no_scratch_folders():
    docs = [*_tracked("README.md", "BENCHMARKS.md", "docs/*.md", "research/*")]
    assert {"README.md", "BENCHMARKS.md", "docs/cluster.md"} <= {str(p.relative_to(REPO)) for p in docs}
    hits = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in docs
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if SCRATCH.search(line)]
    assert not hits, "\n".join(hits)


def test_readme_submission_is_the_one_docs_cluster_tests():
    """README's cluster command is docs/cluster.md's "Submit, watch, resume" submission (which the
    job-submission integration test runs), option for option."""
    from doc_commands import job_submits, user_submit

    readme = job_submits((REPO / "README.md").read_text())
    assert len(readme) == 1
    assert readme[0] == user_submit()


def _ava_section(number: int) -> str:
    text = (REPO / "docs" / "ava.md").read_text()
    return text.split(f"\n## {number}. ", 1)[1].split("\n## ", 1)[0]


def test_ava_doc_downloads_every_checkpoint_a_config_names():
    """Each `checkpoints/...` file that a config of configs/ reads (model.pretrained, bank.checkpoint) is
    a destination in docs/ava.md's download table and the `-O` target of a `wget` of an https URL in the
    same section, so following the page puts every file where the configs look for it."""
    import shlex

    import yaml

    wanted = set()
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        for value in (cfg.get("model", {}).get("pretrained"), cfg.get("bank", {}).get("checkpoint")):
            if value and value.startswith("checkpoints/"):
                wanted.add(value)
    assert "checkpoints/slowonly_r50_4x16x1_256e_kinetics400_rgb.pth" in wanted
    assert "checkpoints/slowonly_kinetics_pretrained_r50_4x16x1_20e_ava_rgb.pth" in wanted

    section = _ava_section(1)
    table = "\n".join(line for line in section.splitlines() if line.startswith("|"))
    downloads = {}
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv[:1] == ["wget"] and "-O" in argv:
                i = argv.index("-O")
                urls = [a for a in argv[1:] if a.startswith("https://")]
                assert len(urls) == 1, line
                downloads[argv[i + 1]] = urls[0]
    for ckpt in sorted(wanted):
        assert f"`{ckpt}`" in table, f"{ckpt} is not in docs/ava.md's download table"
        assert ckpt in downloads, f"no `wget -O {ckpt} URL` in docs/ava.md section 1"
        assert downloads[ckpt].startswith("https://download.openmmlab.com/mmaction/"), downloads[ckpt]


def test_ava_doc_job_commands_parse():
    """Every `python jobs/...` command of docs/ava.md names an existing script, passes only options its
    argparse parser accepts, and its --config loads with the command's overrides."""
    from doc_commands import AVA_DOC, job_parser, python_job_commands

    from lfb_ray.config import load_config

    cmds = python_job_commands(AVA_DOC.read_text())
    scripts = {c[0] for c in cmds}
    assert {"jobs/pipeline.py", "jobs/train.py", "jobs/build_bank.py", "jobs/import_bank.py",
            "jobs/convert_checkpoint.py", "jobs/evaluate.py"} <= scripts, scripts
    for cmd in cmds:
        script, argv = cmd[0], cmd[1:]
        assert (REPO / script).is_file(), f"{script} does not exist"
        parser, parsed_argv = job_parser(script, argv)
        try:
            args = parser.parse_args(parsed_argv)
        except SystemExit:
            raise AssertionError(f"docs/ava.md: `python {' '.join(cmd)}`: {script} rejects its arguments") from None
        configs = getattr(args, "config", None) or []
        for config in [configs] if isinstance(configs, str) else configs:
            assert (REPO / config).is_file(), f"{config} does not exist"
            load_config(REPO / config, [o for o in getattr(args, "overrides", []) if "=" in o])
        if getattr(args, "baseline_config", ""):
            load_config(REPO / args.baseline_config, [*args.overrides, "model.fbo=none"])
    pipeline = [c for c in cmds if c[0] == "jobs/pipeline.py"]
    assert pipeline and all(c[c.index("--baseline-config") + 1] == "configs/baseline.yaml"
                            for c in pipeline if "--baseline-config" in c)
    assert all("--baseline-config" in c for c in pipeline), "the AVA baseline is configs/baseline.yaml"


def test_ava_doc_outputs_are_used():
    """A file docs/ava.md's commands write under checkpoints/ is read by a config or by one of its
    own commands (no converted checkpoint that nothing loads)."""
    text = (REPO / "docs" / "ava.md").read_text()
    from doc_commands import python_job_commands

    configs = "\n".join(p.read_text() for p in (REPO / "configs").glob("*.yaml"))
    for cmd in python_job_commands(text):
        if cmd[0] == "jobs/convert_checkpoint.py":
            out = cmd[2]
            used = [c for c in python_job_commands(text) if any(a.endswith("=" + out) for a in c)]
            assert used or out in configs, f"{out} is written by docs/ava.md but nothing reads it"


def test_readme_states_the_reliability_counts_of_docs_reliability():
    """README's one-line summary of the fault and bad-input tests says what docs/reliability.md counts."""
    rel = " ".join((REPO / "docs" / "reliability.md").read_text().split())
    readme = " ".join((REPO / "README.md").read_text().split())
    faults, real, kinds, cases = re.search(
        r"(\d+) faults injected \((\d+) of them real\) and (\d+) kinds of bad input tried \((\d+) cases", rel).groups()
    assert (f"{faults} injected faults ({real} of them real) and {kinds} kinds of bad input ({cases} cases)"
            in readme), "README's reliability line differs from docs/reliability.md"


def test_the_architecture_map_names_modules_and_values_that_exist():
    """docs/architecture.md cannot drift from the package: every module or folder it names exists
    (from the repository or the package root), and every value of its table is defined where it says."""
    import importlib

    text = (REPO / "docs" / "architecture.md").read_text()
    paths = set(re.findall(r"`((?:[a-z_]+/)*[a-z_]+(?:\.py|/))`", text))
    assert len(paths) > 40

    def exists(p: str) -> bool:  # a path from the repository or the package root, or a file named in its folder's row
        return ((REPO / p).exists() or (REPO / "lfb_ray" / p).exists()
                or ("/" not in p and any((REPO / "lfb_ray").rglob(p))))

    missing = [p for p in paths if not exists(p)]
    assert not missing, missing
    rows = re.findall(r"^\| ([^|]+) \| `([a-z_/]+)\.py` \|", text, re.M)
    assert len(rows) >= 8
    for names, module in rows:
        mod = importlib.import_module("lfb_ray." + module.replace("/", "."))
        for name in re.findall(r"`([A-Z][A-Za-z]+)`", names):
            assert hasattr(mod, name), f"{name} is not defined in lfb_ray/{module}.py"
