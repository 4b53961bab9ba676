"""Ray clusters started with the `ray` CLI (`ray start --block`), as a user or a cloud would start them.

They are separate from the session's in-process `ray_local` cluster: own ports, own temp dirs, own
auth token (a file given with RAY_AUTH_TOKEN_PATH, so ~/.ray/auth_token is neither read nor
written). Each node runs with `--block` in a new session and is stopped by terminating its process
tree, never with `ray stop`, which would stop every Ray cluster on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.helpers.processes import VENV_BIN, free_port, stop_tree, wait_until

REPO = Path(__file__).resolve().parents[2]
# `ray job submit --working-dir REPO` uploads the checkout without these.
UPLOAD_EXCLUDES = ["/.venv/", "/.git/", "/data/", "/runs/", "/mlruns/", "/.pytest_cache/", "/.ruff_cache/",
                   "*.egg-info/"]


class RayCLICluster:
    """Ray nodes started with `ray start --block` from the venv, token auth on, loopback only."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.token_path = tmp / "auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        self.nodes: list[tuple[subprocess.Popen, str, Path]] = []  # (process, temp dir, log)
        self.gcs_port = self.dashboard_port = None

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE"))}
        env.update(PATH=VENV_BIN + os.pathsep + env.get("PATH", ""), RAY_AUTH_MODE="token",
                   RAY_AUTH_TOKEN_PATH=str(self.token_path), RAY_USAGE_STATS_ENABLED="0",
                   RAY_DATA_DISABLE_PROGRESS_BARS="1")
        return env

    def _start(self, args: list[str], num_cpus: int, resources: dict | None, env: dict[str, str]) -> None:
        # A short temp dir per node: Unix socket paths must stay under 107 characters.
        temp_dir = tempfile.mkdtemp(prefix="lfbit", dir="/tmp")
        log = self.tmp / f"node{len(self.nodes)}.log"
        cmd = ["ray", "start", "--block", *args, f"--num-cpus={num_cpus}", "--num-gpus=0",
               f"--temp-dir={temp_dir}", "--disable-usage-stats",
               f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
               f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
               f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
               "--object-store-memory=300000000"]
        if resources:
            cmd.append(f"--resources={json.dumps(resources)}")
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True, cwd=self.tmp)
        self.nodes.append((proc, temp_dir, log))

    def _start_with_retry(self, start) -> None:
        """Run `start()` (which starts a node and waits for it), once more when `ray start` itself
        gave up: on a busy 2-core machine its ~30 s startup deadline ("The current node timed out
        during startup") was seen to expire."""
        for attempt in (1, 2):
            n = len(self.nodes)
            try:
                start()
                return
            except pytest.fail.Exception:
                proc, _, log = self.nodes[-1]
                again = attempt == 1 and proc.poll() is not None and "timed out during startup" in log.read_text()
                # A node that did not start is no node of the cluster (its `ray start` log stays in tmp).
                for proc, temp_dir, _ in self.nodes[n:]:
                    stop_tree(proc, marker=temp_dir)
                    shutil.rmtree(temp_dir, ignore_errors=True)
                del self.nodes[n:]
                if not again:
                    raise

    def _start_head_node(self, num_cpus: int, resources: dict | None, env: dict[str, str],
                         extra_args=lambda gcs_port: []) -> None:
        """Start the head (`extra_args(gcs_port)`: more `ray start` options) and wait for its dashboard."""
        def start():
            self.gcs_port, self.dashboard_port = free_port(), free_port()
            self._start(["--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                         f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}",
                         *extra_args(self.gcs_port)], num_cpus, resources, env)
            proc, _, log = self.nodes[-1]
            wait_until(lambda: self.api("/api/version"), 120, "Ray head (dashboard)", proc, log)
            self.wait_for_nodes(1)

        self._start_with_retry(start)

    def start_head(self, num_cpus: int, resources: dict | None = None, loopback_only: bool = True) -> None:
        """Start the head node; with `loopback_only` it advertises (and its GCS listens on) 127.0.0.1.

        `ray start --node-ip-address=127.0.0.1` is rewritten to the machine's address
        (services.resolve_ip_for_localhost); RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray keep the
        loopback address, as on a laptop. It also forbids adding nodes: multi-node clusters use
        the machine's own address (Ray's gRPC servers listen on all interfaces, behind the token).
        """
        env = self.env()
        if loopback_only:
            env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        self._start_head_node(num_cpus, resources, env)

    def start_autoscaling_head(self, num_cpus: int, autoscaler_config, env: dict[str, str] | None = None) -> str:
        """Start a head whose autoscaler is Ray's fake multi-node provider (`RAY_FAKE_CLUSTER=1`): the
        nodes it adds are raylets on this machine that join over the machine's address.
        `autoscaler_config(gcs_address)` gives the cluster config; `env` is added to the head's
        environment (the monitor, hence the provider, inherits it). Returns the GCS address."""
        import ray._private.services as services

        ip = services.get_node_ip_address()
        config_path = self.tmp / "autoscaler.json"
        head_env = {**self.env(), "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", **(env or {})}

        def extra_args(gcs_port: int) -> list[str]:
            config_path.write_text(json.dumps(autoscaler_config(f"{ip}:{gcs_port}")))
            return [f"--autoscaling-config={config_path}"]

        self._start_head_node(num_cpus, None, head_env, extra_args)
        return f"{ip}:{self.gcs_port}"

    def add_node(self, num_cpus: int, resources: dict | None = None) -> None:
        """Start a worker node and wait until it is alive."""
        def start():
            self._start([f"--address=127.0.0.1:{self.gcs_port}"], num_cpus, resources, self.env())
            self.wait_for_nodes(len(self.nodes))

        self._start_with_retry(start)

    def api(self, path: str, token: bool = True) -> dict:
        import urllib.request

        req = urllib.request.Request(self.dashboard + path)
        if token:
            req.add_header("Authorization", f"Bearer {self.token_path.read_text().strip()}")
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def nodes_detail(self) -> list[dict]:
        """Every node the cluster knows, alive or dead, with its resources and start time."""
        return self.api("/api/v0/nodes?limit=100&detail=1")["data"]["result"]["result"]

    def alive_nodes(self) -> list[dict]:
        nodes = self.api("/api/v0/nodes?limit=100")["data"]["result"]["result"]
        return [n for n in nodes if n["state"] == "ALIVE"]

    def wait_for_nodes(self, n: int) -> None:
        proc, _, log = self.nodes[-1]
        wait_until(lambda: len(self.alive_nodes()) >= n, 120, f"{n} alive Ray node(s)", proc, log)

    def cli(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["ray", *args], env=self.env(), capture_output=True, text=True, timeout=timeout_s,
                              cwd=self.tmp)

    def submit(self, entrypoint: list[str], submission_id: str, timeout_s: float = 420) -> str:
        """`ray job submit` of the repo as working dir; returns the output, fails on a non-zero exit."""
        args = ["job", "submit", "--address", self.dashboard, "--submission-id", submission_id,
                "--working-dir", str(REPO), "--runtime-env-json", json.dumps({"excludes": UPLOAD_EXCLUDES}),
                "--", *entrypoint]
        try:
            res = self.cli(*args, timeout_s=timeout_s)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"ray job submit timed out after {timeout_s} s:\n{(e.stdout or '')[-4000:]}")
        out = res.stdout + res.stderr
        (self.tmp / f"{submission_id}.log").write_text(out)
        assert res.returncode == 0, f"ray job submit exited {res.returncode}:\n{out[-6000:]}"
        return out

    def keep_logs(self, dest: Path, *more_temp_dirs: str) -> None:
        """Copy the nodes' session logs (drivers, raylets, autoscaler, runtime-env agents) to `dest`
        before `stop` removes their temp dirs (pytest keeps tmp_path for a failure's post-mortem).
        `more_temp_dirs`: the temp dirs of nodes the autoscaler added, each a folder of node dirs."""
        groups = {"head": [Path(t) for _, t, _ in self.nodes],
                  "added": [d for t in more_temp_dirs for d in Path(t).glob("n*")]}
        for group, dirs in groups.items():
            for p in (p for d in dirs for p in d.glob("session_2*/logs/*")):  # not the session_latest link
                if p.is_file() and p.suffix in (".log", ".err", ".out") and p.stat().st_size < 50_000_000:
                    (dest / group).mkdir(parents=True, exist_ok=True)
                    shutil.copy(p, dest / group / p.name)

    def stop_node(self, i: int) -> None:
        """Stop node `i` (its whole process tree), as a machine that goes away; the others run on."""
        proc, temp_dir, _ = self.nodes.pop(i)
        stop_tree(proc, marker=temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)

    def stop(self) -> None:
        for proc, temp_dir, _ in reversed(self.nodes):
            stop_tree(proc, marker=temp_dir)
        for _, temp_dir, _ in self.nodes:
            shutil.rmtree(temp_dir, ignore_errors=True)
        self.nodes.clear()


def fake_autoscaler_config(name: str, provider: dict, node_types: dict, *, max_workers: int,
                           upscaling_speed: float, idle_timeout_minutes: float) -> dict:
    """A cluster config for Ray's fake multi-node provider (the fields of Ray's
    fake_multi_node/example.yaml); `node_types` must hold `ray.head.default`."""
    return {
        "cluster_name": name, "max_workers": max_workers, "upscaling_speed": upscaling_speed,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {"use_node_id_as_ip": True, "disable_node_updaters": True, "disable_launch_config_check": True,
                     "launch_multiple": True,  # "Launching 2 nodes" starts 2 (without it: 1 per launch)
                     **provider},
        "available_node_types": node_types,
        "head_node_type": "ray.head.default",
        "auth": {}, "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }
