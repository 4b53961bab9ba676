"""Video ids: where they come from (annotation CSVs, proposal keys, file names, `--video-id`), they
become path components of outputs (`prepared/<split>/<video_id>/`, detect's files), so each must be
one safe path component.

Why: a video file named `...mp4` (stem `..`) with annotation rows for video id `..` made the prepare
job remove `prepared/train/..` = the whole prepared folder, committed videos of an earlier run
included. AVA's ids are YouTube ids (`[A-Za-z0-9_-]{11}`); any id that is a single file name without
separators, control characters or a leading dot is accepted.
"""

from __future__ import annotations

__all__ = ["MAX_ID_LENGTH", "unsafe_video_id"]

MAX_ID_LENGTH = 200  # below the common 255-byte file-name limit, with room for suffixes


def unsafe_video_id(video_id: str) -> str | None:
    """Why `video_id` cannot name an output folder, or None when it can."""
    if not video_id:
        return "empty video id"
    if video_id.startswith("."):
        return f"video id {video_id!r} starts with '.' (hidden, or the '.'/'..' of a path)"
    bad = sorted({c for c in video_id if c in "/\\" or ord(c) < 32 or ord(c) == 127})
    if bad:
        return f"video id {video_id!r} contains {', '.join(repr(c) for c in bad)}: it must be a single path component"
    if len(video_id.encode()) > MAX_ID_LENGTH:
        return f"video id {video_id[:40]!r}... is {len(video_id.encode())} bytes long (at most {MAX_ID_LENGTH})"
    return None
