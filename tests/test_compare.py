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
    MLflow store holding one finished run that logged both protocols."""
    from mlflow.tracking import MlflowClient

    import jobs.compare as job

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("e", artifact_location=str(tmp_path / "art"))
    run = client.create_run(exp, tags={"lfb_ray.operator": "nl"})
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
