"""The path keys of a `Config`: made absolute for Ray workers, and written back as given for hashing."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

from lfb_ray.config.sections import Config

__all__ = ["PATH_KEYS", "path_values", "resolve_paths", "unresolve_paths"]

# The keys that hold local paths or URIs: `resolve_paths` makes them absolute, `unresolve_paths`
# gives them back as written, and a submitted job refuses relative ones (`lfb_ray.preflight`).
PATH_KEYS: tuple[str, ...] = ("workdir", "data.root", "data.prepared_dir", "bank.path", "bank.checkpoint",
                              "model.pretrained", "train.storage_path")


def path_values(cfg: Config) -> dict[str, str]:
    """`{key: value}` of the `PATH_KEYS` of `cfg` (empty values included)."""
    out = {}
    for key in PATH_KEYS:
        node: Any = cfg
        for part in key.split("."):
            node = getattr(node, part)
        out[key] = node
    return out


def _map_paths(cfg: Config, fn: typing.Callable[[str], str]) -> Config:
    return dataclasses.replace(
        cfg,
        workdir=fn(cfg.workdir),
        data=dataclasses.replace(cfg.data, root=fn(cfg.data.root), prepared_dir=fn(cfg.data.prepared_dir)),
        bank=dataclasses.replace(cfg.bank, path=fn(cfg.bank.path), checkpoint=fn(cfg.bank.checkpoint)),
        model=dataclasses.replace(cfg.model, pretrained=fn(cfg.model.pretrained)),
        train=dataclasses.replace(cfg.train, storage_path=fn(cfg.train.storage_path)),
    )


def resolve_paths(cfg: Config) -> Config:
    """The same config with local relative paths made absolute (against the current directory).

    Jobs call this on the driver: Ray workers run in other directories, so every path they
    receive must be absolute (or a URI). Idempotent.
    """
    from lfb_ray.storage import is_uri

    def absolute(p: str) -> str:
        return p if not p or is_uri(p) or Path(p).is_absolute() else str(Path(p).resolve())

    return _map_paths(cfg, absolute)


def unresolve_paths(cfg: Config) -> Config:
    """The inverse of `resolve_paths` on the driver: local paths under the current directory written
    relative to it again, as the config file and overrides gave them.

    Why: run names and the pipeline's stage keys hash the config. Hashed with absolute paths, the
    same command run from two directories (a resubmission whose working dir lands in another of Ray's
    package-cache folders, a RayJob retry on a fresh cluster) names two different runs and starts
    from epoch 0 instead of resuming. Paths outside the current directory and URIs stay as they are.
    """
    from lfb_ray.storage import is_uri

    cwd = Path.cwd().resolve()

    def given(p: str) -> str:
        if not p or is_uri(p) or not Path(p).is_absolute():
            return p
        try:
            return str(Path(p).relative_to(cwd))
        except ValueError:
            return p

    return _map_paths(cfg, given)
