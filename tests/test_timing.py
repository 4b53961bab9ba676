"""Frame timing of keyframe clips at 24/25/30 fps, full movies vs trimmed clips."""

import numpy as np
import pytest

from lfb_ray.data.timing import (
    TimingError,
    clip_ref_offsets,
    detect_video_start,
    frame_indices_for,
    stored_ref_offsets,
)


def test_clip_offsets_and_jitter_range():
    assert clip_ref_offsets(4, 16).tolist() == [-32, -16, 0, 16]
    assert stored_ref_offsets(4, 16, None).tolist() == [-32, -16, 0, 16]
    j = stored_ref_offsets(4, 16, (-8, 7))
    assert j[0] == -40 and j[-1] == 23 and len(j) == 64  # contiguous: every frame around the keyframe


def test_trimmed_30fps_matches_rawframe_rule():
    # mmaction2: centre rawframe = 30*(t-900)+1 (1-based) -> 0-based index 30*(t-900)
    idx = frame_indices_for(np.array([902, 1000]), clip_ref_offsets(4, 16), video_start_second=900,
                            native_fps=30, num_frames=27030)
    assert idx.tolist() == [[28, 44, 60, 76], [2968, 2984, 3000, 3016]]


@pytest.mark.parametrize("fps,expected", [(25, [50 - 27, 50 - 13, 50, 50 + 13]), (24, [48 - 26, 48 - 13, 48, 48 + 13])])
def test_other_fps_map_through_time(fps, expected):
    # offset -32 at 30 fps = -1.0667 s -> -26.67 frames at 25 fps -> round to -27
    idx = frame_indices_for(np.array([902]), clip_ref_offsets(4, 16), video_start_second=900, native_fps=fps,
                            num_frames=10_000)
    assert idx[0].tolist() == expected


def test_full_movie_uses_absolute_seconds():
    idx = frame_indices_for(np.array([902]), np.array([0]), video_start_second=0, native_fps=25, num_frames=10**6)
    assert idx[0, 0] == 902 * 25


def test_indices_clipped_to_video():
    idx = frame_indices_for(np.array([900]), np.array([-40, 0]), video_start_second=900, native_fps=30, num_frames=100)
    assert idx[0].tolist() == [0, 0]


def test_detect_start():
    assert detect_video_start(-1, duration_s=901.0, max_timestamp=1798, video="v") == 900
    assert detect_video_start(-1, duration_s=60.0, max_timestamp=958, video="v") == 900
    assert detect_video_start(-1, duration_s=7200.0, max_timestamp=1798, video="v") == 0
    assert detect_video_start(0, duration_s=7200.0, max_timestamp=1798, video="v") == 0
    assert detect_video_start(-1, duration_s=300.0, max_timestamp=120, video="v") == 0
    with pytest.raises(TimingError, match="shorter than its annotated timestamps"):
        detect_video_start(-1, duration_s=20.0, max_timestamp=958, video="v.mp4")
    with pytest.raises(TimingError, match="data.video_start_second=900"):
        detect_video_start(900, duration_s=20.0, max_timestamp=958, video="v.mp4")


def test_nearest_frames_by_presentation_time():
    from lfb_ray.data.timing import nearest_frames

    times = np.array([0.0, 0.05, 0.1, 0.2, 0.4])
    got = nearest_frames(times, np.array([-1.0, 0.0, 0.024, 0.025, 0.149, 0.15, 0.31, 9.0]))
    assert got.tolist() == [0, 0, 0, 1, 2, 3, 4, 4]  # ties (0.025, 0.15) go to the later frame


def test_frame_times_constant_rate_keeps_the_index_arithmetic():
    from lfb_ray.data.timing import FrameTimes

    ft = FrameTimes(np.arange(27030, dtype=np.float32) / np.float32(30), 30.0)  # decord's float32 clock
    assert ft.constant and ft.duration == pytest.approx(901.0)
    idx = ft.indices(np.array([902, 1000]), clip_ref_offsets(4, 16), video_start_second=900)
    assert idx.tolist() == [[28, 44, 60, 76], [2968, 2984, 3000, 3016]]
    late = FrameTimes.constant_rate(1000, 25.0, first=1.0)  # video stream starts 1 s into the file
    assert late.indices(np.array([902]), np.array([0]), video_start_second=900).tolist() == [[25]]
    assert late.indices(np.array([900]), np.array([0]), video_start_second=900).tolist() == [[0]]


def test_frame_times_variable_rate_and_the_end_of_the_video():
    from lfb_ray.data.timing import FrameTimes

    times = np.concatenate([np.arange(0, 5, 1 / 24), 5 + np.arange(0, 5, 1 / 30)])  # 24 then 30 fps
    ft = FrameTimes(times, len(times) / 10.0)
    assert not ft.constant and ft.duration == pytest.approx(10.0, abs=1e-6)
    idx = ft.indices(np.array([902, 906]), np.array([0, 16]), video_start_second=900)
    assert idx.tolist() == [[48, 61], [120 + 30, 120 + 46]]
    past = ft.indices(np.array([910]), np.array([0]), video_start_second=900, clip=False)
    assert past[0, 0] == ft.num_frames  # beyond the last frame: the caller reports it
