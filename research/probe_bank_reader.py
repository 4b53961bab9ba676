"""Frozen-feature probe: can an LFB head learn to read an actor's role from the bank at all?

    python research/probe_bank_reader.py --data data/synthetic --bank runs/synthetic/bank \
        --fbo nl --steps 2000 --lr 1e-3 --dropout 0.2

Separates "the operator cannot learn retrieval" from "the full training run is too short". The
queries are the bank's own GT-matched entries (the baseline's RoI features at each keyframe: what an
LFB model whose backbone starts from the baseline computes at step 0); the long-term input is the
window the training loop samples for that second (`FeatureBank.sample`, same W and K); the target is
the actor's role (cross-entropy over the three roles). The head is the project's own operator
(`build_fbo`) followed by dropout and a linear layer on concat(st, fbo(st, lt)), as in `LFBDetector`.
Every `--eval-every` steps prints val role accuracy on entries whose second shows the actor's cue
(|cue - t| <= 1) and on the others, where only the bank can tell. No Ray, CPU, a minute or two.
"""

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path


def _entries(dataset_dir: Path, bank_split: Path, split: str):
    """GT-matched bank entries of one split: features [N, C], video ids, seconds, role index, cue flag."""
    import numpy as np

    from lfb_ray.synthetic import LABEL_FAMILIES, load_actors
    from lfb_ray.synthetic.report import _gt_boxes, matched_entries, read_bank_split

    roles = list(LABEL_FAMILIES["long_term"])
    actors = load_actors(dataset_dir / "dataset.json")
    gt = _gt_boxes(dataset_dir, split, tuple(roles))
    table, feats = read_bank_split(bank_split)
    keep, vids, secs, ys, cues = [], [], [], [], []
    for i, vid, sec, (_, role, pid) in matched_entries(table, gt):
        keep.append(i)
        vids.append(vid)
        secs.append(sec)
        ys.append(roles.index(role))
        cues.append(any(abs(c - sec) <= 1 for c in actors[vid][pid].cue_seconds))
    return feats[keep], vids, np.array(secs), np.array(ys), np.array(cues)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="synthetic dataset folder (with dataset.json)")
    p.add_argument("--bank", required=True, type=Path, help="bank folder with train/ and val/")
    p.add_argument("--fbo", default="nl", choices=["nl", "avg", "max", "none"])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    p.add_argument("--optim", default="adam", choices=["adam", "sgd"],
                   help="sgd: momentum 0.9, weight decay 1e-5, grad-norm clip 40 (the training loop's)")
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.2, help="st/lt/nl dropout of the NL operator")
    p.add_argument("--loss", default="ce", choices=["ce", "bce81"],
                   help="bce81: sigmoid BCE on the role logits summed and divided by 81, the gradient "
                        "scale the training loop's mean BCE over 81 classes gives them")
    p.add_argument("--head-dropout", type=float, default=0.5)
    p.add_argument("--window", type=int, default=60)
    p.add_argument("--per-second", type=int, default=5)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-videos", type=float, default=1.0,
                   help="fraction of the train videos to train on (how the result scales with data)")
    args = p.parse_args()

    import numpy as np
    import torch
    from torch import nn

    from lfb_ray.bank import FeatureBank
    from lfb_ray.models.fbo import build_fbo

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    data = {s: _entries(args.data, args.bank / s, s) for s in ("train", "val")}
    if args.train_videos < 1.0:
        videos = sorted(set(data["train"][1]))
        chosen = set(videos[:max(1, round(len(videos) * args.train_videos))])
        sel = np.array([v in chosen for v in data["train"][1]])
        feats, vids, secs, ys, cues = data["train"]
        data["train"] = (feats[sel], [v for v, k in zip(vids, sel, strict=True) if k], secs[sel], ys[sel], cues[sel])
    bank = {s: FeatureBank.open(args.bank / s) for s in ("train", "val")}
    C = bank["train"].feature_dim
    fbo = build_fbo(fbo_type=args.fbo, in_channels=C, latent_channels=args.latent, num_layers=args.layers,
                    st_dropout=args.dropout, lt_dropout=args.dropout, nl_dropout=args.dropout)
    width = C + (fbo.out_channels if fbo is not None else 0)
    cls = nn.Sequential(nn.Dropout(args.head_dropout), nn.Linear(width, 3))
    params = list(cls.parameters()) + (list(fbo.parameters()) if fbo is not None else [])
    opt = (torch.optim.Adam(params, lr=args.lr) if args.optim == "adam"
           else torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=1e-5))
    sample = dict(window_seconds=args.window, max_feats_per_second=args.per_second)

    def forward(split: str, idx: np.ndarray, draw: np.random.Generator) -> torch.Tensor:
        feats, vids, secs, _, _ = data[split]
        st = torch.from_numpy(feats[idx])
        if fbo is None:
            return cls(st)
        lt = bank[split].sample([vids[i] for i in idx], secs[idx], draw, **sample)
        return cls(torch.cat([st, fbo(st, lt)], dim=1))

    def evaluate() -> dict[str, float]:
        for m in (fbo, cls):
            if m is not None:
                m.eval()
        feats, _, _, ys, cues = data["val"]
        draw = np.random.default_rng(1234)
        preds = []
        with torch.no_grad():
            for start in range(0, len(ys), 256):
                preds.append(forward("val", np.arange(start, min(start + 256, len(ys))), draw).argmax(1).numpy())
        ok = np.concatenate(preds) == ys
        for m in (fbo, cls):
            if m is not None:
                m.train()
        return {"cue": float(ok[cues].mean()), "no_cue": float(ok[~cues].mean()),
                "n_cue": int(cues.sum()), "n_no_cue": int((~cues).sum())}

    n_train = len(data["train"][3])
    print(f"train entries {n_train}, val entries {len(data['val'][3])}, feature dim {C}, "
          f"slots {args.window * args.per_second}, fbo {args.fbo}")
    t0 = time.perf_counter()
    losses: dict[int, list[float]] = defaultdict(list)
    for step in range(1, args.steps + 1):
        idx = rng.choice(n_train, size=args.batch, replace=False)
        logits, y = forward("train", idx, rng), torch.from_numpy(data["train"][3][idx])
        if args.loss == "ce":
            loss = nn.functional.cross_entropy(logits, y)
        else:
            onehot = nn.functional.one_hot(y, 3).float()
            loss = nn.functional.binary_cross_entropy_with_logits(logits, onehot, reduction="sum") / (81 * len(y))
        opt.zero_grad()
        loss.backward()
        if args.optim == "sgd":
            nn.utils.clip_grad_norm_(params, 40.0)
        opt.step()
        losses[step // args.eval_every].append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            r = evaluate()
            print(f"step {step:5d}  train loss {np.mean(losses[step // args.eval_every] or [loss.item()]):.3f}  "
                  f"val role acc: cue {r['cue']:.3f} (n={r['n_cue']})  no cue {r['no_cue']:.3f} "
                  f"(n={r['n_no_cue']})  {time.perf_counter() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
