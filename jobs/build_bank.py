"""Stage 3: compute the long-term feature bank with the trained baseline (Ray Data actor pool).

    python jobs/build_bank.py --config configs/synthetic.yaml --checkpoint runs/.../model.pt
    ray job submit --working-dir . -- python jobs/build_bank.py --config configs/lfb_infer.yaml

The checkpoint is our model.pt (or its Ray checkpoint folder) or an mmaction2 baseline .pth;
without --checkpoint, bank.checkpoint of the config is used. Rerunning resumes an interrupted build.
"""

import sys

from lfb_ray.cli import base_parser, init_ray, load_given, preflight_or_exit
from lfb_ray.progress import JobSummary
from lfb_ray.redaction import redact_text


def main(argv=None) -> int:
    from lfb_ray.config import resolve_paths

    p = base_parser(__doc__)
    p.add_argument("--checkpoint", default="", help="baseline checkpoint (model.pt, Ray checkpoint dir or .pth)")
    args = p.parse_args(argv)
    from lfb_ray.bank.build import build_bank  # torch and Ray: after parsing, so --help is instant

    given = load_given(args)
    cfg = resolve_paths(given)
    ckpt = args.checkpoint or cfg.bank.checkpoint
    if not ckpt:
        print("error: no baseline checkpoint: pass --checkpoint or set bank.checkpoint", file=sys.stderr)
        return 2
    init_ray(cfg)
    preflight_or_exit(cfg, "bank", checkpoint=ckpt, given=given)
    summary = build_bank(cfg, ckpt)
    print(redact_text(summary.line()))
    JobSummary("bank", [("bank (train/, val/)", summary.path)]).print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
