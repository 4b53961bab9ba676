"""The one error every AVA reader raises, located at `<file>:<line>` so a bad input can be fixed by hand."""

from __future__ import annotations

import os

from lfb_ray.redaction import RedactedMessage

__all__ = ["AnnotationError", "error_at"]


class AnnotationError(RedactedMessage, ValueError):
    """Malformed AVA input; the message reads `<file>:<line>: <problem>` (line 1-based)."""


def error_at(path: str | os.PathLike, line: int | None, problem: str) -> AnnotationError:
    """`<file>:<line>: <problem>` (or `<file>: <problem>` without a line) as an AnnotationError."""
    where = f"{os.fspath(path)}:{line}" if line is not None else os.fspath(path)
    return AnnotationError(f"{where}: {problem}")
