"""Experiment: does a pipeline's LFB-NL model retrieve an actor's role from the bank, or has it
learned the training actors' roles by heart?

    python research/probe_memorisation.py --workdir runs/synthetic_s1 --data data/synthetic_s1 [--val-half-steps 3000]

Three measurements on the GT-matched bank entries (no Ray, CPU, seconds; the last one minutes):

1. Role accuracy and mean confidence (softmax over the three roles) of every model of the pipeline
   (baseline, control, avg, max, nl) on the *train* bank entries and on the val ones, split by
   whether the box's clip shows the actor's cue. A model that retrieves generalises to val; one
   that memorised training actors is right and confident on train and confident but wrong on val.
2. The NL model again, with the bank slots at the actor's own cue seconds (+-1 s) zeroed: what is
   left of its no-cue accuracy comes from the rest of the window (the actor's other seconds, other
   actors), i.e. not from retrieving the cue. Chance is about 0.33.
3. (`--val-half-steps N`) A fresh NL head warmed up (`warm_up_head`, the pipeline's recipe, N steps)
   on the val bank entries of half of the val videos, whose features come from a backbone that
   never trained on them, then scored on both halves: a head that memorises is right on its half
   and at chance on the other.

`--workdir` is a pipeline's workdir (its `pipeline.json` names the runs); `--data` the synthetic
dataset it was trained on.
"""

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "synthetic.yaml"))
    p.add_argument("--val-half-steps", type=int, default=0)
    args = p.parse_args()

    import numpy as np
    import torch

    from lfb_ray.bank import FeatureBank
    from lfb_ray.config import load_config
    from lfb_ray.models import build_detector, load_checkpoint
    from lfb_ray.synthetic import LABEL_FAMILIES, load_actors
    from lfb_ray.synthetic.report import _gt_boxes, matched_entries, read_bank_split
    from lfb_ray.train.head_warmup import warm_up_head
    from lfb_ray.train.recipe import flush_denormals

    torch.set_num_threads(1)
    flush_denormals()  # as the train loop does (NL steps slow down ~4x without it)
    state = json.loads((args.workdir / "pipeline.json").read_text())
    runs = {"baseline": state["baseline"]["result"]["run_name"],
            **{op: r["run_name"] for op, r in state["operators"]["result"].items()}}
    roles = list(LABEL_FAMILIES["long_term"])
    actors = load_actors(args.data / "dataset.json")
    base_cfg = load_config(args.config, [])
    window, per_second = base_cfg.bank.window_seconds, base_cfg.bank.max_feats_per_second

    def model_of(run: str):
        fbo = run.split("-")[0]
        m = build_detector(load_config(args.config, [f"model.fbo={fbo}"]).model)
        load_checkpoint(m, str(sorted((args.workdir / "ray_results" / run).glob("checkpoint_*/model.pt"))[-1]))
        return m.eval()

    def entries(split: str):
        gt = _gt_boxes(args.data, split, tuple(roles))
        table, feats = read_bank_split(args.workdir / "bank" / split)
        rows, vids, secs, ys, cues, cue_secs = [], [], [], [], [], []
        for i, vid, sec, (_, role, pid) in matched_entries(table, gt):
            a = actors[vid][pid]
            rows.append(i), vids.append(vid), secs.append(sec), ys.append(roles.index(role))
            cues.append(any(abs(c - sec) <= 1 for c in a.cue_seconds)), cue_secs.append(a.cue_seconds)
        bank = FeatureBank.open(args.workdir / "bank" / split)
        secs = np.array(secs)
        lt = bank.sample(vids, secs, np.random.default_rng(1234), window_seconds=window, max_feats_per_second=per_second)
        return (torch.from_numpy(np.asarray(feats[rows], dtype=np.float32)), lt, np.array(ys), np.array(cues),
                vids, secs, cue_secs)

    def score(m, st, lt, y, cue):
        with torch.no_grad():
            prob = m.classify(st, lt if m.fbo is not None else None)[:, roles].softmax(1).numpy()
        ok, conf = prob.argmax(1) == y, prob.max(1)
        return (f"cue {ok[cue].mean():.3f} (conf {conf[cue].mean():.2f})  no cue {ok[~cue].mean():.3f} "
                f"(conf {conf[~cue].mean():.2f})  n={cue.sum()}/{(~cue).sum()}")

    data = {split: entries(split) for split in ("train", "val")}
    print("1. role accuracy (mean confidence) on the bank entries of each split")
    models = {name: model_of(run) for name, run in runs.items()}
    for split, (st, lt, y, cue, *_) in data.items():
        for name, m in models.items():
            print(f"   {split:5s} {name:8s} {score(m, st, lt, y, cue)}", flush=True)
    if "nl" in models:
        print("2. the NL model with the bank slots at the actor's own cue seconds (+-1 s) zeroed")
        for split, (st, lt, y, cue, _, secs, cue_secs) in data.items():
            slot_sec = secs[:, None] - window // 2 + np.arange(lt.shape[1])[None, :] // per_second  # [N, S]
            mask = np.zeros(slot_sec.shape, bool)
            for n, cs in enumerate(cue_secs):
                for c in cs:
                    mask[n] |= np.abs(slot_sec[n] - c) <= 1
            zeroed = lt.clone()
            zeroed[torch.from_numpy(mask)] = 0
            print(f"   {split:5s} full bank          {score(models['nl'], st, lt, y, cue)}")
            print(f"   {split:5s} cue seconds zeroed {score(models['nl'], st, zeroed, y, cue)}", flush=True)
    if args.val_half_steps:
        val_csv = args.data / "annotations" / "val.csv"
        with open(val_csv, newline="") as f:
            rows = list(csv.reader(f))
        videos = sorted({r[0] for r in rows})
        half = set(np.random.default_rng(0).permutation(videos)[: len(videos) // 2])
        cfg = load_config(args.config, ["model.fbo=nl"])
        torch.manual_seed(0)
        m = build_detector(cfg.model)
        with tempfile.TemporaryDirectory() as tmp:
            fit_csv = Path(tmp) / "val_half.csv"
            with open(fit_csv, "w", newline="") as f:
                csv.writer(f).writerows(r for r in rows if r[0] in half)
            res = warm_up_head(m, str(args.workdir / "bank" / "val"), str(fit_csv), steps=args.val_half_steps,
                               lr=cfg.train.head_warmup_lr, batch=cfg.train.head_warmup_batch, seed=0,
                               window_seconds=window, max_feats_per_second=per_second, log=lambda s: None)
        m.eval()
        st, lt, y, cue, vids, *_ = data["val"]
        on = np.array([v in half for v in vids])
        print(f"3. a fresh NL head warmed up on half of the val videos ({res.entries} entries, {res.steps} steps)")
        for tag, sel in (("its half ", on), ("the other", ~on)):
            print(f"   {tag} {score(m, st[sel], lt[sel], y[sel], cue[sel])}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
