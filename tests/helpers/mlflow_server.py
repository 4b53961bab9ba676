"""A real `mlflow server` on a free loopback port, with a SQLite store in a test's folder."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from tests.helpers.processes import free_port, http_ok, stop_tree, wait_until


class MlflowServer(NamedTuple):
    proc: subprocess.Popen  # leader of its own process group: tests SIGKILL/SIGSTOP the group (it forks workers)
    uri: str  # http://127.0.0.1:PORT
    log: Path


def start_mlflow_server(tmp: Path, artifacts_destination: str | None = None,
                        env: dict[str, str] | None = None) -> MlflowServer:
    """Start `mlflow server` and wait until it answers `/health`.

    With `artifacts_destination` (a folder, or `s3://...` with `env` giving the server S3 access) the
    server proxies artifacts to it and clients need no access of their own; without it, clients write
    artifacts straight to `tmp/artifacts` (`--default-artifact-root`), so they still can after the
    server is killed. The server's files (store, log) stay in `tmp`, its working directory."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = tmp / "mlflow_server.log"
    artifacts = (["--artifacts-destination", artifacts_destination] if artifacts_destination
                 else ["--default-artifact-root", str(tmp / "artifacts")])
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db", *artifacts, "--workers", "1"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp,
                                env={**os.environ, **(env or {})})
    server = MlflowServer(proc, f"http://127.0.0.1:{port}", log)
    try:
        wait_until(lambda: http_ok(f"{server.uri}/health"), 300, "mlflow server", proc, log)
    except BaseException:
        stop_tree(proc)
        raise
    return server


@contextlib.contextmanager
def running_mlflow_server(tmp: Path, artifacts_destination: str | None = None,
                          env: dict[str, str] | None = None) -> Iterator[MlflowServer]:
    """`start_mlflow_server` for the duration of a `with` block; its whole process tree stops after."""
    server = start_mlflow_server(tmp, artifacts_destination, env)
    try:
        yield server
    finally:
        stop_tree(server.proc)
