"""Job start-up (`lfb_ray.cli.init_ray`): the job's runtime env is composed with, never re-declared; a
stale Ray address file is ignored; an unreachable RAY_ADDRESS fails fast with an error naming it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(os.environ.get("LFB_TEST_REPO") or Path(__file__).resolve().parents[1])
# What a job does first: jobs/*.py call init_ray() right after parsing the config.
START = ("import time, ray; t = time.time(); from lfb_ray.cli import init_ray; init_ray(); "
         "print('STARTED', ray.get(ray.remote(lambda: 1 + 1).remote()), len(ray.nodes()), "
         "f'{time.time() - t:.1f}', flush=True)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_JOB_CONFIG"))}
    env.update(PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


def test_driver_adds_only_what_the_job_runtime_env_lacks(monkeypatch):
    from lfb_ray.cli import driver_runtime_env, job_runtime_env

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("PYTHONPATH", "/code")
    # What `ray job submit --runtime-env-json '{"env_vars": {"MLFLOW_TRACKING_URI": ...}}'` hands the driver.
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip", "env_vars": {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}},
         "metadata": {}}))
    assert job_runtime_env()["env_vars"] == {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}
    assert driver_runtime_env() == {"env_vars": {"PYTHONPATH": "/code"}}
    # The merge Ray does at ray.init accepts it (it refuses a key given twice).
    from ray.runtime_env.runtime_env import _merge_runtime_env

    assert _merge_runtime_env(job_runtime_env(), driver_runtime_env()) is not None
    assert _merge_runtime_env(job_runtime_env(), {"env_vars": {"MLFLOW_TRACKING_URI": "x"}}) is None
    # Not a submitted job: the driver forwards both.
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert driver_runtime_env() == {"env_vars": {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "PYTHONPATH": "/code"}}
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.delenv("PYTHONPATH")
    assert driver_runtime_env() == {}


def test_unreachable_ray_address_fails_fast_naming_it():
    port = _free_port()  # nothing listens there
    t0 = time.time()
    res = subprocess.run([sys.executable, "-c", START], env=_env(RAY_ADDRESS=f"127.0.0.1:{port}",
                                                                 LFB_RAY_CONNECT_TIMEOUT_S="3"),
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    elapsed = time.time() - t0
    assert res.returncode != 0 and "STARTED" not in res.stdout
    assert f"RAY_ADDRESS=127.0.0.1:{port}" in res.stderr and "ray start --head" in res.stderr, res.stderr
    assert "after 3 s" in res.stderr and elapsed < 30


@pytest.mark.ray
def test_stale_address_file_does_not_hang_a_job(tmp_path):
    """A `ray_current_cluster` file left by a crashed `ray start` (Ray reads it from
    `<RAY_TMPDIR or /tmp>/ray/ray_current_cluster`) names a GCS that is gone: a plain `ray.init()`
    waits for it forever. The job must start its own local cluster at once instead."""
    # A short private temp root (Unix socket paths < 108 chars) instead of the machine's /tmp/ray.
    root = Path(tempfile.mkdtemp(prefix="lfbst", dir="/tmp"))
    try:
        (root / "ray").mkdir()
        stale = f"127.0.0.1:{_free_port()}"
        (root / "ray" / "ray_current_cluster").write_text(stale)
        t0 = time.time()
        try:
            res = subprocess.run([sys.executable, "-c", START], env=_env(RAY_TMPDIR=str(root)),
                                 capture_output=True, text=True, timeout=90, cwd=tmp_path)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"init_ray() still waiting after 90 s with a stale address file ({stale}):\n"
                        f"{(e.stderr or b'')[-3000:]!r}")
        assert res.returncode == 0, res.stdout + res.stderr
        line = next(x for x in res.stdout.splitlines() if x.startswith("STARTED"))
        _, two, nodes, _ = line.split()
        assert two == "2" and nodes == "1"
        assert time.time() - t0 < 90
        assert (root / "ray" / "ray_current_cluster").read_text() == stale  # not touched, not used
    finally:
        shutil.rmtree(root, ignore_errors=True)
