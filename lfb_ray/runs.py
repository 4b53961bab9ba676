"""Run identity: the names under which training runs are tracked and resumed, and their rows in
comparisons. Imports only the config, so training, the pipeline and `lfb_ray.compare` share it.

A run's name hashes its config without the settings that size the work (`without_resource_hints`),
so rerunning the same command, on a cluster of any size, resumes the same run.
"""

from __future__ import annotations

from lfb_ray.config import Config, config_hash, config_to_dict

__all__ = ["BANK_POOL_HINTS", "CONTROL", "RESOURCE_HINTS", "operator_tag", "run_name_for", "without_resource_hints"]

# Operator tag of the baseline retrained from its own backbone with the LFB models' recipe (fine-tune
# schedule, head warm-up, loss): the control for the extra training LFB models get from the baseline.
CONTROL = "none-ft"

RESOURCE_HINTS = ("cpus_per_worker", "data_cpus", "concurrent_runs", "max_gpus")
BANK_POOL_HINTS = ("cpus_per_actor", "min_actors", "max_actors")


def without_resource_hints(d: dict) -> dict:
    """A config dict without the settings that size the work, not the model: the training runs'
    CPU shares and concurrency (`RESOURCE_HINTS` of `cluster`) and the bank actor pool's
    (`BANK_POOL_HINTS` of `bank`). Run names and the pipeline's stage keys hash what is left, so the
    same runs resume on a cluster of another size."""
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    for hint in RESOURCE_HINTS:
        d["cluster"].pop(hint, None)
    for hint in BANK_POOL_HINTS:
        d["bank"].pop(hint, None)
    return d


def run_name_for(cfg: Config, init_checkpoint: str | None = None) -> str:
    """Deterministic run name: rerunning the same command resumes the same run.

    A backbone initialisation is part of the name (`init_checkpoint`), so a baseline continued
    from its own weights is a different run from the baseline itself.
    """
    if cfg.train.run_name:
        return cfg.train.run_name
    # Resource hints do not change the model: a run resumes under the same name on a cluster of
    # another size, and `fit_many` may scale them down to run several at once.
    keep = without_resource_hints(config_to_dict(cfg))
    for volatile in ("tracking",):
        keep.pop(volatile)
    if init_checkpoint:
        keep["init_checkpoint"] = init_checkpoint
    return f"{cfg.model.fbo}-{config_hash(keep)}"


def operator_tag(cfg: Config, init_checkpoint: str | None = None) -> str:
    """The model's row in comparisons: `model.fbo`, or `CONTROL` ("none-ft") for a baseline whose
    backbone starts from a trained detector (the control for LFB models initialised from the baseline)."""
    return CONTROL if cfg.model.fbo == "none" and init_checkpoint else cfg.model.fbo
