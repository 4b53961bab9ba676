"""Regenerate configs/*.yaml from the dataclass defaults plus each config's deltas.

The YAML files are the product (flat, complete, no inheritance); this script only keeps them
complete when a field is added. Run: python tools/write_configs.py
"""

from __future__ import annotations

from pathlib import Path

import yaml

from lfb_ray.config import config_to_dict, load_config

SEED = ["workdir=runs/ava", "data.root=data/ava", "data.train_csv=annotations/ava_train_v2.1.csv",
        "data.val_csv=annotations/ava_val_v2.1.csv",
        "data.train_exclusions=annotations/ava_train_excluded_timestamps_v2.1.csv",
        "data.val_exclusions=annotations/ava_val_excluded_timestamps_v2.1.csv",
        "data.label_map=annotations/ava_action_list_v2.1_for_activitynet_2018.pbtxt",
        "data.train_proposals=annotations/ava_dense_proposals_train.FAIR.recall_93.9.pkl",
        "data.val_proposals=annotations/ava_dense_proposals_val.FAIR.recall_93.9.pkl",
        "data.video_start_second=-1", "model.pretrained=checkpoints/slowonly_r50_4x16x1_256e_kinetics400_rgb.pth",
        "cluster.num_workers=8", "cluster.device=gpu", "cluster.max_gpus=24", "cluster.cpus_per_worker=4",
        "cluster.data_cpus=4",
        "bank.batch_size=16", "bank.cpus_per_actor=8",
        "tracking.experiment=lfb_ava21"]
SYNTH = ["workdir=runs/synthetic", "data.root=data/synthetic", "data.short_side=128", "data.test_short_side=112",
         "data.train_scale_range=[112,128]", "data.train_crop_size=112", "data.jpeg_quality=90",
         "data.flip_ratio=0.0",
         "model.depth=18", "model.base_channels=16", "model.latent_channels=64", "model.init_backbone_from_baseline=true",
         "model.exclusive_groups=[[64,65,66]]", "model.exclusive_groups_in_baseline=false",
         "train.head_warmup_steps=3000", "train.finetune_epochs=0",
         "train.epochs=3", "train.batch_size_per_worker=8", "train.base_lr=1.6", "train.reference_batch=16",
         "train.warmup_epochs=0.5", "train.lr_steps=[2]", "train.finetune_lr_scale=0.25", "train.log_every_iters=5", "train.eval_every_epochs=0",
         "eval.batch_size=8", "bank.batch_size=8",
         "cluster.num_workers=2", "cluster.device=cpu", "cluster.cpus_per_worker=0.5", "cluster.data_cpus=0.5",
         "tracking.experiment=lfb_synthetic"]

CONFIGS = {
    "lfb_nl": ("LFB-NL, SlowOnly-R50 4x16, Kinetics init, AVA v2.1 (mmaction2 0.x: 24.11 mAP)",
               SEED + ["model.fbo=nl"], "jobs/train.py"),
    "lfb_avg": ("LFB-Avg, SlowOnly-R50 4x16, Kinetics init, AVA v2.1 (mmaction2 0.x: 20.17 mAP)",
                SEED + ["model.fbo=avg"], "jobs/train.py"),
    "lfb_max": ("LFB-Max, SlowOnly-R50 4x16, Kinetics init, AVA v2.1 (mmaction2 0.x: 22.15 mAP)",
                SEED + ["model.fbo=max"], "jobs/train.py"),
    "baseline": ("Short-term baseline SlowOnly-R50 4x16 that computes the bank (mmaction2: 20.1 mAP; lr 0.2 at 128)",
                 SEED + ["model.fbo=none", "train.base_lr=0.2", "train.reference_batch=128",
                         "train.batch_size_per_worker=16"], "jobs/train.py"),
    "lfb_infer": ("Bank inference with the AVA baseline checkpoint (proposals >= 0.9, test transform)",
                  SEED + ["model.fbo=none", "model.pretrained=",
                          "bank.checkpoint=checkpoints/slowonly_kinetics_pretrained_r50_4x16x1_20e_ava_rgb.pth",
                          "bank.person_score_thr=0.9", "bank.min_actors=1", "bank.max_actors=8"],
                  "jobs/build_bank.py"),
    "synthetic": ("Synthetic AVA demo on CPU: small SlowOnly (depth 18, width 16), whole pipeline in minutes.\n# data.flip_ratio=0: the synthetic move-left/move-right labels are not mirror-invariant (AVA's are)\n# lr 1.6 at batch 16: a from-scratch model with sigmoid BCE over 80 classes learns the\n# motion labels in ~300 steps at this lr and not at all in 400 steps at 0.1; the LFB models\n# start from the baseline's backbone and fine-tune at a quarter of it (train.finetune_lr_scale):\n# at 1.6 the NL head's training is unstable (tools/probe_bank_reader.py --optim sgd --lr 1.6)\n# The LFB models and the control: the baseline's backbone, frozen, and a head trained for 3000 Adam\n# steps on the bank's own features (train.head_warmup_steps, train.finetune_epochs=0), with a softmax\n# cross-entropy over the three exclusive role classes (model.exclusive_groups); SGD through the\n# backbone does not teach the NL head to retrieve within a CPU budget (docs/synthetic_study.md).\n# The baseline keeps the sigmoid BCE (model.exclusive_groups_in_baseline=false): with the role\n# cross-entropy at lr 1.6 it reaches val mAP 22.4 instead of ~77.\n# cluster.concurrent_runs=2: the four operator runs go two at a time, each reserving half the CPUs;\n# NL's head warm-up keeps one core busy for minutes while its second worker waits, and the other\n# runs use the idle core meanwhile.",
                  SYNTH + ["model.fbo=nl", "cluster.concurrent_runs=2"], "jobs/pipeline.py"),
    "tiny": ("CI smoke: tiny synthetic set, tiny model, 1 epoch",
             SYNTH + ["workdir=runs/tiny", "data.root=data/tiny", "model.base_channels=8", "model.latent_channels=16",
                      "train.epochs=1", "train.batch_size_per_worker=4", "train.lr_steps=[]",
                      "train.warmup_epochs=0.5", "bank.window_seconds=20", "model.fbo=nl",
                      "model.init_backbone_from_baseline=false", "model.exclusive_groups=[]", "train.head_warmup_steps=0",
                      "train.finetune_epochs=-1"], "jobs/pipeline.py"),
}


def main() -> None:
    out = Path(__file__).resolve().parents[1] / "configs"
    for name, (title, overrides, job) in CONFIGS.items():
        cfg = load_config(None, overrides)
        body = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False, width=100)
        header = (f"# {title}\n# Complete and flat: every field of lfb_ray.config.Config is listed; no inheritance.\n"
                  f"# Local:   python {job} --config configs/{name}.yaml\n"
                  f"# Cluster: RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . -- "
                  f"python {job} --config configs/{name}.yaml\n")
        (out / f"{name}.yaml").write_text(header + body)
        print("wrote", out / f"{name}.yaml")


if __name__ == "__main__":
    main()
