"""Run identity: the names under which training runs are tracked and resumed, and their rows in
comparisons. Imports only the config, so training, the pipeline and `lfb_ray.compare` share it.

A run's name hashes its config as given (`config.unresolve_paths`: paths as written, not made
absolute against the driver's directory) without the settings that size the work
(`without_resource_hints`), plus the content identity of its inputs (`lfb_ray.identity.run_inputs`:
prepared data, bank, initial checkpoint). So rerunning the same command from any directory, on a
cluster of any size, resumes the same run, and a run over re-prepared data, a retrained baseline or
a rebuilt bank is a new run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from lfb_ray.config import Config, config_hash, config_to_dict, unresolve_paths

__all__ = ["BANK_POOL_HINTS", "CONTROL", "RESOURCE_HINTS", "ROLES", "display_name", "identity_dict", "operator_tag",
           "run_name_for", "without_resource_hints"]

# Operator tag of the baseline retrained from its own backbone with the LFB models' recipe (fine-tune
# schedule, head warm-up, loss): the control for the extra training LFB models get from the baseline.
CONTROL = "none-ft"
#: The role of a run, by operator tag: the start of its name in the MLflow UI (`display_name`).
ROLES = {"none": "baseline", CONTROL: "control", "nl": "LFB-NL", "avg": "LFB-Avg", "max": "LFB-Max"}

RESOURCE_HINTS = ("cpus_per_worker", "data_cpus", "concurrent_runs", "max_gpus", "resource_wait_s")
# `device` too: where windows are gathered changes the speed, not the windows (lfb_ray.bank.window).
BANK_POOL_HINTS = ("cpus_per_actor", "min_actors", "max_actors", "device")


def without_resource_hints(d: dict) -> dict:
    """A config dict without the settings that size the work, not the model: the training runs'
    CPU shares and concurrency (`RESOURCE_HINTS` of `cluster`), and the bank actor pool's and where
    training gathers LFB windows (`BANK_POOL_HINTS` of `bank`). Run names and the pipeline's stage
    keys hash what is left, so the same runs resume on a cluster of another size."""
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    for hint in RESOURCE_HINTS:
        d["cluster"].pop(hint, None)
    for hint in BANK_POOL_HINTS:
        d["bank"].pop(hint, None)
    return d


def identity_dict(cfg: Config) -> dict:
    """The config as it identifies a run or a stage: paths as given (`unresolve_paths`), without the
    resource hints (`without_resource_hints`) and without `tracking` (where it is logged)."""
    keep = without_resource_hints(config_to_dict(unresolve_paths(cfg)))
    keep.pop("tracking")
    return keep


def run_name_for(cfg: Config, init_checkpoint: str | None = None, inputs: Mapping[str, str] | None = None) -> str:
    """Deterministic run name: rerunning the same command resumes the same run.

    A backbone initialisation is part of the name (`init_checkpoint`), so a baseline continued
    from its own weights is a different run from the baseline itself.

    Args:
        inputs: content identities of what the run consumes (`lfb_ray.identity.run_inputs`); part
            of the name, so that a run over other inputs is another run.
    """
    if cfg.train.run_name:
        return cfg.train.run_name
    keep = identity_dict(cfg)
    if init_checkpoint and not (inputs and "init" in inputs):  # its content identity, when given, says more
        keep["init_checkpoint"] = unresolve_paths(
            dataclasses.replace(cfg, bank=dataclasses.replace(cfg.bank, checkpoint=init_checkpoint))).bank.checkpoint
    if inputs:
        keep["inputs"] = dict(inputs)
    return f"{cfg.model.fbo}-{config_hash(keep)}"


def operator_tag(cfg: Config, init_checkpoint: str | None = None) -> str:
    """The model's row in comparisons: `model.fbo`, or `CONTROL` ("none-ft") for a baseline whose
    backbone starts from a trained detector (the control for LFB models initialised from the baseline)."""
    return CONTROL if cfg.model.fbo == "none" and init_checkpoint else cfg.model.fbo


def display_name(run_name: str, operator: str) -> str:
    """The run's name in the MLflow UI: its role (`ROLES`), then its identity name without the
    operator (`nl-378ea6131b` -> `LFB-NL-378ea6131b`, a control's `none-17fa...` -> `control-17fa...`).

    Display only: a run is found for resumption by its identity name (`run_name_for`, MLflow tag
    `lfb_ray.run_name`), which also names its Ray Train checkpoints."""
    fbo = "none" if operator == CONTROL else operator
    rest = run_name[len(fbo) + 1:] if run_name.startswith(f"{fbo}-") else run_name
    return f"{ROLES.get(operator, operator)}-{rest}"
