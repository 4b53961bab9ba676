"""Ray Train on CPU (gloo): DDP agreement, loss, resume, MLflow, bank build and the operators."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def baseline(prepared, tmp_path_factory):
    """A 2-worker gloo baseline, 2 epochs, fixed run name (so a rerun resumes it)."""
    from lfb_ray.train import fit

    cfg0, _ = prepared
    cfg = tiny_config(cfg0.workdir, cfg0.data.root, "model.fbo=none", "train.epochs=2", "train.run_name=base",
                      "train.base_lr=0.3", "train.log_every_iters=1", "tracking.log_model=true",
                      "tracking.registered_model=lfb-tiny-baseline", "tracking.system_metrics_interval_s=1")
    return cfg, fit(cfg)


def test_ddp_ranks_agree_and_val_map_is_reported(baseline):
    cfg, r = baseline
    assert r.metrics["ddp/param_checksums_equal"] == 1.0
    assert r.metrics["epoch"] == 2
    assert 0.0 <= r.metrics["val/mAP"] <= 1.0
    assert os.path.exists(r.model_path)
    assert os.path.exists(r.metrics["val/csv"])
    # The synthetic set declares label families (dataset.json): their mAPs come with every evaluation.
    assert {"val/mAP_family_short_term", "val/mAP_family_long_term", "val/mAP_family_appearance"} <= set(r.metrics)


def test_the_run_logs_its_model_to_mlflow_once(baseline):
    """The finished run's model.pt is the run's MLflow model (torch.export pt2, registered):
    `mlflow.pytorch.load_model` gives the scores of model.pt, and its params hold the run's mAP.
    A rerun of the finished run logs no second model."""
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    from lfb_ray.config import resolve_paths
    from lfb_ray.mlflow_model import ScoringModel, example_inputs, logged_model_of
    from lfb_ray.models.device import load_model
    from lfb_ray.train import fit

    cfg, r = baseline
    uri = logged_model_of(cfg.tracking_uri, r.mlflow_run_id)
    assert uri, "no MLflow model logged for the run"
    mlflow.set_tracking_uri(cfg.tracking_uri)
    logged = mlflow.pytorch.load_model(uri)
    ours = ScoringModel(load_model(resolve_paths(cfg), r.model_path))
    inputs = [torch.from_numpy(x) for x in example_inputs(cfg, ours.detector.feature_channels)]
    with torch.no_grad():
        torch.testing.assert_close(logged(*inputs), ours(*inputs), rtol=0, atol=1e-6)
    model = mlflow.get_logged_model(uri.rsplit("/", 1)[-1])
    assert float(model.params["val/mAP"]) == pytest.approx(r.metrics["val/mAP"], abs=1e-5)
    assert model.source_run_id == r.mlflow_run_id
    run = MlflowClient(cfg.tracking_uri).get_run(r.mlflow_run_id)
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["prepared AVA data"]  # a baseline: no bank
    assert any("cpu_utilization" in k for k in run.data.metrics), sorted(run.data.metrics)  # system metrics
    (version,) = MlflowClient(cfg.tracking_uri).search_model_versions("name='lfb-tiny-baseline'")
    assert version.run_id == r.mlflow_run_id
    fit(cfg)
    assert len(mlflow.search_logged_models(experiment_ids=[model.experiment_id], output_format="list",
                                           filter_string=f"source_run_id = '{r.mlflow_run_id}'")) == 1


def test_loss_decreases_and_mlflow_has_every_step_once(baseline):
    from mlflow.tracking import MlflowClient

    cfg, r = baseline
    client = MlflowClient(cfg.tracking_uri)
    hist = client.get_metric_history(r.mlflow_run_id, "train/loss")
    steps = [m.step for m in hist]
    assert len(steps) == len(set(steps)) == r.metrics["global_step"]
    losses = [m.value for m in sorted(hist, key=lambda m: m.step)]
    k = max(1, len(losses) // 3)
    assert np.mean(losses[-k:]) < np.mean(losses[:k])
    run = client.get_run(r.mlflow_run_id)
    assert run.data.params["model.fbo"] == "none" and "version.ray" in run.data.params
    assert run.data.metrics["val/mAP"] == pytest.approx(r.metrics["val/mAP"])


def test_rerun_of_a_finished_run_trains_nothing_and_returns_its_result(baseline):
    """What a rerun after `FitManyError` relies on: fitting a finished run again (same name)
    resumes it at its end, trains no step and returns its final checkpoint and metrics."""
    from mlflow.tracking import MlflowClient

    from lfb_ray.train import fit

    cfg, r = baseline
    t0 = len(MlflowClient(cfg.tracking_uri).get_metric_history(r.mlflow_run_id, "train/loss"))
    again = fit(cfg)
    assert again.run_name == r.run_name and again.mlflow_run_id == r.mlflow_run_id
    assert again.metrics["epoch"] == 2 and again.metrics["global_step"] == r.metrics["global_step"]
    assert again.metrics["val/mAP"] == r.metrics["val/mAP"] and os.path.exists(again.model_path)
    assert len(MlflowClient(cfg.tracking_uri).get_metric_history(r.mlflow_run_id, "train/loss")) == t0


def test_rerun_resumes_at_the_right_step(baseline):
    from mlflow.tracking import MlflowClient

    from lfb_ray.train import fit

    cfg, r = baseline
    cfg3 = tiny_config(cfg.workdir, cfg.data.root, "model.fbo=none", "train.epochs=3", "train.run_name=base",
                       "train.base_lr=0.3", "train.log_every_iters=1")
    r3 = fit(cfg3)
    assert r3.mlflow_run_id == r.mlflow_run_id
    per_epoch = r.metrics["global_step"] // 2
    assert r3.metrics["epoch"] == 3 and r3.metrics["global_step"] == 3 * per_epoch
    steps = [m.step for m in MlflowClient(cfg.tracking_uri).get_metric_history(r.mlflow_run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 3 * per_epoch + 1))


def test_init_backbone_is_a_new_run_at_the_finetune_lr(baseline):
    """`--init-backbone`: the baseline continued from its own backbone is its own run (the control of
    the synthetic table), and its lr is scaled by train.finetune_lr_scale."""
    from mlflow.tracking import MlflowClient

    from lfb_ray.train import fit, run_name_for

    cfg, r = baseline
    ft = tiny_config(cfg.workdir, cfg.data.root, "model.fbo=none", "train.epochs=1", "train.base_lr=0.3",
                     "train.log_every_iters=1", "train.max_iters_per_epoch=2", "train.finetune_lr_scale=0.25")
    assert run_name_for(ft, r.model_path) != run_name_for(ft)
    rf = fit(ft, init_checkpoint=r.model_path)
    assert rf.mlflow_run_id != r.mlflow_run_id and rf.run_name != r.run_name
    client = MlflowClient(cfg.tracking_uri)
    assert client.get_run(rf.mlflow_run_id).data.tags["lfb_ray.operator"] == "none-ft"  # the control row
    first = {run: min(client.get_metric_history(run, "train/lr"), key=lambda m: m.step).value
             for run in (r.mlflow_run_id, rf.mlflow_run_id)}
    assert first[rf.mlflow_run_id] == pytest.approx(0.25 * first[r.mlflow_run_id])


def test_bank_build_then_three_operators(baseline, ray_local):
    from lfb_ray.bank import FeatureBank
    from lfb_ray.bank.build import build_bank
    from lfb_ray.train import fit_operators

    cfg, r = baseline
    one = tiny_config(cfg.workdir, cfg.data.root, f"bank.path={cfg.workdir}/bank1", "bank.max_actors=1")
    two = tiny_config(cfg.workdir, cfg.data.root, f"bank.path={cfg.workdir}/bank2", "bank.min_actors=2",
                      "bank.max_actors=2")
    s1, s2 = build_bank(one, r.model_path), build_bank(two, r.model_path)
    assert s1.features == s2.features > 0
    b1, b2 = FeatureBank.open(one.bank_dir), FeatureBank.open(two.bank_dir)
    for v in b1.videos:
        for t in b1.seconds_of(v):
            assert np.array_equal(b1.features_at(v, t), b2.features_at(v, t))
    # Two runs at a time on the 2-CPU test cluster (each run's reservation halved: fit_many).
    ops = tiny_config(cfg.workdir, cfg.data.root, f"bank.path={cfg.workdir}/bank1", "train.max_iters_per_epoch=2",
                      "cluster.concurrent_runs=2")
    res = fit_operators(ops, ["nl", "avg", "max"])
    assert sorted(res) == ["avg", "max", "nl"]
    assert len({x.mlflow_run_id for x in res.values()}) == 3
    from lfb_ray.models.checkpoint import read_meta

    for op, x in res.items():
        assert 0.0 <= x.metrics["val/mAP"] <= 1.0
        meta = read_meta(x.model_path)  # the model names its operator and the baseline that computed its bank
        assert (meta.operator, meta.bank_checkpoint) == (op, r.model_path) and "bank" in meta.inputs
    from mlflow.tracking import MlflowClient

    info = [MlflowClient(ops.tracking_uri).get_run(x.mlflow_run_id).info for x in res.values()]
    spans = sorted((i.start_time, i.end_time) for i in info)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), f"no two runs overlapped: {spans}"


def test_head_warmup_without_finetuning_keeps_the_baseline_backbone(baseline, ray_local):
    """train.head_warmup_steps + train.finetune_epochs=0: the head is trained on the bank, the model
    is evaluated and saved as it is, and its backbone is exactly the baseline's."""
    import torch

    from lfb_ray.bank.build import build_bank
    from lfb_ray.train import fit

    cfg, r = baseline
    c = tiny_config(cfg.workdir, cfg.data.root, f"bank.path={cfg.workdir}/bank_warm", "model.fbo=nl",
                    "train.head_warmup_steps=10", "train.finetune_epochs=0")
    build_bank(c, r.model_path)
    res = fit(c, init_checkpoint=r.model_path)
    assert res.metrics["epoch"] == 0 and 0.0 <= res.metrics["val/mAP"] <= 1.0
    got = torch.load(res.model_path, weights_only=True)["model"]
    want = torch.load(r.model_path, weights_only=True)["model"]
    assert all(torch.equal(got[k], v) for k, v in want.items() if k.startswith("backbone."))
    assert not torch.equal(got["fc_cls.bias"], torch.zeros_like(got["fc_cls.bias"]))  # the head was trained
    # Only rank 0 warms up; DDP's wrap must have given every rank its head (checksums at the end).
    assert c.cluster.num_workers == 2 and res.metrics["ddp/param_checksums_equal"] == 1.0


def test_bank_extractor_batches_keyframes_without_changing_features(baseline, tmp_path):
    """bank.batch_size keyframes per forward pass: same features as one keyframe at a time."""
    import json

    from lfb_ray.bank.build import BankExtractor
    from lfb_ray.data.prep import prepared_files

    cfg, r = baseline
    uri = prepared_files(cfg.prepared_dir, "train")[0]
    parts = {}
    for size in (1, 3):
        c = tiny_config(cfg.workdir, cfg.data.root, "model.fbo=none", f"bank.batch_size={size}")
        extractor = BankExtractor(c, r.model_path, str(tmp_path / f"b{size}"))
        extractor({"item": np.array([json.dumps({"split": "train", "uri": uri, "part_id": "p"})], dtype=object)})
        parts[size] = np.load(tmp_path / f"b{size}" / "train" / "p.npz")
    one, three = parts[1], parts[3]
    assert int(one["keyframes"]) > 3 and len(one["feature"]) >= int(one["keyframes"])
    for key in ("video_id", "second", "person_index", "box", "score"):
        assert np.array_equal(one[key], three[key]), key
    f1, f3 = one["feature"].astype(np.float32), three["feature"].astype(np.float32)
    assert f1.std() > 0
    np.testing.assert_allclose(f3, f1, rtol=1e-2, atol=1e-3 * float(np.abs(f1).max()))


def test_save_best_makes_the_best_evaluated_epoch_the_result(prepared, tmp_path):
    """train.save_best (mmaction2 0.x's save_best='mAP@0.5IOU'): model.pt and the result's val
    metrics are those of the epoch with the highest val mAP (the earliest on a tie), whose weights
    score that mAP again when the inference job evaluates model.pt."""
    import torch
    from mlflow.tracking import MlflowClient

    from lfb_ray.inference import infer_split
    from lfb_ray.train import fit

    cfg0, _ = prepared
    cfg = tiny_config(tmp_path / "w", cfg0.data.root, f"data.prepared_dir={cfg0.prepared_dir}", "model.fbo=none",
                      "train.epochs=2", "train.eval_every_epochs=1", "train.save_best=true", "train.base_lr=0.3",
                      "train.max_iters_per_epoch=2", "cluster.num_workers=1")
    r = fit(cfg)
    hist = {m.step: m.value for m in MlflowClient(cfg.tracking_uri).get_metric_history(r.mlflow_run_id, "val/mAP")}
    assert sorted(hist) == [1, 2]
    want = min(e for e in hist if hist[e] == max(hist.values()))
    assert r.metrics["best/epoch"] == want and r.metrics["epoch"] == 2
    assert r.metrics["val/mAP"] == pytest.approx(hist[want]) and r.metrics["last/val/mAP"] == pytest.approx(hist[2])
    assert torch.load(r.model_path, weights_only=True)["source"] == f"lfb_ray none epoch {want} (best val mAP)"
    # The model says what it is and where it came from (lfb_ray.models.card.CheckpointMeta).
    from lfb_ray.config import resolve_paths
    from lfb_ray.identity import run_inputs
    from lfb_ray.models.card import code_version
    from lfb_ray.models.checkpoint import read_meta

    meta = read_meta(r.model_path)
    assert (meta.operator, meta.epoch, meta.selected_on) == ("none", want, "best val mAP")
    assert meta.val_map == pytest.approx(r.metrics["val/mAP"]) and meta.global_step == 4
    assert (meta.run_name, meta.mlflow_run_id) == (r.run_name, r.mlflow_run_id)
    assert meta.inputs == run_inputs(resolve_paths(cfg)) and meta.to_config() == resolve_paths(cfg)
    assert meta.code == code_version() and meta.code["git"] != "unknown"
    res = infer_split(cfg, r.checkpoint_path, str(tmp_path / "best.csv"))
    assert res.metrics["mAP"] == pytest.approx(r.metrics["val/mAP"], abs=1e-9)


def test_every_evaluated_epochs_csv_is_an_mlflow_artifact(prepared, tmp_path):
    """With train.save_best and an earlier best epoch, the last epoch's val CSV is still logged: the
    run's `results/` artifacts hold one CSV per evaluated epoch (the last one was replaced by the
    best epoch's CSV, logged a second time)."""
    from mlflow.tracking import MlflowClient

    from lfb_ray.train import fit

    cfg0, _ = prepared
    # lr 0: both epochs score the same, so the earliest (epoch 1) is the best on the tie.
    cfg = tiny_config(tmp_path / "w", cfg0.data.root, f"data.prepared_dir={cfg0.prepared_dir}", "model.fbo=none",
                      "train.epochs=2", "train.eval_every_epochs=1", "train.save_best=true", "train.base_lr=0.0",
                      "train.max_iters_per_epoch=1", "cluster.num_workers=1")
    r = fit(cfg)
    assert r.metrics["best/epoch"] == 1 and r.metrics["val/csv"].endswith("val_results_epoch001.csv")
    logged = sorted(a.path for a in MlflowClient(cfg.tracking_uri).list_artifacts(r.mlflow_run_id, "results"))
    assert logged == ["results/val_results_epoch001.csv", "results/val_results_epoch002.csv"], logged
