"""Run lifecycle: the `tracked_run` block, how runs end (status, parent summary), and parent runs.

A block's run ends whatever the block does: FINISHED, or FAILED/KILLED by the exception it raised.
Ending warns instead of raising, since it often runs while another exception propagates.
"""

from __future__ import annotations

import csv
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lfb_ray.redaction import redact_text
from lfb_ray.tracking.lookup import find_or_create_run
from lfb_ray.tracking.store import artifact_location

#: Tag of a parent run: the ids (comma-separated) of the runs it ran or used besides its children.
RUNS_TAG = "lfb_ray.runs"


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

