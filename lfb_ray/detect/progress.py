"""The per-stage progress bars of `jobs/detect.py` (decode, persons, bank, score, render), on stderr."""

from __future__ import annotations

import sys

__all__ = ["bar"]


def bar(total: int, desc: str, unit: str, enabled: bool):
    """A tqdm bar with an ETA, redrawn at most once a second; `enabled=False` (--quiet) draws nothing."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                mininterval=1.0)
