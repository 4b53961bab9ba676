"""`fit_many` isolates failures (issue 22): a failing run does not end its siblings, is reported
with its error, is retried only when its task died, and the caller gets `FitManyError` once every
other run has finished; the pipeline's operators stage keeps the finished runs, so its rerun trains
only the failed one.

`fit` is replaced by `fake_fit`, which behaves per `model.fbo`: this module is pickled by value
so that the real Ray tasks of `fit_many` (other processes) run it. The local cluster is real.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.faults]

# model.fbo -> what its run does: "ok" (returns after `seconds`), "raise" (an exception from fit),
# "crash-once" (its process dies on the first attempt, then it succeeds).
BEHAVIOUR = {"none": ("ok", 0.2), "nl": ("raise", 1.0), "avg": ("crash-once", 0.5), "max": ("ok", 4.0)}


def fake_fit(cfg, *, fresh=False, parent_run_id=None, init_checkpoint=None):
    from lfb_ray.train.driver import FitResult

    calls = Path(cfg.workdir) / "calls"
    calls.mkdir(parents=True, exist_ok=True)
    attempt = len(list(calls.glob(f"{cfg.model.fbo}.*")))
    (calls / f"{cfg.model.fbo}.{attempt}").write_text(f"{time.time()} {os.getpid()}")
    what, seconds = BEHAVIOUR[cfg.model.fbo]
    time.sleep(seconds)
    if what == "raise" and not (Path(cfg.workdir) / "fixed").exists():
        raise ValueError(f"bad {cfg.model.fbo} run")
    if what == "crash-once" and attempt == 0:
        os._exit(3)  # the task's process dies: a Ray system error, not an exception of fit
    (calls / f"{cfg.model.fbo}.{attempt}.end").write_text(str(time.time()))
    return FitResult(run_name=f"{cfg.model.fbo}-run", mlflow_run_id=None, metrics={"val/mAP": 0.5},
                     checkpoint_path=None, model_path=f"/models/{cfg.model.fbo}.pt", seconds=seconds)


def calls(workdir: Path) -> dict[str, int]:
    names = [p.name for p in (workdir / "calls").iterdir() if not p.name.endswith(".end")]
    return {op: sum(n.split(".")[0] == op for n in names) for op in sorted({n.split(".")[0] for n in names})}


def configs(tmp_path, ops, *overrides):
    from lfb_ray.train.driver import _with_operator

    cfg = tiny_config(tmp_path, tmp_path / "data", "tracking.enabled=false", *overrides)
    return {op: _with_operator(cfg, op) for op in ops}


@pytest.fixture
def fake(monkeypatch, ray_local):
    import ray.cloudpickle

    from lfb_ray.train import driver

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's own pickler
    monkeypatch.setattr(driver, "fit", fake_fit)


def test_a_failing_run_does_not_end_the_others(fake, tmp_path, capsys):
    from lfb_ray.train import FitManyError, fit_many

    recorded = []
    t0 = time.time()
    with pytest.raises(FitManyError) as e:
        fit_many(configs(tmp_path, ["nl", "max", "avg"], "cluster.concurrent_runs=2", "train.max_failures=1"),
                 on_done=lambda key, r: recorded.append((key, time.time())))
    # nl raised after 1 s while max (4 s) was running: max still finished, and so did avg, whose
    # task died once and was started again (train.max_failures=1); only then did fit_many raise.
    assert sorted(k for k, _ in recorded) == ["avg", "max"]
    assert e.value.failures == {"nl": ["ValueError: bad nl run"]}
    assert sorted(e.value.results) == ["avg", "max"] and e.value.results["max"].model_path == "/models/max.pt"
    assert calls(tmp_path) == {"avg": 2, "max": 1, "nl": 1}  # an exception of fit is not retried
    assert "1 of 3 runs failed: nl; finished: " in str(e.value) and "ValueError: bad nl run" in str(e.value)
    log = capsys.readouterr().out
    assert "[lfb_ray] run nl failed (the other runs go on): ValueError: bad nl run" in log
    assert "[lfb_ray] run avg failed (its task died, starting it again (attempt 2 of 2))" in log
    assert max(t for _, t in recorded) - t0 >= 4.0  # max ran its whole 4 s after nl had failed


def test_a_task_that_dies_more_often_than_max_failures_is_a_failure(fake, tmp_path):
    from lfb_ray.train import FitManyError, fit_many

    with pytest.raises(FitManyError) as e:
        fit_many(configs(tmp_path, ["avg", "none"], "cluster.concurrent_runs=2", "train.max_failures=0"))
    assert list(e.value.failures) == ["avg"] and "WorkerCrashedError" in e.value.failures["avg"][0]
    assert list(e.value.results) == ["none"] and calls(tmp_path) == {"avg": 1, "none": 1}


def test_one_run_at_a_time_also_goes_on_after_a_failure(fake, tmp_path):
    from lfb_ray.train import FitManyError, fit_many

    recorded = []
    with pytest.raises(FitManyError) as e:
        fit_many(configs(tmp_path, ["nl", "none"], "cluster.concurrent_runs=1"),
                 on_done=lambda key, r: recorded.append(key))
    assert recorded == ["none"] and list(e.value.failures) == ["nl"]


def test_pipeline_keeps_the_finished_operators_and_its_rerun_trains_only_the_failed_one(
        fake, tmp_path, monkeypatch, capsys):
    """The operators stage with real `fit_many` (other stages stubbed: they are not under test)."""
    from types import SimpleNamespace

    from lfb_ray.pipeline import _load_state, run_pipeline
    from lfb_ray.train import FitManyError

    monkeypatch.setattr("lfb_ray.data.prep.build_tasks", lambda cfg: ([], []))
    monkeypatch.setattr("lfb_ray.data.prep.prepare_dataset", lambda cfg, built: SimpleNamespace(
        line=lambda: "prepared", keyframes=1, bytes=1, failures=[]))
    monkeypatch.setattr("lfb_ray.bank.build.build_bank", lambda cfg, model: SimpleNamespace(
        line=lambda: "bank", features=1, bytes=1, path=str(tmp_path / "bank")))
    # The stubbed stages commit nothing to take identities from (tests/test_run_identity.py tests those).
    monkeypatch.setattr("lfb_ray.identity.run_inputs", lambda cfg, init=None: {})
    monkeypatch.setattr("lfb_ray.identity.prepared_id", lambda uri: "prepared")
    monkeypatch.setattr("lfb_ray.identity.bank_id", lambda uri: "bank")
    monkeypatch.setattr("lfb_ray.storage.file_sha256", lambda path: "0" * 64)
    monkeypatch.setattr("lfb_ray.bank.build.build_identity", lambda cfg, sha: ({}, "build"))
    cfg = tiny_config(tmp_path, tmp_path / "data", "tracking.enabled=false", "cluster.concurrent_runs=2")
    with pytest.raises(FitManyError, match="1 of 3 runs failed: nl"):
        run_pipeline(cfg, operators=("nl", "avg", "max"))
    partial = _load_state(str(tmp_path / "pipeline.json"))["operators_partial"]["result"]
    assert sorted(partial) == ["avg", "max"]  # recorded although nl had failed first
    assert "[pipeline] operators: 2 of 3 models recorded (avg, max); failed: nl" in capsys.readouterr().out
    (tmp_path / "fixed").touch()
    out = run_pipeline(cfg, operators=("nl", "avg", "max"))
    assert calls(tmp_path) == {"avg": 2, "max": 1, "nl": 2, "none": 1}  # avg: its crash-once retry
    assert sorted(out["maps"]) == ["avg", "max", "nl", "none"]
