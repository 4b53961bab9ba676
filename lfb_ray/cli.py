"""Shared command-line plumbing of the jobs: `--config PATH key=value ...` and Ray start-up."""

from __future__ import annotations

import argparse
import os
import sys

from lfb_ray.config import Config, ConfigError, load_config, resolve_paths

__all__ = ["base_parser", "init_ray", "load_from_args"]


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="YAML config (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=2 model.fbo=avg")
    return p


def load_from_args(args: argparse.Namespace) -> Config:
    try:
        return resolve_paths(load_config(args.config, args.overrides))
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def init_ray(cfg: Config | None = None) -> None:
    """Connect to the cluster of `ray job submit` (RAY_ADDRESS) or start a local one on loopback."""
    import ray

    if ray.is_initialized():
        return
    runtime_env = {"env_vars": {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "PYTHONPATH")
                                if k in os.environ}}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=runtime_env, log_to_driver=True)
    else:
        # No dashboard locally, hence no State API: Ray Train's PlacementGroupCleaner actor then logs
        # "Failed to query Ray Train Controller actor state" every few seconds for the whole fit.
        # A local cluster dies with its driver (taking any placement group with it), so the hook
        # raises only that logger's level in Ray's worker processes.
        runtime_env["worker_process_setup_hook"] = "lfb_ray.cli.quiet_local_ray_workers"
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, runtime_env=runtime_env,
                 configure_logging=True, logging_level="WARNING")


def quiet_local_ray_workers() -> None:
    """`worker_process_setup_hook` of local clusters: silence the State-API-less cleaner's warnings."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
