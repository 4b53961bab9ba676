"""Clip sampling, transforms (frames and boxes together) and training targets."""

import numpy as np
import pytest

from lfb_ray.data.clips import (
    ClipSpec,
    assign_targets,
    box_iou,
    decode_jpeg,
    encode_jpeg,
    pick_clip_frames,
    train_transform,
)
from lfb_ray.data.clips import (
    test_transform as run_test_transform,
)
from lfb_ray.data.timing import stored_ref_offsets

SPEC = ClipSpec(scale_range=(64, 64), crop_size=64, test_short_side=32, flip_ratio=0.0)


def test_jpeg_round_trip_and_determinism():
    yy, xx = np.mgrid[0:24, 0:32]
    img = np.stack([xx * 8, yy * 10, (xx + yy) * 4], -1).astype(np.uint8)  # smooth: JPEG-friendly
    a, b = encode_jpeg(img, 95), encode_jpeg(img, 95)
    assert a == b
    out = decode_jpeg(a)
    assert out.shape == (24, 32, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - img).mean() < 3


def test_pick_frames_without_and_with_jitter():
    off = stored_ref_offsets(4, 16, (-8, 7))
    pos = pick_clip_frames(off, SPEC, None)
    assert off[pos].tolist() == [-32, -16, 0, 16]
    rng = np.random.default_rng(1)
    for _ in range(50):
        d = off[pick_clip_frames(off, SPEC, rng)] - np.array([-32, -16, 0, 16])
        assert d.min() >= -8 and d.max() <= 7
    with pytest.raises(ValueError, match="temporal_jitter"):
        pick_clip_frames(stored_ref_offsets(4, 16, None), SPEC, np.random.default_rng(3))


def _frames(h=32, w=48):
    f = np.zeros((4, h, w, 3), np.uint8)
    f[:, :, : w // 2] = 200  # left half bright: tells flips apart
    return f


def test_train_transform_shapes_and_box_scaling():
    spec = ClipSpec(scale_range=(64, 64), crop_size=64, flip_ratio=0.0)
    boxes = np.array([[0.0, 0.0, 0.5, 1.0]], np.float32)
    clip, px = train_transform(_frames(), boxes, spec, np.random.default_rng(0))
    assert clip.shape == (4, 64, 64, 3) and clip.dtype == np.uint8
    # frame 32x48 -> short side 64 -> 64x96; crop 64 wide at x0 in [0, 32]
    assert px[0, 1] == 0 and px[0, 3] == 63  # clipped to crop-1
    assert 0 <= px[0, 0] <= px[0, 2] <= 63


@pytest.mark.parametrize(("h", "w", "short"), [(64, 114, 80), (64, 114, 64), (80, 142, 66), (90, 60, 72)])
def test_rescale_crop_equals_the_window_of_the_full_rescale(h, w, short):
    """Cropping before rescaling (Pillow's resize box) gives the window of rescale-then-crop."""
    from lfb_ray.data.clips import _rescale_crop, _resize_short, _short_side_size

    rng = np.random.default_rng(h * w + short)
    frames = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    frames[:, h // 3:, : w // 2] //= 3  # some structure, edges inside the window
    nh, nw = _short_side_size(h, w, short)
    full = _resize_short(frames, short)
    assert full.shape[1:3] == (nh, nw)
    c = min(nh, nw) - 3
    for y0, x0 in [(0, 0), (nh - c, nw - c), (1, (nw - c) // 2)]:
        got = _rescale_crop(frames, (nh, nw), (y0, x0), c)
        ref = full[:, y0:y0 + c, x0:x0 + c]
        assert got.shape == ref.shape == (2, c, c, 3)
        assert np.abs(got.astype(int) - ref).max() <= 1


def test_flip_mirrors_boxes_and_pixels():
    spec = ClipSpec(scale_range=(32, 32), crop_size=32, flip_ratio=1.0)
    f = _frames(32, 32)
    clip, px = train_transform(f, np.array([[0.0, 0.0, 0.25, 0.5]], np.float32), spec, np.random.default_rng(0))
    assert px[0].tolist() == [24.0, 0.0, 32.0, 16.0]
    # left half was bright; after the flip the right half is
    assert clip[0, :, -1].mean() > clip[0, :, 0].mean()


def test_test_transform_keeps_full_frame():
    clip, px = run_test_transform(_frames(32, 48), np.array([[0.5, 0.5, 1.0, 1.0]], np.float32), SPEC)
    assert clip.shape == (4, 32, 48, 3)
    assert px[0].tolist() == [24.0, 16.0, 48.0, 32.0]


def test_normalise_and_collate_test_padding():
    from lfb_ray.config import DataConfig
    from lfb_ray.data.dataset import collate_test, normalise

    d = DataConfig()  # the one owner of the normalisation constants
    x = normalise(np.full((1, 4, 2, 3, 3), 200, np.uint8), d.mean, d.std)
    assert tuple(x.shape) == (1, 3, 4, 2, 3)
    assert np.isclose(float(x[0, 0, 0, 0, 0]), (200 - 123.675) / 58.395, atol=1e-5)
    clips = np.empty(2, dtype=object)
    clips[:] = [np.full((4, 8, 12, 3), 200, np.uint8), np.full((4, 8, 10, 3), 200, np.uint8)]
    boxes = np.empty(2, dtype=object)
    boxes[:] = [np.zeros((1, 4), np.float32), np.zeros((2, 4), np.float32)]
    batch = {"clip": clips, "boxes": boxes, "box_px": boxes, "video_id": np.array(["a", "b"], object),
             "timestamp": np.array([902, 903])}
    out = collate_test(batch, d.mean, d.std)
    assert tuple(out.clip.shape) == (2, 3, 4, 8, 12)
    assert float(out.clip[1, :, :, :, 10:].abs().sum()) == 0.0  # zero padding on the right
    assert out.rois[:, 0].tolist() == [0, 1, 1] and out.roi_video_ids == ["a", "b", "b"]
    assert out.sizes.tolist() == [[8, 12], [8, 10]] and out.roi_batch.tolist() == [0, 1, 1]


def test_collate_train_drops_padding_rois():
    from lfb_ray.config import DataConfig
    from lfb_ray.data.dataset import TrainBatch, collate_train

    d = DataConfig()
    rois = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    valid = np.array([[True, False, True], [False, True, False]])
    labels = np.zeros((2, 3, 5), np.float32)
    labels[..., 2] = 1
    batch = {"clip": np.full((2, 4, 8, 8, 3), 200, np.uint8), "rois": rois, "roi_valid": valid, "labels": labels,
             "video_id": np.array(["a", "b"], object), "timestamp": np.array([902, 903])}
    out = collate_train(batch, d.mean, d.std)
    assert isinstance(out, TrainBatch) and out.num_clips == 2 and tuple(out.clip.shape) == (2, 3, 4, 8, 8)
    assert out.rois.tolist() == [[0, *rois[0, 0]], [0, *rois[0, 2]], [1, *rois[1, 1]]]
    assert tuple(out.labels.shape) == (3, 5) and out.roi_video_ids == ["a", "a", "b"]
    assert out.roi_seconds.tolist() == [902, 902, 903] and out.roi_seconds.dtype == np.int64


def test_assign_targets_copies_labels_of_matching_proposals():
    gt = np.array([[0.1, 0.1, 0.5, 0.9], [0.6, 0.1, 0.9, 0.9]], np.float32)
    labels = np.zeros((2, 81), np.float32)
    labels[0, 11] = labels[0, 64] = 1
    labels[1, 13] = 1
    props = np.array([[0.1, 0.1, 0.5, 0.89, 0.95],   # IoU ~0.97 with gt0
                      [0.6, 0.1, 0.7, 0.9, 0.95],    # low IoU with gt1: negative, dropped
                      [0.0, 0.0, 1.0, 1.0, 0.99]], np.float32)
    rois, lab = assign_targets(gt, labels, props, pos_iou_thr=0.9, max_rois=32, rng=np.random.default_rng(0))
    assert len(rois) == 3
    assert np.array_equal(lab[2], labels[0])
    rois, lab = assign_targets(gt, labels, props, pos_iou_thr=0.9, max_rois=2, rng=np.random.default_rng(0))
    assert len(rois) == 2


def test_box_iou():
    a = np.array([[0, 0, 2, 2]], float)
    b = np.array([[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 5, 6]], float)
    assert np.allclose(box_iou(a, b), [[1 / 7, 1.0, 0.0]])


def test_decode_jpeg_reads_arrow_buffers_and_grayscale_like_pillow():
    """decode_jpeg (simplejpeg) returns Pillow's pixels, from bytes or a frame store's pyarrow Buffer,
    and RGB for a grayscale JPEG."""
    import io

    import pyarrow as pa
    from PIL import Image

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    data = encode_jpeg(img, 90)
    with Image.open(io.BytesIO(data)) as im:
        ref = np.asarray(im.convert("RGB"))
    assert np.array_equal(decode_jpeg(data), ref)
    assert np.array_equal(decode_jpeg(pa.py_buffer(data)), ref)
    buf = io.BytesIO()
    Image.fromarray(img[..., 0]).save(buf, format="JPEG", quality=90)
    gray = decode_jpeg(buf.getvalue())
    assert gray.shape == (24, 40, 3) and np.array_equal(gray[..., 0], gray[..., 2])
    with pytest.raises(ValueError):
        decode_jpeg(b"not a jpeg")


def test_targets_are_assigned_after_the_crop():
    """mmaction2 assigns in the RoI head, after RandomCrop: a GT box the crop pushes out is clipped to
    zero area and matches nothing (not even itself); a proposal matches on the cropped boxes.

    Frames 64x128, short side 64 (no rescale), crop 64: the crop is x in [x0, x0 + 64), x0 in
    [0, 64]; boxes are clipped to [0, 63]. GT A spans x 96..128 (normalised 0.75..1), GT B x 0..40.
    Proposal P is A's left half, x 96..112 (IoU 0.5 with A on the full frame: negative there). In
    the crop A is [96 - x0, 63] and P [96 - x0, min(112 - x0, 63)]: identical for x0 <= 49, IoU
    16/17 at x0 = 50 (positive), 16/18 at 51 (negative); A has no width left for x0 <= 33.
    """
    from lfb_ray.data.clips import transform_and_assign

    spec = ClipSpec(scale_range=(64, 64), crop_size=64, flip_ratio=0.0)
    frames = np.zeros((2, 64, 128, 3), np.uint8)
    gt = np.array([[0.75, 0.25, 1.0, 0.75], [0.0, 0.25, 40 / 128, 0.75]], np.float32)
    labels = np.zeros((2, 81), np.float32)
    labels[0, 12] = labels[1, 14] = 1
    prop = np.array([[96 / 128, 0.25, 112 / 128, 0.75, 0.99]], np.float32)
    seen = set()
    for seed in range(200):
        r = np.random.default_rng(seed)  # replays train_transform's draws: scale, y0, x0
        r.integers(64, 65), r.integers(0, 1)
        x0 = int(r.integers(0, 65))
        clip, rois, lab = transform_and_assign(frames, gt, labels, prop, spec, pos_iou_thr=0.9, max_rois=32,
                                               rng=np.random.default_rng(seed))
        assert clip.shape == (2, 64, 64, 3)
        got = sorted(int(np.argmax(row)) for row in lab)
        a_in = x0 > 33  # A keeps some width inside the crop ([96 - x0, 63])
        b_in = x0 < 40
        p_matches = 33 < x0 <= 50
        want = sorted([12] * a_in + [14] * b_in + [12] * p_matches)
        assert got == want, (seed, x0, got, want)
        assert np.all(rois[:, 2] > rois[:, 0])  # no zero-area RoI enters training
        seen.add((a_in, b_in, p_matches))
    assert seen == {(False, True, False), (True, True, True), (True, False, True), (True, False, False)}
