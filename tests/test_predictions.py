"""`Predictions`: concatenation, selection and the Ray Data row round trip keep every value."""

import pickle

import numpy as np

from lfb_ray.predictions import Predictions


def _pred(ids, first_second, c=3, seed=0):
    r = np.random.default_rng(seed)
    n = len(ids)
    return Predictions(video_ids=list(ids), seconds=np.arange(first_second, first_second + n, dtype=np.int64),
                       boxes=r.random((n, 4), dtype=np.float32), scores=r.random((n, c), dtype=np.float32))


def test_concat_select_and_rows_round_trip():
    a, b = _pred(["v1", "v1"], 902, seed=1), _pred(["v2"], 905, seed=2)
    p = Predictions.concat([a, b], num_classes=3)
    assert len(p) == 3 and p.video_ids == ["v1", "v1", "v2"]
    np.testing.assert_array_equal(p.scores, np.concatenate([a.scores, b.scores]))
    back = Predictions.from_rows([{k: v[i] for k, v in p.to_rows().items()} for i in range(len(p))])
    assert back.video_ids == p.video_ids
    for f in ("seconds", "boxes", "scores"):
        np.testing.assert_array_equal(getattr(back, f), getattr(p, f))
        assert getattr(back, f).dtype == getattr(p, f).dtype
    s = p.select(np.array([False, True, True]))
    assert s.video_ids == ["v1", "v2"] and s.seconds.tolist() == [903, 905]
    np.testing.assert_array_equal(p.select(np.array([2, 0])).boxes, p.boxes[[2, 0]])
    q = pickle.loads(pickle.dumps(p))  # all_gather_object across ranks pickles it
    np.testing.assert_array_equal(q.scores, p.scores)


def test_empty_keeps_the_class_width():
    e = Predictions.concat([], num_classes=81)
    assert len(e) == 0 and e.scores.shape == (0, 81) and e.boxes.shape == (0, 4) and e.seconds.dtype == np.int64
