"""Shared fixtures: a tiny synthetic AVA dataset, tiny configs, and a local Ray cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# The job scripts (run in subprocesses by some tests) import the installed package. This checkout goes
# first on their path, so they test this tree's code even if the venv's editable install is another one's.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """3 videos x 16 s, 160x120 (2 train, 1 val): ~14 keyframes per video."""
    from lfb_ray.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("synthetic")
    generate_dataset(root, num_videos=3, seconds=16, seed=0, workers=1)
    return root


def tiny_config(workdir: Path, data_root: Path, *overrides: str):
    from lfb_ray.config import load_config

    return load_config(REPO / "configs" / "tiny.yaml",
                       [f"workdir={workdir}", f"data.root={data_root}", *overrides])


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster for the session: 2 CPUs, loopback only, no dashboard."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR",
             configure_logging=True, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, synthetic_root, ray_local):
    """The tiny synthetic set prepared once for the session (Ray Data)."""
    from lfb_ray.data.prep import prepare_dataset

    work = tmp_path_factory.mktemp("work")
    cfg = tiny_config(work, synthetic_root)
    summary = prepare_dataset(cfg)
    return cfg, summary


@pytest.fixture(autouse=True)
def _isolated_mlflow_env():
    """No test inherits another's tracking URI (mlflow.set_tracking_uri writes os.environ)."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


# The synthetic set's files under the names the AVA configs (configs/baseline.yaml, configs/lfb_*.yaml)
# expect: an AVA-layout miniature on which those configs run as written, with only data.root changed.
AVA_NAMES = {
    "train.csv": "ava_train_v2.1.csv",
    "val.csv": "ava_val_v2.1.csv",
    "train_excluded_timestamps.csv": "ava_train_excluded_timestamps_v2.1.csv",
    "val_excluded_timestamps.csv": "ava_val_excluded_timestamps_v2.1.csv",
    "label_map.pbtxt": "ava_action_list_v2.1_for_activitynet_2018.pbtxt",
    "train_proposals.pkl": "ava_dense_proposals_train.FAIR.recall_93.9.pkl",
    "val_proposals.pkl": "ava_dense_proposals_val.FAIR.recall_93.9.pkl",
}


@pytest.fixture(scope="session")
def ava_layout(synthetic_root, tmp_path_factory) -> Path:
    """`synthetic_root` copied into AVA's layout and file names (`data/ava` of docs/ava.md)."""
    import shutil

    root = tmp_path_factory.mktemp("ava")
    (root / "annotations").mkdir()
    for ours, ava in AVA_NAMES.items():
        shutil.copy2(synthetic_root / "annotations" / ours, root / "annotations" / ava)
    shutil.copytree(synthetic_root / "videos", root / "videos")
    for extra in ("dataset.json",):
        if (synthetic_root / extra).exists():
            shutil.copy2(synthetic_root / extra, root / extra)
    return root


# Servers and clusters some tests start (tests/helpers/): each is started only by the tests that ask for it.


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` with a SQLite store and artifacts proxied to a local folder; yields its URI.
    One per module: its tests use experiments of their own."""
    from tests.helpers.mlflow_server import running_mlflow_server

    tmp = tmp_path_factory.mktemp("mlflow_server")
    with running_mlflow_server(tmp, str(tmp / "artifacts")) as server:
        yield server.uri


@pytest.fixture
def s3(monkeypatch):
    """moto's S3 server on 127.0.0.1 with bucket `lfb-it`; yields a `tests.helpers.s3_server.S3Server`."""
    from tests.helpers.s3_server import moto_s3

    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask an instance-metadata address
    with moto_s3("lfb-it") as server:
        yield server


@pytest.fixture
def mlflow_server_s3(tmp_path, s3):
    """`mlflow server` whose artifact store is moto's S3 (`s3://lfb-it/mlartifacts`, proxied: clients
    log through the server and need no S3 credentials); yields its URI."""
    from tests.helpers.mlflow_server import running_mlflow_server
    from tests.helpers.s3_server import client_env

    with running_mlflow_server(tmp_path / "mlflow_server", f"s3://{s3.bucket}/mlartifacts", client_env(s3)) as server:
        yield server.uri


@pytest.fixture
def ray_cli_cluster(tmp_path):
    """A `tests.helpers.ray_cli.RayCLICluster` with no node yet; every node it starts is stopped after."""
    from tests.helpers.ray_cli import RayCLICluster

    cluster = RayCLICluster(tmp_path)
    try:
        yield cluster
    finally:
        cluster.stop()
