"""The main job: prepare → baseline → bank → nl/avg/max → evaluate → compare, resumable.

    python jobs/pipeline.py --config configs/synthetic.yaml
    python jobs/pipeline.py --config configs/synthetic.yaml --from bank
    python jobs/pipeline.py --config configs/lfb_nl.yaml --baseline-config configs/baseline.yaml --check
    ray job submit --working-dir . -- python jobs/pipeline.py --config configs/lfb_nl.yaml \
        --baseline-config configs/baseline.yaml
"""

import sys
import traceback

from lfb_ray.cli import base_parser, init_ray, load_given, preflight_or_exit
from lfb_ray.progress import pipeline_summary
from lfb_ray.redaction import redact_text


def main(argv=None) -> int:
    """0 when every stage completed; 1 when a stage failed (its traceback and a one-line error on
    stderr; rerunning continues from what was finished); 2 for a bad command line or config."""
    from lfb_ray.config import ConfigError, load_config, resolve_paths
    from lfb_ray.pipeline import STAGES, run_pipeline

    p = base_parser(__doc__)
    p.add_argument("--from", dest="start_from", choices=STAGES, help="rerun from this stage on")
    p.add_argument("--operators", default="nl,avg,max")
    p.add_argument("--baseline-config", default="", help="config of the bank baseline (default: --config "
                   "with model.fbo=none)")
    p.add_argument("--check", action="store_true", help="run only the preflight checks of every stage (checkpoints, "
                   "data, outputs, MLflow, resources) and exit: 0 when all pass")
    args = p.parse_args(argv)
    given = load_given(args)
    cfg = resolve_paths(given)
    try:
        base = (load_config(args.baseline_config, args.overrides + ["model.fbo=none"])
                if args.baseline_config else None)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: --baseline-config: {redact_text(e)}", file=sys.stderr)
        return 2
    operators = tuple(o.strip() for o in args.operators.split(",") if o.strip())
    init_ray(cfg)
    preflight_or_exit(cfg, "pipeline", operators=operators, baseline_cfg=resolve_paths(base) if base else None,
                      given=given)
    if args.check:
        return 0
    try:
        run_pipeline(cfg, operators=operators, start_from=args.start_from, baseline_cfg=base)
    except Exception as e:  # the exit code says it; the traceback keeps everything but credentials
        print(redact_text(traceback.format_exc()), file=sys.stderr, end="")
        print(f"error: the pipeline stopped: {type(e).__name__}: {redact_text(e)}", file=sys.stderr)
        return 1
    pipeline_summary(cfg).print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
