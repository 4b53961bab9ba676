"""Experiment: pre-train an LFB model's head on the bank itself, then fine-tune the whole model.

    python research/warm_start_head.py --config configs/synthetic.yaml --bank runs/synthetic/bank \
        --baseline-model <baseline model.pt> --out runs/synthetic/warm_nl.pt model.fbo=nl
    python jobs/train.py --config configs/synthetic.yaml --operators nl bank.path=runs/synthetic/bank \
        bank.checkpoint=<baseline model.pt> model.pretrained=runs/synthetic/warm_nl.pt

Why: `research/probe_bank_reader.py` shows that an NL head trained with Adam on the baseline's frozen
features learns to retrieve an actor's role from the bank in ~1000 steps, while the full SGD
training of the demo budget does not. The bank already holds the baseline's RoI feature of every
train keyframe's persons, so the head (operator + `fc_cls`) can be trained on those features at
almost no cost ("linear probing, then fine-tuning"). The product version of this is
`train.head_warmup_steps` (lfb_ray/train/head_warmup.py); this probe keeps the variants
(focal loss, family weights, --optim sgd) and prints the synthetic role accuracy of the warm head.

Targets: each train bank entry matched (IoU >= 0.5) to a GT person gets that person's multi-hot
labels; the loss is the detector's own (`model.loss`: sigmoid BCE, softmax cross-entropy over the
config's `model.exclusive_groups`). The backbone is the
baseline's and stays frozen (it is not even run: the bank entry is the short-term feature). Writes a
whole-detector checkpoint (`save_checkpoint`) for `model.pretrained`.
"""

import argparse
import sys
import time
from pathlib import Path


def _targets(csv_path: str, table, num_classes: int):
    """Bank rows matched to a GT person -> (row indices [N], multi-hot [N, num_classes])."""
    import numpy as np

    from lfb_ray.train.head_warmup import gt_targets

    return gt_targets(csv_path, table.column("video_id").to_pylist(), np.asarray(table.column("second").to_pylist()),
                      np.asarray(table.column("box").to_pylist(), dtype=np.float32).reshape(-1, 4), num_classes)


def _focal(logits, labels, gamma: float):
    """`LFBDetector.loss` with each element's BCE scaled by (1 - p_t) ** gamma."""
    import torch
    import torch.nn.functional as F

    targets = labels[:, 1:].float()
    positive = targets.ne(0).any(dim=1)
    x = logits[positive, 1:].float()
    t = targets[positive]
    bce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = torch.exp(-bce)
    return ((1 - p_t) ** gamma * bce).mean()


def _bce_plus_group_ce(logits, labels, group):
    """Sigmoid BCE over the columns outside `group` (mean over elements, as the detector's loss)
    plus softmax cross-entropy over the `group` columns for RoIs with one label in the group."""
    import torch
    import torch.nn.functional as F

    targets = labels.float()
    positive = targets[:, 1:].ne(0).any(dim=1)
    other = [c for c in range(1, logits.shape[1]) if c not in group]
    loss = F.binary_cross_entropy_with_logits(logits[positive][:, other].float(), targets[positive][:, other])
    g = targets[:, group]
    has = g.sum(1) == 1
    if bool(has.any()):
        loss = loss + F.cross_entropy(logits[has][:, group].float(), g[has].argmax(1))
    return loss + 0 * torch.zeros(())


def _weighted(logits, labels, weight):
    """`LFBDetector.loss` with per-class column weights [K-1] (mean weight 1)."""
    import torch.nn.functional as F

    targets = labels[:, 1:].float()
    positive = targets.ne(0).any(dim=1)
    bce = F.binary_cross_entropy_with_logits(logits[positive, 1:].float(), targets[positive], reduction="none")
    return (bce * weight).mean()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--bank", required=True, type=Path, help="bank folder with train/")
    p.add_argument("--baseline-model", required=True, help="model.pt of the baseline that computed the bank")
    p.add_argument("--out", required=True, help="checkpoint to write (for model.pretrained)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    p.add_argument("--optim", choices=["adam", "sgd"], default="adam",
                   help="sgd: the training loop's SGD (momentum, weight decay and grad clip of cfg.train)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--synthetic", default="", help="synthetic dataset folder: also print val role accuracy of "
                   "the warm head on val bank entries, with / without the actor's cue (as probe_bank_reader)")
    p.add_argument("--only-family", default="", help="synthetic label family (e.g. long_term): train on those "
                   "classes only, to see whether the other classes' share of the loss is what stops retrieval")
    p.add_argument("--focal-gamma", type=float, default=0.0, help="> 0: sigmoid focal loss (Lin et al.) with this "
                   "gamma instead of plain BCE, over the same elements; easy classes then stop dominating")
    p.add_argument("--family-weight", default="", help="FAMILY=W (synthetic): the detector's loss with that label "
                   "family's columns weighted W (others 1), to test whether the family's share of the loss matters")
    p.add_argument("--softmax-family", default="", help="FAMILY (synthetic): sigmoid BCE over the other classes plus "
                   "a softmax cross-entropy over that family's (mutually exclusive) classes")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    import numpy as np
    import torch

    from lfb_ray.bank import FeatureBank
    from lfb_ray.config import load_config, resolve_paths
    from lfb_ray.models.checkpoint import load_checkpoint, save_checkpoint
    from lfb_ray.models.detector import build_detector
    from lfb_ray.synthetic.report import read_bank_split

    cfg = resolve_paths(load_config(args.config, args.overrides))
    if cfg.model.fbo == "none":
        print("error: pass model.fbo=nl|avg|max", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = build_detector(cfg.model)
    print(f"backbone: {load_checkpoint(model, args.baseline_model, backbone_only=True)}")
    table, feats = read_bank_split(args.bank / "train")
    rows, ys = _targets(cfg.data_path(cfg.data.train_csv), table, cfg.model.num_classes)
    vids, secs = table.column("video_id").to_pylist(), np.asarray(table.column("second").to_pylist())
    bank = FeatureBank.open(args.bank / "train", expected_dim=model.feature_channels)
    head = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    opt = (torch.optim.Adam(head, lr=args.lr) if args.optim == "adam" else
           torch.optim.SGD(head, lr=args.lr, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay))
    print(f"{len(rows)} GT-matched train entries, head parameters {sum(p.numel() for p in head)}, fbo {cfg.model.fbo}")
    cols = None
    if args.only_family:
        from lfb_ray.synthetic import LABEL_FAMILIES

        cols = [0, *LABEL_FAMILIES[args.only_family]]
    weight = group = None
    if args.softmax_family:
        from lfb_ray.synthetic import LABEL_FAMILIES

        group = list(LABEL_FAMILIES[args.softmax_family])
    if args.family_weight:
        from lfb_ray.synthetic import LABEL_FAMILIES

        family, w = args.family_weight.split("=")
        weight = torch.ones(cfg.model.num_classes - 1)
        weight[[c - 1 for c in LABEL_FAMILIES[family]]] = float(w)
        weight *= len(weight) / weight.sum()  # same mean weight: only the share changes
    model.train()
    t0, losses = time.perf_counter(), []
    for step in range(1, args.steps + 1):
        pick = rng.choice(len(rows), size=min(args.batch, len(rows)), replace=False)
        idx = rows[pick]
        lt = bank.sample([vids[i] for i in idx], secs[idx], rng, window_seconds=cfg.bank.window_seconds,
                         max_feats_per_second=cfg.bank.max_feats_per_second)
        logits, labels = model.classify(torch.from_numpy(feats[idx]), lt), torch.from_numpy(ys[pick])
        if cols is not None:  # column 0 (dropped by the loss) + the family's classes
            logits, labels = logits[:, cols], labels[:, cols]
        if args.softmax_family:
            loss = _bce_plus_group_ce(logits, labels, group)
        elif args.family_weight:
            loss = _weighted(logits, labels, weight)
        else:
            loss = (model.loss(logits, labels) if args.focal_gamma <= 0  # model.exclusive_groups apply
                    else _focal(logits, labels, args.focal_gamma))
        opt.zero_grad()
        loss.backward()
        if args.optim == "sgd" and cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(head, cfg.train.grad_clip)
        opt.step()
        losses.append(loss.item())
        if step % 250 == 0 or step == args.steps:
            print(f"step {step:5d}  loss {np.mean(losses[-250:]):.4f}  {time.perf_counter() - t0:.0f}s", flush=True)
    if args.synthetic:
        from probe_bank_reader import _entries

        from lfb_ray.synthetic import LABEL_FAMILIES

        vfeats, vvids, vsecs, vys, vcues = _entries(Path(args.synthetic), args.bank / "val", "val")
        vbank = FeatureBank.open(args.bank / "val")
        roles = list(LABEL_FAMILIES["long_term"])
        model.eval()
        with torch.no_grad():
            lt = vbank.sample(vvids, vsecs, np.random.default_rng(1234), window_seconds=cfg.bank.window_seconds,
                              max_feats_per_second=cfg.bank.max_feats_per_second)
            pred = model.classify(torch.from_numpy(vfeats), lt)[:, roles].argmax(1).numpy()
        ok = pred == vys
        print(f"val role acc of the warm head: cue {ok[vcues].mean():.3f} (n={vcues.sum()})  "
              f"no cue {ok[~vcues].mean():.3f} (n={(~vcues).sum()})")
    save_checkpoint(model.state_dict(), args.out,
                    source=f"warm_start_head: {cfg.model.fbo} head on {args.bank}, backbone {args.baseline_model}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
