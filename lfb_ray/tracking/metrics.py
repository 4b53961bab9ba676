"""Metric logging: a buffered rank-0 tracker that never crashes training, and checkpoint replay.

Metrics are buffered and flushed at checkpoints (`Tracker`). What a flush could not send is written
into the checkpoint itself (`write_pending`, before `ray.train.report` commits it) and replayed by
the worker that resumes from it (`read_pending`, `Tracker.replay`): a worker killed while the
tracking server is down or hung loses no step, and the replay, deduplicated by (metric, step)
against what the server already holds, logs none twice. If the tracking server is unreachable or
hangs, the tracker warns once, keeps the buffer and retries at the next flush; training goes on,
and each flush costs at most `FLUSH_DEADLINE_S`.
"""

from __future__ import annotations

import json
import os
import threading
import time

from lfb_ray.redaction import redact_text
from lfb_ray.tracking.store import setup_mlflow_env

#: The most one `Tracker.flush` (and each `log_artifact` / `set_tag` / `set_terminated`) blocks
#: training, in seconds, however the tracking server fails (down, hung, answering slowly). The
#: requests run on a thread that is left behind after this time (`Tracker.flush`).
FLUSH_DEADLINE_S = 30.0
#: The metric rows a checkpoint carries that MLflow had not confirmed when it was written.
PENDING_FILE = "pending_metrics.json"


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
