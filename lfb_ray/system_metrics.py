"""CPU, memory, disk, network and (with nvidia-ml-py) GPU metrics of a training run, in MLflow.

MLflow's own sampler (`SystemMetricsMonitor`, psutil and pynvml) runs on a daemon thread of the
rank-0 Train worker, so the numbers are those of a training node, not of the driver. It logs
`system/*` metrics to the run every `tracking.system_metrics_interval_s` seconds; a resumed worker
continues its step numbering (`resume_logging`). A server that is down or hung stalls only that
thread, never the training step.
"""

from __future__ import annotations

import importlib.util

__all__ = ["start_system_metrics"]


def start_system_metrics(tracking_uri: str, run_id: str, interval_s: float, node: str = ""):
    """Start sampling for run `run_id`; returns the monitor (call `.finish()` at the end), or None
    when `interval_s` is 0 (off).

    Raises:
        ImportError: psutil is missing (a dependency of lfb_ray: the environment is incomplete).
    """
    if interval_s <= 0:
        return None
    if importlib.util.find_spec("psutil") is None:  # MLflow's sampler needs it: fail here, not in its thread
        raise ImportError("psutil is missing: tracking.system_metrics_interval_s needs it (pip install psutil, "
                          "a dependency of lfb_ray), or set tracking.system_metrics_interval_s=0")
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, samples_before_logging=1,
                                   resume_logging=True, node_id=node or None, tracking_uri=tracking_uri)
    monitor.start()
    return monitor
