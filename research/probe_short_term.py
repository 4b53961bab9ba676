"""Plain-torch probe: can the short-term model learn the synthetic labels, and from what?

    python research/probe_short_term.py --config configs/synthetic.yaml --steps 500 --lr 1.6

Trains the baseline detector (`model.fbo=none`) in one process on the prepared train rows (train
transforms, fresh augmentation per pass), and every 100 steps prints on the val rows (train
transform with a fixed seed): motion accuracy, role accuracy, and role accuracy split by whether
the actor's cue is inside the clip (cue second c with c - t in {-1, 0}). A low train loss with
role accuracy on cue clips that falls means the model memorises training actors instead of
reading the cue. Needs `jobs/prepare_data.py` to have run for the config. No Ray.
"""

import argparse
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=0.1, help="per-step learning rate at batch --batch")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    import numpy as np
    import pyarrow as pa
    import torch

    from lfb_ray.config import load_config, resolve_paths
    from lfb_ray.data.dataset import collate_train, decode_train_rows, read_keyframes
    from lfb_ray.models.detector import build_detector
    from lfb_ray.synthetic import LABEL_FAMILIES, load_actors

    torch.manual_seed(0)
    cfg = resolve_paths(load_config(args.config, ["model.fbo=none", *args.overrides]))
    actors = load_actors(Path(cfg.data.root) / "dataset.json")
    motion, roles = list(LABEL_FAMILIES["short_term"]), list(LABEL_FAMILIES["long_term"])

    def load(split: str, epoch: int = 0) -> dict:
        table = read_keyframes(cfg, split, drop_excluded=True)
        d = table.append_column("row_id", pa.array(np.arange(len(table)))).append_column(
            "epoch", pa.array(np.full(len(table), epoch, np.int64))).to_pydict()
        return {k: np.array(v, dtype=object) for k, v in d.items()}

    train, val = load("train"), load("val")
    vb = decode_train_rows(val, data=cfg.data, prepared_uri=cfg.prepared_dir, seed=123)
    model = build_detector(cfg.model)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=cfg.train.weight_decay)

    def cue_in_clip(vid: str, t: int, role: int) -> bool:
        return any(a.role_action_id == role and any(c - t in (-1, 0) for c in a.cue_seconds) for a in actors[vid])

    def evaluate() -> str:
        model.eval()
        m_ok = r_ok = n = 0
        cue_ok, cue_n = [0, 0], [0, 0]
        with torch.no_grad():
            for s in range(0, len(vb["clip"]), 32):
                b = collate_train({k: v[s:s + 32] for k, v in vb.items()}, cfg.data.mean, cfg.data.std)
                logits, lab = model(b.clip, b.rois), b.labels
                m, r = lab[:, motion].argmax(1), lab[:, roles].argmax(1)
                pm, pr = logits[:, motion].argmax(1), logits[:, roles].argmax(1)
                for i in torch.nonzero(lab[:, 1:].sum(1) > 0).flatten().tolist():
                    n += 1
                    m_ok += int(pm[i] == m[i])
                    ok = int(pr[i] == r[i])
                    r_ok += ok
                    vis = int(cue_in_clip(b.roi_video_ids[i], int(b.roi_seconds[i]), roles[int(r[i])]))
                    cue_ok[vis] += ok
                    cue_n[vis] += 1
        model.train()
        return (f"motion {m_ok / n:.3f} role {r_ok / n:.3f} role|cue in clip {cue_ok[1] / max(cue_n[1], 1):.3f} "
                f"(n={cue_n[1]}) role|no cue {cue_ok[0] / max(cue_n[0], 1):.3f}")

    step, epoch, t0 = 0, 0, time.time()
    while step < args.steps:
        train["epoch"][:] = epoch
        tb = decode_train_rows(train, data=cfg.data, prepared_uri=cfg.prepared_dir, seed=0)
        epoch += 1
        perm = np.random.default_rng(epoch).permutation(len(tb["clip"]))
        for s in range(0, len(perm) - args.batch + 1, args.batch):
            b = collate_train({k: v[perm[s:s + args.batch]] for k, v in tb.items()}, cfg.data.mean, cfg.data.std)
            for g in opt.param_groups:  # 50-step linear warmup from 0.1x
                g["lr"] = args.lr * min(1.0, 0.1 + 0.9 * step / 50)
            loss = model.loss(model(b.clip, b.rois), b.labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % 100 == 0:
                print(f"step {step} ({time.time() - t0:.0f} s) train loss {loss.item():.4f} | val {evaluate()}", flush=True)
            if step >= args.steps:
                break
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
