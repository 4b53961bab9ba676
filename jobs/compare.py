"""Compare the trained operators side by side from MLflow (table, PNG, logged back to MLflow).

    python jobs/compare.py --config configs/synthetic.yaml           # the runs of the latest pipeline
    python jobs/compare.py --config configs/synthetic.yaml --parent RUN_ID      # of that pipeline
    python jobs/compare.py --tracking-uri http://127.0.0.1:5000 --experiment lfb_ava21 --runs A B C
    python jobs/compare.py --config configs/lfb_nl.yaml --filter "attributes.status = 'FINISHED'"

Which runs: by default those of the latest pipeline (its MLflow parent run: a `jobs/pipeline.py`
invocation or an `--operators` submission) that has finished runs; `--parent` names another
parent run, `--runs` names the runs, `--filter` takes the runs of the experiment that match an
MLflow search filter (the newest per operator). The first line printed says which runs these are.

Several dataset seeds (one pipeline run each, each with its own workdir/experiment): pass one
`--config` per seed, each followed by its overrides in `--set`; the job prints every seed's table
(its latest pipeline's runs) and one table of mean (min-max) per operator:

    python jobs/compare.py --config configs/synthetic.yaml \\
        --config configs/synthetic.yaml --set workdir=runs/synthetic_s1 --set data.root=data/synthetic_s1 \\
        --set tracking.experiment=lfb_synthetic_s1
"""

import argparse
import sys
from pathlib import Path

from lfb_ray.redaction import redact_text


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=[],
                   help="config of one pipeline run; repeat for several dataset seeds")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for the --config just before it (repeatable)")
    p.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default: the config's)")
    p.add_argument("--experiment", default="", help="MLflow experiment (default: the config's tracking.experiment)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--parent", default="", metavar="RUN_ID",
                       help="compare the runs of this parent run (default: the latest pipeline parent run)")
    which.add_argument("--runs", nargs="+", default=[], metavar="RUN_ID", help="compare exactly these runs")
    which.add_argument("--filter", default="", metavar="FILTER",
                       help="compare the runs of the experiment matching this MLflow search filter, the newest "
                            "per operator, e.g. \"attributes.status = 'FINISHED'\" or \"params.`train.seed` = '1'\"")
    p.add_argument("--out", default="", help="output folder or URI (default <workdir>/comparison)")
    p.add_argument("--protocols", action="store_true",
                   help="also print each run's mAP under both evaluators (official, mmaction2's: the protocol of "
                        "mmaction2's published 24.11/22.15/20.17)")
    return p


def _split_groups(p: argparse.ArgumentParser, argv: list[str]) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """(config, its --set overrides) in argv order, and the other arguments: --set applies to the
    latest --config, which argparse cannot express."""
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
    return groups, rest


def _announce(selection) -> None:
    print(f"comparing {redact_text(selection.label)}")
    for note in selection.left_out:
        print(f"  left out: {redact_text(note)}")


def main(argv=None) -> int:
    from lfb_ray.compare import compare, format_seed_table, select_runs
    from lfb_ray.config import load_config, resolve_paths
    from lfb_ray.evaluation.families import label_families
    from lfb_ray.progress import mlflow_ui_command
    from lfb_ray.storage import join_uri

    p = _parser()
    groups, rest = _split_groups(p, list(sys.argv[1:] if argv is None else argv))
    args = p.parse_args(rest)
    try:
        if len(groups) > 1:
            if args.parent or args.runs or args.filter:
                p.error("several --config (dataset seeds) compare each seed's latest pipeline: "
                        "--parent, --runs and --filter name one set of runs")
            per_seed = {}
            for path, overrides in groups:
                cfg = resolve_paths(load_config(path, overrides))
                sel = select_runs(cfg.tracking_uri, cfg.tracking.experiment)
                print(f"== {cfg.tracking.experiment} ({redact_text(cfg.workdir)})")
                _announce(sel)
                table, rows = compare(cfg.tracking_uri, cfg.tracking.experiment, join_uri(cfg.workdir, "comparison"),
                                      families=label_families(cfg.data_path("dataset.json")),
                                      protocols=args.protocols, selection=sel)
                print(f"{table}\n")
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
        runs = [r for a in args.runs for r in a.split(",") if r]  # "A B" or "A,B"
        sel = select_runs(uri, exp, parent_run_id=args.parent or None, run_ids=runs or None,
                          filter_string=args.filter or None)
        _announce(sel)
        table, _ = compare(uri, exp, out, families=label_families(cfg.data_path("dataset.json")),
                           protocols=args.protocols, selection=sel)
    except ValueError as e:
        print(f"error: {redact_text(e)}", file=sys.stderr)
        return 1
    print(table)
    print(f"wrote {redact_text(out)}/comparison.png, comparison.md, comparison.csv (also logged to MLflow)")
    print(f"MLflow UI: {mlflow_ui_command(uri)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
