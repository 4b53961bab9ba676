"""MLflow tracking, one module per concern; the public names are re-exported here.

- `store`: the client's environment and which stores a cluster run can use.
- `lookup`: finding or creating a run by its identity name, its params and dataset inputs.
- `lifecycle`: the `tracked_run` block, ending runs, parent runs and their summary.
- `metrics`: the buffered rank-0 `Tracker` and the pending rows a checkpoint carries.
"""

from __future__ import annotations

from lfb_ray.tracking.lifecycle import (
    RUNS_TAG,
    TrackedRun,
    child_summary,
    close_parent_run,
    end_run,
    parent_runs,
    status_for,
    tracked_run,
)
from lfb_ray.tracking.lookup import find_or_create_run, log_dataset_inputs
from lfb_ray.tracking.metrics import (
    FLUSH_DEADLINE_S,
    PENDING_FILE,
    NullTracker,
    Tracker,
    read_pending,
    read_pending_of,
    write_pending,
)
from lfb_ray.tracking.store import (
    artifact_location,
    check_artifact_store,
    check_store_reaches_all_nodes,
    is_node_local,
    redact,
    setup_mlflow_env,
)

__all__ = ["FLUSH_DEADLINE_S", "PENDING_FILE", "RUNS_TAG", "NullTracker", "TrackedRun", "Tracker", "artifact_location",
           "check_artifact_store", "check_store_reaches_all_nodes", "child_summary", "close_parent_run", "end_run",
           "find_or_create_run", "is_node_local", "log_dataset_inputs", "parent_runs", "redact", "setup_mlflow_env",
           "read_pending", "read_pending_of", "status_for", "tracked_run", "write_pending"]
