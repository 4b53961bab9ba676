"""Which model a checkpoint holds, and the `ModelConfig` to build it with, for `jobs/detect.py`.

A `model.pt` trained by lfb_ray carries its config and the baseline it started from
(`lfb_ray.models.card.CheckpointMeta`, `saved_meta`): detect then needs nothing else. mmaction2's
`.pth` files, their `jobs/convert_checkpoint.py` conversions and older weight-only `model.pt`
files do not: the layout (depth, width, operator, latent width, NL layers, classes) is read from
the weights' keys and shapes (`lfb_ray.models.checkpoint.infer_model_config`), and what weights
cannot tell (the exclusive label groups, avg vs max, which have the same parameters) comes from
`--config` when given.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from lfb_ray.config import Config, ModelConfig
from lfb_ray.detect.errors import DetectError

__all__ = ["ModelChoice", "checkpoint_model_config", "choose_models", "read_state", "saved_meta"]

_OURS = (("backbone.", "backbone."), ("fbo.", "roi_head.shared_head.fbo."), ("fc_cls.", "roi_head.bbox_head.fc_cls."))


def read_state(path: str, flag: str) -> dict:
    """The flat state dict of a checkpoint file or Ray checkpoint folder, read safely.

    Raises:
        DetectError: missing, not a checkpoint, or not an action detector (naming what it is).
    """
    from lfb_ray.models.checkpoint import read_checkpoint_file
    from lfb_ray.storage import checkpoint_file, is_uri

    if not is_uri(path) and not os.path.exists(path):
        raise DetectError(f"{flag} {path}: no such file")
    path = checkpoint_file(path)
    if not is_uri(path) and not os.path.isfile(path):
        raise DetectError(f"{flag} {path}: no such file (a checkpoint folder must hold model.pt)")
    try:
        flat = read_checkpoint_file(path)
    except Exception as e:  # CheckpointError, or torch's own for garbage bytes
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DetectError(f"{flag} {path} is not a model checkpoint (no state dict of tensors can be read "
                          f"from it: {first})") from None
    if any(k.startswith(("rpn.", "roi_heads.")) for k in flat):
        raise DetectError(f"{flag} {path} is a torchvision object-detector state dict (rpn.*, roi_heads.*), "
                          "not an lfb_ray/mmaction2 action detector; pass it as --detector-weights")
    if not any(k.startswith("backbone.") for k in flat):
        raise DetectError(f"{flag} {path} is not an action-detector checkpoint: no backbone.* weights "
                          f"(keys like {', '.join(sorted(flat)[:3])})")
    if not any(k.startswith(("fc_cls.", "roi_head.bbox_head.fc_cls.")) for k in flat):
        raise DetectError(f"{flag} {path} holds a backbone only (e.g. a Kinetics initialisation), not a trained "
                          "detector with a classifier (fc_cls)")
    return flat


def saved_meta(path: str, flag: str):
    """The `CheckpointMeta` a trained `model.pt` saved (None for files without one).

    Raises:
        DetectError: a meta that cannot be read, naming the file.
    """
    from lfb_ray.models.checkpoint import CheckpointError, read_meta
    from lfb_ray.storage import checkpoint_file

    try:
        return read_meta(checkpoint_file(path))
    except CheckpointError as e:
        raise DetectError(f"{flag} {path}: {e}") from None


def _to_mmaction2_names(flat: dict) -> dict:
    out = {}
    for k, v in flat.items():
        for ours, theirs in _OURS:
            if k.startswith(ours):
                out[theirs + k[len(ours):]] = v
                break
        else:
            out[k] = v
    return out


def checkpoint_model_config(path: str, flag: str, base: ModelConfig | None, *,
                            notes: list[str]) -> ModelConfig:
    """The `ModelConfig` of checkpoint `path`: layout from its weights, the rest from `base`.

    `base` (the `--config`'s model section, or None) decides what weights cannot: the exclusive
    groups, dropouts, RoI grid, and avg vs max when the weights say avg/max. A disagreement on the
    layout goes to `notes` (the weights win).
    """
    from lfb_ray.models.checkpoint import CheckpointError, infer_model_config

    flat = read_state(path, flag)
    try:
        inferred = infer_model_config(_to_mmaction2_names(flat))
    except CheckpointError as e:
        raise DetectError(f"{flag} {path}: {e}") from None
    given = base is not None
    base = base or ModelConfig()
    fbo = inferred.fbo
    if fbo == "avg":  # avg and max have no parameters: the same weights
        if base.fbo in ("avg", "max"):
            fbo = base.fbo
        else:
            notes.append(f"{flag} {path}: an LFB-avg or LFB-max model (their weights are the same); using avg, "
                         "pass model.fbo=max for a max model")
    layout = {"depth": inferred.depth, "base_channels": inferred.base_channels, "fbo": fbo,
              "num_classes": inferred.num_classes}
    if fbo == "nl":
        layout.update(latent_channels=inferred.latent_channels, num_nl_layers=inferred.num_nl_layers)
    differs = [f"{k}={getattr(base, k)} (checkpoint: {v})" for k, v in layout.items()
               if getattr(base, k) != v and not (k == "fbo" and base.fbo == "avg" and v == "max")]
    if differs and given:
        notes.append(f"{flag} {path}: the config's model.{', model.'.join(differs)}; using the checkpoint's")
    groups = base.exclusive_groups if all(c < layout["num_classes"] for g in base.exclusive_groups for c in g) else ()
    return dataclasses.replace(base, **layout, exclusive_groups=groups)


@dataclass(frozen=True)
class ModelChoice:
    """The models detect runs: `model` (the scored model's config) and, for LFB models, `baseline`
    (the short-term model that computes the bank, from `bank_checkpoint`)."""

    cfg: Config  # the run's config: --config, else the checkpoint's saved one, else the defaults
    given: bool  # cfg is the model's own (--config or saved), not lfb_ray's defaults
    model: ModelConfig
    baseline: ModelConfig | None
    bank_checkpoint: str | None

    @property
    def lfb(self) -> bool:
        return self.model.fbo != "none"


def choose_models(checkpoint: str, bank_checkpoint: str | None, config: Config | None, *, notes: list[str],
                  log=print) -> ModelChoice:
    """What `--checkpoint` (and `--bank-checkpoint`) hold and the config to run them with; cheap
    (no model is built), so that a wrong file is refused before any decoding.

    Raises:
        DetectError: a missing or foreign checkpoint, an LFB model without a baseline, an LFB model
            given as the baseline.
    """
    given = config is not None
    cfg = config or Config()
    read_state(checkpoint, "--checkpoint")  # a named error for a missing or foreign file first
    meta = saved_meta(checkpoint, "--checkpoint")
    if meta is not None:
        log(f"detect: --checkpoint is {meta.describe()}")
        if not given:  # the model's own config: its operator, label groups, bank and data settings
            cfg, given = meta.to_config(), True
        recorded = meta.bank_checkpoint or meta.init_checkpoint
        if not bank_checkpoint and meta.operator != "none" and recorded:
            bank_checkpoint = recorded
            notes.append(f"--bank-checkpoint: the baseline that computed the bank of --checkpoint's training "
                         f"({bank_checkpoint})")
    model_cfg = checkpoint_model_config(checkpoint, "--checkpoint", cfg.model if given else None, notes=notes)
    if model_cfg.fbo == "none" and given and cfg.model.fbo != "none" and not cfg.model.exclusive_groups_in_baseline \
            and model_cfg.exclusive_groups:
        # A short-term model with an LFB config: the baseline, trained without the groups (the
        # control, trained with them, is run with its own config, model.fbo=none).
        model_cfg = model_cfg.baseline()
        notes.append("a short-term model with an LFB config: scored as the baseline, without model.exclusive_groups "
                     "(model.exclusive_groups_in_baseline=false); for the control pass model.fbo=none")
    if model_cfg.fbo == "none":
        if bank_checkpoint:
            notes.append(f"--checkpoint {checkpoint} is a short-term model (fbo=none): no bank, "
                         f"--bank-checkpoint {bank_checkpoint} is not used")
        return ModelChoice(cfg=cfg, given=given, model=model_cfg, baseline=None, bank_checkpoint=None)
    if not bank_checkpoint:
        raise DetectError(f"--checkpoint {checkpoint} is an LFB-{model_cfg.fbo} model: pass --bank-checkpoint "
                          "BASELINE.pt, the short-term baseline (model.fbo=none) that computed its bank")
    base = cfg.model.baseline() if given else None
    base_cfg = checkpoint_model_config(bank_checkpoint, "--bank-checkpoint", base, notes=notes)
    if base_cfg.fbo != "none":
        raise DetectError(f"--bank-checkpoint {bank_checkpoint} is an LFB-{base_cfg.fbo} model; the bank is "
                          "computed by the short-term baseline (model.fbo=none) the LFB model was trained with")
    return ModelChoice(cfg=cfg, given=given, model=model_cfg, baseline=base_cfg, bank_checkpoint=bank_checkpoint)
