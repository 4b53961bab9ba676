"""Import an mmaction2 long-term feature bank (`lfb_train.pkl`, `lfb_val.pkl`) as an lfb_ray bank.

    python jobs/import_bank.py --config configs/lfb_nl.yaml \\
        --lfb data/ava/lfb_half/lfb_train.pkl data/ava/lfb_half/lfb_val.pkl

Each file `lfb_<split>.pkl` becomes the sub-bank `<out>/<split>/`; `--out` defaults to the bank the
config trains with (`bank.path`, or `<workdir>/bank`). The files are read with
`torch.load(weights_only=True)`: a pickle holding anything but containers and tensors is refused.
The feature width must be the one the config's backbone computes (2048 for SlowOnly-R50).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lfb_ray.redaction import redact_text


def main(argv: list[str] | None = None) -> int:
    import torch

    from lfb_ray.bank import BankError, FeatureBank, import_mmaction2
    from lfb_ray.cli import load_from_args
    from lfb_ray.models.backbone import build_backbone

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config of the models that will read the bank")
    p.add_argument("--lfb", nargs="+", required=True, metavar="lfb_SPLIT.pkl",
                   help="mmaction2 bank files, named lfb_<split>.pkl (lfb_train.pkl, lfb_val.pkl)")
    p.add_argument("--out", default="", help="destination bank folder or URI (default: the config's bank)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. workdir=runs/ava2")
    args = p.parse_args(argv)
    cfg = load_from_args(args)
    out = args.out or cfg.bank_dir
    files = [Path(f) for f in args.lfb]
    bad = [str(f) for f in files if not (f.name.startswith("lfb_") and f.suffix == ".pkl" and len(f.stem) > 4)]
    if bad:
        p.error(f"--lfb: expected files named lfb_<split>.pkl, got {bad}")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        print(f"error: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    splits = [f.stem[len("lfb_"):] for f in files]
    if len(set(splits)) != len(splits):
        p.error(f"--lfb: one file per split, got splits {splits}")
    with torch.device("meta"):  # only the width: no weights allocated
        dim = build_backbone(depth=cfg.model.depth, base_channels=cfg.model.base_channels).out_channels
    try:
        for f, split in zip(files, splits, strict=True):
            (s,) = import_mmaction2(f.parent, out, splits=[split]).values()
            print(f"{redact_text(f)} -> {redact_text(s.path)}: {s.num_videos} videos, {s.num_seconds} seconds, {s.num_features} features "
                  f"of dim {s.feature_dim}")
            if s.feature_dim != dim:
                raise BankError(f"{f} holds {s.feature_dim}-wide features, but the model of {args.config} expects "
                                f"{dim} (model.depth {cfg.model.depth}, model.base_channels "
                                f"{cfg.model.base_channels}); {s.path} was written: delete it")
        bank = FeatureBank.open(out, expected_dim=dim)
    except BankError as e:
        print(f"error: {redact_text(e)}", file=sys.stderr)
        return 1
    print(redact_text(f"bank {out}: {len(bank.videos)} videos, dim {bank.feature_dim}; train with bank.path={out}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
