"""The typed config travels as itself: the baseline rule has one owner (`ModelConfig.baseline`), and
an evaluation is a typed result whose metrics keep the names and order MLflow and best.pt hold."""

from __future__ import annotations

import dataclasses
import pickle

from lfb_ray.config import Config, ModelConfig, load_config


def test_the_baseline_has_no_operator_and_the_groups_only_when_asked():
    m = ModelConfig(fbo="max", exclusive_groups=((1, 2), (3, 4)), num_classes=5)
    assert m.baseline() == dataclasses.replace(m, fbo="none")
    off = dataclasses.replace(m, exclusive_groups_in_baseline=False)
    assert off.baseline() == dataclasses.replace(off, fbo="none", exclusive_groups=())
    assert off.baseline().baseline() == off.baseline()


def test_a_config_pickles_through_ray_unchanged():
    cfg = load_config("configs/synthetic.yaml", ["model.fbo=avg"])
    again = pickle.loads(pickle.dumps(cfg))
    assert again == cfg and isinstance(again, Config) and again.data.mean == cfg.data.mean


def test_eval_result_metrics_keep_their_names_and_order():
    from lfb_ray.train.evaluate import EvalResult

    ev = EvalResult(mAP=0.5, csv="s3://b/r/val_results_epoch001.csv", csv_local="/x/val_results_epoch001.csv",
                    group_mAP={"pose": 0.4}, protocol_mAP={"official": 0.5, "mmaction2": 0.6},
                    per_class={1: 0.3}, family_mAP={"val/mAP_family_motion": 0.2})
    assert list(ev.metrics().items()) == [
        ("val/mAP", 0.5), ("val/csv", "s3://b/r/val_results_epoch001.csv"), ("val/mAP_pose", 0.4),
        ("val/mAP_official", 0.5), ("val/mAP_mmaction2", 0.6), ("val/mAP_family_motion", 0.2)]
