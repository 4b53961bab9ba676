"""Start-up polling, free ports and process-tree shutdown for the servers and clusters tests start."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

VENV_BIN = str(Path(sys.executable).parent)


def free_port() -> int:
    """A port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout_s: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Poll `check()` until it returns a truthy value and return that value; fail the test (with the
    tail of `log`) on timeout or when `proc` exits. Errors a starting service gives (refused
    connection, half-written file) count as "not yet"."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        try:
            value = check()
            if value:
                return value
        except (OSError, urllib.error.URLError, ValueError):
            pass
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    pytest.fail(f"{what} not ready after {timeout_s:.0f} s (exit code {proc.poll() if proc else None}):\n{tail}")


def http_ok(url: str) -> bool:
    """True when `url` answers 200 within 2 s."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError, ValueError):
        return False


def stop_tree(proc: subprocess.Popen, marker: str | None = None, grace_s: float = 15.0) -> None:
    """Terminate `proc` and all its descendants (and stray processes whose command line holds
    `marker`, a temp dir unique to the test), then kill what is left. Only processes the test
    started: never `ray stop`, which stops every Ray cluster on the machine."""
    import importlib

    importlib.import_module("ray")  # puts Ray's vendored psutil on sys.path
    import psutil

    procs: dict[int, psutil.Process] = {}
    try:
        root = psutil.Process(proc.pid)
        procs[root.pid] = root
        procs.update({c.pid: c for c in root.children(recursive=True)})
    except psutil.NoSuchProcess:
        pass
    if marker:
        for p in psutil.process_iter(["cmdline"]):
            try:
                if p.pid != os.getpid() and any(marker in a for a in (p.info["cmdline"] or [])):
                    procs.setdefault(p.pid, p)
                    procs.update({c.pid: c for c in p.children(recursive=True)})
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
    for p in procs.values():
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
