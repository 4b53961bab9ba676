"""MLflow tracking: a buffered rank-0 tracker that never crashes training, and run lookup helpers.

Metrics are buffered and flushed right after each checkpoint is committed, so a worker restart
(which replays the iterations since the last checkpoint) neither duplicates nor loses MLflow steps.
If the tracking server is unreachable the tracker warns once, keeps the buffer and retries at the
next flush; training goes on.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from typing import Any

__all__ = ["NullTracker", "Tracker", "find_or_create_run", "redact", "setup_mlflow_env"]

log = logging.getLogger("lfb_ray.tracking")

_SECRET = re.compile(r"(secret|token|password|passwd|access_key|api_key|credential)", re.I)
_URI_CREDS = re.compile(r"(://)([^/@:]+):([^/@]+)@")


def redact(key: str, value: Any) -> Any:
    """Hide credentials: secret-looking keys, `user:pass@` in URIs, key=... query parameters."""
    if _SECRET.search(key):
        return "***"
    if isinstance(value, str):
        value = _URI_CREDS.sub(r"\1***:***@", value)
        value = re.sub(r"((?:secret|access)_key|token|password)=([^&]+)", r"\1=***", value, flags=re.I)
    return value


def setup_mlflow_env(tracking_uri: str) -> None:
    """Point mlflow at `tracking_uri` (inside Ray workers too) with quiet, short retries."""
    import mlflow

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    if tracking_uri.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(tracking_uri[len("sqlite:///"):]) or ".", exist_ok=True)
    # mlflow.set_tracking_uri also writes MLFLOW_TRACKING_URI into os.environ, which would make
    # every later config in this process (and its children) silently use this URI: restore it.
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def find_or_create_run(tracking_uri: str, experiment: str, run_name: str, *, params: dict[str, Any],
                       artifact_root: str | None = None, parent_run_id: str | None = None,
                       fresh: bool = False, tags: dict[str, str] | None = None,
                       config_yaml: str | None = None) -> str:
    """The MLflow run id of `run_name` in `experiment`, created (with params) if absent.

    A rerun of the same command finds the same run (tag `lfb_ray.run_name`), so a resumed
    training continues the same MLflow run. `fresh=True` always creates a new run.
    """
    import ray
    import torch
    from mlflow.tracking import MlflowClient

    setup_mlflow_env(tracking_uri)
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment, artifact_location=artifact_root)
    if not fresh:
        runs = client.search_runs([exp_id], f"tags.`lfb_ray.run_name` = '{run_name}'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        if runs:
            return runs[0].info.run_id
    all_tags = {"lfb_ray.run_name": run_name, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    safe = {k: str(redact(k, v))[:500] for k, v in params.items()}
    safe.update({"version.ray": ray.__version__, "version.torch": torch.__version__,
                 "version.python": sys.version.split()[0], "git_commit": _git_commit()})
    items = sorted(safe.items())
    from mlflow.entities import Param

    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
    if config_yaml:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "config.yaml")
            with open(path, "w") as f:
                f.write(config_yaml)
            client.log_artifact(run.info.run_id, path)
    return run.info.run_id


class NullTracker:
    """Tracker of non-zero ranks and of runs with tracking disabled: does nothing."""

    run_id: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def flush(self) -> bool:
        return True

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        pass

    def set_tag(self, key: str, value: str) -> None:
        pass

    def set_terminated(self, status: str = "FINISHED") -> None:
        pass


class Tracker(NullTracker):
    """Rank-0 MLflow tracker with a metric buffer flushed at checkpoint boundaries."""

    def __init__(self, tracking_uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        setup_mlflow_env(tracking_uri)
        self.run_id = run_id
        self._client = MlflowClient(tracking_uri)
        self._buffer: list[tuple[str, float, int]] = []
        self._warned = False
        self._logged_upto: dict[str, int] = {}  # metric -> highest step already in MLflow

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._buffer += [(k, float(v), int(step)) for k, v in metrics.items()]

    def drop_buffer(self) -> None:
        self._buffer.clear()

    def _warn(self, what: str, e: Exception) -> None:
        if not self._warned:
            print(f"[lfb_ray] WARNING: MLflow tracking unavailable ({what}: {type(e).__name__}: "
                  f"{str(e)[:200]}); training continues, metrics are kept and retried", flush=True)
            self._warned = True

    def flush(self) -> bool:
        """Send buffered metrics; on failure keep them for the next flush. Returns success."""
        if not self._buffer:
            return True
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        try:
            # Idempotent per (metric, step): after a restart that replays steps whose metrics were
            # already sent (e.g. a fault between flush and checkpoint registration), skip them.
            for key in {k for k, _, _ in self._buffer} - set(self._logged_upto):
                hist = self._client.get_metric_history(self.run_id, key)
                self._logged_upto[key] = max((m.step for m in hist), default=-1)
            todo = [(k, v, s) for k, v, s in self._buffer if s > self._logged_upto[k]]
            for i in range(0, len(todo), 500):
                chunk = todo[i:i + 500]
                self._client.log_batch(self.run_id, metrics=[Metric(k, v, ts, s) for k, v, s in chunk])
                for k, _, s in chunk:
                    self._logged_upto[k] = max(self._logged_upto[k], s)
        except Exception as e:
            self._warn("log_batch", e)
            return False
        self._buffer.clear()
        if self._warned:
            print("[lfb_ray] MLflow tracking is reachable again; buffered metrics were logged", flush=True)
            self._warned = False
        return True

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        try:
            self._client.log_artifact(self.run_id, path, artifact_path)
        except Exception as e:
            self._warn("log_artifact", e)

    def set_tag(self, key: str, value: str) -> None:
        try:
            self._client.set_tag(self.run_id, key, value)
        except Exception as e:
            self._warn("set_tag", e)

    def set_terminated(self, status: str = "FINISHED") -> None:
        try:
            self._client.set_terminated(self.run_id, status)
        except Exception as e:
            self._warn("set_terminated", e)
