"""How many operator runs go at once (`plan_concurrency`), and run names that do not depend on it."""

from __future__ import annotations

import pytest

from tests.conftest import REPO


def _cfg(*overrides: str):
    from lfb_ray.config import load_config

    return load_config(REPO / "configs" / "tiny.yaml", list(overrides))


def test_auto_takes_as_many_runs_as_the_cpus_hold():
    from lfb_ray.train.loop import plan_concurrency

    cfg = _cfg("cluster.num_workers=2", "cluster.cpus_per_worker=0.5", "cluster.data_cpus=0.5")  # 2 CPUs a run
    assert plan_concurrency(cfg, 4, {"CPU": 2.0}) == (1, 1.0)
    assert plan_concurrency(cfg, 4, {"CPU": 5.0}) == (2, 1.0)
    assert plan_concurrency(cfg, 3, {"CPU": 64.0}) == (3, 1.0)


def test_asked_for_runs_scale_the_cpu_reservations_to_fit():
    from lfb_ray.train.loop import _scaled, plan_concurrency

    cfg = _cfg("cluster.num_workers=2", "cluster.cpus_per_worker=0.5", "cluster.data_cpus=0.5",
               "cluster.concurrent_runs=2")
    slots, scale = plan_concurrency(cfg, 4, {"CPU": 2.0})
    assert (slots, scale) == (2, 0.5)
    s = _scaled(cfg, scale).cluster
    assert slots * s.num_workers * (s.cpus_per_worker + s.data_cpus) == pytest.approx(2.0)
    assert plan_concurrency(cfg, 4, {"CPU": 8.0}) == (2, 1.0)  # enough CPUs: no scaling
    assert plan_concurrency(cfg, 1, {"CPU": 2.0}) == (1, 1.0)  # one run: as configured


def test_gpu_runs_never_share_a_gpu():
    from lfb_ray.train.loop import plan_concurrency

    cfg = _cfg("cluster.num_workers=2", "cluster.device=gpu", "cluster.concurrent_runs=3")
    assert plan_concurrency(cfg, 3, {"CPU": 64.0, "GPU": 4.0})[0] == 2
    assert plan_concurrency(cfg, 3, {"CPU": 64.0, "GPU": 1.0})[0] == 1
    auto = _cfg("cluster.num_workers=8", "cluster.device=auto", "cluster.cpus_per_worker=1", "cluster.data_cpus=1")
    assert plan_concurrency(auto, 3, {"CPU": 192.0, "GPU": 16.0}) == (2, 1.0)


def test_run_names_ignore_resource_hints_but_not_the_recipe():
    from lfb_ray.train import run_name_for

    base = _cfg("model.fbo=nl")
    assert run_name_for(base) == run_name_for(_cfg("model.fbo=nl", "cluster.cpus_per_worker=0.25",
                                                   "cluster.data_cpus=0.125", "cluster.concurrent_runs=2",
                                                   "bank.max_actors=1", "bank.cpus_per_actor=2"))
    assert run_name_for(base) != run_name_for(_cfg("model.fbo=nl", "cluster.num_workers=1"))  # batch changes
    assert run_name_for(base) != run_name_for(_cfg("model.fbo=nl", "train.head_warmup_steps=7"))
    assert run_name_for(base) != run_name_for(_cfg("model.fbo=nl", "bank.max_feats_per_second=3"))


def test_negative_concurrent_runs_is_rejected():
    from lfb_ray.config import ConfigError

    with pytest.raises(ConfigError, match="concurrent_runs"):
        _cfg("cluster.concurrent_runs=-1")
