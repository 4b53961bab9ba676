"""Metrics across checkpoints and a hung tracking server (issue 32).

What a flush could not send goes into the checkpoint before it is committed and is replayed, once,
by the worker that resumes from it; a server that accepts connections but never answers costs each
flush at most its deadline (`lfb_ray.tracking.Tracker`). The first two tests need no Ray; the last
SIGSTOPs a real `mlflow server` over checkpoints and SIGKILLs the rank-0 Train worker meanwhile.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import tiny_config


def _new_run(uri: str) -> tuple:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    return client, client.create_run(client.create_experiment("metrics")).info.run_id


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_pending_rows_of_a_checkpoint_are_replayed_once(tmp_path):
    """The replay/dedup logic without Ray: a worker dies with rows unsent (some of them reached the
    server through a request it had given up on); its checkpoint's rows are replayed by the next
    tracker; the late request arrives once more after that. Every step is in MLflow exactly once."""
    from mlflow.entities import Metric

    from lfb_ray.tracking import PENDING_FILE, Tracker, read_pending, write_pending

    client, run = _new_run(f"sqlite:///{tmp_path}/mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    a = Tracker(uri, run)
    for s in (1, 2):
        a.log_metrics({"train/loss": 1.0 / s}, step=s)
    assert a.flush()
    assert a.pending() == []
    empty = tmp_path / "ckpt_empty"
    empty.mkdir()
    write_pending(a, str(empty))
    assert not (empty / PENDING_FILE).exists() and read_pending(str(empty)) == []

    for s in (3, 4, 5, 6):
        a.log_metrics({"train/loss": 1.0 / s, "train/lr": 0.1 * s}, step=s)
    late = [Metric(k, v, t, s) for k, v, s, t in a.pending() if s <= 4]
    client.log_batch(run, metrics=late)  # a timed-out request that the (hung) server still served
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    write_pending(a, str(ckpt))  # the checkpoint is committed; then the worker is killed
    assert len(json.loads((ckpt / PENDING_FILE).read_text())["rows"]) == 8
    del a

    # A step the server has with another value (the steps a resume runs again after a checkpoint
    # that was written but never registered): the server's value stays, the step once.
    client.log_batch(run, metrics=[Metric("train/loss", 99.0, 1, 7)])

    b = Tracker(uri, run)
    b.replay(read_pending(str(ckpt)))
    for s in (7, 8):
        b.log_metrics({"train/loss": 1.0 / s, "train/lr": 0.1 * s}, step=s)
    assert b.flush()
    assert b.pending() == []
    client.log_batch(run, metrics=late)  # the same late request, served once more
    assert _steps(client, run, "train/loss") == [1, 2, 3, 4, 5, 6, 7, 8]
    assert _steps(client, run, "train/lr") == [3, 4, 5, 6, 7, 8]
    assert {m.step: m.value for m in client.get_metric_history(run, "train/loss")}[7] == 99.0
    assert {m.step: m.value for m in client.get_metric_history(run, "train/loss")}[5] == pytest.approx(0.2)


def test_the_driver_reads_the_pending_rows_of_the_final_checkpoint(tmp_path):
    """`read_pending_of` reads the one file from a `ray.train.Checkpoint` (no Ray cluster needed)."""
    from ray.train import Checkpoint

    from lfb_ray.tracking import PENDING_FILE, read_pending_of

    assert read_pending_of(Checkpoint.from_directory(str(tmp_path))) == []
    (tmp_path / PENDING_FILE).write_text(json.dumps({"version": 1, "rows": [["val/mAP", 0.5, 2, 1000]]}))
    assert read_pending_of(Checkpoint.from_directory(str(tmp_path))) == [["val/mAP", 0.5, 2, 1000]]
    (tmp_path / PENDING_FILE).write_text("{not json")
    assert read_pending_of(Checkpoint.from_directory(str(tmp_path))) == []  # warned, never raised


def test_a_server_that_never_answers_costs_a_flush_its_deadline(tmp_path):
    """A socket that accepts connections (the kernel's backlog) but never answers: the flush gives
    up within its deadline and keeps the rows; the next flush, its predecessor still unanswered,
    returns at once; tags and artifacts are bounded the same way."""
    from lfb_ray.tracking import Tracker

    deadline, slack = 2.0, 1.5
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(64)
        tr = Tracker(f"http://127.0.0.1:{srv.getsockname()[1]}", "0" * 32)
        tr.deadline_s = deadline  # the default is lfb_ray.tracking.FLUSH_DEADLINE_S (30 s)
        tr.log_metrics({"train/loss": 1.0}, step=1)

        t0 = time.monotonic()
        assert not tr.flush()
        assert time.monotonic() - t0 < deadline + slack
        assert [r[:3] for r in tr.pending()] == [["train/loss", 1.0, 1]]  # kept, for the checkpoint

        t0 = time.monotonic()
        assert not tr.flush()  # the first one's requests are still unanswered
        assert time.monotonic() - t0 < 0.5
        t0 = time.monotonic()
        assert not tr.flush(wait=True)
        assert time.monotonic() - t0 < deadline + slack

        art = tmp_path / "a.txt"
        art.write_text("x")
        t0 = time.monotonic()
        tr.set_tag("k", "v")
        tr.log_artifact(str(art))
        tr.set_terminated("FINISHED")
        assert time.monotonic() - t0 < 3 * deadline + slack


# --------------------------------------------------------------------------------------------
# A real `mlflow server`, SIGSTOPped over checkpoints, and a SIGKILLed rank-0 worker


def _latest(storage: str, name: str) -> tuple[str | None, int]:
    """The folder and global_step of the latest checkpoint Ray Train has registered (None, -1: none
    yet), from its checkpoint-manager snapshot (Ray Train V2)."""
    snap = Path(storage) / name / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snap.read_text()).get("latest_checkpoint_result") or {}
        return latest.get("checkpoint_dir_name"), int((latest.get("metrics") or {}).get("global_step", -1))
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return None, -1


@pytest.mark.faults
@pytest.mark.ray
@pytest.mark.slow
def test_hung_tracking_server_and_a_killed_rank0_worker(prepared, tmp_path):
    """SIGSTOP the `mlflow server` (its process group: the server forks its workers) after the first
    checkpoint, keep it stopped over two more, SIGKILL the rank-0 Train worker (the only one), SIGCONT
    once its replacement runs: the run finishes, `train/loss` has every step exactly once, so do the
    epoch-level metrics, and no metric has a step twice. Before issue 32 the rows not yet sent when
    a checkpoint was committed died with the worker (here the epoch-level rows of epoch 1), and rows
    sent again by a later flush with a new timestamp could be logged twice."""
    from mlflow.tracking import MlflowClient

    from lfb_ray.train import fit
    from tests.helpers.mlflow_server import start_mlflow_server
    from tests.helpers.processes import wait_until as _wait_for
    from tests.helpers.ray_local import pids_with as _pids_with

    cfg0, _ = prepared
    mlflow = start_mlflow_server(tmp_path / "mlflow_server")
    server, port = mlflow.proc, int(mlflow.uri.rsplit(":", 1)[1])
    events: list[str] = []
    try:
        name = "hung"
        cfg = tiny_config(tmp_path, cfg0.data.root, f"data.prepared_dir={cfg0.prepared_dir}", "model.fbo=none",
                          "cluster.num_workers=1", "train.epochs=2", "train.max_iters_per_epoch=4",
                          "train.checkpoint_every_iters=2", "train.log_every_iters=1", "train.max_failures=2",
                          f"tracking.tracking_uri=http://127.0.0.1:{port}", f"train.run_name={name}")

        def inject():
            _wait_for(lambda: _latest(cfg.storage_path, name)[1] >= 2, 300, "the first checkpoint")
            os.killpg(server.pid, signal.SIGSTOP)
            at = _latest(cfg.storage_path, name)
            events.append(f"stopped after step {at[1]}")
            later: set[str] = set()

            def two_more() -> bool:  # checkpoints registered while the server is stopped
                d, step = _latest(cfg.storage_path, name)
                if d and d != at[0] and step >= at[1]:
                    later.add(d)
                return len(later) >= 2

            _wait_for(two_more, 300, "two checkpoints while the server is stopped")
            pids = _pids_with("RayTrainWorker")
            for pid in pids:  # cluster.num_workers=1: the one worker is rank 0
                os.kill(pid, signal.SIGKILL)
            events.append(f"killed {pids} after step {_latest(cfg.storage_path, name)[1]}")
            _wait_for(lambda: set(_pids_with("RayTrainWorker")) - set(pids), 300, "the restarted worker")
            time.sleep(3)
            os.killpg(server.pid, signal.SIGCONT)
            events.append("continued")

        t = threading.Thread(target=inject, daemon=True)
        t.start()
        r = fit(cfg)
        t.join(timeout=5)
        print(f"[test] faults: {events}", flush=True)
        assert events[-1:] == ["continued"], events
        assert r.metrics["epoch"] == 2
        client = MlflowClient(cfg.tracking_uri)
        assert _steps(client, r.mlflow_run_id, "train/loss") == list(range(1, r.metrics["global_step"] + 1)), events
        # The epoch-level rows of epoch 1 were logged while the server was stopped (before main
        # persisted pending rows, they died with the worker).
        for key in ("epoch", "train/loss_epoch", "train/epoch_seconds"):
            assert _steps(client, r.mlflow_run_id, key) == [1, 2], (key, events)
        for key in client.get_run(r.mlflow_run_id).data.metrics:  # no (metric, step) twice
            steps = _steps(client, r.mlflow_run_id, key)
            assert len(steps) == len(set(steps)), (key, steps)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGCONT)
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()

