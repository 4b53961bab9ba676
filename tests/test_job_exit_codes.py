"""The jobs' exit codes mean something (issue 22): a failed run returns non-zero, so the tests that
assert `main(...) == 0` (test_benchmarks.py, test_pipeline.py) can fail. Fast: no Ray cluster."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
from conftest import REPO

pytestmark = pytest.mark.faults


def job(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_job", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def small_eval_case(monkeypatch):
    from benchmarks import evaluation

    monkeypatch.setitem(evaluation.SIZES, "quick", 40)  # keyframes: the check, not the timing, is under test


def test_benchmark_exit_code_follows_its_correctness_check(small_eval_case, monkeypatch, capsys):
    import lfb_ray.evaluation.ava_map as ava_map

    bench = job("benchmark")
    assert bench.main(["eval", "--quick"]) == 0
    real = ava_map.evaluate_frame_map
    # A vectorised evaluator that drifts from the reference: the benchmark's own check must fail it.
    monkeypatch.setattr(ava_map, "evaluate_frame_map",
                        lambda *a, **k: dataclasses.replace(real(*a, **k), mAP=real(*a, **k).mAP + 1e-3))
    assert bench.main(["eval", "--quick"]) == 1
    err = capsys.readouterr().err
    assert "[eval] FAILED" in err and "AssertionError: official: vectorised and reference frame-mAP differ" in err
    assert "error: 1 of 1 benchmark(s) failed: eval" in err


def test_pipeline_exit_code_is_nonzero_when_a_stage_fails(tmp_path, monkeypatch, capsys):
    pipeline = job("pipeline")
    monkeypatch.setattr(pipeline, "init_ray", lambda cfg=None: None)  # the failure comes before Ray work
    # A failure the preflight does not foresee (the one below it does: see the next test).
    monkeypatch.setattr(pipeline, "preflight_or_exit", lambda *a, **k: None)
    rc = pipeline.main(["--config", str(REPO / "configs" / "tiny.yaml"), f"workdir={tmp_path / 'work'}",
                        f"data.root={tmp_path / 'no_data'}"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "error: the pipeline stopped:" in err and "no_data" in err


def test_pipeline_exit_code_is_2_when_the_preflight_fails(tmp_path, monkeypatch, capsys):
    pipeline = job("pipeline")
    monkeypatch.setattr(pipeline, "init_ray", lambda cfg=None: None)
    with pytest.raises(SystemExit) as e:
        pipeline.main(["--config", str(REPO / "configs" / "tiny.yaml"), f"workdir={tmp_path / 'work'}",
                       f"data.root={tmp_path / 'no_data'}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"preflight: data.videos_dir: {tmp_path / 'no_data' / 'videos'}: videos folder" in err
    assert "nothing was run" in err and not (tmp_path / "work" / "pipeline.json").exists()
