"""The rehearsal (issue 31): docs/cluster.md's AVA pipeline submission, run as written on a miniature.

What is taken from the doc (tests/doc_commands.py parses it, so the doc and this test cannot drift):
the pipeline command of "One storage root, and the checks before any work" (`jobs/pipeline.py
--config configs/lfb_nl.yaml --baseline-config configs/baseline.yaml`), its three storage-root
overrides, the smoke overrides of "Trying a config before paying for GPUs" (and the `--operators`
that smoke command gives, if it gives one; else jobs/pipeline.py's default nl,avg,max), and the
options of "Submit, watch, resume" (`--submission-id`, `--working-dir .`, the runtime-env
JSON). What is substituted: the S3 address (moto's server, credentials and endpoint in the URI; the
doc's bucket names are kept), `data.root` (the miniature, a local path as the doc says), the MLflow
address in the runtime env's MLFLOW_TRACKING_URI, a new `--submission-id` for the resubmission (as
the doc says) and `--no-wait` (the test polls the job instead of following its logs).

The data is an AVA-format miniature: AVA's file names (CSV, pbtxt, pkl) and 456x256 mp4 videos
(the synthetic generator). The Kinetics checkpoint is a randomly initialised R50 backbone saved in
mmaction2's format at the documented key. The cluster scales from zero like
configs/cluster/cluster.yaml: Ray's fake multi-node autoscaler, a head with 0 CPUs, one CPU worker
node type with `min_workers: 0` that the autoscaler adds once the job asks for CPUs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import pytest
from conftest import AVA_NAMES, REPO
from doc_commands import pipeline_commands, storage_table, user_submit

from tests.helpers.processes import stop_tree
from tests.helpers.ray_cli import RayCLICluster, fake_autoscaler_config

KINETICS_KEY = "checkpoints/slowonly_r50_4x16x1_256e_kinetics400_rgb.pth"
WORKER_CPUS = 2


# --------------------------------------------------------------------------------------------
# The commands, from the doc (fast)


def test_the_rehearsed_commands_are_the_docs():
    """The pipeline command, its storage-root overrides, the smoke overrides and the submission
    options that the rehearsal runs are the doc's; the doc's smoke overrides are
    `lfb_ray.preflight.SMOKE_OVERRIDES` (the set the preflight's error messages name)."""
    from lfb_ray.config import load_config
    from lfb_ray.preflight import SMOKE_OVERRIDES

    cmds = pipeline_commands()
    assert cmds.argv[:2] == ["python", "jobs/pipeline.py"]
    for flag in ("--config", "--baseline-config"):
        assert (REPO / cmds.argv[cmds.argv.index(flag) + 1]).is_file()
    keys = [o.split("=", 1)[0] for o in cmds.storage_overrides]
    assert keys == ["workdir", "data.root", "model.pretrained"]
    assert [o.split("=", 1)[0] for o in storage_table()] == keys  # the section's table names the same three
    assert cmds.storage_overrides[2].endswith("/" + KINETICS_KEY)
    assert set(cmds.smoke_flags) <= {"--operators", *cmds.smoke_flags[1::2]}, cmds.smoke_flags  # flags it may add
    assert cmds.smoke_overrides == list(SMOKE_OVERRIDES), (
        "docs/cluster.md's smoke command and lfb_ray.preflight.SMOKE_OVERRIDES differ: "
        f"doc {cmds.smoke_overrides}, code {list(SMOKE_OVERRIDES)}")
    sub = user_submit()
    assert sub.option("--working-dir") == "." and sub.option("--submission-id")
    assert set(sub.runtime_env["env_vars"]) == {"MLFLOW_TRACKING_URI"}
    config = REPO / cmds.argv[cmds.argv.index("--config") + 1]
    load_config(config, [*cmds.storage_overrides, *cmds.smoke_overrides])  # all keys exist, all values parse


# --------------------------------------------------------------------------------------------
# The rehearsal (slow)


def _moto(uri: str, port: int) -> str:
    """`s3://bucket/key` of the doc as a URI of moto's server: the address (and credentials) only."""
    assert uri.startswith("s3://"), uri
    return f"s3://testing:testing@{uri[5:]}?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"


def _ava_miniature(tmp: Path) -> Path:
    """The synthetic generator's set at 456x256 under AVA's layout and file names."""
    from lfb_ray.synthetic import generate_dataset

    gen, root = tmp / "generated", tmp / "ava"
    generate_dataset(gen, num_videos=3, seconds=10, seed=0, width=456, height=256, workers=1)
    (root / "annotations").mkdir(parents=True)
    for ours, ava in AVA_NAMES.items():
        shutil.copy2(gen / "annotations" / ours, root / "annotations" / ava)
    shutil.copytree(gen / "videos", root / "videos")
    shutil.rmtree(gen)
    return root


def _kinetics_checkpoint(config: Path) -> bytes:
    """A Kinetics checkpoint in mmaction2's format for the config's backbone: `backbone.*` (randomly
    initialised) and a 400-class `cls_head.fc_cls`, as `{"state_dict": ...}`."""
    import io

    import torch

    from lfb_ray.config import load_config
    from lfb_ray.models.checkpoint import to_mmaction2_state_dict
    from lfb_ray.models.detector import build_detector

    cfg = load_config(config, ["model.fbo=none"])
    sd = {k: v for k, v in to_mmaction2_state_dict(build_detector(cfg.model)).items() if k.startswith("backbone.")}
    sd["cls_head.fc_cls.weight"] = torch.zeros(400, 2048)
    sd["cls_head.fc_cls.bias"] = torch.zeros(400)
    buf = io.BytesIO()
    torch.save({"state_dict": sd, "meta": {"note": "lfb_ray rehearsal: random init"}}, buf)
    return buf.getvalue()


# Ray's fake multi-node provider starts each node it adds in the head's temp dir, so the nodes share
# one session directory and one runtime-env cache (`runtime_resources/`). Ray's working_dir plugin
# unpacks a job's package with `overwrite=True` (ray/_private/runtime_env/working_dir.py, `create`):
# the first task of the job on the added node removes and re-unpacks the directory that the job's
# driver on the head runs in, and the driver's `os.getcwd()` fails (FileNotFoundError). Machines of a
# real cluster do not share that directory. This provider is the fake one with one change: each node
# it adds gets a temp dir of its own (under the head's, so the cluster's shutdown finds its processes).
PROVIDER = r"""
import os

import ray._private.parameter as parameter
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider


class SeparateTempDirProvider(FakeMultiNodeProvider):
    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        base = parameter.RayParams
        temp_dir = os.path.join(os.environ["LFB_REHEARSAL_NODE_DIRS"], f"n{len(self._nodes)}")

        class Params(base):
            def __init__(self, *args, **kwargs):
                kwargs.setdefault("temp_dir", temp_dir)
                super().__init__(*args, **kwargs)

        parameter.RayParams = Params  # looked up by the fake provider at each call
        try:
            super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
        finally:
            parameter.RayParams = base
"""


def _autoscaler_config(gcs_address: str) -> dict:
    """Ray's fake multi-node provider, shaped like configs/cluster/cluster.yaml: a head that takes no
    work (0 CPUs) and a CPU worker type that scales from 0."""
    return fake_autoscaler_config(
        "lfb-rehearsal", max_workers=1, upscaling_speed=1.0,
        idle_timeout_minutes=10,  # not between two stages: the nodes stay up for the whole pipeline
        provider={"type": "external", "module": "lfb_rehearsal_provider.SeparateTempDirProvider",
                  "gcs_address": gcs_address},
        node_types={
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu_worker": {"resources": {"CPU": WORKER_CPUS, "object_store_memory": 300_000_000}, "node_config": {},
                           "min_workers": 0, "max_workers": 1},
        })


def _start_scale_from_zero_cluster(c: RayCLICluster, tmp: Path, node_dirs: str) -> None:
    """The head with the autoscaler of `_autoscaler_config`, whose provider (`PROVIDER`) adds each
    node under `node_dirs`."""
    (tmp / "provider").mkdir(exist_ok=True)
    (tmp / "provider" / "lfb_rehearsal_provider.py").write_text(PROVIDER)
    pythonpath = os.pathsep.join(p for p in (str(tmp / "provider"), c.env().get("PYTHONPATH")) if p)
    c.start_autoscaling_head(0, _autoscaler_config, env={"LFB_REHEARSAL_NODE_DIRS": node_dirs,
                                                         "PYTHONPATH": pythonpath})


def _submit(c: RayCLICluster, args: list[str], cwd: Path, timeout_s: float) -> tuple[str, str, float]:
    """`ray job submit ... --no-wait` from `cwd` (`--working-dir .` is that directory); wait for the
    job to end. Returns (submission id, its logs, seconds from submission to the end)."""
    env = {**c.env(), "RAY_ADDRESS": c.dashboard}  # as the doc: `export RAY_ADDRESS=...`
    t0 = time.time()
    res = subprocess.run(["ray", *args], env=env, capture_output=True, text=True, timeout=180, cwd=cwd)
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"ray job submit exited {res.returncode}:\n{out[-4000:]}"
    sid = re.search(r"Job '([^']+)' submitted successfully", out).group(1)
    deadline = time.time() + timeout_s
    while (status := c.api(f"/api/jobs/{sid}")["status"]) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        if time.time() > deadline:
            c.cli("job", "stop", "--address", c.dashboard, sid)
            break
        time.sleep(2)
    seconds = time.time() - t0
    logs = c.cli("job", "logs", "--address", c.dashboard, sid, timeout_s=120)
    text = logs.stdout + logs.stderr
    (c.tmp / f"{sid}.log").write_text(text)
    assert status == "SUCCEEDED", f"job {sid} ended {status} after {seconds:.0f} s:\n{text[-8000:]}"
    return sid, text, seconds


def _package_dir(c: RayCLICluster, sid: str) -> Path:
    """The head's unpacked `--working-dir` package of job `sid`: its driver's working directory."""
    uri = c.api(f"/api/jobs/{sid}")["runtime_env"]["working_dir"]  # gcs://_ray_pkg_<content hash>.zip
    name = uri.rsplit("/", 1)[1].removesuffix(".zip")
    unpacked = [p for p in Path(c.nodes[0][1]).glob("session_2*/runtime_resources/working_dir_files/_ray_pkg_*")
                if p.is_dir()]
    found = [p for p in unpacked if p.name == name]
    assert len(found) == 1, f"job {sid}'s package {uri} is not unpacked on the head once: {unpacked}"
    return found[0]


def _written_in(pkg: Path, source: Path) -> list[str]:
    """Files in an unpacked package that the source directory's upload did not contain (bytecode
    caches aside: Python writes those when it imports the package's modules)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=source,
                            capture_output=True, text=True)
    uploaded = set(listed.stdout.splitlines()) if listed.returncode == 0 else {
        str(p.relative_to(source)) for p in source.rglob("*") if p.is_file()}
    return sorted(rel for p in pkg.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                  and (rel := str(p.relative_to(pkg))) not in uploaded)


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


@pytest.mark.ray
@pytest.mark.slow
def test_the_rehearsal(s3, mlflow_server_s3, tmp_path):
    from mlflow.tracking import MlflowClient

    from lfb_ray.pipeline import STAGES

    t_start = time.time()
    port = s3.port
    cmds = pipeline_commands()
    sub = user_submit()

    # The substitutions: the S3 address (the doc's buckets, on moto's server), data.root, MLflow.
    data_root = _ava_miniature(tmp_path)
    overrides = []
    for o in cmds.storage_overrides:
        key, value = o.split("=", 1)
        overrides.append(f"{key}={data_root}" if key == "data.root" else f"{key}={_moto(value, port)}")
    workdir = cmds.storage_overrides[0].split("=", 1)[1]  # s3://lfb-ray-runs/ava
    bucket, prefix = urllib.parse.urlparse(workdir).netloc, urllib.parse.urlparse(workdir).path.strip("/") + "/"
    pretrained = urllib.parse.urlparse(cmds.storage_overrides[2].split("=", 1)[1])
    for b in {bucket, pretrained.netloc}:
        s3.client.create_bucket(Bucket=b)
    config = REPO / cmds.argv[cmds.argv.index("--config") + 1]
    s3.client.put_object(Bucket=pretrained.netloc, Key=pretrained.path.lstrip("/"), Body=_kinetics_checkpoint(config))
    entry = [*cmds.argv, *cmds.smoke_flags, *overrides, *cmds.smoke_overrides]
    # The operators the command trains: its `--operators`, else jobs/pipeline.py's default.
    operators = (entry[entry.index("--operators") + 1] if "--operators" in entry else "nl,avg,max").split(",")
    trained_ops = sorted(["none", *operators])  # the baseline too

    opts = list(sub.options)
    env = sub.runtime_env
    env["env_vars"] = {k: mlflow_server_s3 for k in env["env_vars"]}  # MLFLOW_TRACKING_URI: the test's server
    opts[opts.index("--runtime-env-json") + 1] = json.dumps(env)
    args = ["job", "submit", "--no-wait", *opts, "--", *entry]
    print("\n[rehearsal] ray " + " ".join(args))

    def keys(p: str = prefix) -> list[str]:
        return s3.keys(p, bucket=bucket)

    c = RayCLICluster(tmp_path)
    node_dirs = tempfile.mkdtemp(prefix="lfbnd", dir="/tmp")  # short: Unix socket paths
    try:
        _start_scale_from_zero_cluster(c, tmp_path, node_dirs)
        (head,) = c.nodes_detail()
        assert head["is_head_node"] and head["resources_total"].get("CPU", 0) == 0  # the head takes no work
        t_ready = time.time()
        data_before = _files(data_root)

        # 1. The submission, on a cluster of the head alone.
        t_submit_ms = time.time() * 1000
        sid, logs, job_s = _submit(c, args, REPO, timeout_s=900)
        nodes = c.nodes_detail()
        workers = [n for n in nodes if not n["is_head_node"]]
        assert workers, "no worker node was added"
        assert all(n["start_time_ms"] > t_submit_ms for n in workers), (t_submit_ms, workers)  # scale-from-zero
        assert all(n["resources_total"].get("CPU") == WORKER_CPUS for n in workers)
        for stage in STAGES:
            assert f"[pipeline] {stage}: done" in logs, stage
        assert "up to date, skipped" not in logs

        # Every output is an object in the bucket; nothing in the job's working directory, nothing in the data.
        out = set(keys())
        assert f"{prefix}pipeline.json" in out and f"{prefix}prepared/manifest.json" in out
        assert f"{prefix}bank/build.json" in out
        models = sorted(k for k in out if k.startswith(f"{prefix}ray_results/") and k.endswith("/model.pt"))
        assert len({k.split("/")[2] for k in models}) == len(trained_ops), models  # the baseline and the operators
        assert len([k for k in out if k.startswith(f"{prefix}results/") and k.endswith(".csv")]) == len(trained_ops)
        assert {f"{prefix}comparison/comparison.{x}" for x in ("png", "md", "csv")} <= out
        assert not [k for k in out if ".tmp" in k]
        pkg = _package_dir(c, sid)
        assert _written_in(pkg, REPO) == []
        assert _files(data_root) == data_before

        # MLflow (the runtime env's server) has the runs, their losses and their artifacts (on S3 too).
        client = MlflowClient(mlflow_server_s3)
        exp = client.get_experiment_by_name("lfb_ava21")  # the AVA configs' experiment
        assert exp is not None
        runs = client.search_runs([exp.experiment_id], max_results=100)
        trained = {r.data.tags["lfb_ray.operator"]: r for r in runs if r.data.tags.get("lfb_ray.operator")}
        assert sorted(trained) == trained_ops
        steps = {}
        for op, r in trained.items():
            assert r.info.status == "FINISHED" and "val/mAP" in r.data.metrics, op
            steps[op] = len(client.get_metric_history(r.info.run_id, "train/loss"))
            assert steps[op] >= 1, op
        (parent,) = [r for r in runs if r.data.tags.get("lfb_ray.kind") == "pipeline"]
        assert parent.info.status == "FINISHED"
        assert [r for r in runs if r.data.tags.get("lfb_ray.kind") == "comparison"]
        artifacts = set(s3.keys("mlartifacts/"))
        for r in trained.values():
            path = urllib.parse.urlparse(r.info.artifact_uri).path.strip("/")
            assert f"mlartifacts/{path}/config.yaml" in artifacts
        checkpoints = sorted(k for k in out if k.startswith(f"{prefix}ray_results/"))

        # 2. The same command from another working directory (a copy of the tracked files).
        elsewhere = tmp_path / "elsewhere"
        listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
        for rel in listed.stdout.splitlines():
            if (REPO / rel).is_file():
                (elsewhere / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / rel, elsewhere / rel)
        # One file more than the repository's upload: Ray names a package by its content, so an identical
        # copy would unpack into (run in) the first submission's directory.
        (elsewhere / "SUBMITTED_FROM_A_COPY").write_text("the rehearsal's resubmission\n")
        again = list(args)
        again[again.index("--submission-id") + 1] = f"{sid}-again"  # the doc: a new --submission-id
        sid2, logs2, job2_s = _submit(c, again, elsewhere, timeout_s=240)
        assert logs2.count("up to date, skipped") == len(STAGES), logs2[-4000:]
        assert "running" not in "".join(ln for ln in logs2.splitlines() if ln.startswith("[pipeline]"))
        pkg2 = _package_dir(c, sid2)
        assert pkg2 != pkg  # it ran in another directory
        assert _written_in(pkg2, elsewhere) == []
        # No training step repeated: the same runs, the same losses, the same checkpoints.
        runs2 = client.search_runs([exp.experiment_id], max_results=100)
        trained2 = {r.data.tags["lfb_ray.operator"]: r for r in runs2 if r.data.tags.get("lfb_ray.operator")}
        assert {op: r.info.run_id for op, r in trained2.items()} == {op: r.info.run_id for op, r in trained.items()}
        assert {op: len(client.get_metric_history(r.info.run_id, "train/loss")) for op, r in trained2.items()} == steps
        assert sorted(k for k in keys() if k.startswith(f"{prefix}ray_results/")) == checkpoints
        assert _files(data_root) == data_before

        stage_times = re.search(r"\[pipeline\] stage wall times: (.*)", logs).group(1)
        print(f"[rehearsal] cluster up {t_ready - t_start:.0f} s after the start (miniature, checkpoint, servers); "
              f"pipeline job {job_s:.0f} s ({stage_times}); resubmission {job2_s:.0f} s; "
              f"train/loss steps {steps}; test wall time {time.time() - t_start:.0f} s", file=sys.stderr)
    finally:
        c.keep_logs(tmp_path / "cluster_logs", node_dirs)
        if c.nodes:  # the added nodes' processes (children of the head's monitor), by their temp dir
            stop_tree(c.nodes[0][0], marker=node_dirs)
        c.stop()
        shutil.rmtree(node_dirs, ignore_errors=True)

