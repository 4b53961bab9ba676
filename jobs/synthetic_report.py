"""Role accuracy on the synthetic val set with / without the actor's cue inside the clip, per run.

    python jobs/synthetic_report.py --data data/synthetic --workdir runs/synthetic
    python jobs/synthetic_report.py --data data/synthetic --workdir runs/synthetic \
        --bank-probe runs/synthetic/bank --baseline-model runs/synthetic/ray_results/<run>/<checkpoint>/model.pt

See lfb_ray/synthetic/report.py for the rule. No Ray; reads the runs' val result CSVs.
"""

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    from lfb_ray.pipeline import run_models
    from lfb_ray.synthetic.report import find_result_csvs, role_accuracy

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="synthetic dataset folder (with dataset.json)")
    p.add_argument("--workdir", required=True, help="pipeline workdir (with results/<run>/)")
    p.add_argument("--bank-probe", default="", help="bank folder: also report what the bank holds")
    p.add_argument("--baseline-model", default="", help="model.pt of the baseline that computed the bank")
    args = p.parse_args(argv)
    if bool(args.bank_probe) != bool(args.baseline_model):
        p.error("--bank-probe and --baseline-model go together")
    if not (Path(args.data) / "dataset.json").is_file():
        print(f"error: {args.data}/dataset.json not found (not a synthetic dataset)", file=sys.stderr)
        return 1
    runs = find_result_csvs(args.workdir)
    if not runs:
        print(f"error: no val result CSVs under {args.workdir}/results", file=sys.stderr)
        return 1
    models = run_models(args.workdir)
    print(f"{'run':24s} {'model':10s} {'role acc, cue in clip':>22s} {'role acc, no cue':>18s}")
    for name, path in runs.items():
        r = role_accuracy(args.data, path)
        print(f"{name:24s} {models.get(name, '-'):10s} {r.cue:8.3f} (n={r.cue_total:4d})     "
              f"{r.nocue:6.3f} (n={r.nocue_total:4d})")
    if args.bank_probe:
        from lfb_ray.models.checkpoint import read_classifier
        from lfb_ray.synthetic.report import bank_probe

        b = bank_probe(args.data, args.bank_probe, read_classifier(args.baseline_model))
        print("\nbank probe (the baseline's fc_cls on its own bank entries, GT-matched):")
        for split in ("train", "val"):
            (c, nc), (o, no) = b.role_cue[split], b.role_nocue[split]
            print(f"  {split:5s} role acc at the actor's cue seconds {c:.3f} (n={nc}), elsewhere {o:.3f} (n={no})")
        print(f"  val   look (identity) acc {b.look_val[0]:.3f} (n={b.look_val[1]})")
        print("  val keyframes without the cue, role from the mean probability of bank entries of:")
        for name, (acc, n) in b.oracle_val.items():
            print(f"    {name:28s} {acc:.3f} (n={n})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
