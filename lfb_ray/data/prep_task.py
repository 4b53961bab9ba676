"""Typed records of the prepare stage's work: one `PrepareTask` per (split, video), its keyframes and the
settings that shape the bytes it writes.

Why records: a task is built by `lfb_ray.data.prep.build_tasks` (and by `jobs/detect.py`), crosses
Ray Data as one JSON string column (`to_dict` / `from_dict` at that boundary only) and is consumed by
`lfb_ray.data.prep_video.prepare_video`. Its `hash`, kept in each video's `_DONE.json` and the
manifest, is the SHA-256 of `to_dict`'s JSON, so the dict form must not change.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lfb_ray.data.schema import SCHEMA_VERSION

if TYPE_CHECKING:
    from lfb_ray.config import Config
    from lfb_ray.data.annotations import KeyframeBoxes

__all__ = ["WHOLE_FRAME", "KeyframeTask", "PrepSettings", "PrepareTask"]

WHOLE_FRAME = (0.0, 0.0, 1.0, 1.0, 1.0)  # the one proposal of a keyframe the proposals file lacks


@dataclass(frozen=True)
class PrepSettings:
    """The config values that change prepared bytes; part of every task's identity and of the manifest."""

    schema_version: int
    clip_frames: int
    frame_interval: int
    reference_fps: float
    jitter: tuple[int, int] | None  # (data.jitter_min, data.jitter_max); None without temporal jitter
    short_side: int
    jpeg_quality: int
    video_start_second: int
    max_proposals: int
    num_classes: int

    @classmethod
    def from_config(cls, cfg: Config) -> PrepSettings:
        d = cfg.data
        return cls(schema_version=SCHEMA_VERSION, clip_frames=d.clip_frames, frame_interval=d.frame_interval,
                   reference_fps=d.reference_fps, jitter=(d.jitter_min, d.jitter_max) if d.temporal_jitter else None,
                   short_side=d.short_side, jpeg_quality=d.jpeg_quality, video_start_second=d.video_start_second,
                   max_proposals=d.max_proposals, num_classes=d.num_classes)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "clip_frames": self.clip_frames,
                "frame_interval": self.frame_interval, "reference_fps": self.reference_fps,
                "jitter": list(self.jitter) if self.jitter is not None else None, "short_side": self.short_side,
                "jpeg_quality": self.jpeg_quality, "video_start_second": self.video_start_second,
                "max_proposals": self.max_proposals, "num_classes": self.num_classes}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrepSettings:
        jitter = d["jitter"]
        return cls(**{**d, "jitter": (jitter[0], jitter[1]) if jitter is not None else None})


@dataclass(frozen=True)
class KeyframeTask:
    """One annotated keyframe of a task, flat as its keyframe row stores it (`lfb_ray.data.schema`);
    G ground-truth persons, C = `num_classes`, P proposals."""

    timestamp: int  # movie second
    excluded: bool  # in the split's excluded-timestamps file
    gt_boxes: tuple[float, ...]  # [G*4] normalised x1, y1, x2, y2
    gt_labels: tuple[int, ...]  # [G*C] multi-hot
    gt_person_ids: tuple[int, ...]  # [G]
    proposals: tuple[float, ...]  # [P*5] normalised x1, y1, x2, y2, score; WHOLE_FRAME when missing
    proposals_missing: bool

    @classmethod
    def build(cls, timestamp: int, proposals: np.ndarray | None, max_proposals: int, *, excluded: bool = False,
              gt: KeyframeBoxes | None = None) -> KeyframeTask:
        """From a keyframe's proposals ([n, 5] or None) and its ground truth (None: no persons)."""
        return cls(timestamp=timestamp, excluded=excluded,
                   gt_boxes=tuple(gt.boxes.ravel().tolist()) if gt is not None else (),
                   gt_labels=tuple(int(x) for x in gt.labels.ravel()) if gt is not None else (),
                   gt_person_ids=tuple(int(x) for x in gt.person_ids) if gt is not None else (),
                   proposals=(tuple(proposals[:max_proposals].ravel().tolist()) if proposals is not None
                              else WHOLE_FRAME),
                   proposals_missing=proposals is None)

    def to_dict(self) -> dict[str, Any]:
        return {"timestamp": self.timestamp, "excluded": self.excluded, "gt_boxes": list(self.gt_boxes),
                "gt_labels": list(self.gt_labels), "gt_person_ids": list(self.gt_person_ids),
                "proposals": list(self.proposals), "proposals_missing": self.proposals_missing}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KeyframeTask:
        return cls(timestamp=d["timestamp"], excluded=d["excluded"], gt_boxes=tuple(d["gt_boxes"]),
                   gt_labels=tuple(d["gt_labels"]), gt_person_ids=tuple(d["gt_person_ids"]),
                   proposals=tuple(d["proposals"]), proposals_missing=d["proposals_missing"])


@dataclass(frozen=True)
class PrepareTask:
    """One video of one split: the file (size and mtime fingerprint it), its keyframes (sorted by
    second) and the settings. A video whose `_DONE.json` holds the same `hash` is not prepared again."""

    split: str
    video_id: str
    path: str  # local path or URI of the video file
    size: int  # bytes
    mtime: int  # seconds
    keyframes: tuple[KeyframeTask, ...]
    settings: PrepSettings
    hash: str = ""  # `with_hash`; "" until then

    def _identity(self) -> dict[str, Any]:
        return {"split": self.split, "video_id": self.video_id, "path": self.path,
                "source": {"size": self.size, "mtime": self.mtime},
                "keyframes": [k.to_dict() for k in self.keyframes], "settings": self.settings.to_dict()}

    def with_hash(self, *, full_path: bool = False) -> PrepareTask:
        """This task with its hash: of the file's name, not where the dataset lies (the same data read
        from another directory, a moved project or another node's mount point, is the same task), or
        of the whole path with `full_path`."""
        ident = self._identity()
        if not full_path:
            ident["path"] = Path(self.path).name
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
        return replace(self, hash=digest)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (a Ray Data row's column holds its JSON)."""
        return {**self._identity(), "hash": self.hash}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrepareTask:
        return cls(split=d["split"], video_id=d["video_id"], path=d["path"], size=d["source"]["size"],
                   mtime=d["source"]["mtime"], keyframes=tuple(KeyframeTask.from_dict(k) for k in d["keyframes"]),
                   settings=PrepSettings.from_dict(d["settings"]), hash=d["hash"])
