"""`Predictions`: the scores of a set of proposal boxes, one row per RoI.

One type for what `lfb_ray.inference.predict_batch` returns, what the val metric gathers across
ranks and what the result CSV is written from; `to_rows` / `from_rows` are the Ray Data boundary
(the inference job's actor pool), so the row column names live here only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Predictions"]


@dataclass(frozen=True)
class Predictions:
    """Scores of R boxes over C classes (R may be 0).

    Attributes:
        video_ids: list[str] [R], the video of each box.
        seconds: int64 [R], the keyframe second of each box.
        boxes: float32 [R, 4], normalised x1, y1, x2, y2 (fractions of the frame).
        scores: float32 [R, C], per-class scores (sigmoid; softmax within exclusive label groups).
    """

    video_ids: list[str]
    seconds: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.video_ids)

    @classmethod
    def empty(cls, num_classes: int) -> Predictions:
        """No box, `num_classes` wide."""
        return cls(video_ids=[], seconds=np.zeros(0, np.int64), boxes=np.zeros((0, 4), np.float32),
                   scores=np.zeros((0, num_classes), np.float32))

    @classmethod
    def concat(cls, preds: Sequence[Predictions], num_classes: int) -> Predictions:
        """Several batches' predictions as one, in order (an empty one, `num_classes` wide, for none)."""
        if not preds:
            return cls.empty(num_classes)
        return cls(video_ids=[v for p in preds for v in p.video_ids],
                   seconds=np.concatenate([p.seconds for p in preds]),
                   boxes=np.concatenate([p.boxes for p in preds]),
                   scores=np.concatenate([p.scores for p in preds]))

    def select(self, idx: np.ndarray) -> Predictions:
        """The rows picked by `idx` (integer indices or a boolean mask [R]), in that order."""
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return Predictions(video_ids=[self.video_ids[i] for i in idx], seconds=self.seconds[idx],
                           boxes=self.boxes[idx], scores=self.scores[idx])

    def to_rows(self) -> dict[str, np.ndarray]:
        """A Ray Data batch (columns video_id [R] object, timestamp [R], box [R, 4], scores [R, C])."""
        n = len(self)
        return {"video_id": np.array(self.video_ids, dtype=object), "timestamp": self.seconds,
                "box": self.boxes.reshape(n, 4), "scores": self.scores}

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping]) -> Predictions:
        """The inverse of `to_rows`, from the rows Ray Data hands back (`Dataset.take_all`)."""
        return cls(video_ids=[r["video_id"] for r in rows],
                   seconds=np.array([r["timestamp"] for r in rows], np.int64),
                   boxes=np.array([r["box"] for r in rows], np.float32).reshape(-1, 4),
                   scores=np.array([r["scores"] for r in rows], np.float32).reshape(len(rows), -1))
