"""Frame timing: which frames of a video file a keyframe clip touches (spec sections 1, 2 and 11).

AVA clips are defined on 30 fps rawframes of the trimmed movie: the clip of keyframe second `t`
is centred on reference frame 30*(t-900)+1 (1-based), i.e. exactly at time t, with reference
offsets {-32, -16, 0, +16} and a train-time jitter in [-8, 7] per frame. We never extract
rawframes: a reference offset `o` is mapped to the time `t + o/30` and from there to the nearest
frame of the video at its own fps, so 24/25/30 fps files and full or trimmed movies all work.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "TimingError",
    "clip_ref_offsets",
    "detect_video_start",
    "frame_indices_for",
    "stored_ref_offsets",
]

AVA_TRIMMED_START = 900  # the trimmed 15-minute clips start at movie second 900


class TimingError(ValueError):
    """A video cannot serve its annotated keyframes (too short, ambiguous offset)."""


def clip_ref_offsets(clip_frames: int, frame_interval: int) -> np.ndarray:
    """Reference-frame offsets of the clip frames around the keyframe.

    For 4 frames at stride 16 this is [-32, -16, 0, 16]: two frames before the keyframe, the
    keyframe and one after (mmaction2's SampleAVAFrames).

    Returns:
        int64 array [clip_frames].
    """
    return (np.arange(clip_frames, dtype=np.int64) - clip_frames // 2) * frame_interval


def stored_ref_offsets(clip_frames: int, frame_interval: int, jitter: tuple[int, int] | None) -> np.ndarray:
    """All reference offsets a sampler may touch: the clip offsets, widened by the jitter range.

    Returns:
        sorted unique int64 array; 4 offsets without jitter, 64 for (-8, 7) at stride 16.
    """
    base = clip_ref_offsets(clip_frames, frame_interval)
    if jitter is None:
        return base
    lo, hi = jitter
    return np.unique((base[:, None] + np.arange(lo, hi + 1)[None, :]).ravel())


def frame_indices_for(
    timestamps: np.ndarray,
    ref_offsets: np.ndarray,
    *,
    video_start_second: int,
    native_fps: float,
    num_frames: int,
    reference_fps: float = 30.0,
) -> np.ndarray:
    """Map (keyframe second, reference offset) pairs to 0-based frame indices of the video file.

    The keyframe second `t` sits at file time `t - video_start_second`; offset `o` adds
    `o / reference_fps` seconds. The nearest native frame (round half up) is taken and clipped
    to the video, as mmaction2 clips indices to the shot.

    Args:
        timestamps: [K] keyframe seconds (AVA movie time).
        ref_offsets: [O] reference-frame offsets.

    Returns:
        int64 array [K, O] of frame indices in [0, num_frames - 1].
    """
    t = np.asarray(timestamps, dtype=np.float64)[:, None]
    o = np.asarray(ref_offsets, dtype=np.float64)[None, :]
    # Exact for integer fps: (t - start) * fps + o * fps / ref_fps.
    pos = (t - video_start_second) * native_fps + o * (native_fps / reference_fps)
    idx = np.floor(pos + 0.5 + 1e-9).astype(np.int64)
    return np.clip(idx, 0, num_frames - 1)


def detect_video_start(configured: int, *, duration_s: float, max_timestamp: int, video: str) -> int:
    """Decide the movie second at file time 0: 900 for trimmed clips, 0 for full movies.

    A trimmed clip can hold keyframe `t` iff `t - 900 < duration`; a full movie iff `t < duration`.
    When `configured >= 0` it is checked, not guessed.

    Raises:
        TimingError: the video is shorter than its annotations, or the offset is ambiguous.
    """
    def fits(start: int) -> bool:
        return max_timestamp - start < duration_s

    if configured >= 0:
        if not fits(configured):
            raise TimingError(
                f"{video}: video is {duration_s:.1f} s long but annotations reach second {max_timestamp} "
                f"(file time {max_timestamp - configured} s with data.video_start_second={configured})")
        return configured
    if max_timestamp < AVA_TRIMMED_START:  # custom data before second 900: only a full movie fits
        if fits(0):
            return 0
    else:
        trimmed, full = fits(AVA_TRIMMED_START), fits(0)
        if trimmed and not full:
            return AVA_TRIMMED_START
        if full and duration_s > 902:
            # Both fit only if the file is longer than the last keyframe second; trimmed AVA clips
            # are 901 s long, so such a file is a full movie.
            return 0
        if full:
            raise TimingError(f"{video}: cannot tell whether the file is a full movie or a trimmed clip "
                              f"({duration_s:.1f} s, last keyframe {max_timestamp}); set data.video_start_second")
    raise TimingError(f"{video}: video is {duration_s:.1f} s long, shorter than its annotated timestamps "
                      f"(last keyframe {max_timestamp})")
