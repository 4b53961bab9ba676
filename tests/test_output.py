"""What a run prints: progress inside an epoch, the closing summaries, and a non-interactive log a
person reads (no progress-bar redraws, no per-report flood, no deprecation warnings)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

from lfb_ray.progress import (
    LINES_PER_EPOCH,
    JobSummary,
    format_duration,
    mlflow_ui_command,
    progress_every,
    progress_line,
    stdout_is_terminal,
)

PROGRESS_RE = re.compile(r"\[lfb_ray\] (\S+) epoch (\d+)/(\d+) iter (\d+)/(\d+): loss \d+\.\d{4}, lr \d+\.\d{6}, "
                         r"\d+\.\d clips/s, epoch ETA (\d+h\d\dm|\d+m\d\ds|\d+s|\?)$")


# --- unit: the progress line and its rate


def test_progress_line_format():
    line = progress_line("nl", 3, 20, 400, 2000, loss=0.41234, lr=0.15, clips_per_s=42.06, eta_s=750.4)
    assert line == "[lfb_ray] nl epoch 3/20 iter 400/2000: loss 0.4123, lr 0.150000, 42.1 clips/s, epoch ETA 12m30s"
    assert PROGRESS_RE.fullmatch(line)


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (44.6, "45s"), (60, "1m00s"), (750.4, "12m30s"),
                                           (3599.4, "59m59s"), (7500, "2h05m"), (float("nan"), "?"),
                                           (float("inf"), "?"), (-1, "?")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_a_terminal_gets_a_line_at_every_logging_point():
    assert progress_every(10, 2000, interactive=True) == 10
    assert progress_every(1, 5, interactive=True) == 1


@pytest.mark.parametrize("log_every, iters", [(10, 2000), (10, 2001), (5, 15), (5, 100), (5, 101), (1, 3),
                                              (20, 50_000), (7, 141), (10, 199)])
def test_a_log_gets_at_most_lines_per_epoch_on_logging_points(log_every, iters):
    def most_lines(every: int) -> int:
        """The most progress lines of an epoch, over every global step count it can start from: the
        loop prints after global steps s+1..s+iters-1 (not the last) that `every` divides."""
        return max((s + iters - 1) // every - s // every for s in range(every))

    every = progress_every(log_every, iters, interactive=False)
    assert every % log_every == 0  # a progress line only where the loss is read anyway: no extra host sync
    assert most_lines(every) <= LINES_PER_EPOCH
    if every > log_every:  # and no sparser than needed: one logging interval less prints too many
        assert most_lines(every - log_every) > LINES_PER_EPOCH


def test_an_ava_epoch_prints_every_100_iterations_into_a_log():
    # configs/lfb_nl.yaml: log_every_iters 10; AVA v2.1 at batch 96: ~2,000 iterations an epoch
    assert progress_every(10, 2000, interactive=False) == 100


def test_progress_every_refuses_a_zero_interval():
    with pytest.raises(ValueError, match="log_every_iters"):
        progress_every(0, 100, interactive=False)


def test_stdout_is_terminal_of_files_and_odd_streams(tmp_path):
    with open(tmp_path / "log", "w") as f:
        assert not stdout_is_terminal(f)
    assert not stdout_is_terminal(object())


# --- unit: the closing summary


def test_job_summary_redacts_credentials_and_names_the_mlflow_ui():
    s = JobSummary("train", [("nl model", "s3://AKIAKEY:s3cret@bucket/runs/nl/model.pt"), ("bank", "/w/bank")],
                   "sqlite:////w/mlflow.db")
    text = "\n".join(s.lines())
    assert "s3cret" not in text and "AKIAKEY" not in text
    assert text.splitlines()[0] == "[train] outputs:"
    assert "bucket/runs/nl/model.pt" in text and "/w/bank" in text
    assert text.splitlines()[-1].split() == ["MLflow", "UI", "mlflow", "ui", "--backend-store-uri",
                                             "sqlite:////w/mlflow.db"]


def test_job_summary_without_tracking_has_no_mlflow_line():
    assert not any("MLflow" in line for line in JobSummary("bank", [("bank", "/w/bank")]).lines())


def test_mlflow_ui_of_a_tracking_server_is_its_own_address():
    cmd = mlflow_ui_command("https://user:pw@mlflow.example.com:5000")
    assert "pw" not in cmd and "mlflow.example.com:5000" in cmd and "--backend-store-uri" not in cmd


def test_pipeline_summary_names_table_plot_and_mlflow(tmp_path):
    from conftest import tiny_config

    from lfb_ray.config import resolve_paths
    from lfb_ray.progress import pipeline_summary

    cfg = resolve_paths(tiny_config(tmp_path / "w", tmp_path / "d"))
    text = "\n".join(pipeline_summary(cfg).lines())
    assert f"{cfg.workdir}/comparison/comparison.png" in text
    assert f"{cfg.workdir}/comparison/comparison.md" in text
    assert f"mlflow ui --backend-store-uri sqlite:///{cfg.workdir}/mlflow.db" in text
    off = resolve_paths(tiny_config(tmp_path / "w", tmp_path / "d", "tracking.enabled=false"))
    assert "comparison" not in "\n".join(pipeline_summary(off).lines())


# --- unit: the Ray settings of a non-interactive run (no cluster started)


@pytest.fixture
def _env_restored():
    from lfb_ray.cli import COLOR_PREFIX_ENV, DATA_PROGRESS_ENV, TRAIN_PRINT_PATCH_ENV
    from lfb_ray.progress import INTERACTIVE_ENV

    keys = (COLOR_PREFIX_ENV, DATA_PROGRESS_ENV, INTERACTIVE_ENV, TRAIN_PRINT_PATCH_ENV)
    before = {k: os.environ.get(k) for k in keys}
    for k in keys:
        os.environ.pop(k, None)
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _data_context_after(interactive: bool):
    from ray.data import DataContext

    from lfb_ray.cli import configure_ray_output, set_output_env

    ctx = DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.print_on_execution_start)
    try:
        set_output_env(interactive)
        configure_ray_output()
        return ctx.enable_progress_bars, ctx.print_on_execution_start
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start = saved


def test_a_redirected_driver_turns_ray_data_bars_off_here_and_in_its_workers(_env_restored):
    from lfb_ray.cli import driver_runtime_env

    assert _data_context_after(interactive=False) == (False, False)
    env = driver_runtime_env({})["env_vars"]
    assert env["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1"  # the workers' Ray Data reads it on import
    assert "LFB_RAY_INTERACTIVE" not in env
    assert os.environ["RAY_COLOR_PREFIX"] == "0"
    assert env["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"  # one copy of each line a Train worker prints


def test_a_terminal_keeps_ray_data_bars(_env_restored):
    from lfb_ray.cli import driver_runtime_env

    assert _data_context_after(interactive=True) == (True, True)
    assert driver_runtime_env({})["env_vars"]["LFB_RAY_INTERACTIVE"] == "1"


def test_a_users_own_progress_bar_setting_is_kept(_env_restored):
    os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "0"
    assert _data_context_after(interactive=False)[0] is True


def test_the_job_declares_the_variable_itself(_env_restored):
    from lfb_ray.cli import driver_runtime_env, set_output_env

    set_output_env(False)
    env = driver_runtime_env({"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "0"}}).get("env_vars", {})
    assert "RAY_DATA_DISABLE_PROGRESS_BARS" not in env  # declaring it twice fails `ray job submit`


def test_ray_train_report_lines_are_dropped_but_its_warnings_kept():
    from ray.train.v2._internal.execution import context

    from lfb_ray.cli import quiet_ray_train_reports

    logger = logging.getLogger(context.__file__)
    level = logger.level
    try:
        quiet_ray_train_reports()
        assert not logger.isEnabledFor(logging.INFO) and logger.isEnabledFor(logging.WARNING)
    finally:
        logger.setLevel(level)


# --- the main job with stdout redirected, as `python jobs/pipeline.py ... > log 2>&1` runs it

# The tiny pipeline below (5 training runs of 3 iterations, log_every_iters=1) printed 161 lines
# (39 KB; 313 lines with the cleaner tracebacks not counted below): ~20 a run (Ray Train's worker
# group start-up, our progress and epoch lines, one warning each from torch and Ray Data per
# worker), ~50 for the stages, the table and the summary. Today's main had printed 76,955 lines
# (3.3 MB, mostly progress-bar redraws) before its operators stage. The budget leaves room for the
# warnings a loaded host adds (raylet's "worker processes have been started", resource waits).
LINE_BUDGET = 300
OVERRIDES = ["train.max_iters_per_epoch=3", "model.init_backbone_from_baseline=true", "train.log_every_iters=1"]


@pytest.fixture(scope="module")
def redirected_log(synthetic_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("redirected")
    log = work / "pipeline.log"
    # The environment of README command 1: Python's default warning filters (a RayDeprecationWarning
    # printed there; Ray Data's own DeprecationWarnings, hidden there, are not our concern).
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_DATA_DISABLE_PROGRESS_BARS",
                                                             "RAY_COLOR_PREFIX", "LFB_RAY_INTERACTIVE",
                                                             "RAY_TRAIN_ENABLE_PRINT_PATCH", "PYTHONWARNINGS")}
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "jobs/pipeline.py", "--config", "configs/tiny.yaml",
                               f"workdir={work / 'run'}", f"data.root={synthetic_root}", *OVERRIDES],
                              cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=1800)
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    return work / "run", text


@pytest.mark.ray
@pytest.mark.slow
def test_a_redirected_pipeline_log_reads_as_text(redirected_log):
    workdir, text = redirected_log
    lines = text.splitlines()
    assert "\x1b" not in text and "\r" not in text  # no progress-bar redraws, no colour codes
    assert "Reporting training result" not in text
    assert "DeprecationWarning" not in text
    assert "logging_progress" not in text and "Starting execution of Dataset" not in text
    # Not counted: Ray Train's PlacementGroupCleaner actor dies with a ~30-line traceback per run
    # ("Found multiple active Ray instances") on a host running more than one Ray cluster, as this
    # test does next to the session's; with one cluster it prints nothing (lfb_ray.cli silences it).
    ours = [line for line in lines if not line.startswith("(PlacementGroupCleaner ")]
    assert len(ours) <= LINE_BUDGET, f"{len(ours)} lines:\n" + "\n".join(ours[:80])


@pytest.mark.ray
@pytest.mark.slow
def test_a_redirected_run_prints_progress_inside_each_epoch(redirected_log):
    _, text = redirected_log
    progress = [m for m in map(PROGRESS_RE.search, text.splitlines()) if m]
    # log_every_iters=1 and 3-iteration epochs: lines at iterations 1 and 2 (the epoch's own line
    # follows the 3rd) of the baseline, the control and nl/avg/max, from rank 0 only.
    by_model = {}
    for m in progress:
        by_model.setdefault(m.group(1), []).append((int(m.group(4)), int(m.group(5))))
    assert sorted(by_model) == ["avg", "max", "nl", "none"]
    for model, its in by_model.items():
        runs = 2 if model == "none" else 1  # "none": the baseline and the control
        assert sorted(its) == sorted([(1, 3), (2, 3)] * runs), (model, its)  # each line once


@pytest.mark.ray
@pytest.mark.slow
def test_a_redirected_pipeline_ends_with_where_its_outputs_are(redirected_log):
    workdir, text = redirected_log
    tail = text[text.rindex("[pipeline] outputs:"):]
    assert f"{workdir}/comparison/comparison.png" in tail and (workdir / "comparison" / "comparison.png").exists()
    assert f"{workdir}/comparison/comparison.md" in tail and (workdir / "comparison" / "comparison.md").exists()
    assert f"mlflow ui --backend-store-uri sqlite:///{workdir}/mlflow.db" in tail
