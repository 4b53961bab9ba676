"""Fault injection: kill workers, actors, drivers and the tracking server; the work is not lost.

Each case injects the fault, lets the system recover, and compares the final artefacts with what
a fault-free run produces.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, tiny_config

from tests.helpers.mlflow_server import start_mlflow_server
from tests.helpers.processes import wait_until
from tests.helpers.ray_local import pids_with

pytestmark = [pytest.mark.faults, pytest.mark.ray, pytest.mark.slow]


def _checkpoints(storage: str, name: str) -> list[Path]:
    d = Path(storage) / name
    return sorted(d.glob("checkpoint_*")) if d.exists() else []


def test_worker_killed_mid_epoch_resumes_from_checkpoint(prepared, tmp_path):
    """`os.kill` of a Ray Train worker: the group restarts from the last checkpoint and finishes;
    MLflow holds every step exactly once."""
    from mlflow.tracking import MlflowClient

    from lfb_ray.train import fit

    cfg0, _ = prepared
    cfg = tiny_config(tmp_path, cfg0.data.root, f"data.prepared_dir={cfg0.prepared_dir}", "model.fbo=none",
                      "train.epochs=2", "train.checkpoint_every_iters=2", "train.log_every_iters=1",
                      "train.max_failures=2", "train.run_name=killed")
    killed: list[int] = []

    def killer():
        wait_until(lambda: _checkpoints(cfg.storage_path, "killed"), 300, "the first checkpoint")
        pids = wait_until(lambda: pids_with("RayTrainWorker"), 60, "a train worker")
        os.kill(pids[-1], signal.SIGKILL)
        killed.append(pids[-1])

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    r = fit(cfg)
    t.join(timeout=5)
    assert killed, "the fault was never injected"
    assert len(_checkpoints(cfg.storage_path, "killed")) >= 1
    assert r.metrics["epoch"] == 2
    steps = [m.step for m in MlflowClient(cfg.tracking_uri).get_metric_history(r.mlflow_run_id, "train/loss")]
    assert sorted(steps) == list(range(1, r.metrics["global_step"] + 1))  # none missing, none twice


def _recorded_checkpoint(storage: str, name: str) -> bool:
    """True once Ray Train's checkpoint-manager snapshot names a checkpoint.

    The `checkpoint_*` folder appears while the checkpoint is still being registered; a driver
    killed in that window rightly starts over, so the resume test waits for the snapshot that a
    rerun restores from (`checkpoint_manager_snapshot.json`, Ray Train V2).
    """
    snap = Path(storage) / name / "checkpoint_manager_snapshot.json"
    try:
        return bool(json.loads(snap.read_text()).get("checkpoint_results"))
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return False


def test_interrupted_driver_resumes_when_rerun(prepared, tmp_path):
    """SIGKILL the whole `jobs/train.py` driver after its first checkpoint; the same command resumes."""
    cfg0, _ = prepared
    args = [sys.executable, str(REPO / "jobs" / "train.py"), "--config", str(REPO / "configs" / "tiny.yaml"),
            f"workdir={tmp_path}", f"data.root={cfg0.data.root}", f"data.prepared_dir={cfg0.prepared_dir}",
            "model.fbo=none", "train.epochs=2", "train.checkpoint_every_iters=2", "train.run_name=driver",
            "tracking.enabled=false"]
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    p = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         start_new_session=True)
    try:
        wait_until(lambda: _recorded_checkpoint(str(tmp_path / "ray_results"), "driver"), 600,
                  "the first recorded checkpoint")
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # the driver and the local Ray cluster it started
        p.wait()
    time.sleep(2)
    log_path = tmp_path / "rerun.log"
    with open(log_path, "w") as f:
        t0 = time.time()
        try:  # generous: a loaded 2-core CI machine runs this tiny job several times slower
            rc = subprocess.run(args, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=1200).returncode
        except subprocess.TimeoutExpired:
            rc = None
    log = log_path.read_text()
    assert rc == 0, f"rerun exit {rc} after {time.time() - t0:.0f} s; its log ends:\n{log[-4000:]}"
    assert "resumed from checkpoint" in log
    assert "none: run driver" in log


@pytest.fixture(scope="module")
def reference_bank(prepared, tmp_path_factory):
    """A baseline checkpoint (random init, seed 0) and the bank built from it without faults: what
    the bank fault tests' builds must equal. (checkpoint path, `FeatureBank`)."""
    import torch

    from lfb_ray.bank import FeatureBank
    from lfb_ray.bank.build import build_bank
    from lfb_ray.models import build_detector, save_checkpoint

    cfg0, _ = prepared
    tmp = tmp_path_factory.mktemp("reference_bank")
    base = tiny_config(tmp, cfg0.data.root, f"data.prepared_dir={cfg0.prepared_dir}", "model.fbo=none")
    torch.manual_seed(0)
    ckpt = str(tmp / "base.pt")
    save_checkpoint(build_detector(base.model).state_dict(), ckpt)
    clean = tiny_config(tmp, cfg0.data.root, f"data.prepared_dir={cfg0.prepared_dir}", f"bank.path={tmp}/clean")
    build_bank(clean, ckpt)
    return ckpt, FeatureBank.open(clean.bank_dir)


def _assert_same_bank(a, b) -> None:
    assert a.num_features == b.num_features and a.videos == b.videos
    for v in a.videos:
        for s in a.seconds_of(v):
            assert np.array_equal(a.features_at(v, s), b.features_at(v, s))


def test_bank_actor_killed_mid_build(prepared, reference_bank, tmp_path):
    """Kill the extractor actor during the build: Ray restarts it, the bank is complete and equal
    to a fault-free build."""
    from lfb_ray.bank import FeatureBank
    from lfb_ray.bank.build import build_bank

    cfg0, _ = prepared
    ckpt, clean = reference_bank
    faulty = tiny_config(tmp_path, cfg0.data.root, f"data.prepared_dir={cfg0.prepared_dir}",
                         f"bank.path={tmp_path}/faulty")
    killed: list[int] = []

    def killer():
        pids = wait_until(lambda: pids_with("BankExtractor"), 300, "a bank actor")
        time.sleep(1.0)
        os.kill(pids[0], signal.SIGKILL)
        killed.append(pids[0])

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    summary = build_bank(faulty, ckpt)
    t.join(timeout=5)
    assert killed
    assert summary.features == clean.num_features
    _assert_same_bank(clean, FeatureBank.open(faulty.bank_dir))


def test_interrupted_bank_build_resumes(prepared, reference_bank, tmp_path):
    """A build stopped after some parts continues with the missing ones and equals a full build."""
    from lfb_ray.bank import FeatureBank
    from lfb_ray.bank.build import build_bank

    cfg0, _ = prepared
    ckpt, full = reference_bank
    cfg = tiny_config(tmp_path, cfg0.data.root, f"data.prepared_dir={cfg0.prepared_dir}", f"bank.path={tmp_path}/b")
    build_bank(cfg, ckpt, max_parts=1)  # "interrupted" after one part
    assert not (Path(cfg.bank_dir) / "build.json").exists()
    s = build_bank(cfg, ckpt)
    assert s.skipped_parts == 1
    _assert_same_bank(full, FeatureBank.open(cfg.bank_dir))


def test_interrupted_prepare_resumes_identical(prepared, tmp_path):
    """SIGKILL `jobs/prepare_data.py` after its first video commits; the rerun completes the rest
    and the shards are byte-identical to a clean run's (the session's `prepared`: the same config)."""
    import hashlib

    cfg0, _ = prepared

    def digest(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted([*root.rglob("*.parquet"), *root.rglob("*.arrow")])}

    cmd = [sys.executable, str(REPO / "jobs" / "prepare_data.py"), "--config", str(REPO / "configs" / "tiny.yaml"),
           f"workdir={tmp_path / 'a'}", f"data.root={cfg0.data.root}"]
    p = subprocess.Popen(cmd, cwd=REPO, stdout=open(tmp_path / "job_a.log", "w"), stderr=subprocess.STDOUT,
                         start_new_session=True)
    try:
        wait_until(lambda: list((tmp_path / "a" / "prepared").rglob("_DONE.json")), 600, "a committed video")
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    committed = len(list((tmp_path / "a" / "prepared").rglob("_DONE.json")))
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    # Ray workers outlive the killed driver for a moment, so more videos may have committed since.
    done = int(re.search(r"prepare: 3 videos \((\d) already done\)", out.stdout).group(1))
    assert committed >= 1 and done >= committed  # resumed: committed videos were not redone
    assert digest(tmp_path / "a" / "prepared") == digest(Path(cfg0.prepared_dir))


def test_tracking_server_down_does_not_stop_training(prepared, tmp_path):
    """The MLflow server dies after the run was created: training completes and warns, no crash."""

    from lfb_ray.train import fit

    cfg0, _ = prepared
    server = start_mlflow_server(tmp_path / "mlflow_server")
    try:
        cfg = tiny_config(tmp_path, cfg0.data.root, f"data.prepared_dir={cfg0.prepared_dir}", "model.fbo=none",
                          "train.epochs=2", f"tracking.tracking_uri={server.uri}", "train.run_name=nosrv")

        def stop_server():
            wait_until(lambda: _checkpoints(cfg.storage_path, "nosrv"), 300, "the first checkpoint")
            os.killpg(server.proc.pid, signal.SIGKILL)

        t = threading.Thread(target=stop_server, daemon=True)
        t.start()
        r = fit(cfg)
        t.join(timeout=5)
        assert r.metrics["epoch"] == 2 and r.model_path and os.path.exists(r.model_path)
    finally:
        if server.proc.poll() is None:
            os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait()


def test_prepare_worker_killed_mid_video_is_retried_identical(tmp_path, ray_local):
    """SIGKILL the Ray Data worker process while it is writing a video's frame store (its temporary
    file exists): Ray retries the task, the video is prepared again from scratch, no video is in
    failures.json and every shard is byte-identical to a clean run's."""
    import hashlib

    from lfb_ray.data.prep import prepare_dataset
    from lfb_ray.synthetic import generate_dataset

    root = tmp_path / "data"
    generate_dataset(root, num_videos=3, seconds=40, seed=5, workers=1)  # long enough to be caught mid-write

    def digest(d: Path) -> dict[str, str]:
        return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted([*d.rglob("*.parquet"), *d.rglob("*.arrow")])}

    clean = tiny_config(tmp_path / "clean", root)
    prepare_dataset(clean)
    faulty = tiny_config(tmp_path / "faulty", root)
    out = Path(faulty.prepared_dir)
    killed: list[int] = []

    def killer():
        wait_until(lambda: list(out.rglob("frames.arrow.tmp-*")), 300, "a frame store being written")
        pids = pids_with("_prepare_batch")
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    summary = prepare_dataset(faulty)
    t.join(timeout=5)
    assert killed, "the fault was never injected"
    assert not summary.failures and json.loads((out / "failures.json").read_text()) == []
    assert summary.videos == 3
    assert digest(out) == digest(Path(clean.prepared_dir))
    assert not list(out.rglob("*.tmp-*"))
