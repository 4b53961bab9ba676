"""Safe checkpoint reading and the mmaction2 <-> lfb_ray key mapping.

Our module names equal mmaction2's below three prefixes, so the mapping is a prefix rename:

    mmaction2                          lfb_ray
    backbone.*                         backbone.*
    roi_head.shared_head.fbo.*         fbo.*
    roi_head.bbox_head.fc_cls.*        fc_cls.*
    cls_head.*, data_preprocessor.*    (dropped: Kinetics recognizer head, normalisation buffers)

Files are only ever read with `torch.load(weights_only=True)`; mmaction2/mmengine metadata
objects are replaced by inert placeholders, never imported or executed.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lfb_ray.config import ModelConfig
from lfb_ray.models.card import CheckpointMeta
from lfb_ray.models.detector import build_detector
from lfb_ray.redaction import RedactedMessage
from lfb_ray.storage import atomic_path

__all__ = [
    "FORMAT",
    "CheckpointError",
    "convert_checkpoint",
    "infer_model_config",
    "load_checkpoint",
    "load_mmaction2_state_dict",
    "read_checkpoint_file",
    "read_meta",
    "save_checkpoint",
    "to_mmaction2_state_dict",
]

FORMAT = "lfb_ray/v1"

_PREFIX_MAP = (  # (mmaction2 prefix, our prefix)
    ("backbone.", "backbone."),
    ("roi_head.shared_head.fbo.", "fbo."),
    ("roi_head.bbox_head.fc_cls.", "fc_cls."),
)
_DROPPED_PREFIXES = ("cls_head.", "data_preprocessor.")
# Top-level packages whose pickled objects may appear in checkpoint metadata (mmcv/mmengine
# `meta`, message hubs, numpy scalars). They become placeholders; any other unknown global
# (os.system, builtins.eval, ...) makes the file be refused.
_METADATA_PACKAGES = frozenset({"mmengine", "mmcv", "mmaction", "mmdet", "numpy", "_codecs"})


class CheckpointError(RedactedMessage, ValueError):
    """A checkpoint cannot be read or does not fit the model; the message lists the keys.

    Attributes:
        missing: model keys the checkpoint lacks.
        unexpected: checkpoint keys the model does not have.
        mismatched: `(key, checkpoint shape, model shape)` triples.
    """

    def __init__(self, message: str, missing: list[str] | None = None, unexpected: list[str] | None = None,
                 mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] | None = None) -> None:
        super().__init__(message)
        self.missing = missing or []
        self.unexpected = unexpected or []
        self.mismatched = mismatched or []


class _DroppedObject:
    """Inert stand-in for a metadata object: accepts any construction and state, does nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _DroppedObject:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# Reading files


def _load_object(path: str | Path) -> Any:
    """`torch.load(weights_only=True)`, retrying with placeholders for metadata globals.

    A URI (`s3://...`, e.g. a Ray Train checkpoint on object storage) is first copied to a local
    temporary file through its pyarrow filesystem; the same restricted loading applies to it.
    """
    from lfb_ray.storage import is_uri, resolve

    if is_uri(path):  # s3://, gs://, file:// ...: through the URI's pyarrow filesystem
        fs, inner = resolve(str(path))
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, os.path.basename(inner) or "checkpoint.pt")
            with fs.open_input_stream(inner) as src, open(local, "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
            return _load_object(local)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first_error = e
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: refused by the weights-only loader: {first_error}")
    try:  # static scan of the pickle opcodes: nothing is imported or called
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (ValueError, pickle.UnpicklingError, EOFError) as e:
        raise CheckpointError(f"{path}: refused by the weights-only loader: {first_error} ({e})") from None
    refused = sorted(g for g in unsafe if g.split(".", 1)[0] not in _METADATA_PACKAGES)
    if refused:
        raise CheckpointError(f"{path}: refusing checkpoint with untrusted globals: {', '.join(refused)}")
    # Each metadata global resolves to the inert placeholder; the real one is never imported.
    with torch.serialization.safe_globals([(_DroppedObject, g) for g in unsafe]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{path}: cannot read the metadata safely: {e}") from None


def _unwrap(obj: Any, where: str) -> dict[str, torch.Tensor]:
    """Pull the flat tensor dict out of `{"state_dict": ...}` / `{"model": ...}` / a bare dict."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{where}: no state dict found")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{where}: state dict entries that are not tensors: {', '.join(bad[:10])}")
    out = dict(obj)
    if all(k.startswith("module.") for k in out):  # saved from a DDP-wrapped model
        out = {k[len("module."):]: v for k, v in out.items()}
    return out


def read_classifier(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(weight [num_classes, C], bias [num_classes]) float32 of a detector checkpoint's `fc_cls`."""
    sd = read_checkpoint_file(path)
    return sd["fc_cls.weight"].float().numpy(), sd["fc_cls.bias"].float().numpy()


def read_checkpoint_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint's flat state dict without executing anything from the file.

    Accepts mmaction2/mmcv/mmengine `.pth` files (`{"state_dict": ..., "meta": ...}`), our
    `{"model": ..., "format": "lfb_ray/v1"}` files and bare state dicts; strips a `module.`
    prefix. Metadata objects of mmengine/mmcv/numpy are dropped unexecuted.

    Returns:
        `{key: tensor}` on the CPU, keys as stored in the file.

    Raises:
        CheckpointError: untrusted globals (e.g. `os.system`), or no tensor state dict.
    """
    return _unwrap(_load_object(path), str(path))


# ---------------------------------------------------------------------------------------------
# Key mapping and strict loading


def _from_mmaction2_key(key: str) -> str | None:
    """mmaction2 key -> our key; None for dropped keys; unchanged (unexpected) otherwise."""
    if key.startswith(_DROPPED_PREFIXES):
        return None
    for theirs, ours in _PREFIX_MAP:
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return key


def to_mmaction2_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our detector's state dict under mmaction2 detector key names (inverse of the loader).

    Returns:
        `{mmaction2 key: tensor}` (detached, sharing storage with the model).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        for theirs, ours in _PREFIX_MAP:
            if key.startswith(ours):
                out[theirs + key[len(ours):]] = value
                break
        else:
            raise CheckpointError(f"model key {key!r} has no mmaction2 name")
    return out


def _check_fits(model: nn.Module, state_dict: Mapping[str, torch.Tensor], only_prefix: str, where: str) -> None:
    """Every model key under `only_prefix` must be in `state_dict` with its shape, and no more."""
    own = {k: v for k, v in model.state_dict().items() if k.startswith(only_prefix)}
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [(k, tuple(state_dict[k].shape), tuple(own[k].shape))
                  for k in sorted(set(own) & set(state_dict)) if state_dict[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        lines = [f"{where} does not fit the model"]
        if missing:
            lines.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if mismatched:
            lines.append("shape mismatches: " + ", ".join(f"{k} checkpoint {list(a)} vs model {list(b)}"
                                                        for k, a, b in mismatched))
        raise CheckpointError("\n  ".join(lines), missing, unexpected, mismatched)


def _load_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], only_prefix: str, where: str) -> None:
    _check_fits(model, state_dict, only_prefix, where)
    model.load_state_dict(state_dict, strict=False)  # strictness checked above (prefix-aware)


def _mmaction2_to_ours(flat: Mapping[str, torch.Tensor], backbone_only: bool) -> dict[str, torch.Tensor]:
    """Rename mmaction2 keys to ours, dropping recognizer heads (and `roi_head.*` if backbone_only)."""
    ours: dict[str, torch.Tensor] = {}
    for key, value in flat.items():
        new_key = _from_mmaction2_key(key)
        if new_key is None or (backbone_only and key.startswith("roi_head.")):
            continue
        ours[new_key] = value
    return ours


def load_mmaction2_state_dict(model: nn.Module, state_dict: Mapping[str, Any],
                              backbone_only: bool | None = None) -> None:
    """Load an mmaction2 detector or Kinetics recognizer state dict into our detector, strictly.

    Detector checkpoints (`backbone.*`, `roi_head.shared_head.fbo.*`, `roi_head.bbox_head.fc_cls.*`)
    must cover every tensor of the model. Recognizer checkpoints (`backbone.*` + `cls_head.*`,
    no `roi_head.*`) load the backbone only, strictly; the FBO and `fc_cls` keep their init.

    Args:
        model: an `LFBDetector`.
        state_dict: mmaction2 keys; a `{"state_dict": ...}` wrapper and `module.` prefix are accepted.
        backbone_only: force the mode; None = backbone only iff there is no `roi_head.*` key.

    Raises:
        CheckpointError: lists missing keys, unexpected keys and shape mismatches.
    """
    flat = _unwrap(state_dict, "state dict")
    if backbone_only is None:
        backbone_only = not any(k.startswith("roi_head.") for k in flat)
    ours = _mmaction2_to_ours(flat, backbone_only)
    what = "mmaction2 backbone checkpoint" if backbone_only else "mmaction2 detector checkpoint"
    _load_strict(model, ours, "backbone." if backbone_only else "", what)


_LAYOUT_KEYS = ("fbo", "depth", "base_channels", "num_classes", "latent_channels", "num_nl_layers")


def _layout(model_config: Mapping[str, Any]) -> str:
    """`model.fbo=nl model.depth=50 ...`: the fields that decide a model's weights (NL ones for NL)."""
    keys = _LAYOUT_KEYS if model_config.get("fbo") == "nl" else _LAYOUT_KEYS[:4]
    return " ".join(f"model.{k}={model_config.get(k)}" for k in keys)


def _check_saved_layout(path: str | Path, saved: Mapping[str, Any], expect: ModelConfig) -> None:
    """Refuse a file whose saved model config is another operator or shape than `expect`, naming both."""
    want = {k: getattr(expect, k) for k in _LAYOUT_KEYS}
    differs = [k for k in _LAYOUT_KEYS if k in saved and saved[k] != want[k]
               and (k in _LAYOUT_KEYS[:4] or "nl" in (saved.get("fbo"), expect.fbo))]
    if differs:
        # Avg and Max have the same weights: only the saved config tells them apart.
        raise CheckpointError(f"{path} holds a {_layout(saved)} model (its saved config), but the config asks for "
                              f"{_layout(want)}: use that model's checkpoint, or the checkpoint's config "
                              f"({' '.join(f'model.{k}={saved[k]}' for k in differs)})")


def read_meta(path: str | Path) -> CheckpointMeta | None:
    """The `CheckpointMeta` of one of our trained `model.pt` files; None for files without one
    (mmaction2 files, converted files, and ours from before lfb_ray stored it).

    Raises:
        CheckpointError: unreadable or untrusted file, or a meta that does not parse.
    """
    obj = _load_object(path)
    return _meta_of(obj, path)


def _meta_of(obj: Any, path: str | Path) -> CheckpointMeta | None:
    # mmaction2 files have a "meta" of their own (mmengine's): only our format's is a CheckpointMeta.
    raw = obj.get("meta") if isinstance(obj, Mapping) and obj.get("format") == FORMAT else None
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{path}: its meta is not a mapping")
    try:
        return CheckpointMeta.from_dict(raw, str(path))
    except (TypeError, ValueError) as e:
        raise CheckpointError(str(e)) from None


def load_checkpoint(model: nn.Module, path: str | Path, *, backbone_only: bool = False,
                    expect: ModelConfig | None = None) -> str:
    """Load weights from a file in our format or mmaction2's, strictly (see the loaders above).

    Our format holding only `backbone.*` keys (a converted Kinetics checkpoint) loads the
    backbone only. `backbone_only=True` takes just the backbone of a whole detector (e.g. the
    baseline's backbone into an LFB model, whose head differs); the backbone must still match exactly.

    Args:
        expect: the model config the model is built with: a file that saved its model config
            (our trained `model.pt`) and names another operator or shape is refused, naming both.
            A trained file of ours without one (saved before lfb_ray stored it) loads with a warning.

    Returns:
        what was loaded: "lfb_ray/v1", "lfb_ray/v1 backbone", "mmaction2" or "mmaction2 backbone".
    """
    obj = _load_object(path)
    flat = _unwrap(obj, str(path))
    saved = obj.get("model_config") if isinstance(obj, Mapping) else None
    meta = _meta_of(obj, path)
    if meta is not None and not isinstance(saved, Mapping):
        saved = meta.config.get("model")
    if expect is not None and not backbone_only and isinstance(saved, Mapping):
        _check_saved_layout(path, saved, expect)
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        if meta is None and str(obj.get("source", "")).startswith("lfb_ray ") and not backbone_only:
            warnings.warn(f"{path} holds weights only (saved before lfb_ray stored a checkpoint's meta): its "
                          "operator, data and bank cannot be checked; they are taken from the config",
                          UserWarning, stacklevel=2)
        if backbone_only:
            flat = {k: v for k, v in flat.items() if k.startswith("backbone.")}
        backbone_only = all(k.startswith("backbone.") for k in flat)
        _load_strict(model, flat, "backbone." if backbone_only else "", str(path))
        return FORMAT + (" backbone" if backbone_only else "")
    backbone_only = backbone_only or not any(k.startswith("roi_head.") for k in flat)
    load_mmaction2_state_dict(model, flat, backbone_only=backbone_only)
    return "mmaction2" + (" backbone" if backbone_only else "")


# ---------------------------------------------------------------------------------------------
# Conversion


def save_checkpoint(state_dict: Mapping[str, torch.Tensor], path: str | Path, source: str = "",
                    model_config: Mapping[str, Any] | None = None, meta: CheckpointMeta | None = None) -> None:
    """Write `{"model": state_dict, "source", "format"[, "model_config", "meta"]}` atomically (temp
    file moved into place, `lfb_ray.storage.atomic_path`). `model_config` (plain data: `config_to_dict(cfg)["model"]`) lets a loader
    refuse a checkpoint of another operator (Avg and Max weights have the same keys and shapes);
    `meta` (`lfb_ray.models.card.CheckpointMeta`) says where the weights came from."""
    payload = {"model": {k: v.detach().cpu() for k, v in state_dict.items()}, "source": source,
               "format": FORMAT}
    if model_config is not None:
        payload["model_config"] = dict(model_config)
    if meta is not None:
        payload["meta"] = meta.to_dict()
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def infer_model_config(state_dict: Mapping[str, torch.Tensor]) -> ModelConfig:
    """Guess the `ModelConfig` of an mmaction2 state dict from its keys and shapes.

    Avg and max checkpoints are identical (no FBO parameters); "avg" is returned for both.

    Raises:
        CheckpointError: the backbone layout is not a SlowOnly ResNet of a supported depth.
    """
    sd = _unwrap(state_dict, "state dict")
    try:
        base_channels = sd["backbone.conv1.conv.weight"].shape[0]
    except KeyError:
        raise CheckpointError("no backbone.conv1.conv.weight: not an mmaction2 SlowOnly checkpoint") from None
    bottleneck = any(k.startswith("backbone.layer1.0.conv3.") for k in sd)
    blocks = tuple(len({k.split(".")[2] for k in sd if k.startswith(f"backbone.layer{i}.")}) for i in range(1, 5))
    depths = {(False, (2, 2, 2, 2)): 18, (False, (3, 4, 6, 3)): 34, (True, (3, 4, 6, 3)): 50,
              (True, (3, 4, 23, 3)): 101}
    if (bottleneck, blocks) not in depths:
        raise CheckpointError(f"unsupported backbone layout: blocks per stage {blocks}")
    channels = base_channels * 8 * (4 if bottleneck else 1)
    nl_layers = {k.split(".")[3] for k in sd if k.startswith("roi_head.shared_head.fbo.non_local_layer_")}
    fc = sd.get("roi_head.bbox_head.fc_cls.weight")
    kwargs: dict[str, Any] = {"depth": depths[(bottleneck, blocks)], "base_channels": base_channels}
    if nl_layers:
        latent = sd["roi_head.shared_head.fbo.st_feat_conv.weight"].shape[0]
        kwargs.update(fbo="nl", latent_channels=latent, num_nl_layers=len(nl_layers))
    elif fc is not None:
        kwargs["fbo"] = "avg" if fc.shape[1] == 2 * channels else "none"
    else:
        kwargs["fbo"] = "none"
    if fc is not None:
        kwargs["num_classes"] = fc.shape[0]
    return ModelConfig(**kwargs)


def convert_checkpoint(in_path: str | Path, out_path: str | Path, model_cfg: ModelConfig | None = None) -> str:
    """Convert an mmaction2 `.pth` to our format, checking it loads strictly into the model.

    Args:
        in_path: mmaction2 detector or Kinetics recognizer checkpoint.
        out_path: destination `.pt`; written atomically.
        model_cfg: the model it must fit; None = inferred from the keys (`infer_model_config`).

    Returns:
        what was converted ("mmaction2" or "mmaction2 backbone").

    Raises:
        CheckpointError: unreadable or untrusted file, or keys/shapes that do not fit.
    """
    flat = read_checkpoint_file(in_path)
    cfg = model_cfg if model_cfg is not None else infer_model_config(flat)
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = build_detector(cfg)
    backbone_only = not any(k.startswith("roi_head.") for k in flat)
    ours = _mmaction2_to_ours(flat, backbone_only)
    _check_fits(model, ours, "backbone." if backbone_only else "", str(in_path))
    save_checkpoint(ours, out_path, source=str(in_path))
    return "mmaction2" + (" backbone" if backbone_only else "")
