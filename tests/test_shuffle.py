"""Training order: every epoch a seeded permutation of all training keyframes over all workers, and
seeded per-sample augmentation (the training data used to stream in (video, second) order)."""

from __future__ import annotations

import numpy as np
import pytest


def test_epoch_order_visits_every_keyframe_once_shuffled_and_reproducible():
    from lfb_ray.data.dataset import epoch_order

    n, world = 120, 4
    e0 = epoch_order(n, seed=0, epoch=0, world=world)
    assert e0.shape == (world, 30)
    assert sorted(e0.ravel().tolist()) == list(range(n))  # every keyframe exactly once, over all ranks
    assert not np.array_equal(np.sort(e0[0]), e0[0])  # not in (video, second) order on any rank
    assert all(not np.array_equal(np.sort(r), r) for r in e0)
    e1 = epoch_order(n, seed=0, epoch=1, world=world)
    assert not np.array_equal(e0, e1) and sorted(e1.ravel().tolist()) == list(range(n))
    assert np.array_equal(e0, epoch_order(n, seed=0, epoch=0, world=world))  # same seed, same order
    assert not np.array_equal(e0, epoch_order(n, seed=1, epoch=0, world=world))


def test_epoch_order_pads_like_distributed_sampler():
    from lfb_ray.data.dataset import epoch_order

    o = epoch_order(10, seed=3, epoch=2, world=4)  # 10 keyframes, 4 ranks: 3 steps each, 2 repeats
    assert o.shape == (4, 3)
    flat = o.T.ravel()  # the padded permutation, dealt round-robin
    assert sorted(set(flat.tolist())) == list(range(10))
    assert flat[10:].tolist() == flat[:2].tolist()
    with pytest.raises(ValueError, match="no training keyframes"):
        epoch_order(0, seed=0, epoch=0, world=2)


@pytest.mark.ray
def test_one_epoch_over_all_workers_through_ray_data(prepared):
    """The samples a rank receives follow its epoch order exactly: one epoch over both ranks sees every
    training keyframe once, in an order that is not (video, second) and changes with the epoch; the
    same seed gives identical clips; a resume from position k gives the tail of the same epoch."""
    from lfb_ray.data.dataset import epoch_order, read_keyframes, train_samples

    cfg, _ = prepared
    table = read_keyframes(cfg, "train", drop_excluded=True)
    keys = list(zip(table.column("video_id").to_pylist(), table.column("timestamp").to_pylist(), strict=True))
    assert keys == sorted(keys)  # the table itself is in (video, second) order
    n, world = table.num_rows, 2

    def run(epoch: int, rank: int, start: int = 0) -> tuple[list, np.ndarray]:
        order = epoch_order(n, cfg.train.seed, epoch, world)[rank][start:]
        got, clips = [], []
        for b in train_samples(cfg, table, order, epoch, block_rows=3).iter_batches(batch_size=4, batch_format="numpy"):
            got += list(zip(b["video_id"].tolist(), b["timestamp"].tolist(), strict=True))
            clips.append(b["clip"])
        return got, np.concatenate(clips)

    seen0, clips0 = run(0, 0)
    seen1, _ = run(0, 1)
    order = epoch_order(n, cfg.train.seed, 0, world)
    assert seen0 == [keys[i] for i in order[0]] and seen1 == [keys[i] for i in order[1]]
    both = seen0 + seen1
    pad = order.size - n
    assert set(both) == set(keys) and len(both) == n + pad and pad < world
    assert both[:n] != sorted(both[:n])
    again, clips_again = run(0, 0)
    assert again == seen0 and np.array_equal(clips0, clips_again)  # jitter/scale/crop seeded per sample
    tail, clips_tail = run(0, 0, start=5)
    assert tail == seen0[5:] and np.array_equal(clips_tail, clips0[5:])  # resume skips exactly 5
    next_epoch, clips_next = run(1, 0)
    assert next_epoch != seen0
    same = [i for i, k in enumerate(next_epoch) if k in seen0[:1]]
    if same:  # the same keyframe in another epoch gets other augmentation draws
        assert not np.array_equal(clips_next[same[0]], clips0[0])
