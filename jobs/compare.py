"""Compare the trained operators side by side from MLflow (table, PNG, logged back to MLflow).

    python jobs/compare.py --config configs/synthetic.yaml
    python jobs/compare.py --tracking-uri http://127.0.0.1:5000 --experiment lfb_ava21 [--run-ids A,B,C]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from lfb_ray.compare import compare
    from lfb_ray.config import load_config

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="")
    p.add_argument("--tracking-uri", default="")
    p.add_argument("--experiment", default="")
    p.add_argument("--run-ids", default="")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    cfg = load_config(args.config or None)
    uri = args.tracking_uri or cfg.tracking_uri
    exp = args.experiment or cfg.tracking.experiment
    out = args.out or str(Path(cfg.workdir) / "comparison")
    try:
        table, _ = compare(uri, exp, out, run_ids=[r for r in args.run_ids.split(",") if r] or None)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(table)
    print(f"wrote {out}/comparison.png, comparison.md, comparison.csv (also logged to MLflow)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
