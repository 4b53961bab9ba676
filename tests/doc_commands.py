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
