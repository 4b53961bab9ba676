"""MLflow run life cycle on the driver: a failed fit ends FAILED, an interrupted one KILLED (never
RUNNING forever); the `--operators` parent run ends with a summary of its children; artifacts go to
the server's store or the workdir, never `<cwd>/mlruns`; a multi-node cluster refuses a node-local store.

The training itself is replaced here (`_fit_run`, `fit_many`): these are the driver's MLflow parts.
tests/test_integration.py runs the real thing against an `mlflow server` through `ray job submit`.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import REPO

from lfb_ray.config import ConfigError, load_config


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module (creating one runs MLflow's migrations: seconds each)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture(autouse=True)
def _store_uri(store, monkeypatch, request):
    monkeypatch.setenv("LFB_TEST_STORE", store)
    monkeypatch.setenv("LFB_TEST_EXPERIMENT", request.node.name)
    # No prepared data here: the runs' input identities (tests/test_run_identity.py) are not under test.
    monkeypatch.setattr("lfb_ray.identity.run_inputs", lambda cfg, init=None: {"prepared": "test"})


def _cfg(tmp_path: Path, *overrides: str):
    import os

    return load_config(REPO / "configs" / "tiny.yaml", [f"workdir={tmp_path / 'work'}", "model.fbo=none",
                                                          f"tracking.tracking_uri={os.environ['LFB_TEST_STORE']}",
                                                          f"tracking.experiment={os.environ['LFB_TEST_EXPERIMENT']}",
                                                          *overrides])


def _runs(cfg) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    return {r.data.tags["lfb_ray.run_name"]: r for r in client.search_runs([exp.experiment_id])}


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """Run from another directory, as a Ray worker does: nothing may land in its `mlruns`."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield cwd
    assert not (cwd / "mlruns").exists(), "artifacts went to <cwd>/mlruns"


@pytest.mark.parametrize("exc,status", [(RuntimeError("worker died"), "FAILED"), (KeyboardInterrupt(), "KILLED"),
                                        (SystemExit(15), "KILLED")])
def test_a_fit_that_raises_ends_its_run(tmp_path, elsewhere, monkeypatch, exc, status):
    from lfb_ray.train import driver

    def boom(cfg, **kw):
        assert _runs(cfg)[kw["name"]].info.status == "RUNNING"
        raise exc

    monkeypatch.setattr(driver, "_fit_run", boom)
    cfg = _cfg(tmp_path)
    with pytest.raises(type(exc)):
        driver.fit(cfg)
    (run,) = _runs(cfg).values()
    assert run.info.status == status
    # The experiment's artifacts live in the workdir (a local store has no server to hold them).
    assert run.info.artifact_uri.startswith((tmp_path / "work" / "mlartifacts").as_uri())

    # The rerun resumes the same MLflow run: RUNNING again while it trains.
    seen = []
    monkeypatch.setattr(driver, "_fit_run", lambda cfg, **kw: seen.append(_runs(cfg)[kw["name"]].info.status)
                        or (_ for _ in ()).throw(RuntimeError("again")))
    with pytest.raises(RuntimeError):
        driver.fit(cfg)
    assert seen == ["RUNNING"] and [r.info.run_id for r in _runs(cfg).values()] == [run.info.run_id]


def _fake_fit_many(fail_after: int | None = None, exc: BaseException | None = None):
    """Stands in for `fit_many`: creates each child under the parent and logs its metrics like a
    finished run; after `fail_after` children, leaves one RUNNING and raises `exc`."""
    from lfb_ray.tracking import find_or_create_run

    def fake(cfgs, *, parent_run_id=None, **kw):
        from mlflow.tracking import MlflowClient

        out = {}
        for i, (op, c) in enumerate(cfgs.items()):
            rid = find_or_create_run(c.tracking_uri, c.tracking.experiment, f"{op}-run", params={},
                                     parent_run_id=parent_run_id, tags={"lfb_ray.operator": op})
            client = MlflowClient(c.tracking_uri)
            if fail_after is not None and i == fail_after:
                raise exc
            client.log_metric(rid, "val/mAP", 0.1 * (i + 1), step=1)
            client.log_metric(rid, "val_ap/3", 0.5, step=1)
            client.set_terminated(rid, "FINISHED")
            out[op] = rid
        return out

    return fake


def test_operators_parent_run_ends_with_a_summary_of_its_children(tmp_path, elsewhere, monkeypatch):
    from mlflow.tracking import MlflowClient

    from lfb_ray.train import driver

    monkeypatch.setattr(driver, "fit_many", _fake_fit_many())
    cfg = _cfg(tmp_path)
    driver.fit_operators(cfg, ["nl", "avg", "max"])
    runs = _runs(cfg)
    parent = next(r for name, r in runs.items() if name.startswith("operators-nl-avg-max-"))
    assert parent.info.status == "FINISHED" and parent.data.tags["lfb_ray.kind"] == "operators"
    for op in ("nl", "avg", "max"):
        assert runs[f"{op}-run"].data.tags["mlflow.parentRunId"] == parent.info.run_id
    client = MlflowClient(cfg.tracking_uri)
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"summary.csv", "summary.md"}
    rows = list(csv.DictReader(open(client.download_artifacts(parent.info.run_id, "summary.csv", str(tmp_path)))))
    assert [(r["operator"], r["status"], r["val/mAP"]) for r in rows] == [
        ("nl", "FINISHED", "0.1"), ("avg", "FINISHED", "0.2"), ("max", "FINISHED", "0.3")]
    assert "val_ap/3" not in rows[0]  # per-class APs stay in the child runs
    md = Path(client.download_artifacts(parent.info.run_id, "summary.md", str(tmp_path))).read_text()
    assert md.count("\n") == 2 + 3 and "| nl |" in md


@pytest.mark.parametrize("exc,status", [(RuntimeError("avg failed"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_operators_parent_and_running_children_end_when_a_run_fails(tmp_path, elsewhere, monkeypatch, exc, status):
    from mlflow.tracking import MlflowClient

    from lfb_ray.train import driver

    monkeypatch.setattr(driver, "fit_many", _fake_fit_many(fail_after=1, exc=exc))
    cfg = _cfg(tmp_path)
    with pytest.raises(type(exc)):
        driver.fit_operators(cfg, ["nl", "avg", "max"])
    runs = _runs(cfg)
    parent = next(r for name, r in runs.items() if name.startswith("operators-"))
    assert parent.info.status == status
    assert runs["nl-run"].info.status == "FINISHED" and runs["avg-run"].info.status == status
    rows = list(csv.DictReader(open(MlflowClient(cfg.tracking_uri).download_artifacts(
        parent.info.run_id, "summary.csv", str(tmp_path)))))
    assert [(r["operator"], r["status"]) for r in rows] == [("nl", "FINISHED"), ("avg", status)]


def test_server_experiments_keep_the_servers_artifact_store():
    from lfb_ray.tracking import artifact_location, is_node_local

    assert artifact_location("http://127.0.0.1:5000", "/w") is None
    assert artifact_location("sqlite:////w/mlflow.db", "/w") == "file:///w/mlartifacts"
    for uri in ("sqlite:///x.db", "file:///x", "mlruns", "/abs/mlruns", "file:mlruns"):
        assert is_node_local(uri), uri
    for uri in ("http://h:5000", "https://h", "databricks", "databricks-uc", "postgresql://u@h/db"):
        assert not is_node_local(uri), uri


def test_multi_node_cluster_refuses_a_node_local_store(tmp_path, monkeypatch):
    import ray

    from lfb_ray.train import driver

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": True}, {"Alive": False}])
    cfg = _cfg(tmp_path, f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(ConfigError, match=r"sqlite:///.*2 alive nodes.*tracking server"):
        driver.fit(cfg)
    with pytest.raises(ConfigError, match="2 alive nodes"):
        driver.fit_operators(cfg, ["nl"])
    assert not (tmp_path / "mlflow.db").exists()  # refused before touching the store
    driver.check_tracking_store(_cfg(tmp_path, "tracking.tracking_uri=http://127.0.0.1:5000"))  # a server: fine
    driver.check_tracking_store(_cfg(tmp_path, "tracking.enabled=false"))
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": False}])
    driver.check_tracking_store(cfg)  # one alive node: a local store is fine


def test_a_resumed_run_stays_under_its_own_parent(tmp_path, elsewhere):
    """A run interrupted under parent A and resumed under parent B (a second pipeline invocation)
    stays nested under A: MLflow's tree of A does not change under A's feet."""
    from lfb_ray.tracking import find_or_create_run

    cfg = _cfg(tmp_path)
    uri, exp = cfg.tracking_uri, cfg.tracking.experiment
    a = find_or_create_run(uri, exp, "pipeline-a", params={}, fresh=True)
    child = find_or_create_run(uri, exp, "nl-run", params={}, parent_run_id=a)
    b = find_or_create_run(uri, exp, "pipeline-b", params={}, fresh=True)
    assert find_or_create_run(uri, exp, "nl-run", params={}, parent_run_id=b) == child
    assert _runs(cfg)["nl-run"].data.tags["mlflow.parentRunId"] == a


def test_a_parent_lists_and_ends_the_runs_it_resumed(tmp_path, elsewhere):
    """`tracked_run`: each pipeline invocation is a parent run of its own; a run it resumes from
    another parent is one of its runs (`add_runs`), so its comparison has it, and closing it ends
    that run too when nothing else did (never RUNNING forever)."""
    from mlflow.tracking import MlflowClient

    from lfb_ray.tracking import find_or_create_run, parent_runs, tracked_run

    cfg = _cfg(tmp_path)
    with pytest.raises(KeyboardInterrupt), tracked_run(cfg, "pipeline-x", kind="pipeline", params={}, fresh=True) as a:
        child = find_or_create_run(cfg.tracking_uri, cfg.tracking.experiment, "nl-run", params={},
                                   parent_run_id=a.run_id, tags={"lfb_ray.operator": "nl"})
        a.add_runs([child])
        raise KeyboardInterrupt
    client = MlflowClient(cfg.tracking_uri)
    assert client.get_run(a.run_id).info.status == "KILLED" and client.get_run(child).info.status == "KILLED"
    with tracked_run(cfg, "pipeline-x", kind="pipeline", params={}, fresh=True) as b:
        assert b.run_id != a.run_id
        assert find_or_create_run(cfg.tracking_uri, cfg.tracking.experiment, "nl-run", params={},
                                  parent_run_id=b.run_id) == child
        b.add_runs([child, None])
    assert client.get_run(b.run_id).info.status == "FINISHED"
    assert client.get_run(child).info.status == "FAILED"  # left RUNNING by its (here absent) trainer
    assert client.get_run(child).data.tags["mlflow.parentRunId"] == a.run_id
    assert [r.info.run_id for r in parent_runs(client, b.run_id)] == [child]
    assert [r.info.run_id for r in parent_runs(client, a.run_id)] == [child]


def test_tracked_run_without_mlflow_warns_and_yields_no_run(tmp_path, monkeypatch, capsys):
    import lfb_ray.tracking as tracking
    import lfb_ray.tracking.lifecycle as lifecycle  # tracked_run looks find_or_create_run up there

    def unreachable(uri, *a, **k):
        raise ConnectionError("Max retries exceeded")

    monkeypatch.setattr(lifecycle, "find_or_create_run", unreachable)
    with tracking.tracked_run(_cfg(tmp_path), "pipeline-x", kind="pipeline", params={}, log="[pipeline]") as run:
        assert run.run_id is None
        run.add_runs(["x"])  # nothing to record in
    assert "[pipeline] WARNING: MLflow unavailable at sqlite:///" in capsys.readouterr().out
    with tracking.tracked_run(_cfg(tmp_path, "tracking.enabled=false"), "x", kind="pipeline", params={}) as run:
        assert run.run_id is None
    assert capsys.readouterr().out == ""


def test_runs_are_named_by_role_and_runs_named_by_hash_still_resume(tmp_path, elsewhere):
    """The MLflow UI shows the role before the hash (`LFB-NL-<hash>`, `control-<hash>`); a run is
    found for resumption by its identity name (tag `lfb_ray.run_name`, unchanged), so a run made
    when runs were named by hash alone (`nl-<hash>`) is resumed, not duplicated."""
    from mlflow.tracking import MlflowClient

    from lfb_ray.tracking import find_or_create_run

    cfg = _cfg(tmp_path)
    uri, exp = cfg.tracking_uri, cfg.tracking.experiment
    client = MlflowClient(uri)
    for op, name, shown in [("nl", "nl-378ea6131b", "LFB-NL-378ea6131b"), ("none", "none-2120aa", "baseline-2120aa"),
                            ("none-ft", "none-17fae95809", "control-17fae95809"), ("max", "mine", "LFB-Max-mine")]:
        rid = find_or_create_run(uri, exp, name, params={}, tags={"lfb_ray.operator": op})
        run = client.get_run(rid)
        assert (run.info.run_name, run.data.tags["lfb_ray.run_name"]) == (shown, name)
        assert find_or_create_run(uri, exp, name, params={}, tags={"lfb_ray.operator": op}) == rid
    old = client.create_run(client.get_experiment_by_name(exp).experiment_id, run_name="avg-0ld",
                            tags={"lfb_ray.run_name": "avg-0ld", "lfb_ray.operator": "avg"}).info.run_id
    client.set_terminated(old, "KILLED")
    assert find_or_create_run(uri, exp, "avg-0ld", params={}, tags={"lfb_ray.operator": "avg"}) == old
    assert client.get_run(old).info.status == "RUNNING"


def test_a_run_lists_its_prepared_data_and_bank_as_dataset_inputs(tmp_path, elsewhere):
    """The Dataset column: the prepared data and the bank a run consumes, their content ids as
    digests; logging the same inputs again (a resumed run) adds nothing, a new bank adds itself."""
    from mlflow.tracking import MlflowClient

    from lfb_ray.tracking import find_or_create_run, log_dataset_inputs

    cfg = _cfg(tmp_path, "model.fbo=nl", "workdir=s3://KEY:SECRET@bucket/w")
    rid = find_or_create_run(cfg.tracking_uri, cfg.tracking.experiment, "nl-run", params={})
    log_dataset_inputs(cfg.tracking_uri, rid, cfg, {"prepared": "p1", "bank": "b1", "init": "c1"})
    log_dataset_inputs(cfg.tracking_uri, rid, cfg, {"prepared": "p1", "bank": "b1", "init": "c1"})
    got = [(d.dataset.name, d.dataset.digest, d.dataset.source)
           for d in MlflowClient(cfg.tracking_uri).get_run(rid).inputs.dataset_inputs]
    assert sorted(n for n, _, _ in got) == ["long-term feature bank", "prepared AVA data"]
    assert {n: g for n, g, _ in got} == {"prepared AVA data": "p1", "long-term feature bank": "b1"}
    assert all("SECRET" not in src and "bucket/w" in src for _, _, src in got)
    log_dataset_inputs(cfg.tracking_uri, rid, cfg, {"prepared": "p1", "bank": "b2"})
    assert len(MlflowClient(cfg.tracking_uri).get_run(rid).inputs.dataset_inputs) == 3


def test_system_metrics_are_sampled_into_the_run_and_can_be_off(tmp_path, elsewhere):
    import time

    from mlflow.tracking import MlflowClient

    from lfb_ray.system_metrics import start_system_metrics
    from lfb_ray.tracking import find_or_create_run

    cfg = _cfg(tmp_path)
    rid = find_or_create_run(cfg.tracking_uri, cfg.tracking.experiment, "sys-run", params={})
    assert start_system_metrics(cfg.tracking_uri, rid, 0) is None
    monitor = start_system_metrics(cfg.tracking_uri, rid, 0.5, node="rank0")
    deadline = time.monotonic() + 60
    client = MlflowClient(cfg.tracking_uri)
    while time.monotonic() < deadline and not client.get_run(rid).data.metrics:
        time.sleep(0.5)
    monitor.finish()
    keys = set(client.get_run(rid).data.metrics)
    assert any(k.startswith("system/rank0/cpu_utilization") or k.startswith("system/cpu_utilization")
               for k in keys), keys
