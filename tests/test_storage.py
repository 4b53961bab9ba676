"""`lfb_ray.storage`'s local atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def test_atomic_path_moves_on_success_and_keeps_the_old_file_on_failure(tmp_path):
    """The one helper for writers that need a file name (torch.save, PyAV, Pillow, CSV text)."""
    from lfb_ray.storage import atomic_path

    target = tmp_path / "sub" / "out.mp4"
    with atomic_path(target, suffix=".mp4") as tmp:
        assert tmp.endswith(".mp4") and os.path.dirname(tmp) == str(target.parent) and not target.exists()
        Path(tmp).write_bytes(b"one")
    assert target.read_bytes() == b"one"
    with pytest.raises(RuntimeError, match="encoder died"), atomic_path(target) as tmp:
        Path(tmp).write_bytes(b"half")
        raise RuntimeError("encoder died")
    assert target.read_bytes() == b"one"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.mp4"]  # no temporary file left
