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
