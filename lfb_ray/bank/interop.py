"""Convert between mmaction2 LFB pickles (`lfb_{train,val}.pkl`) and the lfb_ray bank format.

mmaction2 layout: `torch.save` of `{video_id: {second: [fp16 tensor [C], ...]}}`, one
tensor per person in proposal order (1.x may hold a stacked [n, C] tensor per second). Files are read
with `weights_only=True`, so a pickle holding anything but containers and tensors is refused, never run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch

from lfb_ray.bank.format import SPLITS, BankError, child_path, leaf_banks, split_location
from lfb_ray.bank.reader import FeatureBank
from lfb_ray.bank.writer import BankSummary, write_bank
from lfb_ray.storage import atomic_path

__all__ = ["export_mmaction2", "import_mmaction2"]


def _load_mmaction2(file: Path) -> dict[str, Any]:
    try:
        lfb = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for forbidden globals, RuntimeError for bad archives
        raise BankError(f"{file} is not a plain mmaction2 feature bank (refused to unpickle: {e})") from e
    if not isinstance(lfb, dict):
        raise BankError(f"{file}: expected a dict of videos, got {type(lfb).__name__}")
    return lfb


def _flatten(file: Path, lfb: dict[str, Any]) -> dict[str, Any]:
    """{video: {second: features}} -> write_bank keyword arrays, persons numbered in list order."""
    vids, secs, persons, feats = [], [], [], []
    for vid, per_second in lfb.items():
        if not isinstance(per_second, dict):
            raise BankError(f"{file}: video {vid!r} maps to {type(per_second).__name__}, expected a dict")
        for sec, value in per_second.items():
            try:
                if isinstance(value, torch.Tensor) and value.ndim in (1, 2):
                    stacked = value.reshape(-1, value.shape[-1])
                elif isinstance(value, (list, tuple)) and all(isinstance(v, torch.Tensor) for v in value):
                    stacked = torch.stack([v.reshape(-1) for v in value]) if value else None
                else:
                    raise TypeError(type(value).__name__)
            except (TypeError, RuntimeError) as e:
                raise BankError(f"{file}: video {vid!r} second {sec!r} holds {e}, expected a list of "
                                "[C] tensors or an [n, C] tensor") from e
            if stacked is None or stacked.shape[0] == 0:
                continue
            n = stacked.shape[0]
            vids.extend([str(vid)] * n)
            secs.append(np.full(n, int(sec), np.int64))
            persons.append(np.arange(n, dtype=np.int32))
            feats.append(stacked.to(torch.float16).numpy())
    dims = {f.shape[1] for f in feats}
    if len(dims) > 1:
        raise BankError(f"{file}: features of different dims {sorted(dims)}")
    n = len(vids)
    dim = dims.pop() if dims else 1
    return dict(
        video_ids=np.asarray(vids, dtype=str),
        seconds=np.concatenate(secs) if secs else np.zeros(0, np.int64),
        person_index=np.concatenate(persons) if persons else np.zeros(0, np.int32),
        boxes=np.full((n, 4), np.nan, np.float32),  # mmaction2 banks do not keep boxes or scores
        scores=np.full(n, np.nan, np.float32),
        features=np.concatenate(feats) if feats else np.zeros((0, dim), np.float16),
    )


def import_mmaction2(
    src_dir: str | os.PathLike,
    dst_path: str | os.PathLike,
    *,
    splits: Sequence[str] = SPLITS,
    metadata: dict[str, Any] | None = None,
    filesystem: pafs.FileSystem | None = None,
) -> dict[str, BankSummary]:
    """Convert the `lfb_<split>.pkl` files of `src_dir` into sub-banks `dst_path/<split>/`.

    With the default splits, `FeatureBank.open(dst_path)` merges them as the reference does (val wins).
    fp32 banks are cast to fp16; fp16 banks convert bit-exactly.

    Args:
        src_dir: folder holding `lfb_train.pkl` and/or `lfb_val.pkl` (whichever exist).
        dst_path: destination folder (local path or URI).
        splits: split names to look for.
        metadata: extra manifest metadata; the source file name is added.
        filesystem: pyarrow filesystem of `dst_path`, instead of inferring it from a URI.

    Returns:
        {split: BankSummary} for each split found.

    Raises:
        FileNotFoundError: none of the files exist.
        BankError: a file is not a plain mmaction2 bank (including pickles of arbitrary objects).
    """
    src = Path(src_dir)
    found = {s: src / f"lfb_{s}.pkl" for s in splits if (src / f"lfb_{s}.pkl").is_file()}
    if not found:
        raise FileNotFoundError(f"no {', '.join(f'lfb_{s}.pkl' for s in splits)} in {src}")
    summaries = {}
    for split, file in found.items():
        arrays = _flatten(file, _load_mmaction2(file))
        meta = {**(metadata or {}), "imported_from": str(file)}
        summaries[split] = write_bank(child_path(dst_path, split), metadata=meta, filesystem=filesystem,
                                     **arrays)
    return summaries


def _to_mmaction2(bank: FeatureBank) -> dict[str, dict[int, list[torch.Tensor]]]:
    lfb: dict[str, dict[int, list[torch.Tensor]]] = {}
    for vid in bank.videos:
        secs = bank.seconds_of(vid)
        per_sec = [bank.features_at(vid, int(s)) for s in secs]
        # One storage per video: torch.save writes it once; tensors are views of it, as after torch.stack.
        video = torch.from_numpy(np.concatenate(per_sec))
        lfb[vid], row = {}, 0
        for s, f in zip(secs, per_sec, strict=True):
            lfb[vid][int(s)] = list(video[row:row + len(f)].unbind(0))
            row += len(f)
    return lfb


def export_mmaction2(
    bank_path: str | os.PathLike,
    dst_dir: str | os.PathLike,
    *,
    name: str | None = None,
    filesystem: pafs.FileSystem | None = None,
) -> list[Path]:
    """Write a bank as mmaction2 pickles: `lfb_<split>.pkl` for each sub-bank of a split folder, or
    `lfb_<name>.pkl` for a single bank (name defaults to the bank folder name). Atomic per file.

    Args:
        bank_path: bank folder or split folder (local path or URI).
        dst_dir: local output folder.
        name: file name part for a single bank.
        filesystem: pyarrow filesystem of `bank_path`, instead of inferring it from a URI.

    Returns:
        The written files.
    """
    fs, root, _ = split_location(bank_path, filesystem)
    leaves = leaf_banks(fs, root)
    if leaves == [root]:
        targets = {name or root.rsplit("/", 1)[-1]: root}
    else:
        targets = {leaf.rsplit("/", 1)[-1]: leaf for leaf in leaves}
    out_dir = Path(dst_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for split, path in targets.items():
        file = out_dir / f"lfb_{split}.pkl"
        with atomic_path(file) as tmp:
            torch.save(_to_mmaction2(FeatureBank.open(path, filesystem=fs)), tmp)
        written.append(file)
    return written

