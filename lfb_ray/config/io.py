"""Reading and writing a `Config` as plain data: YAML files, dotted overrides, dicts, hashes.

`load_config(path, overrides)` is the only YAML reader of the project. Overrides are dotted
`section.key=value` strings (values parsed as YAML scalars), type-checked against the dataclasses
of `lfb_ray.config.sections`. Unknown keys and wrong types are errors that name the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from lfb_ray.config.sections import Config, ConfigError

__all__ = ["ConfigError", "config_from_dict", "config_hash", "config_to_dict", "flatten_config", "load_config",
           "with_overrides"]


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against annotation `tp`; return the value in its canonical type."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed and type(value) is type(allowed[allowed.index(value)]):
            return value
        raise ConfigError(f"{key}: {value!r} is not allowed; allowed values: {', '.join(map(repr, allowed))}")
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} does not match {tp}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(f"unknown key(s) {', '.join(prefix + u for u in unknown)} in {where}; "
                          f"allowed: {', '.join(names)}")
    kwargs: dict[str, Any] = {}
    for name in names:
        if name not in data:
            continue
        tp = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(tp):
            if not isinstance(data[name], dict):
                raise ConfigError(f"{key}: expected a mapping (section), got {data[name]!r}")
            kwargs[name] = _build(tp, data[name], key + ".")
        else:
            kwargs[name] = _coerce(key, data[name], tp)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build a `Config` from nested plain data (e.g. `config_to_dict` output inside a Ray worker)."""

    return _build(Config, data, "")


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Nested plain-data form (tuples as lists) that round-trips through `config_from_dict`."""
    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(cfg))


def _apply_override(data: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    value = yaml.safe_load(raw) if raw.strip() else ""
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {p} is not a section")
    node[parts[-1]] = value


def with_overrides(cfg: Config, overrides: typing.Sequence[str]) -> Config:
    """`cfg` with dotted overrides applied, as `load_config` applies them to a file's values
    (e.g. to the config a checkpoint saved: `lfb_ray.models.card.CheckpointMeta`)."""
    data = config_to_dict(cfg)
    for item in overrides:
        _apply_override(data, item)
    return config_from_dict(data)


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load a YAML config (or the defaults when `path` is None) and apply dotted overrides.

    Raises:
        ConfigError: unknown key, wrong type or value not allowed; the message names the key.
        FileNotFoundError: `path` does not exist.
    """
    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        data = loaded or {}
    for item in overrides:
        _apply_override(data, item)
    try:
        return config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path or '<defaults>'}: {e}") from None


def flatten_config(cfg: Config) -> dict[str, Any]:
    """`{"section.key": value}` for logging as MLflow params."""
    out: dict[str, Any] = {}

    def walk(prefix: str, x: Any) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                walk(f"{prefix}{k}.", v)
        else:
            out[prefix.rstrip(".")] = x

    walk("", config_to_dict(cfg))
    return out


def config_hash(cfg: Config | dict[str, Any], sections: typing.Sequence[str] | None = None) -> str:
    """Stable short hash of the config (or of some sections): names runs deterministically."""

    d = config_to_dict(cfg) if isinstance(cfg, Config) else cfg
    if sections is not None:
        d = {s: d[s] for s in sections}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]
