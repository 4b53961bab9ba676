"""How many operator runs go at once (`plan_concurrency`), and run names that do not depend on it."""

from __future__ import annotations

import pytest

from tests.conftest import REPO


def _cfg(*overrides: str):
    from lfb_ray.config import load_config

    return load_config(REPO / "configs" / "tiny.yaml", list(overrides))


def test_auto_takes_as_many_runs_as_the_cpus_hold():
    from lfb_ray.train.resources import plan_concurrency

    cfg = _cfg("cluster.num_workers=2", "cluster.cpus_per_worker=0.5", "cluster.data_cpus=0.5")  # 2 CPUs a run
    assert plan_concurrency(cfg, 4, {"CPU": 2.0}) == (1, 1.0)
    assert plan_concurrency(cfg, 4, {"CPU": 5.0}) == (2, 1.0)
    assert plan_concurrency(cfg, 3, {"CPU": 64.0}) == (3, 1.0)


def test_asked_for_runs_scale_the_cpu_reservations_to_fit():
    from lfb_ray.train.resources import plan_concurrency, scaled

    cfg = _cfg("cluster.num_workers=2", "cluster.cpus_per_worker=0.5", "cluster.data_cpus=0.5",
               "cluster.concurrent_runs=2")
    slots, scale = plan_concurrency(cfg, 4, {"CPU": 2.0})
    assert (slots, scale) == (2, 0.5)
    s = scaled(cfg, scale).cluster
    assert slots * s.num_workers * (s.cpus_per_worker + s.data_cpus) == pytest.approx(2.0)
    assert plan_concurrency(cfg, 4, {"CPU": 8.0}) == (2, 1.0)  # enough CPUs: no scaling
    assert plan_concurrency(cfg, 1, {"CPU": 2.0}) == (1, 1.0)  # one run: as configured


def test_gpu_runs_never_share_a_gpu():
    from lfb_ray.train.resources import plan_concurrency

    cfg = _cfg("cluster.num_workers=2", "cluster.device=gpu", "cluster.concurrent_runs=3")
    assert plan_concurrency(cfg, 3, {"CPU": 64.0, "GPU": 4.0})[0] == 2
    assert plan_concurrency(cfg, 3, {"CPU": 64.0, "GPU": 2.0})[0] == 1
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


def test_one_device_rule_for_every_stage():
    none, some = {"CPU": 16.0}, {"CPU": 16.0, "GPU": 8.0}
    gpu, cpu, auto = (_cfg(f"cluster.device={d}").cluster for d in ("gpu", "cpu", "auto"))
    assert gpu.uses_gpu(none) and gpu.uses_gpu(some)
    assert not cpu.uses_gpu(some)
    assert not auto.uses_gpu(none) and auto.uses_gpu(some)


def test_gpu_config_asks_for_gpus_before_any_gpu_node_is_up():
    """An autoscaling cluster at 0 GPU nodes: the ScalingConfig still asks for a GPU per worker
    (what makes the autoscaler add GPU nodes), and auto would not."""
    from lfb_ray.train.resources import scaling_config

    head_only = {"CPU": 0.0, "memory": 1e9}
    sc = scaling_config(_cfg("cluster.num_workers=8", "cluster.device=gpu", "cluster.max_gpus=24"), head_only)
    assert sc.use_gpu and sc.num_workers == 8 and sc.resources_per_worker == {"CPU": 0.5, "GPU": 1}
    sc = scaling_config(_cfg("cluster.num_workers=2", "cluster.device=auto"), {"CPU": 4.0})
    assert not sc.use_gpu and "GPU" not in sc.resources_per_worker


def test_ava_configs_run_the_three_operators_side_by_side_on_three_8_gpu_nodes():
    from lfb_ray.config import load_config
    from lfb_ray.train.resources import plan_concurrency, scaling_config

    for name in ("lfb_nl", "lfb_avg", "lfb_max", "baseline", "lfb_infer"):
        cl = load_config(REPO / "configs" / f"{name}.yaml").cluster
        assert (cl.device, cl.num_workers, cl.max_gpus) == ("gpu", 8, 24), name
    cfg = load_config(REPO / "configs" / "lfb_nl.yaml")
    for now in ({"CPU": 0.0}, {"CPU": 96.0, "GPU": 8.0}, {"CPU": 288.0, "GPU": 24.0}):  # 0, 1, 3 nodes up
        assert plan_concurrency(cfg, 3, now) == (3, 1.0), now
        assert scaling_config(cfg, now).use_gpu
    # A cluster bigger than configured: the GPUs up now count.
    assert plan_concurrency(cfg, 5, {"CPU": 480.0, "GPU": 40.0}) == (5, 1.0)
    # Asked for fewer at once: that many.
    two = load_config(REPO / "configs" / "lfb_nl.yaml", ["cluster.concurrent_runs=2"])
    assert plan_concurrency(two, 3, {"CPU": 0.0}) == (2, 1.0)


def test_gpu_runs_that_can_never_be_placed_fail_at_start():
    from lfb_ray.config import ConfigError
    from lfb_ray.train.resources import plan_concurrency, scaling_config

    fixed = _cfg("cluster.num_workers=2", "cluster.device=gpu")  # max_gpus=0: a fixed cluster
    for fn in (lambda r: plan_concurrency(fixed, 3, r), lambda r: scaling_config(fixed, r)):
        with pytest.raises(ConfigError, match=r"num_workers=2 GPUs.*cluster.max_gpus=0"):
            fn({"CPU": 64.0, "GPU": 1.0})
        with pytest.raises(ConfigError, match="cluster.max_gpus"):
            fn({"CPU": 64.0})
    # auto without GPUs is CPU, cpu never checks GPUs
    assert plan_concurrency(_cfg("cluster.device=auto"), 2, {"CPU": 64.0})[0] >= 1
    assert not scaling_config(_cfg("cluster.device=cpu", "cluster.max_gpus=4"), {"CPU": 4.0}).use_gpu


@pytest.mark.parametrize("override,needle", [
    ("cluster.max_gpus=-1", "cluster.max_gpus must be >= 0"),
    ("cluster.max_gpus=1", "cluster.max_gpus=1 cannot hold one run of cluster.num_workers=2"),
    ("cluster.max_gpus=two", "cluster.max_gpus: expected an integer"),
])
def test_max_gpus_is_validated(override, needle):
    from lfb_ray.config import ConfigError

    with pytest.raises(ConfigError) as e:
        _cfg("cluster.device=gpu", override)
    assert needle in str(e.value)


def test_run_names_ignore_max_gpus():
    from lfb_ray.train import run_name_for

    assert run_name_for(_cfg("cluster.device=gpu")) == run_name_for(_cfg("cluster.device=gpu", "cluster.max_gpus=16"))
