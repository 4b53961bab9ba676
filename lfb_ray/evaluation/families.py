"""mAP per label family (e.g. the synthetic set's short_term / long_term / appearance classes).

A dataset may declare families in `<data.root>/dataset.json` (`"label_families": {name: [ids]}`);
the family mAP is the mean AP of its classes that have an AP (classes without GT are NaN and skipped),
so it is computed from the per-class APs every evaluation already has, without re-scoring.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

__all__ = ["FAMILY_PREFIX", "family_maps", "family_means", "label_families"]

#: Metric key of a family's mAP: `val/mAP_family_<name>`.
FAMILY_PREFIX = "val/mAP_family_"


def label_families(dataset_json: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """`label_families` of a dataset.json, or {} when the file or the key is absent."""
    from lfb_ray.storage import file_exists, read_bytes  # lazily: this module needs no pyarrow otherwise

    if not file_exists(dataset_json):
        return {}
    info = json.loads(read_bytes(dataset_json))
    return {str(k): tuple(int(i) for i in v) for k, v in (info.get("label_families") or {}).items()}


def family_means(per_class: Mapping, families: Mapping[str, tuple[int, ...]]) -> dict[str, float]:
    """{"val/mAP_family_<name>": mean AP} from per-class APs keyed by class id (int or str).

    Computed where a run is evaluated (its result and its MLflow metrics carry them); everyone else
    reads them with `family_maps`."""
    aps = {int(k): float(v) for k, v in per_class.items()}
    out = {}
    for name, ids in families.items():
        vals = [aps[i] for i in ids if i in aps and not math.isnan(aps[i])]
        out[f"{FAMILY_PREFIX}{name}"] = sum(vals) / len(vals) if vals else float("nan")
    return out


def family_maps(metrics: Mapping[str, float], per_class: Mapping | None = None,
                families: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, float]:
    """A run's mAP per label family, as its evaluation computed them (the `val/mAP_family_*` of
    its result or of its MLflow metrics). A family the run lacks (a run that predates them) is
    computed from its per-class APs `per_class` when `families` is given, never by re-scoring."""
    out = {k: float(v) for k, v in metrics.items() if k.startswith(FAMILY_PREFIX)}
    if families and per_class:
        for k, v in family_means(per_class, families).items():
            out.setdefault(k, v)
    return out
