"""The main job end to end on the tiny synthetic set: every stage, then resume and --from.

LFB models start from the baseline's backbone here (as in configs/synthetic.yaml), so the operators
stage also trains the control ("none-ft": the baseline fine-tuned from itself).
"""

from __future__ import annotations

import json

import pytest
from conftest import REPO, tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

OVERRIDES = ["train.max_iters_per_epoch=3", "model.init_backbone_from_baseline=true"]
STAGES = ["prepare", "baseline", "bank", "operators", "evaluate", "compare"]


@pytest.fixture(scope="module")
def first_run(synthetic_root, ray_local, tmp_path_factory):
    from lfb_ray.pipeline import run_pipeline

    work = tmp_path_factory.mktemp("pipeline")
    cfg = tiny_config(work, synthetic_root, *OVERRIDES)
    return cfg, run_pipeline(cfg)


def test_every_stage_runs_and_the_table_has_all_models(first_run, capsys):
    cfg, out = first_run
    assert list(out["stage_seconds"]) == STAGES
    assert all(s > 0 for s in out["stage_seconds"].values())
    assert sorted(out["maps"]) == ["avg", "max", "nl", "none", "none-ft"]
    for m in out["maps"].values():
        assert 0.0 <= m["mAP"] <= 1.0
        assert {"mAP_family_short_term", "mAP_family_long_term"} <= {k.split("val/")[-1] for k in m}
    with open(f"{cfg.workdir}/pipeline.json") as f:
        assert set(json.load(f)) == set(STAGES)


def test_the_runs_nest_under_one_finished_pipeline_parent(first_run, tmp_path):
    """MLflow: one parent run per invocation; the five training runs and the comparison are its
    children, all FINISHED; the parent holds the stage times and the summary of its children."""
    from mlflow.tracking import MlflowClient

    from lfb_ray.pipeline import resolve_paths

    cfg = resolve_paths(first_run[0])
    client = MlflowClient(cfg.tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    (parent,) = [r for r in runs if r.data.tags.get("lfb_ray.kind") == "pipeline"]
    assert parent.info.status == "FINISHED"
    assert {f"stage_seconds/{s}" for s in STAGES} <= set(parent.data.metrics)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(runs) - 1  # nothing outside the parent
    trained = [r for r in children if "lfb_ray.operator" in r.data.tags]
    assert len(trained) == 5 and {"nl", "avg", "max"} <= {r.data.tags["lfb_ray.operator"] for r in trained}
    assert [r.data.tags.get("lfb_ray.kind") for r in children if r not in trained] == ["comparison"]
    assert all(r.info.status == "FINISHED" for r in children)
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"summary.csv", "summary.md"}
    assert all("val/mAP" in r.data.metrics for r in trained)


def test_rerun_skips_every_stage_and_from_reruns_the_rest(first_run, capsys):
    """Resumable: a second run does nothing; `--from evaluate` (via the job's CLI) redoes only the tail."""
    import importlib.util

    from lfb_ray.pipeline import run_pipeline

    cfg, out = first_run
    again = run_pipeline(cfg)
    assert all(s == 0.0 for s in again["stage_seconds"].values())
    assert json.dumps(again["maps"], sort_keys=True) == json.dumps(out["maps"], sort_keys=True)  # NaN-safe
    printed = capsys.readouterr().out
    assert printed.count("up to date, skipped") == len(STAGES)
    # Resource settings only (another cluster size): still nothing to redo.
    moved = tiny_config(cfg.workdir, cfg.data.root, *OVERRIDES, "cluster.concurrent_runs=1",
                        "cluster.cpus_per_worker=0.25", "cluster.data_cpus=0.25", "bank.max_actors=1")
    assert all(s == 0.0 for s in run_pipeline(moved)["stage_seconds"].values())
    capsys.readouterr()

    spec = importlib.util.spec_from_file_location("pipeline_job", REPO / "jobs" / "pipeline.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.main(["--config", str(REPO / "configs" / "tiny.yaml"), f"workdir={cfg.workdir}",
                     f"data.root={cfg.data.root}", *OVERRIDES, "--from", "evaluate"]) == 0
    printed = capsys.readouterr().out
    for s in ("prepare", "baseline", "bank", "operators"):
        assert f"[pipeline] {s}: up to date, skipped" in printed
    for s in ("evaluate", "compare"):
        assert f"[pipeline] {s}: running" in printed
    assert "[pipeline] summary" in printed
    for name in ("baseline", "control", "nl", "avg", "max"):
        assert f"  {name:9s} mAP" in printed
    assert "control (baseline, LFB head recipe)" in printed  # the compare stage's table


def test_a_damaged_frame_store_is_prepared_again_and_the_rest_is_kept(first_run, capsys):
    """A frames.arrow cut in half after the run: the rerun finds it from the manifest's sizes,
    prepares that video again (byte-identical) and keeps every later stage, whose inputs did not change."""
    import glob

    from lfb_ray.data.frames import FrameStore
    from lfb_ray.pipeline import run_pipeline

    cfg, _ = first_run
    store = sorted(glob.glob(f"{cfg.workdir}/prepared/train/*/frames.arrow"))[0]
    with open(store, "rb") as f:
        whole = f.read()
    with open(store, "wb") as f:
        f.write(whole[: len(whole) // 2])
    capsys.readouterr()
    again = run_pipeline(cfg)
    printed = capsys.readouterr().out
    assert "[pipeline] prepare: 1 prepared video(s) damaged" in printed and "frames.arrow has" in printed
    assert again["stage_seconds"]["prepare"] > 0
    assert all(again["stage_seconds"][s] == 0.0 for s in STAGES[1:])
    with open(store, "rb") as f:
        assert f.read() == whole
    FrameStore(store)
