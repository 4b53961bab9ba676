"""Typed configuration: frozen dataclasses are the schema and the defaults; YAML files fill them.

`sections` holds the dataclasses (each checks its own values; `Config` the cross-section facts),
`io` reads and writes them as plain data (YAML, dotted overrides, dicts, hashes), `paths` makes
their path keys absolute for Ray workers and gives them back as written. Import from here.
"""

from lfb_ray.config.io import (
                               config_from_dict,
                               config_hash,
                               config_to_dict,
                               flatten_config,
                               load_config,
                               with_overrides,
)
from lfb_ray.config.paths import PATH_KEYS, path_values, resolve_paths, unresolve_paths
from lfb_ray.config.sections import (
                               OPERATORS,
                               BankConfig,
                               ClusterConfig,
                               Config,
                               ConfigError,
                               DataConfig,
                               EvalConfig,
                               ModelConfig,
                               Operator,
                               TrackingConfig,
                               TrainConfig,
                               check_exclusive_groups,
)

__all__ = ["OPERATORS", "PATH_KEYS", "BankConfig", "ClusterConfig", "Config", "ConfigError", "DataConfig",
           "EvalConfig", "ModelConfig", "Operator", "TrackingConfig", "TrainConfig", "check_exclusive_groups",
           "config_from_dict", "config_hash", "config_to_dict", "flatten_config", "load_config", "path_values",
           "resolve_paths", "unresolve_paths", "with_overrides"]
