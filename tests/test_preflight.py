"""Preflight: each trap of a real run that used to show only minutes or hours in is one line, in seconds.

The AVA configs are used as written (configs/baseline.yaml, configs/lfb_*.yaml) on an AVA-layout
miniature (`ava_layout`), with only data.root, the workdir and the file under test changed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from conftest import REPO

from lfb_ray.config import load_config, resolve_paths

KINETICS = "checkpoints/slowonly_r50_4x16x1_256e_kinetics400_rgb.pth"


def _ava(config: str, ava_layout, tmp_path, *overrides: str):
    return resolve_paths(load_config(REPO / "configs" / config, [f"data.root={ava_layout}", f"workdir={tmp_path / 'w'}",
                                                                  *overrides]))


def _tiny_state(tmp_path, fbo: str):
    """A checkpoint of a small detector with operator `fbo` (depth 18, width 8) and its model config."""
    from lfb_ray.models.checkpoint import save_checkpoint
    from lfb_ray.models.detector import build_detector

    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"model.fbo={fbo}"])
    path = tmp_path / f"{fbo}.pt"
    save_checkpoint(build_detector(cfg.model).state_dict(), path)
    return str(path)


def test_the_pipeline_job_refuses_a_missing_kinetics_checkpoint_and_gpus_it_cannot_get_in_seconds(ava_layout, tmp_path):
    """`jobs/pipeline.py` as docs/ava.md runs it, on a machine without GPUs and without the Kinetics
    file: it used to prepare the data (4.4 core-hours on AVA), then fail inside Train workers, or wait
    forever for 8 GPUs ("Error count: 1 (max allowed: inf)")."""
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "jobs/pipeline.py", "--config", "configs/lfb_nl.yaml",
                        "--baseline-config", "configs/baseline.yaml", f"data.root={ava_layout}",
                        f"workdir={tmp_path / 'w'}", "tracking.enabled=false", "--check"],
                       cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "RAY_ADDRESS": ""})
    took = time.monotonic() - t0
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("preflight: ")]
    assert any(ln.startswith("preflight: model.pretrained: checkpoint ") and KINETICS in ln and "does not exist" in ln
               for ln in lines), r.stderr
    assert any(ln.startswith("preflight: cluster.device: gpu asks for cluster.num_workers=8 GPUs") and
               "no autoscaler" in ln and "cluster.device=cpu" in ln for ln in lines), r.stderr
    assert "nothing was run" in r.stderr
    assert not (tmp_path / "w" / "prepared" / "manifest.json").exists()
    assert took < 60, took  # a bound (6.9 s idle, 38 s seen under a load of ~60), not a speed


def test_a_bad_operator_is_refused_before_any_stage(ava_layout, tmp_path):
    from lfb_ray.pipeline import run_pipeline
    from lfb_ray.preflight import PreflightError, run_preflight

    cfg = _ava("lfb_nl.yaml", ava_layout, tmp_path, "tracking.enabled=false")
    with pytest.raises(PreflightError, match=r"preflight: --operators: unknown operator\(s\) nlx; allowed: "):
        run_preflight(cfg, "pipeline", operators=("nl", "nlx"), with_cluster=False)
    with pytest.raises(ValueError, match="--operators: unknown operator"):
        run_pipeline(cfg, operators=("nlx",))
    assert not (tmp_path / "w" / "pipeline.json").exists()


def test_a_checkpoint_of_another_operator_is_refused(tmp_path):
    """An LFB-NL detector given as the bank's baseline (model.fbo=none) does not fit it: named with
    the keys that do not fit, before the bank's actor pool starts."""
    from lfb_ray.preflight import PreflightError, run_preflight

    nl = _tiny_state(tmp_path, "nl")
    cfg = resolve_paths(load_config(REPO / "configs" / "tiny.yaml", [f"workdir={tmp_path / 'w'}"]))
    with pytest.raises(PreflightError) as e:
        run_preflight(cfg, "bank", checkpoint=nl, with_cluster=False)
    (p,) = e.value.problems
    assert p.where == "--checkpoint/bank.checkpoint"
    assert "does not load into a model.fbo=none detector" in p.message and "fbo" in p.message
    assert run_preflight(cfg, "bank", checkpoint=_tiny_state(tmp_path, "none"), with_cluster=False) == []


def test_a_kinetics_checkpoint_of_another_depth_is_refused(tmp_path):
    from lfb_ray.preflight import check_checkpoint

    other = _tiny_state(tmp_path, "none")
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["model.depth=34"])
    (p,) = check_checkpoint(other, cfg, "model.pretrained", backbone_only=True)
    assert p.where == "model.pretrained" and "depth 34" in p.message


def test_relative_paths_are_refused_in_a_submitted_job(monkeypatch):
    """docs/cluster.md's submission overrode only train.storage_path: workdir runs/ava and data.root
    data/ava then resolved against Ray's package cache on the head node."""
    from lfb_ray.preflight import check_submitted_paths, is_submitted

    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    assert is_submitted()
    given = load_config(REPO / "configs" / "lfb_nl.yaml", ["train.storage_path=s3://b/ray"])
    assert {p.where for p in check_submitted_paths(given)} == {"workdir", "data.root", "model.pretrained"}
    given = load_config(REPO / "configs" / "lfb_nl.yaml", ["workdir=s3://b/lfb/ava", "data.root=/mnt/ava",
                                                          "model.pretrained=s3://b/lfb/k400.pth"])
    assert check_submitted_paths(given) == []


def test_a_node_local_store_is_refused_where_the_cluster_can_grow(tmp_path):
    """The guard counted the nodes alive at start-up: on a cluster at zero GPU nodes it passed."""
    from lfb_ray.preflight import check_tracking

    cfg = resolve_paths(load_config(REPO / "configs" / "baseline.yaml", [f"workdir={tmp_path}"]))
    (p,) = check_tracking(cfg, scalable=True, alive_nodes=1)
    assert p.where == "tracking.tracking_uri" and "sqlite" in p.message and "tracking server" in p.message
    assert check_tracking(cfg, scalable=False, alive_nodes=1) == []
    assert len(check_tracking(cfg, scalable=False, alive_nodes=2)) == 1


def test_an_mlflow_server_that_does_not_answer_is_named(tmp_path):
    import socket

    from lfb_ray.preflight import check_tracking

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"tracking.tracking_uri=http://127.0.0.1:{port}"])
    (p,) = check_tracking(cfg, scalable=True)
    assert f"127.0.0.1:{port} does not answer" in p.message


def test_gpus_on_a_cluster_with_none(tmp_path):
    from lfb_ray.preflight import check_resources

    cfg = load_config(REPO / "configs" / "baseline.yaml")
    (p,), _ = check_resources(cfg, {"CPU": 2.0}, autoscaler=False)
    assert p.where == "cluster.device" and "cluster.max_gpus=24 only says what an autoscaler could add" in p.message
    problems, notes = check_resources(cfg, {"CPU": 2.0}, autoscaler=True)
    assert problems == [] and "waiting up to cluster.resource_wait_s=1800 s" in notes[0]
    assert check_resources(cfg, {"CPU": 2.0, "GPU": 8.0}, autoscaler=False) == ([], [])
    cpu = load_config(REPO / "configs" / "baseline.yaml", ["cluster.device=cpu"])
    (p,), _ = check_resources(cpu, {"CPU": 2.0}, autoscaler=False)
    assert p.where == "cluster.num_workers" and "need 32 CPUs" in p.message


def test_a_train_run_waits_for_its_workers_a_bounded_time():
    """Ray Train retried a worker group it could not place without end (controller_failure_limit=-1)."""
    from lfb_ray.train.resources import failure_config

    fc = failure_config(load_config(REPO / "configs" / "baseline.yaml"))
    assert fc.controller_failure_limit == 30 and fc.max_failures == 2
    fc = failure_config(load_config(REPO / "configs" / "baseline.yaml", ["cluster.resource_wait_s=0"]))
    assert fc.controller_failure_limit == 1


def test_the_smoke_overrides_pass_the_resource_check():
    from lfb_ray.preflight import SMOKE_OVERRIDES, check_resources

    cfg = load_config(REPO / "configs" / "baseline.yaml", list(SMOKE_OVERRIDES))
    assert check_resources(cfg, {"CPU": 2.0}, autoscaler=False) == ([], [])


@pytest.mark.ray
def test_a_cluster_started_here_has_no_autoscaler(ray_local):
    from lfb_ray.preflight import has_autoscaler

    assert has_autoscaler() is False


def test_an_avg_checkpoint_is_refused_for_a_max_model(tmp_path):
    """Avg and Max have the same weights (keys and shapes): an avg model.pt loaded silently into a
    max model. The model config saved with the weights tells them apart."""
    from lfb_ray.config import config_to_dict
    from lfb_ray.models.checkpoint import CheckpointError, save_checkpoint
    from lfb_ray.models.detector import build_detector
    from lfb_ray.models.device import load_model
    from lfb_ray.preflight import check_checkpoint

    avg = load_config(REPO / "configs" / "tiny.yaml", ["model.fbo=avg"])
    mx = load_config(REPO / "configs" / "tiny.yaml", ["model.fbo=max"])
    path = tmp_path / "avg.pt"
    save_checkpoint(build_detector(avg.model).state_dict(), path, model_config=config_to_dict(avg)["model"])
    (p,) = check_checkpoint(str(path), mx, "--checkpoint")
    assert "holds a model.fbo=avg model" in p.message and "asks for model.fbo=max" in p.message
    with pytest.raises(CheckpointError, match="model.fbo=avg model"):
        load_model(mx, str(path))
    assert check_checkpoint(str(path), avg, "--checkpoint") == []
    load_model(avg, str(path))
    # Its backbone goes anywhere (an LFB model starts from the baseline's backbone).
    assert check_checkpoint(str(path), mx, "--init-backbone", backbone_only=True) == []
    # Files without a saved config (older lfb_ray files, converted mmaction2 ones) load as before.
    old = tmp_path / "old.pt"
    save_checkpoint(build_detector(avg.model).state_dict(), old)
    load_model(mx, str(old))


def test_the_preflight_message_hides_credentials():
    """Problems name paths as given, and a data root or workdir may be `s3://KEY:SECRET@...`."""
    from lfb_ray.preflight import PreflightError, Problem

    e = PreflightError([Problem("data.train_csv", "s3://AKIAEXAMPLE:SECRETEXAMPLE@bucket/ava/a.csv does not exist")])
    assert "SECRETEXAMPLE" not in str(e) and "AKIAEXAMPLE" not in str(e)
    assert "preflight: data.train_csv: s3://" in str(e) and "bucket/ava/a.csv does not exist" in str(e)
