"""Person boxes once per second for `jobs/detect.py`: from a proposals file (FAIR/mmaction2 pickle
or an AVA-style CSV) or from torchvision's Faster R-CNN person detector with local weights.

Boxes are normalised (x1, y1, x2, y2) with a score, [n, 5] float32 per keyframe second, as
`lfb_ray.data.annotations.load_proposals` returns them.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from lfb_ray.detect.errors import DetectError

__all__ = ["DETECTOR_URL", "PersonDetector", "load_person_boxes", "missing_persons_message"]

# torchvision.models.detection.FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1.url (torchvision 0.29)
DETECTOR_URL = "https://download.pytorch.org/models/fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth"
COCO_PERSON = 1  # COCO category id of "person" in torchvision's detection models


def missing_persons_message() -> str:
    return ("no person boxes: pass --persons PROPOSALS.pkl|CSV (FAIR/mmaction2 proposal pickle "
            "{'video,second': [N, 5] normalised x1,y1,x2,y2,score} or an AVA-style CSV), or "
            "--detector-weights FILE, the state dict of torchvision's "
            "fasterrcnn_resnet50_fpn_v2 (FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1), downloaded once "
            f"elsewhere from {DETECTOR_URL} (nothing is downloaded at run time)")


def _read_csv_boxes(path: str) -> dict[tuple[str, int], np.ndarray]:
    """AVA-style CSV without header, one box (or box and action) per line:

    * `video_id,second,x1,y1,x2,y2` (score 1)
    * `video_id,second,x1,y1,x2,y2,score` (7th column with a decimal point or exponent), or
      `video_id,second,x1,y1,x2,y2,action_id` (AVA GT without person id; score 1)
    * `video_id,second,x1,y1,x2,y2,action_id,person_id` (AVA GT; score 1) or
      `video_id,second,x1,y1,x2,y2,action_id,score` (AVA result CSV; the box's best score)

    A box listed on several lines (one per action) is one person.
    """
    groups: dict[tuple[str, int], dict[tuple[float, ...], float]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for line_no, row in enumerate(csv.reader(f), 1):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) not in (6, 7, 8):
                raise DetectError(f"{path}:{line_no}: expected 6-8 columns (video_id,second,x1,y1,x2,y2"
                                  f"[,score|action_id[,person_id|score]]), got {len(row)}")
            try:
                vid, sec = row[0].strip(), int(row[1])
                box = tuple(float(c) for c in row[2:6])
                score = 1.0
                if len(row) == 7 and any(ch in row[6] for ch in ".eE"):
                    score = float(row[6])
                elif len(row) == 8 and any(ch in row[7] for ch in ".eE"):
                    score = float(row[7])
                else:
                    for c in row[6:]:
                        int(c)
            except ValueError as e:
                raise DetectError(f"{path}:{line_no}: not a number: {e}") from None
            x1, y1, x2, y2 = box
            if not (np.isfinite(box).all() and 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1) or not np.isfinite(score):
                raise DetectError(f"{path}:{line_no}: box {box} is not 0 <= x1 < x2 <= 1, 0 <= y1 < y2 <= 1 "
                                  "(normalised coordinates)")
            per = groups.setdefault((vid, sec), {})
            per[box] = max(per.get(box, -np.inf), score)
    return {k: np.array([[*b, s] for b, s in v.items()], np.float32).reshape(-1, 5) for k, v in groups.items()}


def load_person_boxes(path: str, video_id: str) -> dict[int, np.ndarray]:
    """{second: [n, 5] float32} of `video_id` from a proposals pickle (read by the project's
    restricted loader, `load_proposals`) or an AVA-style CSV (`_read_csv_boxes`).

    Raises:
        DetectError: unreadable file, or no entry for `video_id` (naming the ids it has).
    """
    from lfb_ray.data.annotations import AnnotationError, load_proposals

    if not os.path.isfile(path):
        raise DetectError(f"--persons {path}: no such file")
    if Path(path).suffix.lower() == ".csv":
        boxes = _read_csv_boxes(path)
    else:
        try:
            boxes = load_proposals(path)
        except AnnotationError as e:
            raise DetectError(f"--persons {path}: {e}") from None
        except Exception as e:  # a truncated or foreign file
            raise DetectError(f"--persons {path}: not a proposals pickle ({type(e).__name__}: {e})") from None
    mine = {t: b for (v, t), b in boxes.items() if v == video_id}
    if not mine:
        ids = sorted({v for v, _ in boxes})
        raise DetectError(f"--persons {path} has no boxes for video {video_id!r} (pass --video-id); it has "
                          f"{len(ids)} videos: {', '.join(ids[:8])}{' ...' if len(ids) > 8 else ''}")
    return mine


class PersonDetector:
    """torchvision's `fasterrcnn_resnet50_fpn_v2`, built without any download and loaded strictly
    from a local state dict (`torch.load(weights_only=True)`); keeps COCO class 1 (person).

    Args:
        weights: path of the state dict file (e.g. fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth).
        score_thr: persons with a lower score are dropped.
        min_size: the detector's input short side (torchvision's default 800).
    """

    def __init__(self, weights: str, *, score_thr: float, device, min_size: int = 800) -> None:
        import torch
        from torchvision.models.detection import fasterrcnn_resnet50_fpn_v2

        if not os.path.isfile(weights):
            raise DetectError(f"--detector-weights {weights}: no such file. {missing_persons_message()}")
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:  # garbage, truncated, or a pickle with code
            raise DetectError(f"--detector-weights {weights}: not a PyTorch state dict ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        model = fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, min_size=min_size,
                                           box_score_thresh=min(0.05, score_thr))
        if not isinstance(state, dict):
            raise DetectError(f"--detector-weights {weights}: holds a {type(state).__name__}, not a state dict")
        own = model.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = [k for k in set(own) & set(state) if getattr(state[k], "shape", None) != own[k].shape]
        if missing or unexpected or shapes:
            hint = (" (it looks like an lfb_ray/mmaction2 action-detector checkpoint: pass it as --checkpoint "
                    "or --bank-checkpoint)" if any(k.startswith(("fc_cls.", "fbo.", "roi_head.")) for k in state) else "")
            raise DetectError(
                f"--detector-weights {weights} is not a fasterrcnn_resnet50_fpn_v2 state dict{hint}: "
                f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])}), {len(unexpected)} unexpected "
                f"(e.g. {', '.join(unexpected[:3])}), {len(shapes)} with other shapes")
        model.load_state_dict(state)
        self.model = model.to(device).eval()
        self.device = device
        self.score_thr = float(score_thr)

    def __call__(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        """uint8 RGB [H, W, 3] frames -> [n, 5] float32 normalised person boxes + score each,
        best first, scores >= score_thr."""
        import torch

        x = [torch.from_numpy(np.ascontiguousarray(f)).permute(2, 0, 1).float().div(255).to(self.device)
             for f in frames]
        with torch.no_grad():
            outs = self.model(x)
        res = []
        for f, o in zip(frames, outs, strict=True):
            h, w = f.shape[:2]
            keep = (o["labels"] == COCO_PERSON) & (o["scores"] >= self.score_thr)
            b = o["boxes"][keep].cpu().numpy().astype(np.float64) / np.array([w, h, w, h])
            s = o["scores"][keep].cpu().numpy()
            b = np.clip(b, 0.0, 1.0)
            ok = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
            arr = np.concatenate([b[ok], s[ok, None]], axis=1).astype(np.float32).reshape(-1, 5)
            res.append(arr[np.argsort(-arr[:, 4], kind="stable")])
        return res
