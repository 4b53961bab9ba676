"""Compare the trained operators side by side from MLflow (table, PNG, logged back to MLflow).

    python jobs/compare.py --config configs/synthetic.yaml
    python jobs/compare.py --tracking-uri http://127.0.0.1:5000 --experiment lfb_ava21 [--run-ids A,B,C]

Several dataset seeds (one pipeline run each, each with its own workdir/experiment): pass one
`--config` per seed, each followed by its overrides in `--set`; the job prints every seed's table
and one table of mean (min-max) per operator:

    python jobs/compare.py --config configs/synthetic.yaml \\
        --config configs/synthetic.yaml --set workdir=runs/synthetic_s1 --set data.root=data/synthetic_s1 \
        --set tracking.experiment=lfb_synthetic_s1
"""

import argparse
import sys
from pathlib import Path

from lfb_ray.redaction import redact_text


def main(argv=None) -> int:
    from lfb_ray.compare import compare, format_seed_table
    from lfb_ray.config import load_config, resolve_paths
    from lfb_ray.evaluation.families import label_families
    from lfb_ray.progress import mlflow_ui_command
    from lfb_ray.storage import join_uri

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=[],
                   help="config of one pipeline run; repeat for several dataset seeds")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for the --config just before it (repeatable)")
    p.add_argument("--tracking-uri", default="")
    p.add_argument("--experiment", default="")
    p.add_argument("--run-ids", default="")
    p.add_argument("--out", default="", help="output folder or URI (default <workdir>/comparison)")
    p.add_argument("--protocols", action="store_true",
                   help="also print each run's mAP under both evaluators (official, mmaction2's: the protocol of "
                        "mmaction2's published 24.11/22.15/20.17)")
    # --set applies to the latest --config: parse the argv order ourselves.
    argv = list(sys.argv[1:] if argv is None else argv)
    groups: list[tuple[str, list[str]]] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("--config", "--set") and i + 1 >= len(argv):
            p.error(f"{a} needs a value")
        if a == "--config":
            groups.append((argv[i + 1], []))
            i += 2
        elif a == "--set":
            if not groups:
                p.error("--set must follow a --config")
            groups[-1][1].append(argv[i + 1])
            i += 2
        else:
            rest.append(a)
            i += 1
    args = p.parse_args(rest)
    try:
        if len(groups) > 1:
            per_seed = {}
            for path, overrides in groups:
                cfg = resolve_paths(load_config(path, overrides))
                fams = label_families(cfg.data_path("dataset.json"))
                table, rows = compare(cfg.tracking_uri, cfg.tracking.experiment,
                                      join_uri(cfg.workdir, "comparison"), families=fams, protocols=args.protocols)
                print(f"== {cfg.tracking.experiment} ({redact_text(cfg.workdir)})\n{table}\n")
                per_seed[f"{cfg.tracking.experiment}@{cfg.workdir}"] = rows
            seeds = format_seed_table(per_seed, markdown=False)
            print(f"== mean (min-max) over {len(per_seed)} dataset seeds, val frame-mAP@0.5 (%)\n{seeds}")
            if args.out:
                Path(args.out).mkdir(parents=True, exist_ok=True)
                (Path(args.out) / "seeds.md").write_text(format_seed_table(per_seed) + "\n")
                print(redact_text(f"wrote {args.out}/seeds.md"))
            return 0
        cfg = resolve_paths(load_config(groups[0][0] if groups else None, groups[0][1] if groups else ()))
        uri = args.tracking_uri or cfg.tracking_uri
        exp = args.experiment or cfg.tracking.experiment
        out = args.out or join_uri(cfg.workdir, "comparison")
        table, _ = compare(uri, exp, out, run_ids=[r for r in args.run_ids.split(",") if r] or None,
                           families=label_families(cfg.data_path("dataset.json")), protocols=args.protocols)
    except ValueError as e:
        print(f"error: {redact_text(e)}", file=sys.stderr)
        return 1
    print(table)
    print(f"wrote {redact_text(out)}/comparison.png, comparison.md, comparison.csv (also logged to MLflow)")
    print(f"MLflow UI: {mlflow_ui_command(uri)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
