"""Frame timing: which frames of a video file a keyframe clip touches.

AVA clips are defined on 30 fps rawframes of the trimmed movie: the clip of keyframe second `t`
is centred on reference frame 30*(t-900)+1 (1-based), i.e. exactly at time t, with reference
offsets {-32, -16, 0, +16} and a train-time jitter in [-8, 7] per frame. We never extract
rawframes: a reference offset `o` is mapped to the time `t + o/30` and from there to the nearest
frame of the video at its own fps, so 24/25/30 fps files and full or trimmed movies all work.

Movie time is presentation time since the start of the file as ffmpeg and players count it: a
frame's pts minus the container's start time (the earliest start of any stream; what
`ffmpeg -ss 900`, which cut AVA's trimmed clips, seeks from). A file whose first video frame has
pts 1.0 s and no other stream therefore has that frame at movie time 0; one with an audio stream
from pts 0 has it at movie time 1.0 s. `FrameTimes` holds each frame's movie time: constant-rate
files keep the exact index arithmetic of `frame_indices_for`, variable-rate ones take the frame
whose presentation time is nearest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lfb_ray.redaction import RedactedMessage

__all__ = [
    "FrameTimes",
    "TimingError",
    "clip_ref_offsets",
    "detect_video_start",
    "frame_indices_for",
    "nearest_frames",
    "stored_ref_offsets",
]

AVA_TRIMMED_START = 900  # the trimmed 15-minute clips start at movie second 900


class TimingError(RedactedMessage, ValueError):
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
    first_frame_time: float = 0.0,
) -> np.ndarray:
    """Map (keyframe second, reference offset) pairs to 0-based frame indices of a constant-rate
    video file.

    The keyframe second `t` sits at file time `t - video_start_second`; offset `o` adds
    `o / reference_fps` seconds. The nearest native frame (round half up) is taken and clipped
    to the video, as mmaction2 clips indices to the shot. `first_frame_time`: the movie time of
    frame 0 (a video stream that starts after the file does).

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
    if first_frame_time:
        pos = pos - first_frame_time * native_fps
    idx = np.floor(pos + 0.5 + 1e-9).astype(np.int64)
    return np.clip(idx, 0, num_frames - 1)


def nearest_frames(frame_times: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Index of the frame whose presentation time is nearest each target time (ties go to the later
    frame, as `frame_indices_for` rounds half up); targets outside the video get its first or last
    frame.

    Args:
        frame_times: [N] increasing presentation times (seconds).
        targets: any shape, seconds on the same clock.

    Returns:
        int64 array of the targets' shape.
    """
    times = np.asarray(frame_times, dtype=np.float64)
    t = np.asarray(targets, dtype=np.float64)
    if len(times) == 1:
        return np.zeros(t.shape, np.int64)
    hi = np.clip(np.searchsorted(times, t, side="left"), 1, len(times) - 1)
    lo = hi - 1
    take_hi = (times[hi] - t) <= (t - times[lo]) + 1e-9
    return np.where(take_hi, hi, lo).astype(np.int64)


@dataclass(frozen=True)
class FrameTimes:
    """When each frame of a video file is shown, in movie time (see the module docstring).

    `times[i]` is frame i's presentation time (seconds); `fps` the stream's average rate.
    `constant`: every frame sits within a tenth of a frame of `times[0] + i / fps`, so frame
    indices come from `frame_indices_for`'s exact arithmetic (as before this class existed) rather
    than from `times`, whose float32 values (decord's) carry rounding error.
    """

    times: np.ndarray
    fps: float

    @property
    def num_frames(self) -> int:
        return len(self.times)

    @property
    def first(self) -> float:
        return float(self.times[0])

    @property
    def constant(self) -> bool:
        ideal = self.first + np.arange(self.num_frames) / self.fps
        return bool(np.max(np.abs(self.times - ideal)) < 0.1 / self.fps)

    @property
    def duration(self) -> float:
        """Movie time at which the last frame ends."""
        if self.constant or self.num_frames < 2:
            return self.first + self.num_frames / self.fps
        return float(self.times[-1] + np.median(np.diff(self.times)))

    @classmethod
    def constant_rate(cls, num_frames: int, fps: float, first: float = 0.0) -> FrameTimes:
        return cls(first + np.arange(num_frames, dtype=np.float64) / fps, float(fps))

    def indices(self, timestamps: np.ndarray, ref_offsets: np.ndarray, *, video_start_second: int,
                reference_fps: float = 30.0, clip: bool = True) -> np.ndarray:
        """[K, O] frame index of each (keyframe second, reference offset): the frame shown nearest
        the time `t - video_start_second + o / reference_fps` (clipped to the video; with
        `clip=False`, constant-rate indices may run past the last frame, which is how the caller
        tells that a keyframe lies beyond the video)."""
        if self.constant:
            return frame_indices_for(timestamps, ref_offsets, video_start_second=video_start_second,
                                     native_fps=self.fps, num_frames=self.num_frames if clip else 10**12,
                                     reference_fps=reference_fps, first_frame_time=self.first)
        t = np.asarray(timestamps, dtype=np.float64)[:, None] - video_start_second
        target = t + np.asarray(ref_offsets, dtype=np.float64)[None, :] / reference_fps
        idx = nearest_frames(self.times, target)
        if not clip:
            idx = np.where(target >= self.duration, self.num_frames, idx)
        return idx


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
