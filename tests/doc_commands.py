"""The `ray job submit` commands of docs/cluster.md, parsed, so that tests run what the doc says."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "cluster.md"


@dataclass
class JobSubmit:
    options: list[str]  # between `ray job submit` and `--`
    entrypoint: list[str]  # after `--`

    def option(self, name: str) -> str | None:
        return self.options[self.options.index(name) + 1] if name in self.options else None

    @property
    def runtime_env(self) -> dict:
        raw = self.option("--runtime-env-json")
        return json.loads(raw) if raw else {}


def job_submits(text: str | None = None) -> list[JobSubmit]:
    """Every `ray job submit ... -- ENTRYPOINT` in the doc's code blocks (backslash continuations joined)."""
    text = DOCS.read_text() if text is None else text
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S)
    out = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line.startswith("ray job submit"):
                continue
            argv = shlex.split(line, comments=True)
            if "--" not in argv:
                continue
            i = argv.index("--")
            out.append(JobSubmit(options=argv[3:i], entrypoint=argv[i + 1:]))
    return out


def user_submit() -> JobSubmit:
    """The submission the "Submit, watch, resume" section tells a user to run."""
    section = DOCS.read_text().split("### Submit, watch, resume", 1)[1].split("\n### ", 1)[0]
    subs = job_submits(section)
    assert len(subs) == 1, f"expected one `ray job submit` in 'Submit, watch, resume', found {len(subs)}"
    return subs[0]


AVA_DOC = REPO / "docs" / "ava.md"
PLACEHOLDER = "PLACEHOLDER"  # stands for `$VAR`, `<...>` and `...` arguments of a documented command


def python_job_commands(text: str) -> list[list[str]]:
    """Every `python jobs/X.py ...` command of the doc's code blocks, as argv after `python`
    (backslash continuations joined, comments dropped, placeholders replaced by PLACEHOLDER)."""
    out = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for m in re.finditer(r"(?:^|\s)python (jobs/\S+\.py.*)", line):
                argv = shlex.split(m.group(1), comments=True)
                out.append([PLACEHOLDER if "$" in a or "<" in a or a == "..." else a for a in argv])
    return out


class _Parsed(Exception):
    def __init__(self, parser, args):
        self.parser, self.args = parser, args


def job_parser(script: str, argv: list[str]):
    """The argparse parser that `script`'s main() parses `argv` with, and the argv it hands it: main
    runs until its first `parse_args`, which is intercepted (nothing after it runs)."""
    import argparse
    import runpy
    from unittest import mock

    def intercept(self, args=None, namespace=None):
        raise _Parsed(self, list(args) if args is not None else [])

    module = runpy.run_path(str(REPO / script), run_name="doc_commands_check")
    with mock.patch.object(argparse.ArgumentParser, "parse_args", intercept):
        try:
            module["main"](list(argv))
        except _Parsed as p:
            return p.parser, p.args
    raise AssertionError(f"{script}: main() did not parse its command line with argparse")


# docs/cluster.md, "One storage root, and the checks before any work": the pipeline command with the
# storage root overrides, and the same command with the smoke overrides.
STORAGE_SECTION = "### One storage root, and the checks before any work"


@dataclass
class PipelineCommands:
    argv: list[str]  # `python` argv of the pipeline command, without `--check` and overrides
    storage_overrides: list[str]  # workdir=..., data.root=..., model.pretrained=...
    smoke_overrides: list[str]  # the smoke command's overrides, less the storage root ones
    smoke_flags: list[str]  # flags the smoke command adds to the pipeline command (e.g. `--operators nl`)


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(flags and their values, `key=value` overrides) of a job's argv."""
    flags, overrides = [], []
    for a in argv:
        (overrides if "=" in a and not a.startswith("-") else flags).append(a)
    return flags, overrides


def pipeline_commands(text: str | None = None) -> PipelineCommands:
    """The section's two `jobs/pipeline.py --check` commands: the first with the storage root's
    overrides, the second (trying a config before paying for GPUs) with the smoke overrides."""
    text = DOCS.read_text() if text is None else text
    section = text.split(STORAGE_SECTION, 1)[1].split("\n### ", 1)[0]
    cmds = [c for c in python_job_commands(section) if c[0] == "jobs/pipeline.py"]
    assert len(cmds) == 2, f"expected two `python jobs/pipeline.py` commands in {STORAGE_SECTION!r}, found {len(cmds)}"
    (flags, storage), (smoke_flags, smoke) = (_split_overrides(c) for c in cmds)
    assert "--check" in flags and smoke_flags[:len(flags)] == flags, (flags, smoke_flags)
    keys = {o.split("=", 1)[0] for o in storage}
    return PipelineCommands(argv=["python", *[a for a in flags if a != "--check"]], storage_overrides=storage,
                            smoke_overrides=[o for o in smoke if o.split("=", 1)[0] not in keys],
                            smoke_flags=smoke_flags[len(flags):])


def storage_table(text: str | None = None) -> list[str]:
    """The overrides of the section's table (`| \\`key=value\\` | what |` rows)."""
    text = DOCS.read_text() if text is None else text
    section = text.split(STORAGE_SECTION, 1)[1].split("\n### ", 1)[0]
    return re.findall(r"^\| `([a-z_.]+=[^`]+)` \|", section, flags=re.M)
