"""Where MLflow writes: the client's environment, and whether a store can serve a cluster run.

A node-local store (sqlite, file) is reachable only from the machine that holds it: the checks here
refuse it where another node or a URI workdir would need it, at start-up rather than mid-run.
"""

from __future__ import annotations

import os
from typing import Any

from lfb_ray.redaction import redact_obj
from lfb_ray.storage import is_uri


def redact(key: str, value: Any) -> Any:
    """`value` with credentials hidden (`lfb_ray.redaction`): all of it when `key` names a secret,
    else `user:pass@` in URIs and secret query parameters, in strings and inside lists/dicts."""
    return redact_obj(value, key)


def setup_mlflow_env(tracking_uri: str) -> None:
    """Point mlflow at `tracking_uri` (inside Ray workers too) with quiet, short retries.

    MLflow 3's defaults (MLFLOW_HTTP_REQUEST_TIMEOUT 120 s, MLFLOW_HTTP_REQUEST_MAX_RETRIES 7,
    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR 2) let one request to a hung server take ~20 minutes. Here,
    unless the environment sets them: 10 s per attempt, 2 retries, backoff factor 2 (sleeps of 0 s
    and 4 s, each plus up to MLFLOW_HTTP_REQUEST_BACKOFF_JITTER's 1 s), so one request gives up
    after ~36 s at most; the tracker's calls are in addition cut off after `FLUSH_DEADLINE_S`.
    """
    import mlflow

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "2")
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


def is_node_local(tracking_uri: str) -> bool:
    """Whether `tracking_uri` is a store on this machine's disk (sqlite, file, a bare path), which
    the other nodes of a cluster cannot reach (each would write its own)."""
    uri = tracking_uri.strip().lower()
    if uri.startswith(("sqlite:", "file:")):
        return True
    if is_uri(uri) or uri.startswith("databricks"):  # a server or a managed store ("databricks", "databricks-uc")
        return False
    return True  # a bare path: mlflow's file store


def artifact_location(tracking_uri: str, workdir: str) -> str | None:
    """Artifact root of a new experiment: None (the tracking server's artifact store) for a server,
    `<workdir>/mlartifacts` for a node-local store. MLflow's own default for a local store is
    `./mlruns`, relative to whichever process creates the experiment (a Ray worker's directory).

    Raises:
        ValueError: a node-local store with a workdir that is a URI (`check_artifact_store`).
    """
    if not is_node_local(tracking_uri):
        return None
    check_artifact_store(tracking_uri, workdir)
    from pathlib import Path

    return (Path(workdir).resolve() / "mlartifacts").as_uri()


def check_artifact_store(tracking_uri: str, workdir: str) -> None:
    """A node-local tracking store keeps its artifacts in `<workdir>/mlartifacts`, which needs a local
    workdir: a URI workdir (`s3://...`) needs a tracking server, whose artifact store (e.g.
    `mlflow server --artifacts-destination s3://...`) takes the artifacts instead.

    Raises:
        ValueError: `tracking_uri` is node-local and `workdir` a URI.
    """
    if is_uri(workdir) and is_node_local(tracking_uri):
        raise ValueError(
            f"workdir {redact('workdir', workdir)} is a URI, but MLflow tracking URI {redact('uri', tracking_uri)} is a "
            "store on this machine's disk, whose artifacts would go to <workdir>/mlartifacts: point "
            "tracking.tracking_uri at a tracking server (http://...), or set tracking.enabled=false")


def check_store_reaches_all_nodes(tracking_uri: str, alive_nodes: int) -> None:
    """Fail at start-up when a multi-node cluster is given a node-local tracking store.

    Raises:
        ValueError: `alive_nodes` > 1 and `tracking_uri` is node-local (`is_node_local`).
    """
    if alive_nodes > 1 and is_node_local(tracking_uri):
        raise ValueError(
            f"MLflow tracking URI {redact('uri', tracking_uri)} is a store on one node's disk, but the Ray "
            f"cluster has {alive_nodes} alive nodes: runs whose rank-0 worker is on another node would log "
            "to a store of their own. Point tracking.tracking_uri (or MLFLOW_TRACKING_URI in the job's "
            "runtime env) at a tracking server (http://...), or set tracking.enabled=false")

