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

__all__ = ["family_means", "label_families"]


def label_families(dataset_json: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """`label_families` of a dataset.json, or {} when the file or the key is absent."""
    from lfb_ray.storage import file_exists, read_bytes  # lazily: this module needs no pyarrow otherwise

    if not file_exists(dataset_json):
        return {}
    info = json.loads(read_bytes(dataset_json))
    return {str(k): tuple(int(i) for i in v) for k, v in (info.get("label_families") or {}).items()}


def family_means(per_class: Mapping, families: Mapping[str, tuple[int, ...]]) -> dict[str, float]:
    """{"val/mAP_family_<name>": mean AP} from per-class APs keyed by class id (int or str)."""
    aps = {int(k): float(v) for k, v in per_class.items()}
    out = {}
    for name, ids in families.items():
        vals = [aps[i] for i in ids if i in aps and not math.isnan(aps[i])]
        out[f"val/mAP_family_{name}"] = sum(vals) / len(vals) if vals else float("nan")
    return out
