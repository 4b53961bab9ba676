"""The multi-seed comparison table (no MLflow: rows are built directly)."""

import pytest

from lfb_ray.compare import ComparisonRow, format_seed_table


def _row(op: str, m: float, lt: float) -> ComparisonRow:
    return ComparisonRow(op, f"run-{op}", op, {"val/mAP": m, "val/mAP_family_long_term": lt}, {}, [])


def test_seed_table_gives_mean_and_range_per_operator_in_seed_order():
    per_seed = {"s0": [_row("nl", 0.80, 0.70), _row("none", 0.50, 0.30)],
                "s1": [_row("none", 0.54, 0.34), _row("nl", 0.84, 0.74)]}
    lines = format_seed_table(per_seed).splitlines()
    assert lines[0] == "| model | mAP | mAP long_term | seeds |"
    assert lines[2] == "| baseline | 52.00 (50.00-54.00) | 32.00 (30.00-34.00) | 2 |"
    assert lines[3] == "| LFB-NL | 82.00 (80.00-84.00) | 72.00 (70.00-74.00) | 2 |"
    plain = format_seed_table(per_seed, markdown=False).splitlines()
    assert plain[0].split() == ["model", "mAP", "mAP", "long_term", "seeds"]


def test_seed_table_refuses_an_operator_missing_from_a_seed():
    per_seed = {"s0": [_row("nl", 0.8, 0.7), _row("avg", 0.6, 0.5)], "s1": [_row("nl", 0.8, 0.7)]}
    with pytest.raises(ValueError, match=r"seed 's1' has no finished run for operator\(s\) \['avg'\]"):
        format_seed_table(per_seed)


def test_compare_job_needs_a_config_before_set():
    import jobs.compare as job

    with pytest.raises(SystemExit):
        job.main(["--set", "workdir=x"])


def test_family_means_from_per_class_aps(tmp_path):
    import json
    import math

    from lfb_ray.evaluation.families import family_means, label_families

    assert label_families(tmp_path / "missing.json") == {}
    (tmp_path / "dataset.json").write_text(json.dumps({"label_families": {"short": [11, 12], "long": [64, 65]}}))
    fams = label_families(tmp_path / "dataset.json")
    assert fams == {"short": (11, 12), "long": (64, 65)}
    out = family_means({"11": 0.5, "12": 1.0, 64: float("nan")}, fams)
    assert out["val/mAP_family_short"] == 0.75
    assert math.isnan(out["val/mAP_family_long"])  # no class of the family has an AP


def test_table_shows_both_protocols_when_asked():
    from lfb_ray.compare import format_table

    rows = [ComparisonRow("nl", "run-nl-0123456789", "nl", {"val/mAP": 0.25, "val/mAP_official": 0.25,
                                                           "val/mAP_mmaction2": 0.2411}, {}, []),
            ComparisonRow("none", "run-none-0123456", "none", {"val/mAP": 0.2}, {}, [])]  # logged before both
    plain = format_table(rows).splitlines()
    assert "mAP_official" not in plain[0]
    lines = format_table(rows, protocols=True).splitlines()
    assert lines[0].startswith("| model | mAP | mAP_official | mAP_mmaction2 |")
    assert lines[2].startswith("| LFB-NL | 25.00 | 25.00 | 24.11 |")
    assert lines[3].startswith("| baseline | 20.00 | - | - |")


def test_plot_labels_are_wrapped_and_runs_without_steps_are_named(tmp_path):
    from lfb_ray.compare import NAMES, plot, tick_label

    assert tick_label(NAMES["none-ft"]) == "control\n(baseline, LFB\nhead recipe)"
    assert all(len(line) <= 14 for line in tick_label(NAMES["none-ft"]).splitlines())
    assert tick_label("LFB-NL") == "LFB-NL"
    rows = [ComparisonRow("none", "a", "none", {"val/mAP": 0.5}, {"1": 0.4}, [(1, 0.3), (2, 0.2)]),
            ComparisonRow("none-ft", "b", "none-ft", {"val/mAP": 0.6}, {}, [])]
    plot(rows, str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").stat().st_size > 0


def test_compare_job_protocols_flag_prints_both_evaluators(tmp_path, capsys):
    """`python jobs/compare.py --config configs/synthetic.yaml --protocols` (README), on a local
    MLflow store holding a pipeline parent run with one finished run that logged both protocols."""
    from mlflow.tracking import MlflowClient

    import jobs.compare as job

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("e", artifact_location=str(tmp_path / "art"))
    parent = client.create_run(exp, tags={"lfb_ray.kind": "pipeline"}).info.run_id
    run = client.create_run(exp, tags={"lfb_ray.operator": "nl", "mlflow.parentRunId": parent})
    for k, v in {"val/mAP": 0.25, "val/mAP_official": 0.25, "val/mAP_mmaction2": 0.2411}.items():
        client.log_metric(run.info.run_id, k, v)
    client.set_terminated(run.info.run_id)
    assert job.main(["--config", "configs/synthetic.yaml", "--tracking-uri", uri, "--experiment", "e",
                     "--out", str(tmp_path / "cmp"), "--protocols"]) == 0
    out = capsys.readouterr().out
    assert "mAP_official" in out and "mAP_mmaction2" in out and "24.11" in out


def test_table_shows_the_dataset_families_instead_of_the_ava_groups():
    """On a dataset that declares its label families (the synthetic set) the AVA category columns
    (movement / object / interaction, computed from AVA's class ids) mean nothing: the families
    are shown instead; on AVA (no families) the AVA groups are shown."""
    from lfb_ray.compare import format_table

    ava = {"val/mAP": 0.25, "val/mAP_person_movement": 0.4, "val/mAP_object_manipulation": 0.1,
           "val/mAP_person_interaction": 0.2}
    head = format_table([ComparisonRow("nl", "run-nl-0123456789", "nl", ava, {}, [])]).splitlines()[0]
    assert "| movement | object | interaction |" in head
    syn = {**ava, "val/mAP_family_long_term": 0.7, "val/mAP_family_short_term": 0.9}
    lines = format_table([ComparisonRow("nl", "run-nl-0123456789", "nl", syn, {}, [])]).splitlines()
    assert lines[0].startswith("| model | mAP | mAP long_term | mAP short_term | epochs |")
    assert "movement" not in lines[0] and "interaction" not in lines[0]
    assert lines[2].startswith("| LFB-NL | 25.00 | 70.00 | 90.00 | 0 |")


def _store(tmp_path):
    """A local MLflow store (SQLite) with experiment "e"; returns (uri, client, experiment id)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    return uri, client, client.create_experiment("e", artifact_location=str(tmp_path / "art"))


def _finished_run(client, exp, op: str, start_ms: int, mAP: float, parent: str | None = None,
                  extra: dict | None = None) -> str:
    """A finished training run of operator `op` as the driver leaves it (tags, final metrics)."""
    tags = {"lfb_ray.operator": op, "lfb_ray.run_name": f"{op}-{start_ms}"}
    if parent:
        tags["mlflow.parentRunId"] = parent
    run = client.create_run(exp, start_time=start_ms, tags=tags)
    for k, v in {"val/mAP": mAP, "epoch": 2, "wall_seconds": 30.0, **(extra or {})}.items():
        client.log_metric(run.info.run_id, k, v)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _csv_runs(folder) -> list[str]:
    import csv

    with open(folder / "comparison.csv") as f:
        return [r["run_id"] for r in csv.DictReader(f)]


def test_two_pipelines_in_one_experiment_give_two_comparisons(tmp_path, capsys):
    """Pipeline A's NL run finishes after pipeline B started (two pipelines sharing an experiment):
    by default the latest pipeline's runs are compared, `--parent` names another one, `--runs` names
    runs, and `--filter` selects runs of the experiment; no comparison takes runs of both."""
    import jobs.compare as job

    uri, client, exp = _store(tmp_path)
    a = client.create_run(exp, start_time=1000, run_name="pipeline-a", tags={"lfb_ray.kind": "pipeline"}).info.run_id
    a_none = _finished_run(client, exp, "none", 1100, 0.50, a, {"recipe": 1})
    b = client.create_run(exp, start_time=2000, run_name="pipeline-b", tags={"lfb_ray.kind": "pipeline"}).info.run_id
    b_none = _finished_run(client, exp, "none", 2100, 0.40, b)
    b_nl = _finished_run(client, exp, "nl", 2200, 0.60, b)
    a_nl = _finished_run(client, exp, "nl", 3000, 0.80, a, {"recipe": 1})
    for p in (a, b):
        client.set_terminated(p)
    base = ["--config", "configs/synthetic.yaml", "--tracking-uri", uri, "--experiment", "e"]

    assert job.main([*base, "--out", str(tmp_path / "latest")]) == 0
    assert _csv_runs(tmp_path / "latest") == [b_none, b_nl]
    assert "pipeline-b" in capsys.readouterr().out  # says which parent run it compares
    assert job.main([*base, "--parent", a, "--out", str(tmp_path / "a")]) == 0
    assert _csv_runs(tmp_path / "a") == [a_none, a_nl]
    assert job.main([*base, "--runs", b_nl, a_none, "--out", str(tmp_path / "named")]) == 0
    assert _csv_runs(tmp_path / "named") == [a_none, b_nl]
    assert job.main([*base, "--filter", "metrics.recipe = 1", "--out", str(tmp_path / "filtered")]) == 0
    assert _csv_runs(tmp_path / "filtered") == [a_none, a_nl]
    # The comparison run is logged under the parent it compares.
    cmp_runs = client.search_runs([exp], "tags.`lfb_ray.kind` = 'comparison'")
    assert sorted(r.data.tags.get("mlflow.parentRunId", "") for r in cmp_runs) == sorted(["", "", a, b])


def test_compare_job_refuses_contradicting_selections_and_an_unknown_parent(tmp_path, capsys):
    import jobs.compare as job

    uri, client, exp = _store(tmp_path)
    _finished_run(client, exp, "none", 1000, 0.5)  # a run outside any pipeline
    base = ["--config", "configs/synthetic.yaml", "--tracking-uri", uri, "--experiment", "e", "--out", str(tmp_path)]
    assert job.main(base) == 1
    assert "no pipeline parent run in experiment 'e'" in capsys.readouterr().err
    assert job.main([*base, "--parent", "0" * 32]) == 1
    assert "0" * 32 in capsys.readouterr().err
    with pytest.raises(SystemExit):
        job.main([*base, "--parent", "x", "--runs", "y"])


def test_comparison_csv_holds_every_number_of_the_table(tmp_path):
    """comparison.csv: every column the table shows (both protocols, label families, epochs, wall
    time, clips/s) for every run, unrounded: the Markdown table's cells are its numbers, formatted."""
    import csv

    from lfb_ray.compare import compare

    uri, client, exp = _store(tmp_path)
    extra = {"val/mAP_official": 0.25, "val/mAP_mmaction2": 0.2411, "val/mAP_family_long_term": 0.7123456,
             "val/mAP_family_short_term": 0.9, "train/clips_per_s": 12.34}
    ids = [_finished_run(client, exp, op, 1000 + i, 0.2 + 0.1 * i, extra=extra)
           for i, op in enumerate(("none", "nl"))]
    compare(uri, "e", str(tmp_path / "out"), run_ids=ids, protocols=True, log_to_mlflow=False)
    with open(tmp_path / "out" / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["model", "operator", "run_id", "run_name", "mAP", "mAP_official", "mAP_mmaction2",
                             "mAP_family_long_term", "mAP_family_short_term", "epochs", "wall_seconds",
                             "clips_per_s"]
    assert [r["run_id"] for r in rows] == ids
    assert float(rows[1]["mAP"]) == pytest.approx(0.3) and float(rows[0]["mAP_family_long_term"]) == 0.7123456
    md = (tmp_path / "out" / "comparison.md").read_text().splitlines()
    for line, r in zip(md[2:], rows):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:8] == [r["model"]] + [f"{100 * float(r[k]):.2f}" for k in
                                            ("mAP", "mAP_official", "mAP_mmaction2", "mAP_family_long_term",
                                             "mAP_family_short_term")] + [r["epochs"], f"{float(r['wall_seconds']):.0f}"]
        assert cells[8] == f"{float(r['clips_per_s']):.1f}" and r["run_id"].startswith(cells[9])


def test_family_maps_come_from_the_result_and_else_from_per_class_aps():
    """One owner of a run's family mAPs: those its evaluation logged win; a run that predates them
    gets them from its per-class APs."""
    from lfb_ray.evaluation.families import family_maps

    fams = {"short": (1, 2), "long": (3,)}
    logged = {"val/mAP": 0.5, "val/mAP_family_short": 0.6}
    assert family_maps(logged) == {"val/mAP_family_short": 0.6}
    assert family_maps(logged, {"1": 0.1, "2": 0.3, "3": 0.9}, fams) == {"val/mAP_family_short": 0.6,
                                                                        "val/mAP_family_long": 0.9}
