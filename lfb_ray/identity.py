"""Content identity of what a run or stage consumes: the prepared data, checkpoints, the bank.

Run names and the pipeline's stage keys hash the config as given (`config.unresolve_paths`) *plus*
these identities, so that

* the same inputs give the same names from any directory and on any retry cluster (a rerun resumes),
* changed inputs give new names: re-preparing a video, retraining the baseline or rebuilding the
  bank makes the runs that consume them new runs, instead of returning models made from the old
  inputs and reporting success.

Each identity is a short hex string read from what the producing stage committed:

* prepared data: the manifest's per-video entries (task hash = annotations, proposals, source file
  size/mtime and prepare settings; rows; files) and its settings; not its creation time;
* a checkpoint file: the SHA-256 of its bytes (memoised per process on path, size and mtime);
* a bank: the build id written by `jobs/build_bank.py` (`build.json`, which includes the prepared
  data's identity and the baseline checkpoint's SHA-256), else the sub-banks' manifests (a bank
  imported from mmaction2).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

from lfb_ray.config import Config
from lfb_ray.redaction import RedactedMessage

__all__ = ["InputError", "bank_checkpoint", "bank_id", "checkpoint_id", "describe_changes", "prepared_id", "run_inputs"]


class InputError(RedactedMessage, FileNotFoundError):
    """An input a run consumes is missing or unreadable; the message names it and the job that makes it."""


def _short(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def prepared_id(prepared_uri: str) -> str:
    """Identity of the prepared data at `prepared_uri` (a path or URI) from its manifest.

    Raises:
        InputError: no readable manifest (prepare has not finished there).
    """
    from lfb_ray.data.prep import PrepareError, prepared_data_id

    try:
        return prepared_data_id(prepared_uri)
    except (PrepareError, OSError) as e:
        raise InputError(f"prepared data: {e}") from None


def checkpoint_id(path: str) -> str:
    """SHA-256 (first 16 hex digits) of a checkpoint file, or of `model.pt` in a checkpoint folder
    (`lfb_ray.storage.file_sha256`, memoised).

    Raises:
        InputError: the file does not exist.
    """
    from pyarrow import fs as pafs

    from lfb_ray.storage import checkpoint_file, file_sha256, resolve

    fs, inner = resolve(checkpoint_file(path))
    if fs.get_file_info(inner).type != pafs.FileType.File:
        raise InputError(f"checkpoint {path} does not exist")
    return file_sha256(path)[:16]


def bank_id(bank_dir: str) -> str:
    """Identity of the bank at `bank_dir`: its build id, or its sub-banks' manifests.

    Raises:
        InputError: no complete bank there.
    """
    from lfb_ray.bank.format import BankError, bank_manifests
    from lfb_ray.storage import exists, join, read_json, resolve

    fs, root = resolve(bank_dir)
    marker = join(root, "build.json")
    if exists(fs, marker):
        info = read_json(fs, marker)
        if info.get("build_hash"):
            return str(info["build_hash"])
    try:
        manifests = bank_manifests(bank_dir)
    except (BankError, OSError) as e:
        raise InputError(f"feature bank: {e}") from None
    return _short([m.get("bank_id") or m for m in manifests])


def run_inputs(cfg: Config, init_checkpoint: str | None = None) -> dict[str, str]:
    """The identities of what one training run of `cfg` consumes (paths already resolved):
    the prepared data, the bank (LFB models), the checkpoint its backbone starts from
    (`init_checkpoint`, else `model.pretrained`).

    Raises:
        InputError: one of them is missing (named, with the job that makes it).
    """
    inputs = {"prepared": prepared_id(cfg.prepared_dir)}
    if cfg.model.uses_bank:
        inputs["bank"] = bank_id(cfg.bank_dir)
    start = init_checkpoint or cfg.model.pretrained
    if start:
        inputs["init" if init_checkpoint else "pretrained"] = checkpoint_id(start)
    return inputs


def bank_checkpoint(bank_dir: str) -> str:
    """The baseline checkpoint that computed the bank at `bank_dir`, as `jobs/build_bank.py` recorded
    it (credentials redacted); "" for a bank without one (imported, or built before it was recorded)."""
    from lfb_ray.storage import exists, join, read_json, resolve

    fs, root = resolve(bank_dir)
    marker = join(root, "build.json")
    return str(read_json(fs, marker).get("checkpoint", "")) if exists(fs, marker) else ""


_INPUT_NAMES = {"prepared": "the prepared data", "bank": "the feature bank", "init": "the initial checkpoint",
                "pretrained": "model.pretrained", "checkpoint": "the baseline checkpoint", "config": "the config"}


def describe_changes(before: Mapping[str, str] | None, after: Mapping[str, str]) -> str | None:
    """One line naming which inputs changed between two `run_inputs`-style dicts; None if none did."""
    if not before:
        return None
    changed = [k for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
    if not changed:
        return None
    return "; ".join(f"{_INPUT_NAMES.get(k, k)} changed ({before.get(k) or '-'} -> {after.get(k) or '-'})"
                     for k in changed)
