"""Fakes for the pipeline's expensive stages (prepare's decoding, training, the bank's forward passes)
that commit what the real ones commit, so the pipeline's own logic (stage keys, resumption, what it
prints and stores) is tested in seconds and without Ray."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace


def fake_prepare(calls: list[str] | None = None) -> Callable:
    """`prepare_dataset(cfg, built)` that writes only the prepared manifest (one entry per prepare
    task, with its content hash: what the stage key and `identity.prepared_id` read)."""
    from lfb_ray.data.schema import SCHEMA_VERSION

    def prepare_dataset(cfg, built):
        if calls is not None:
            calls.append("prepare")
        root = Path(cfg.prepared_dir)
        root.mkdir(parents=True, exist_ok=True)
        tasks, _ = built
        (root / "manifest.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION, "settings": {}, "videos": [
            {"split": t.split, "video_id": t.video_id, "hash": t.hash, "rows": len(t.keyframes),
             "bytes": 1, "files": []} for t in tasks]}))
        return SimpleNamespace(line=lambda: "prepared", keyframes=1, bytes=1, failures=[])

    return prepare_dataset


def bank_summary(bank_dir: str) -> SimpleNamespace:
    """What `build_bank` returns, as far as the pipeline reads it."""
    return SimpleNamespace(line=lambda: "bank", features=1, bytes=1, path=bank_dir)


def install(monkeypatch, *, prepare: Callable, fit: Callable, build_bank: Callable) -> None:
    """Put the fakes where the pipeline looks them up; `fit_many` runs `fit` once per operator, in order."""
    import lfb_ray.bank.build as build
    import lfb_ray.data.prep as prep
    import lfb_ray.train as train

    def fit_many(cfgs, on_done, parent_run_id=None, init_checkpoint=None):
        for op, c in cfgs.items():
            on_done(op, fit(c, init_checkpoint))

    monkeypatch.setattr(prep, "prepare_dataset", prepare)
    monkeypatch.setattr(train, "fit", fit)
    monkeypatch.setattr(train, "fit_many", fit_many)
    monkeypatch.setattr(build, "build_bank", build_bank)
