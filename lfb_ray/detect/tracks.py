"""Per-person tracks for `jobs/detect.py`: boxes of consecutive seconds linked by greedy IoU matching."""

from __future__ import annotations

import numpy as np

from lfb_ray.data.clips import box_iou

__all__ = ["link_tracks"]


def link_tracks(seconds: list[int], boxes: list[np.ndarray], *, iou_thr: float = 0.3,
                max_gap: int = 1) -> list[np.ndarray]:
    """Track id of every box, linking each second's boxes to the tracks seen up to `max_gap`
    seconds before.

    Greedy: all (track, box) pairs with IoU >= `iou_thr`, best IoU first, each track and box used
    once; unmatched boxes start new tracks. A pair's IoU is the larger of the box's IoU with the
    track's last box and with that box moved on at the track's last velocity (a person crossing a
    third of the frame per second overlaps little with where it was a second before, but much with
    where it was heading). Ids count from 0 in order of first appearance.

    Args:
        seconds: increasing keyframe seconds.
        boxes: [n_i, 4] normalised boxes of each second.

    Returns:
        int64 [n_i] track ids per second.
    """
    last: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}  # track -> (second, box, velocity per second)
    out: list[np.ndarray] = []
    next_id = 0
    for t, b in zip(seconds, boxes, strict=True):
        b = np.asarray(b, np.float64).reshape(-1, 4)
        ids = np.full(len(b), -1, np.int64)
        live = [k for k, (s, _, _) in last.items() if 0 < t - s <= max_gap]
        if live and len(b):
            at = np.stack([last[k][1] for k in live])
            ahead = np.stack([last[k][1] + last[k][2] * (t - last[k][0]) for k in live])
            iou = np.maximum(box_iou(at, b), box_iou(ahead, b))  # [L, n]
            order = np.argsort(-iou, axis=None, kind="stable")
            used_t, used_b = set(), set()
            for flat in order:
                i, j = divmod(int(flat), len(b))
                if iou[i, j] < iou_thr:
                    break
                if i in used_t or j in used_b:
                    continue
                used_t.add(i)
                used_b.add(j)
                ids[j] = live[i]
        for j in np.flatnonzero(ids < 0):
            ids[j] = next_id
            next_id += 1
        for j, k in enumerate(ids):
            k = int(k)
            v = (b[j] - last[k][1]) / (t - last[k][0]) if k in last else np.zeros(4)
            last[k] = (t, b[j], v)
        out.append(ids)
    return out
