"""Stages 2 and 4: train the short-term baseline or the LFB operators with Ray Train.

    python jobs/train.py --config configs/lfb_nl.yaml [key=value ...]
    python jobs/train.py --config configs/baseline.yaml              # model.fbo=none: the bank model
    python jobs/train.py --config configs/lfb_nl.yaml --operators nl,avg,max
    python jobs/train.py --config configs/synthetic.yaml model.fbo=none --init-backbone <baseline model.pt>
    ray job submit --working-dir . -- python jobs/train.py --config configs/lfb_nl.yaml

Rerunning the same command resumes the same run (deterministic run name); --fresh starts anew.
"""


from lfb_ray.cli import base_parser, init_ray, load_given, preflight_or_exit
from lfb_ray.progress import JobSummary
from lfb_ray.redaction import redact_text


def main(argv=None) -> int:
    from lfb_ray.config import resolve_paths

    p = base_parser(__doc__)
    p.add_argument("--operators", default="", help="comma list of operators, e.g. nl,avg,max (one run each)")
    p.add_argument("--fresh", action="store_true", help="start a new run instead of resuming")
    p.add_argument("--init-backbone", default=None, metavar="MODEL",
                   help="start the backbone from this detector checkpoint (fresh head, lr scaled by "
                        "train.finetune_lr_scale), e.g. the control that continues the baseline")
    args = p.parse_args(argv)
    from lfb_ray.train import fit, fit_operators  # torch and Ray: after parsing, so --help is instant

    given = load_given(args)
    cfg = resolve_paths(given)
    ops = [o.strip() for o in args.operators.split(",") if o.strip()]
    init_ray(cfg)
    preflight_or_exit(cfg, "train", operators=ops, init_checkpoint=args.init_backbone, given=given)
    if ops:
        results = fit_operators(cfg, ops, fresh=args.fresh, init_checkpoint=args.init_backbone)
    else:
        results = {cfg.model.fbo: fit(cfg, fresh=args.fresh, init_checkpoint=args.init_backbone)}
    for op, r in results.items():
        print(redact_text(f"{op}: run {r.run_name} mlflow {r.mlflow_run_id} val mAP "
                          f"{r.metrics.get('val/mAP', float('nan')):.4f} model {r.model_path} ({r.seconds:.0f} s)"))
    JobSummary("train", [(f"{op} model", r.model_path or "(none)") for op, r in results.items()],
               cfg.tracking_uri if cfg.tracking.enabled else "").print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
