"""Convert an mmaction2 LFB/baseline detector or Kinetics SlowOnly checkpoint to lfb_ray's format.

    python jobs/convert_checkpoint.py IN.pth OUT.pt [--config configs/lfb_nl.yaml]

Without --config the model layout is inferred from the checkpoint's keys and shapes.
"""

from __future__ import annotations

import argparse

from lfb_ray.config import load_config
from lfb_ray.models.checkpoint import convert_checkpoint
from lfb_ray.redaction import redact_text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("in_path", help="mmaction2 .pth checkpoint")
    parser.add_argument("out_path", help="destination .pt (lfb_ray/v1)")
    parser.add_argument("--config", help="YAML config whose `model` section the checkpoint must fit")
    args = parser.parse_args(argv)
    model_cfg = load_config(args.config).model if args.config else None
    kind = convert_checkpoint(args.in_path, args.out_path, model_cfg)
    print(redact_text(f"converted {kind} checkpoint {args.in_path} -> {args.out_path}"))


if __name__ == "__main__":
    main()
