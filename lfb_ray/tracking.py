"""MLflow tracking: a buffered rank-0 tracker that never crashes training, and run lookup helpers.

Metrics are buffered and flushed at checkpoints (`Tracker`). What a flush could not send is written
into the checkpoint itself (`write_pending`, before `ray.train.report` commits it) and replayed by
the worker that resumes from it (`read_pending`, `Tracker.replay`): a worker killed while the
tracking server is down or hung loses no step, and the replay, deduplicated by (metric, step)
against what the server already holds, logs none twice. If the tracking server is unreachable or
hangs, the tracker warns once, keeps the buffer and retries at the next flush; training goes on,
and each flush costs at most `FLUSH_DEADLINE_S`.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lfb_ray.redaction import redact_obj, redact_text
from lfb_ray.runs import display_name
from lfb_ray.storage import is_uri

__all__ = ["FLUSH_DEADLINE_S", "PENDING_FILE", "RUNS_TAG", "NullTracker", "TrackedRun", "Tracker", "artifact_location",
           "check_artifact_store", "check_store_reaches_all_nodes", "close_parent_run", "end_run",
           "find_or_create_run", "is_node_local", "log_dataset_inputs", "parent_runs", "redact", "setup_mlflow_env", "read_pending",
           "read_pending_of", "status_for", "tracked_run", "write_pending"]

log = logging.getLogger("lfb_ray.tracking")

#: The most one `Tracker.flush` (and each `log_artifact` / `set_tag` / `set_terminated`) blocks
#: training, in seconds, however the tracking server fails (down, hung, answering slowly). The
#: requests run on a thread that is left behind after this time (`Tracker.flush`).
FLUSH_DEADLINE_S = 30.0
#: The metric rows a checkpoint carries that MLflow had not confirmed when it was written.
PENDING_FILE = "pending_metrics.json"
#: Tag of a parent run: the ids (comma-separated) of the runs it ran or used besides its children.
RUNS_TAG = "lfb_ray.runs"


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


def status_for(exc: BaseException | None) -> str:
    """MLflow run status after `exc`: FINISHED (none), KILLED (Ctrl-C; SIGTERM, which Ray's driver
    turns into SystemExit, e.g. from `ray job stop`), FAILED (any other exception)."""
    if exc is None:
        return "FINISHED"
    return "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED"


def end_run(tracking_uri: str, run_id: str, status: str) -> None:
    """Set the run's status (warns instead of raising: it runs while another exception propagates)."""
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri).set_terminated(run_id, status)
    except Exception as e:
        print(f"[lfb_ray] WARNING: could not mark MLflow run {run_id} {status}: {type(e).__name__}: "
              f"{redact_text(e)[:200]}", flush=True)


def parent_runs(client, parent_id: str) -> list:
    """The runs of parent run `parent_id`, oldest first: its children (`mlflow.parentRunId`) and the
    runs it lists in its `RUNS_TAG` (`TrackedRun.add_runs`: runs it resumed from another parent, or
    took as they were, e.g. a pipeline whose training stages were up to date)."""
    parent = client.get_run(parent_id)
    runs = {r.info.run_id: r for r in client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=1000)}
    for rid in filter(None, parent.data.tags.get(RUNS_TAG, "").split(",")):
        if rid not in runs:
            run = client.get_run(rid)
            if run.info.lifecycle_stage != "deleted":
                runs[rid] = run
    return sorted(runs.values(), key=lambda r: r.info.start_time)


def child_summary(client, parent_id: str) -> tuple[list[str], list[list[str]]]:
    """A table of the runs of `parent_id` (`parent_runs`): operator, run name and id, status, and
    each final metric (per-class APs `val_ap/*` left out)."""
    runs = parent_runs(client, parent_id)
    keys = sorted({k for r in runs for k in r.data.metrics if not k.startswith("val_ap/")})
    head = ["operator", "run_name", "run_id", "status", *keys]
    rows = []
    for r in runs:
        m = r.data.metrics
        rows.append([r.data.tags.get("lfb_ray.operator", ""), r.data.tags.get("lfb_ray.run_name", r.info.run_name),
                     r.info.run_id, r.info.status, *[f"{m[k]:.6g}" if k in m else "" for k in keys]])
    return head, rows


def close_parent_run(tracking_uri: str, parent_id: str, exc: BaseException | None = None) -> None:
    """End a parent run (`--operators`, a pipeline invocation): its runs still RUNNING end with the
    parent's status (their processes are gone with the driver), the table of their metrics is
    logged as `summary.csv` and `summary.md`, and the parent ends `status_for(exc)`.
    Warns instead of raising (it also runs while `exc` propagates)."""
    import tempfile

    from mlflow.tracking import MlflowClient

    status = status_for(exc)
    try:
        client = MlflowClient(tracking_uri)
        for r in parent_runs(client, parent_id):
            if r.info.status == "RUNNING":
                client.set_terminated(r.info.run_id, "KILLED" if status == "KILLED" else "FAILED")
        head, rows = child_summary(client, parent_id)
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "summary.csv"), "w", newline="") as f:
                csv.writer(f).writerows([head, *rows])
            with open(os.path.join(d, "summary.md"), "w") as f:
                f.write("| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n")
                f.writelines("| " + " | ".join(r) + " |\n" for r in rows)
            client.log_artifact(parent_id, os.path.join(d, "summary.csv"))
            client.log_artifact(parent_id, os.path.join(d, "summary.md"))
        if exc is not None:
            client.set_tag(parent_id, "lfb_ray.error", f"{type(exc).__name__}: {redact_text(exc)[:400]}")
        client.set_terminated(parent_id, status)
    except Exception as e:
        print(f"[lfb_ray] WARNING: could not close MLflow parent run {parent_id} ({status}): "
              f"{type(e).__name__}: {redact_text(e)[:200]}", flush=True)
        end_run(tracking_uri, parent_id, status)


class TrackedRun:
    """The MLflow run a `tracked_run` block holds: `run_id` None when tracking is off or MLflow
    was unreachable at the start (the work goes on untracked)."""

    def __init__(self, tracking_uri: str, run_id: str | None):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self._runs: list[str] = []
        self._lock = threading.Lock()  # fit_many's on_done and the pipeline's stages may both add

    def add_runs(self, run_ids) -> None:
        """List `run_ids` (None skipped) among this parent's runs (`RUNS_TAG`, read by
        `parent_runs`): a run it resumed stays nested under the parent that created it, and a run a
        pipeline took as it was (an up-to-date stage) is nested under none of its invocations.
        Warns instead of raising: the listing must not stop the work."""
        if self.run_id is None:
            return
        from mlflow.tracking import MlflowClient

        with self._lock:
            new = [r for r in run_ids if r and r not in self._runs]
            if not new:
                return
            self._runs += new
            try:
                MlflowClient(self.tracking_uri).set_tag(self.run_id, RUNS_TAG, ",".join(self._runs))
            except Exception as e:
                print(f"[lfb_ray] WARNING: could not list runs {new} in MLflow parent run {self.run_id}: "
                      f"{type(e).__name__}: {redact_text(e)[:200]}", flush=True)


#: The dataset inputs of a training run (MLflow's Dataset column): `lfb_ray.identity` names.
_DATASETS = {"prepared": ("prepared AVA data", "prepared_dir"), "bank": ("long-term feature bank", "bank_dir")}


def log_dataset_inputs(tracking_uri: str, run_id: str, cfg, inputs: dict[str, str]) -> None:
    """Log the prepared data and (LFB runs) the bank a run consumes as its MLflow dataset inputs,
    with their content ids (`lfb_ray.identity.run_inputs`) as digests, so the UI's Dataset column
    tells runs over different data apart. An input already logged with the same digest is not repeated.
    """
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    have = {(d.dataset.name, d.dataset.digest) for d in client.get_run(run_id).inputs.dataset_inputs}
    new = []
    for key, (name, attr) in _DATASETS.items():
        if key in inputs and (name, inputs[key]) not in have:
            source = json.dumps({"uri": redact_text(str(getattr(cfg, attr)))})
            new.append(DatasetInput(Dataset(name=name, digest=inputs[key], source_type="lfb_ray", source=source),
                                    tags=[InputTag("mlflow.data.context", "training")]))
    if new:
        client.log_inputs(run_id, datasets=new)


@contextmanager
def tracked_run(cfg, run_name: str, *, params: dict[str, Any], kind: str | None = None,
                parent_run_id: str | None = None, fresh: bool = False, tags: dict[str, str] | None = None,
                config_yaml: str | None = None, log: str = "[lfb_ray]") -> Iterator[TrackedRun]:
    """The MLflow run `run_name` of `cfg`'s experiment (`find_or_create_run`) for the block, ended
    when the block ends.

    A parent run (`kind`: "pipeline", "operators"; tag `lfb_ray.kind`) ends with its runs' summary
    (`close_parent_run`): FINISHED, or FAILED/KILLED by the exception the block raised. A training
    run (`kind` None) ends FAILED/KILLED when the block raises; on success its trainer has ended it
    FINISHED after logging its last metrics. The exception propagates. With tracking off, or MLflow
    unreachable (a warning), the block runs with `run_id` None.

    `cfg` is a `lfb_ray.config.Config` (`tracking.*`, `tracking_uri`, `workdir`).
    """
    run = TrackedRun(cfg.tracking_uri, None)
    if cfg.tracking.enabled:
        try:
            run.run_id = find_or_create_run(
                cfg.tracking_uri, cfg.tracking.experiment, run_name, params=params,
                artifact_root=artifact_location(cfg.tracking_uri, cfg.workdir), parent_run_id=parent_run_id,
                fresh=fresh, tags={**({"lfb_ray.kind": kind} if kind else {}), **(tags or {})},
                config_yaml=config_yaml)
            if kind:
                print(f"{log} MLflow parent run {run_name} ({run.run_id})", flush=True)
        except Exception as e:
            without = "no parent run" if kind else "training without tracking"
            print(f"{log} WARNING: MLflow unavailable at {redact_text(cfg.tracking_uri)} "
                  f"({type(e).__name__}: {redact_text(e)}); {without}", flush=True)
    try:
        yield run
    except BaseException as e:
        if run.run_id and kind:
            close_parent_run(run.tracking_uri, run.run_id, e)
        elif run.run_id:
            end_run(run.tracking_uri, run.run_id, status_for(e))
        raise
    if run.run_id and kind:
        close_parent_run(run.tracking_uri, run.run_id)


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
    """The MLflow run id of `run_name` in `experiment`, created (with params) if absent, RUNNING.

    A rerun of the same command finds the same run (tag `lfb_ray.run_name`), so a resumed
    training continues the same MLflow run: it is set RUNNING again and stays nested under the
    parent that created it (a run of none is nested under `parent_run_id`, the parent that runs it
    now; that parent lists a run it resumes, `TrackedRun.add_runs`). `fresh=True` always creates a new run.
    `artifact_root` is the artifact location of the experiment if this creates it
    (`artifact_location`). A training run (tag `lfb_ray.operator`) is shown in the MLflow UI under
    its role (`lfb_ray.runs.display_name`, e.g. `LFB-NL-378ea6131b`); it is found by `run_name`.
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
            run = runs[0]
            if run.info.status != "RUNNING":  # it runs again (a resume): FINISHED/FAILED/KILLED no more
                client.update_run(run.info.run_id, status="RUNNING")
            if parent_run_id and not run.data.tags.get("mlflow.parentRunId"):
                client.set_tag(run.info.run_id, "mlflow.parentRunId", parent_run_id)
            return run.info.run_id
    all_tags = {"lfb_ray.run_name": run_name, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    op = all_tags.get("lfb_ray.operator")
    run = client.create_run(exp_id, run_name=display_name(run_name, op) if op else run_name, tags=all_tags)
    safe = {k: redact_text(str(redact(k, v)))[:500] for k, v in params.items()}
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


def write_pending(tracker: NullTracker, folder: str) -> None:
    """Write the metric rows `tracker` has not had confirmed by MLflow into `folder` (a checkpoint
    being written) as `PENDING_FILE`, before the checkpoint is committed.

    Why: the checkpoint is what a restarted worker resumes from, and it re-runs (and logs again)
    only the steps after it. Rows of earlier steps still in the buffer (the server was down or
    hung at the flush) would die with the worker; in the checkpoint they survive and are replayed
    (`read_pending`, `Tracker.replay`). Nothing is written when there is nothing pending.
    """
    rows = tracker.pending()
    if rows:
        with open(os.path.join(folder, PENDING_FILE), "w") as f:
            json.dump({"version": 1, "rows": rows}, f)


def read_pending(folder: str) -> list[list]:
    """The pending metric rows of the checkpoint in `folder` (`write_pending`); [] when it has none.
    An unreadable file costs its rows, with a warning, never the resume."""
    path = os.path.join(folder, PENDING_FILE)
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            return _valid_rows(json.load(f)["rows"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"[lfb_ray] WARNING: could not read the pending MLflow metrics of the checkpoint ({type(e).__name__}: "
              f"{redact_text(e)[:200]}); their steps may be missing from MLflow", flush=True)
        return []


def read_pending_of(checkpoint) -> list[list]:
    """`read_pending` of a `ray.train.Checkpoint` (local or on S3), reading only that one file."""
    path = checkpoint.path.rstrip("/") + "/" + PENDING_FILE
    try:
        with checkpoint.filesystem.open_input_stream(path) as f:
            return _valid_rows(json.loads(f.read())["rows"])
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"[lfb_ray] WARNING: could not read the pending MLflow metrics of the final checkpoint "
              f"({type(e).__name__}: {redact_text(e)[:200]})", flush=True)
        return []


def _valid_rows(rows) -> list[list]:
    """Rows as [key, value, step, timestamp_ms] (raises TypeError/ValueError on anything else)."""
    return [[str(k), float(v), int(s), int(t)] for k, v, s, t in rows]


class NullTracker:
    """Tracker of non-zero ranks and of runs with tracking disabled: does nothing."""

    run_id: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def flush(self, wait: bool = False) -> bool:
        return True

    def pending(self) -> list[list]:
        return []

    def replay(self, rows: list[list]) -> None:
        pass

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        pass

    def set_tag(self, key: str, value: str) -> None:
        pass

    def set_terminated(self, status: str = "FINISHED") -> None:
        pass


class Tracker(NullTracker):
    """Rank-0 MLflow tracker with a metric buffer flushed at checkpoint boundaries.

    Exactly once per (metric, step), whatever fails and whenever:

    - Each row is `(key, value, step, timestamp)`, its timestamp taken when it is logged, so every
      resend of a row (a retry, a replay after a resume) is byte-identical: MLflow's SQL store
      treats an identical metric as already logged (its primary key), which makes a request that
      timed out on our side but reached a hung server later harmless.
    - Before sending, a flush asks the server which steps of each metric it has
      (`get_metric_history`, cached until a request fails) and sends only the others: the steps a
      resume runs again after a checkpoint that was written but never registered, and replayed
      rows the server already got, are not logged a second time.
    - What is not confirmed stays in the buffer, which goes into every checkpoint
      (`write_pending`) and is replayed by the worker that resumes from it (`replay`).

    Why persist-and-replay rather than "flush, and refuse to checkpoint while the buffer is not
    empty": that would stop checkpointing (and so put the training at risk) whenever MLflow is
    down; here training and its checkpoints go on, with a warning, and the metrics follow.

    A hung server costs at most `deadline_s` (`FLUSH_DEADLINE_S`) per call: the requests run on a
    daemon thread that the call waits for that long. A flush that finds the previous one still
    running (the server has not answered it) does not start another and returns False at once,
    unless `wait`. The thread itself gives up after MLflow's own timeouts (`setup_mlflow_env`).
    """

    def __init__(self, tracking_uri: str, run_id: str, *, deadline_s: float = FLUSH_DEADLINE_S):
        from mlflow.tracking import MlflowClient

        setup_mlflow_env(tracking_uri)
        self.run_id = run_id
        self.deadline_s = deadline_s
        self._client = MlflowClient(tracking_uri)
        self._buffer: list[tuple[str, float, int, int]] = []
        self._lock = threading.Lock()  # the buffer: the sender thread removes what it sent
        self._sender: threading.Thread | None = None
        self._error: BaseException | None = None
        self._warned = False
        self._have: dict[str, set[int]] = {}  # metric -> steps MLflow holds (as of the last query)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        with self._lock:
            self._buffer += [(k, float(v), int(step), ts) for k, v in metrics.items()]

    def pending(self) -> list[list]:
        """The rows not yet confirmed by MLflow, as JSON-able [key, value, step, timestamp_ms]."""
        with self._lock:
            return [list(r) for r in self._buffer]

    def replay(self, rows: list[list]) -> None:
        """Queue `rows` (`pending()` of a checkpoint, `read_pending`) to be sent at the next flush,
        ahead of what this tracker logs; steps the server already holds are skipped then."""
        rows = [tuple(r) for r in _valid_rows(rows)]
        with self._lock:
            self._buffer[:0] = rows

    def drop_buffer(self) -> None:
        with self._lock:
            self._buffer.clear()

    def _warn(self, what: str, e: BaseException) -> None:
        if not self._warned:
            print(f"[lfb_ray] WARNING: MLflow tracking unavailable ({what}: {type(e).__name__}: "
                  f"{redact_text(e)[:200]}); training continues, metrics are kept and retried", flush=True)
            self._warned = True

    def _send(self, rows: list[tuple[str, float, int, int]]) -> None:
        """The sender thread: log the rows whose (metric, step) MLflow lacks, then drop `rows`
        from the buffer. On failure the cache of the server's steps is forgotten: a request that
        timed out may still reach the server, so the next flush asks again."""
        from mlflow.entities import Metric

        try:
            for key in sorted({k for k, _, _, _ in rows} - set(self._have)):
                self._have[key] = {m.step for m in self._client.get_metric_history(self.run_id, key)}
            todo, seen = [], set()
            for k, v, s, t in rows:
                if s not in self._have[k] and (k, s) not in seen:
                    seen.add((k, s))
                    todo.append((k, v, s, t))
            for i in range(0, len(todo), 500):
                chunk = todo[i:i + 500]
                self._client.log_batch(self.run_id, metrics=[Metric(k, v, t, s) for k, v, s, t in chunk])
                for k, _, s, _ in chunk:
                    self._have[k].add(s)
        except BaseException as e:  # a thread's error is reported by `flush`
            self._have.clear()
            self._error = e
            return
        sent = set(rows)
        with self._lock:
            self._buffer = [r for r in self._buffer if r not in sent]

    def flush(self, wait: bool = False) -> bool:
        """Send the buffered metrics; keep what fails for the next flush. Returns success.

        Returns within `deadline_s` seconds whatever the server does (down, hung, slow). A flush
        while the previous one's requests are still unanswered returns False at once, or with
        `wait` (the end of a run) waits for it first, within the same deadline.
        """
        end = time.monotonic() + self.deadline_s
        if self._sender is not None and self._sender.is_alive():
            if wait:
                self._sender.join(max(0.0, end - time.monotonic()))
            if self._sender.is_alive():
                self._warn("flush", TimeoutError(f"the previous flush is still unanswered after {self.deadline_s:g} s"))
                return False
        with self._lock:
            rows = list(self._buffer)
        if not rows:
            return True
        self._error = None
        self._sender = threading.Thread(target=self._send, args=(rows,), daemon=True, name="lfb_ray-mlflow-flush")
        self._sender.start()
        self._sender.join(max(0.0, end - time.monotonic()))
        if self._sender.is_alive():
            self._warn("log_batch", TimeoutError(f"no answer within {self.deadline_s:g} s"))
            return False
        if self._error is not None:
            self._warn("log_batch", self._error)
            return False
        if self._warned:
            print("[lfb_ray] MLflow tracking is reachable again; buffered metrics were logged", flush=True)
            self._warned = False
        return True

    def _bounded(self, what: str, fn, *args) -> None:
        """`fn(*args)` on a daemon thread, waited for `deadline_s`; a failure or timeout warns."""
        err: list[BaseException] = []

        def call() -> None:
            try:
                fn(*args)
            except BaseException as e:
                err.append(e)

        t = threading.Thread(target=call, daemon=True, name=f"lfb_ray-mlflow-{what}")
        t.start()
        t.join(self.deadline_s)
        if t.is_alive():
            self._warn(what, TimeoutError(f"no answer within {self.deadline_s:g} s"))
        elif err:
            self._warn(what, err[0])

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self._bounded("log_artifact", self._client.log_artifact, self.run_id, path, artifact_path)

    def set_tag(self, key: str, value: str) -> None:
        self._bounded("set_tag", self._client.set_tag, self.run_id, key, value)

    def set_terminated(self, status: str = "FINISHED") -> None:
        self._bounded("set_terminated", self._client.set_terminated, self.run_id, status)
