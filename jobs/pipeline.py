"""The main job: prepare → baseline → bank → nl/avg/max → evaluate → compare, resumable.

    python jobs/pipeline.py --config configs/synthetic.yaml
    python jobs/pipeline.py --config configs/synthetic.yaml --from bank
    ray job submit --working-dir . -- python jobs/pipeline.py --config configs/lfb_nl.yaml \
        --baseline-config configs/baseline.yaml
"""

import sys
import traceback

from lfb_ray.cli import base_parser, init_ray, load_from_args


def main(argv=None) -> int:
    """0 when every stage completed; 1 when a stage failed (its traceback and a one-line error on
    stderr; rerunning continues from what was finished); 2 for a bad command line or config."""
    from lfb_ray.config import load_config
    from lfb_ray.pipeline import STAGES, run_pipeline

    p = base_parser(__doc__)
    p.add_argument("--from", dest="start_from", choices=STAGES, help="rerun from this stage on")
    p.add_argument("--operators", default="nl,avg,max")
    p.add_argument("--baseline-config", default="", help="config of the bank baseline (default: --config "
                   "with model.fbo=none)")
    args = p.parse_args(argv)
    cfg = load_from_args(args)
    base = load_config(args.baseline_config, args.overrides + ["model.fbo=none"]) if args.baseline_config else None
    init_ray(cfg)
    try:
        run_pipeline(cfg, operators=tuple(o for o in args.operators.split(",") if o), start_from=args.start_from,
                     baseline_cfg=base)
    except Exception as e:  # the exit code says it; the traceback keeps everything
        traceback.print_exc()
        print(f"error: the pipeline stopped: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
