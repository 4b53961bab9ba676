"""Experiment: the head warm-up's variants on a frozen bank, scored on the val bank entries.

    python research/warmup_grid.py --bank runs/synthetic_s1/bank --data data/synthetic_s1 \
        --variant nldrop=0.5 --seed 0 --steps 3000 --device cpu --out grid.jsonl

    # the grid of docs/synthetic_study.md (3 banks x 10 variants x 2 head seeds), 14 at a time on one GPU:
    for seed in 0 1; do for b in runs/s1u/run/bank:data/synthetic_s1 runs/synthetic_s1/bank:data/synthetic_s1 \
        runs/synthetic/bank:data/synthetic; do for v in ref fbo=none nldrop=0.5 ls=0.2 wd=0.5 hold=0.2 \
        latent_channels=16 lt_feat_dropout=0.5,nl_dropout=0.5 nldrop=0.5,hold=0.2; do
        echo "${b%%:*} ${b##*:} $v $seed 3000"; done; echo "${b%%:*} ${b##*:} ref $seed 1000"; done; done |
      xargs -P 14 -L 1 sh -c 'python research/warmup_grid.py --bank $0 --data $1 --variant $2 --seed $3 --steps $4 \
        --device cuda --out grid.jsonl'

The banks are those of pipeline runs made by the "Before the shuffle" commands of
docs/synthetic_study.md: `runs/synthetic/bank` (`python jobs/make_synthetic_ava.py --out data/synthetic`,
then `python jobs/pipeline.py --config configs/synthetic.yaml`), `runs/synthetic_s1/bank` (the same
with `--seed 1 --out data/synthetic_s1` and `workdir=runs/synthetic_s1 data.root=data/synthetic_s1`)
and `runs/s1u/run/bank`, a second pipeline run on data/synthetic_s1 (`workdir=runs/s1u/run
data.root=data/synthetic_s1 tracking.experiment=lfb_s1u`: Ray Data's order differs, so its bank does).

Why: the product's warm-up (`lfb_ray/train/head_warmup.py`: the LFB head on the bank's own train
entries, Adam 1e-3, batches of 32, the detector's loss with the softmax role group) gives an NL model
that reads the role from the bank where the clip cannot show it, but whose long-term mAP over the
control (the same recipe without a bank) changes sign between runs (docs/synthetic_study.md). Each variant
here changes one thing of that recipe; one line of JSON per run reports the val role accuracy with
and without the actor's cue in the clip, the mean confidence of the predicted role, and a role-AP
proxy (mean over the three role classes of the AP of their softmax score over the GT-matched val
entries; no false boxes, so higher than the evaluation's mAP, but ranked the same way).

Variants (comma-separated KEY=VALUE; `ref` = the recipe of configs/synthetic.yaml):
    fbo=none|avg|max          the operator (none = the control)
    latent_channels=, lt_feat_dropout=, nl_dropout=, st_feat_dropout=, head_dropout=   model fields
    nldrop=P                  zero the whole NL output of a box with probability P in training
    ls=E                      label smoothing E in the role cross-entropy
    wd=W                      AdamW with decoupled weight decay W instead of Adam
    hold=F                    hold out a fraction F of the train videos; keep the head of the step
                              (every 250) with the lowest role cross-entropy on their entries
    sub=F                     train on a fraction F of the train videos only
    window=S                  bank window in seconds
    lr=, batch=               Adam's learning rate and the boxes per step (default: the config's
                              train.head_warmup_lr and head_warmup_batch)
"""

import argparse
import copy
import json
import sys
import time
from pathlib import Path

MODEL_KEYS = ("latent_channels", "lt_feat_dropout", "nl_dropout", "st_feat_dropout", "head_dropout")


def _ap(score, positive) -> float:
    """Average precision of one class: [N] scores, [N] bool labels."""
    import numpy as np

    order = np.argsort(-score)
    pos = positive[order]
    precision = np.cumsum(pos) / np.arange(1, len(pos) + 1)
    return float((precision * pos).sum() / max(pos.sum(), 1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bank", required=True, type=Path, help="bank folder with train/ and val/")
    p.add_argument("--data", required=True, type=Path, help="synthetic dataset folder (dataset.json, annotations/)")
    p.add_argument("--variant", default="ref")
    p.add_argument("--seed", type=int, default=0, help="head initialisation, batches and dropout")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "synthetic.yaml"))
    p.add_argument("--out", default="", help="append the result line (JSON) to this file too")
    args = p.parse_args()

    import numpy as np
    import torch
    import torch.nn.functional as F
    from probe_bank_reader import _entries

    from lfb_ray.bank import FeatureBank
    from lfb_ray.config import load_config
    from lfb_ray.models import build_detector
    from lfb_ray.synthetic import LABEL_FAMILIES
    from lfb_ray.train.head_warmup import gt_targets
    from lfb_ray.train.recipe import flush_denormals

    torch.set_num_threads(1)
    flush_denormals()  # as the train loop does (NL steps slow down ~4x without it)
    v = dict(kv.split("=") for kv in args.variant.split(",")) if args.variant != "ref" else {}
    overrides = [f"model.fbo={v.pop('fbo', 'nl')}"] + [f"model.{k}={v.pop(k)}" for k in MODEL_KEYS if k in v]
    cfg = load_config(args.config, overrides)
    nl_drop, smooth, wd = float(v.pop("nldrop", 0)), float(v.pop("ls", 0)), float(v.pop("wd", 0))
    hold, sub = float(v.pop("hold", 0)), float(v.pop("sub", 1))
    window = int(v.pop("window", cfg.bank.window_seconds))
    lr, batch = float(v.pop("lr", cfg.train.head_warmup_lr)), int(v.pop("batch", cfg.train.head_warmup_batch))
    if v:
        print(f"error: unknown variant keys {sorted(v)}", file=sys.stderr)
        return 2
    dev = args.device
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = build_detector(cfg.model).to(dev)
    roles = list(LABEL_FAMILIES["long_term"])
    k = cfg.model.num_classes
    sig_cols = torch.tensor([c for c in range(1, k) if c not in roles], device=dev)
    g_idx = torch.tensor(roles, device=dev)

    def loss_fn(logits, y):  # LFBDetector.loss with the role group, plus optional label smoothing
        pos = y[:, 1:].ne(0).any(1)
        loss = F.binary_cross_entropy_with_logits(logits[pos][:, sig_cols], y[pos][:, sig_cols])
        g = y[:, g_idx]
        one = g.sum(1).eq(1)
        return loss + F.cross_entropy(logits[one][:, g_idx], g[one].argmax(1), label_smoothing=smooth)

    def classify(st, lt, train: bool):  # LFBDetector.classify with the optional whole-NL-output dropout
        if model.fbo is None:
            return model.fc_cls(model.dropout(st))
        nl = model.fbo(st, lt)
        if train and nl_drop > 0:
            nl = nl * (torch.rand(nl.shape[0], 1, device=dev) >= nl_drop).float()
        return model.fc_cls(model.dropout(torch.cat([st, nl], 1)))

    bank = FeatureBank.open(args.bank / "train", expected_dim=model.feature_channels)
    vids, secs, boxes, feats = bank.entries()
    rows, ys = gt_targets(str(args.data / "annotations" / "train.csv"), vids, secs, boxes, k)
    r_vids, r_secs = [vids[i] for i in rows], secs[rows]
    st_all, y_all = torch.from_numpy(np.asarray(feats[rows], dtype=np.float32)), torch.from_numpy(ys)
    videos = sorted(set(r_vids))
    fit, held = np.arange(len(rows)), np.zeros(0, int)
    if hold > 0:
        out_v = set(np.random.default_rng(99).permutation(videos)[: int(len(videos) * hold)])
        is_held = np.array([x in out_v for x in r_vids])
        fit, held = np.where(~is_held)[0], np.where(is_held)[0]
    if sub < 1:
        keep_v = set(np.random.default_rng(98).permutation(videos)[: int(len(videos) * sub)])
        fit = np.array([i for i in fit if r_vids[i] in keep_v])
    head = [q for n, q in model.named_parameters() if not n.startswith("backbone.")]
    opt = torch.optim.AdamW(head, lr=lr, weight_decay=wd) if wd > 0 else torch.optim.Adam(head, lr=lr)
    kw = dict(window_seconds=window, max_feats_per_second=cfg.bank.max_feats_per_second)
    if len(held):
        h_lt = bank.sample([r_vids[i] for i in held], r_secs[held], np.random.default_rng(7), **kw).to(dev)
        h_st, h_y = st_all[held].to(dev), y_all[held].to(dev)
    best, curve, t0 = (float("inf"), None, 0), [], time.time()
    for step in range(1, args.steps + 1):
        model.train()
        pick = fit[rng.choice(len(fit), size=min(batch, len(fit)), replace=False)]
        lt = (bank.sample([r_vids[i] for i in pick], r_secs[pick], rng, **kw).to(dev)
              if model.fbo is not None else None)
        loss = loss_fn(classify(st_all[pick].to(dev), lt, True), y_all[pick].to(dev))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if len(held) and (step % 250 == 0 or step == args.steps):
            model.eval()
            with torch.no_grad():
                logits = classify(h_st, h_lt, False)[:, g_idx]
                one = h_y[:, g_idx].sum(1).eq(1)
                h_loss = float(F.cross_entropy(logits[one], h_y[one][:, g_idx].argmax(1)))
            curve.append((step, round(h_loss, 4)))
            if h_loss < best[0]:
                best = (h_loss, copy.deepcopy(model.state_dict()), step)
    if len(held):
        model.load_state_dict(best[1])
    f, vv, vs, vy, cue = _entries(args.data, args.bank / "val", "val")
    vbank = FeatureBank.open(args.bank / "val")
    model.eval()
    with torch.no_grad():
        lt = vbank.sample(vv, vs, np.random.default_rng(1234), **kw).to(dev) if model.fbo is not None else None
        prob = classify(torch.from_numpy(f).to(dev), lt, False)[:, g_idx].float().softmax(1).cpu().numpy()
    ok, conf = prob.argmax(1) == vy, prob.max(1)
    rec = dict(bank=str(args.bank), variant=args.variant, seed=args.seed, steps=args.steps,
               cue=round(float(ok[cue].mean()), 3), nocue=round(float(ok[~cue].mean()), 3),
               conf_cue=round(float(conf[cue].mean()), 3), conf_nocue=round(float(conf[~cue].mean()), 3),
               role_ap=round(100 * float(np.mean([_ap(prob[:, c], vy == c) for c in range(3)])), 2),
               best_step=best[2], curve=curve, seconds=round(time.time() - t0, 1))
    print(json.dumps(rec), flush=True)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
