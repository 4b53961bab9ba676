"""Person proposals: the FAIR / mmaction2 proposal pickle, read safely, and per-keyframe selection."""

from __future__ import annotations

import io
import os
import re

import numpy as np

from lfb_ray.data.annotations.errors import AnnotationError, error_at
from lfb_ray.data.ids import unsafe_video_id
from lfb_ray.storage import is_uri, read_bytes

__all__ = ["load_proposals", "select_proposals"]

_PROPOSAL_KEY = re.compile(r"([^,\s]+),(\d+)")


def load_proposals(path: str | os.PathLike) -> dict[tuple[str, int], np.ndarray]:
    """Loads a person-proposal pickle `{"<video_id>,<%04d second>": boxes}` (FAIR / mmaction2).

    The pickle is read with `lfb_ray.safe_pickle.safe_load`: only numpy arrays and plain builtins.

    Args:
        path: the .pkl file.

    Returns:
        {(video_id, timestamp): [n, 5] float32 (x1, y1, x2, y2, score) normalised}; [n, 4]
        entries get score 1.0; values may be stored as arrays or nested lists.

    Raises:
        AnnotationError: a refused global or corrupt pickle, a non-dict, a bad key, a value that
            is not [n, 4]/[n, 5] finite numbers, or two keys for one keyframe.
    """
    from lfb_ray.safe_pickle import UnsafePickleError, safe_load

    try:
        obj = safe_load(io.BytesIO(read_bytes(path)) if is_uri(path) else path, what="proposals")
    except UnsafePickleError as e:
        raise AnnotationError(str(e)) from None
    if not isinstance(obj, dict):
        raise error_at(path, None, f"expected a dict of proposals, got {type(obj).__name__}")
    out: dict[tuple[str, int], np.ndarray] = {}
    for key, value in obj.items():
        if isinstance(key, bytes):
            key = key.decode("latin1")
        m = _PROPOSAL_KEY.fullmatch(key) if isinstance(key, str) else None
        if m is None:
            raise error_at(path, None, f"key {key!r} is not '<video_id>,<timestamp>'")
        why = unsafe_video_id(m.group(1))
        if why:
            raise error_at(path, None, f"key {key!r}: {why}")
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (ValueError, TypeError):
            raise error_at(path, None, f"key {key!r}: value is not a numeric array") from None
        if arr.size == 0:
            arr = arr.reshape(0, 5)
        if arr.ndim != 2 or arr.shape[1] not in (4, 5):
            raise error_at(path, None, f"key {key!r}: expected shape [n, 4] or [n, 5], got {list(arr.shape)}")
        if not np.isfinite(arr).all():
            raise error_at(path, None, f"key {key!r}: non-finite values")
        if arr.shape[1] == 4:
            arr = np.concatenate([arr, np.ones((len(arr), 1))], axis=1)
        k = (m.group(1), int(m.group(2)))
        if k in out:
            raise error_at(path, None, f"key {key!r}: keyframe {k} appears twice")
        out[k] = arr.astype(np.float32)
    return out


def select_proposals(props: np.ndarray | None, score_thr: float, max_proposals: int = 1000) -> np.ndarray:
    """Selects the proposals of one keyframe.

    thr = min(score_thr, best score); keep score >= thr (so the best box always survives); keep
    the first `max_proposals` in stored order (as mmaction2 does). A missing or empty entry gives
    one whole-frame box with score 1.

    Args:
        props: [n, 5] (x1, y1, x2, y2, score), or None when the keyframe has no entry.

    Returns:
        [m, 5] float32, 1 <= m <= max_proposals.
    """
    if props is None or len(props) == 0:
        return np.array([[0.0, 0.0, 1.0, 1.0, 1.0]], dtype=np.float32)
    props = np.asarray(props, dtype=np.float32)
    thr = min(float(score_thr), float(props[:, 4].max()))
    return props[props[:, 4] >= thr][:max_proposals]
