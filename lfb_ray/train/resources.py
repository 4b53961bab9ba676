"""Where the work runs: the device rule (training, bank build, inference), the training runs'
`ScalingConfig`, and how many training runs go at once.

One rule decides GPU or CPU for every stage (`ClusterConfig.uses_gpu`): `cluster.device=gpu` always asks for GPUs,
so that a cluster whose GPU nodes scale from 0 adds them for the demand (the autoscaler only starts
nodes for resources that are asked for); `auto` looks at the GPUs up *now*, which on such a cluster
is 0, so auto means CPU there. Concurrency plans for `cluster.max_gpus` (the GPUs the cluster can
scale to) instead of the GPUs up now.

Nothing here imports Ray at module level; the functions take `ray.cluster_resources()` as an argument
where they can, so that they are plain functions to test.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from lfb_ray.config import Config, ConfigError

__all__ = ["check_gpu_capacity", "device_note", "failure_config", "gpu_capacity", "plan_concurrency", "scaled",
           "scaling_config", "start_timeout_s"]

# Ray Train's own variable and default for one attempt to start a run's worker group.
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
DEFAULT_START_TIMEOUT_S = 60.0


def device_note(cfg: Config, cluster_resources: Mapping[str, float]) -> str | None:
    """The line to print when `cluster.device=auto` decided (None for an explicit device)."""
    if cfg.cluster.device != "auto":
        return None
    gpus = cluster_resources.get("GPU", 0)
    if gpus > 0:
        return f"[lfb_ray] cluster.device=auto: {gpus:g} GPU(s) in the cluster -> GPU workers"
    return ("[lfb_ray] cluster.device=auto: no GPU in the cluster now -> CPU workers (on a cluster that adds "
            "GPU nodes on demand set cluster.device=gpu, or the autoscaler is never asked for one)")


def gpu_capacity(cfg: Config, cluster_resources: Mapping[str, float]) -> float:
    """GPUs the runs can count on: the GPUs up now, or `cluster.max_gpus` if that is more."""
    return max(float(cluster_resources.get("GPU", 0)), float(cfg.cluster.max_gpus))


def check_gpu_capacity(cfg: Config, cluster_resources: Mapping[str, float]) -> None:
    """Fail at start-up instead of waiting forever for GPUs that cannot come.

    Raises:
        ConfigError: the runs use GPUs, and neither the GPUs up now nor `cluster.max_gpus` hold
            one run's `cluster.num_workers` GPUs.
    """
    if not cfg.cluster.uses_gpu(cluster_resources):
        return
    need, have = cfg.cluster.num_workers, gpu_capacity(cfg, cluster_resources)
    if have < need:
        raise ConfigError(
            f"cluster.device={cfg.cluster.device}: a run needs cluster.num_workers={need} GPUs, but the cluster "
            f"has {cluster_resources.get('GPU', 0):g} now and cluster.max_gpus={cfg.cluster.max_gpus} (the GPUs it "
            f"can scale to) is less: set cluster.max_gpus to the GPUs the autoscaler can add, lower "
            f"cluster.num_workers, or use cluster.device=cpu")


def scaling_config(cfg: Config, cluster_resources: Mapping[str, float]):
    """The `ScalingConfig` of one training run: `use_gpu` and one GPU per worker by `ClusterConfig.uses_gpu`.

    Raises:
        ConfigError: see `check_gpu_capacity`.
    """
    from ray.train import ScalingConfig

    check_gpu_capacity(cfg, cluster_resources)
    gpu = cfg.cluster.uses_gpu(cluster_resources)
    return ScalingConfig(num_workers=cfg.cluster.num_workers, use_gpu=gpu,
                         resources_per_worker={"CPU": cfg.cluster.cpus_per_worker, **({"GPU": 1} if gpu else {})})


def plan_concurrency(cfg: Config, runs: int, resources: Mapping[str, float]) -> tuple[int, float]:
    """How many of `runs` training runs go at once, and the factor on each run's CPU reservations.

    Args:
        cfg: the runs' config (they share `cluster`).
        runs: number of runs to schedule.
        resources: `ray.cluster_resources()`.

    Returns:
        (slots, cpu_scale): slots >= 1 runs at a time; cpu_scale in (0, 1] multiplies
        `cluster.cpus_per_worker` and `cluster.data_cpus` so that `slots` runs fit in the CPUs.
        GPU runs: never more runs than `gpu_capacity` holds (a worker's GPU is not shared); when
        `cluster.max_gpus` is more than the GPUs up now, the cluster is still scaling up and the CPUs
        come with the GPU nodes, so the CPUs up now do not bound the runs (scale 1).
        `cluster.concurrent_runs=0` keeps the reservations (scale 1) and takes as many runs as
        fit; N >= 1 asks for N, scaling CPUs down to fit the CPUs up now.

    Raises:
        ConfigError: see `check_gpu_capacity`.
    """
    check_gpu_capacity(cfg, resources)
    cl = cfg.cluster
    need_cpu = cl.num_workers * (cl.cpus_per_worker + cl.data_cpus)
    cpus = resources.get("CPU", 0.0)
    gpu = cfg.cluster.uses_gpu(resources)
    gpu_slots = int(gpu_capacity(cfg, resources) // cl.num_workers) if gpu else runs
    wanted = min(runs, cl.concurrent_runs or runs, gpu_slots)
    if gpu and cl.max_gpus > resources.get("GPU", 0):
        return max(1, wanted), 1.0
    if cl.concurrent_runs == 0:
        cpu_slots = int(cpus // need_cpu) if need_cpu > 0 else runs
        return max(1, min(wanted, cpu_slots)), 1.0
    slots = max(1, wanted)
    scale = min(1.0, cpus / (slots * need_cpu)) if need_cpu > 0 and cpus > 0 else 1.0
    return slots, scale


def scaled(cfg: Config, scale: float) -> Config:
    """`cfg` with `cluster.cpus_per_worker` and `cluster.data_cpus` multiplied by `scale` (< 1)."""
    if scale >= 1.0:
        return cfg
    cl = dataclasses.replace(cfg.cluster, cpus_per_worker=cfg.cluster.cpus_per_worker * scale,
                             data_cpus=cfg.cluster.data_cpus * scale)
    return dataclasses.replace(cfg, cluster=cl)


def start_timeout_s() -> float:
    """Seconds Ray Train gives one attempt to start a worker group (`RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`)."""
    import os

    try:
        return float(os.environ.get(START_TIMEOUT_ENV) or DEFAULT_START_TIMEOUT_S)
    except ValueError:
        return DEFAULT_START_TIMEOUT_S


def failure_config(cfg: Config):
    """The run's `FailureConfig`: `train.max_failures` worker restarts, and controller retries bounded
    by `cluster.resource_wait_s`.

    Why: a worker group that cannot be placed (GPUs asked of a cluster that has none now) fails its
    start-up after `start_timeout_s()` as a *controller* error, which Ray Train retries without end
    by default (`controller_failure_limit=-1`: "Error count: 1 (max allowed: inf)", still waiting
    after hours). Bounded, a cluster whose autoscaler cannot deliver the GPUs fails the run after
    about `resource_wait_s` seconds.
    """
    import math

    from ray.train import FailureConfig

    retries = max(1, math.ceil(cfg.cluster.resource_wait_s / start_timeout_s()))
    return FailureConfig(max_failures=cfg.train.max_failures, controller_failure_limit=retries)
