"""Video decoding and frame timing that the prepare job and `jobs/detect.py` share.

decord decodes (in order, in bounded chunks: `decode_frames`); PyAV is the fallback for single
frames decord refuses and the source of the container's start time. Frame times follow
`lfb_ray.data.timing` (movie time = pts minus the container's start; variable-rate files by each
frame's presentation time).
"""

from __future__ import annotations

import numpy as np

from lfb_ray.data.timing import FrameTimes

__all__ = ["FRAMES_PER_DECODE", "decode_frames", "decode_one_pyav", "frame_times", "short_error", "stored_size",
           "stream_start_shift"]

FRAMES_PER_DECODE = 128  # frames decoded together: bounds memory, still one in-order pass


def stored_size(orig_h: int, orig_w: int, short_side: int) -> tuple[int, int]:
    """(height, width) frames are stored at: short side `data.short_side`, or the source's own size
    when that is smaller (never upsampled at prepare time; `load_config` makes sure `short_side` is
    at least the largest train-time scale, so training never upsamples stored frames either)."""
    short = min(short_side, orig_h, orig_w)
    if orig_h <= orig_w:
        return short, int(round(orig_w * short / orig_h))
    return int(round(orig_h * short / orig_w)), short


def stream_start_shift(path: str) -> float:
    """Movie time of the video stream's first frame: its start time minus the container's (the
    earliest start of any stream), as ffmpeg and players count time; 0 when either is unknown.
    decord counts frame times from the video stream's own first frame, so this is added to them."""
    import av

    try:
        with av.open(path) as c:
            st = c.streams.video[0]
            if st.start_time is None or c.start_time is None:
                return 0.0
            return max(0.0, float(st.start_time * st.time_base) - c.start_time / 1e6)
    except Exception:  # decord opened the file; without PyAV's view, keep decord's clock
        return 0.0


def frame_times(path: str, vr, fps: float) -> tuple[FrameTimes, float]:
    """Every frame's movie time (`lfb_ray.data.timing`), from decord's per-frame timestamps, and the
    shift from decord's clock (seconds since the video stream's first frame) to movie time."""
    n = len(vr)
    ts = np.asarray(vr.get_frame_timestamp(range(n)), dtype=np.float64).reshape(n, -1)[:, 0]
    ts = ts - ts[0] if len(ts) else ts
    shift = stream_start_shift(path)
    return FrameTimes(ts + shift, fps), shift


def decode_one_pyav(path: str, stream_time: float, height: int, width: int) -> np.ndarray:
    """The frame shown at `stream_time` (seconds since the video stream's first frame), decoded with
    PyAV from the keyframe before it, skipping packets the decoder refuses; RGB [height, width, 3].

    Why: decord fails a whole request when any packet it has read ahead is broken, so frames shortly
    before a broken packet are lost to it although nothing they depend on is damaged.

    Raises:
        ValueError: the frame is not produced, or it is decoded from a broken packet since the last
            keyframe (its picture would be wrong).
    """
    import av

    with av.open(path) as c:
        st = c.streams.video[0]
        st.thread_type = "NONE"
        tb = float(st.time_base)
        zero = float(st.start_time * st.time_base) if st.start_time is not None else 0.0
        target = zero + stream_time
        c.seek(int(target / tb), stream=st, backward=True, any_frame=False)
        broken = None
        for packet in c.demux(st):
            try:
                frames = packet.decode()
            except av.error.FFmpegError as e:
                broken = f"{type(e).__name__}: {e}"
                continue
            for f in frames:
                if f.key_frame:
                    broken = None
                if f.pts is None:
                    continue
                t = f.pts * tb
                if abs(t - target) < 2e-3:
                    if broken:
                        raise ValueError(f"decoded from a broken packet before it ({broken})")
                    return f.to_ndarray(format="rgb24", width=width, height=height)
                if t > target:
                    raise ValueError(f"no frame at {stream_time:.3f} s (next one at {t - zero:.3f} s)")
    raise ValueError(f"no frame at {stream_time:.3f} s (end of stream)")


def short_error(e: BaseException) -> str:
    """One line of an exception: decord's messages are multi-line C++ traces."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith("Stack trace")]
    text = lines[0] if lines else ""
    return f"{type(e).__name__}: {text[:300]}"


def decode_frames(open_reader, frames: np.ndarray, path: str, fallback):
    """Decode `frames` (sorted unique indices) in order, in chunks of FRAMES_PER_DECODE, with decord.

    A chunk that fails is split in halves down to single frames; a single frame that fails is
    decoded by `fallback(index)` (PyAV) instead, and recorded as undecodable when that fails too.
    The decord reader is opened afresh after a failure (a failed decode can leave it failing the
    next request). Yields (frame index, [h, w, 3] array or None, error or None) in frame order.

    Raises:
        ValueError: more than max(FRAMES_PER_DECODE, a quarter of `frames`) frames are undecodable:
            the video is broken as a whole, not in a few places (and bisecting all of it would cost
            a decode per frame).
    """
    state = {"vr": open_reader(), "failed": 0}
    limit = max(FRAMES_PER_DECODE, len(frames) // 4)

    def run(chunk: np.ndarray):
        try:
            decoded = state["vr"].get_batch(chunk.tolist()).asnumpy()  # [n, h, w, 3], in order
        except Exception as e:  # decord raises its own error types
            if len(chunk) > 1:
                mid = len(chunk) // 2
                yield from run(chunk[:mid])
                yield from run(chunk[mid:])
                return
            state["vr"] = open_reader()
            i = int(chunk[0])
            try:
                yield i, fallback(i), None
            except Exception as e2:
                state["failed"] += 1
                if state["failed"] > limit:
                    raise ValueError(f"{path}: decoding frames failed at frame {i} and {limit} other frames "
                                     f"(truncated or corrupt video?): {short_error(e)}") from e
                yield i, None, f"{short_error(e2)} (decord: {short_error(e)})"
            return
        for j, i in enumerate(chunk):
            yield int(i), decoded[j], None

    for c0 in range(0, len(frames), FRAMES_PER_DECODE):
        yield from run(frames[c0:c0 + FRAMES_PER_DECODE])
