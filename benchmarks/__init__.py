"""Benchmarks of the pipeline stages against in-process baselines; run them with `jobs/benchmark.py`.

Each module measures one stage and prints a table of absolute numbers, ratios to a baseline
measured in the same run, CPU time next to wall time, and the machine load. Nothing is asserted
about timings: the numbers go to BENCHMARKS.md.
"""

from __future__ import annotations

__all__ = ["start_local_ray"]


def start_local_ray(num_cpus: int) -> bool:
    """Start a private local Ray cluster (loopback, no dashboard) unless one is connected already.

    `address="local"` always starts a new cluster, never joins another one running on the host.

    Returns:
        True if this call started it (the caller then shuts it down).
    """
    import logging

    import ray
    import ray.data

    for handler in logging.getLogger("ray.data").handlers:  # console only: ray-data.log keeps INFO
        if type(handler).__name__ != "SessionFileHandler":
            handler.setLevel(logging.WARNING)  # no per-dataset INFO lines between the tables
    if ray.is_initialized():
        return False
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level="ERROR", configure_logging=True, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return True
