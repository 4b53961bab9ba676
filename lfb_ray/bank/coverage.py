"""Does the bank hold every video a run will read? Checked when training or evaluation opens it.

mmaction2 raises `KeyError` for a video its bank does not hold; an all-zero window instead would
train and score an LFB model without its long-term context, silently. `open_checked` opens the bank
of a config and refuses it (`BankError` naming the split, the videos and the bank path) unless
`bank.missing_videos=zeros` opts out.
"""

from __future__ import annotations

from collections.abc import Sequence

from lfb_ray.bank.reader import FeatureBank
from lfb_ray.config import Config

__all__ = ["open_checked", "split_videos"]


def split_videos(cfg: Config, split: str) -> list[str]:
    """The videos of `split` a run reads from the bank: those of the split's annotation CSV, less the
    ones the prepare stage recorded as failed as a whole (`failures.json` of the prepared folder:
    they have no prepared rows, so nothing samples them; a video that only lost some keyframes
    stays). Sorted; [] for a split without an annotation CSV in the
    config (no rows of it are prepared, so none are read).

    Raises:
        ValueError: a split other than "train" and "val".
    """
    import numpy as np

    from lfb_ray.data.annotations import cap_annotation_rows, read_annotation_rows
    from lfb_ray.storage import exists, join, read_json, resolve

    if split not in ("train", "val"):
        raise ValueError(f"unknown split {split!r}: 'train' or 'val'")
    csv = cfg.data.train_csv if split == "train" else cfg.data.val_csv
    if not csv:
        return []
    rows = cap_annotation_rows(read_annotation_rows(cfg.data_path(csv), check_boxes=False),
                               cfg.data.max_keyframes_per_split)  # only those keyframes are prepared
    videos = set(np.unique(rows.video_ids).tolist())
    fs, root = resolve(cfg.prepared_dir)
    failures_json = join(root, "failures.json")
    if exists(fs, failures_json):
        # Entries with a timestamp are single keyframes lost to undecodable frames: their video
        # still has prepared rows, so the bank must hold it.
        videos -= {f["video_id"] for f in read_json(fs, failures_json)
                   if f.get("split") == split and f.get("timestamp") is None}
    return sorted(videos)


def open_checked(cfg: Config, splits: Sequence[str], *, expected_dim: int | None = None) -> FeatureBank:
    """`FeatureBank.open(cfg.bank_dir)` in the `bank.missing_videos` mode, after checking that it
    holds every video of each split in `splits` (`FeatureBank.require_videos`).

    Raises:
        BankError: the bank is missing, incomplete or of another dim, or lacks videos of a split (in
            the default "error" mode), naming the split, the videos and the bank path.
    """
    bank = FeatureBank.open(cfg.bank_dir, expected_dim=expected_dim, missing_videos=cfg.bank.missing_videos)
    for split in splits:
        bank.require_videos(split_videos(cfg, split), split)
    return bank
