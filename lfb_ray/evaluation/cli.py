"""Command line of `jobs/evaluate.py`: score a result CSV against AVA GT and print/write frame-mAP.

Mode 1 (here): `--gt GT.csv --pred PRED.csv --label-map MAP.pbtxt [--exclusions EXCL.csv]
[--protocol official|mmaction2] [--json OUT.json]`. Mode 2 (`--config CFG --checkpoint CKPT`,
model inference then evaluation) is reserved for the inference job.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from lfb_ray.data.annotations import AnnotationError, read_annotation_rows, read_exclusions, read_label_map
from lfb_ray.evaluation.ava_map import MapResult, evaluate_frame_map
from lfb_ray.evaluation.results import read_results_csv

__all__ = ["build_parser", "format_table", "main", "result_to_json"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; the CSV-mode inputs are required only without `--config`."""
    p = argparse.ArgumentParser(
        prog="jobs/evaluate.py",
        description="AVA frame-mAP@0.5 of a result CSV (LFB_SPEC section 14).")
    files = p.add_argument_group("evaluate a result CSV")
    files.add_argument("--gt", help="GT CSV, e.g. ava_val_v2.1.csv")
    files.add_argument("--pred", help="result CSV: video_id,timestamp,x1,y1,x2,y2,action_id,score")
    files.add_argument("--label-map", help="label map .pbtxt; only its ids are evaluated")
    files.add_argument("--exclusions", default="", help="excluded-timestamps CSV (optional)")
    p.add_argument("--protocol", choices=("official", "mmaction2"), default="official",
                   help="official ActivityNet evaluator (default) or mmaction2 1.x's variant")
    p.add_argument("--json", default="", help="also write the metrics as JSON here")
    model = p.add_argument_group("run a model first (not implemented yet)")
    model.add_argument("--config", default="", help="config YAML of a trained model")
    model.add_argument("--checkpoint", default="", help="checkpoint to run with --config")
    return p


def result_to_json(result: MapResult) -> dict:
    """JSON-able metrics: NaN becomes null; class ids become string keys."""

    def num(x: float) -> float | None:
        return None if math.isnan(x) else float(x)

    return {
        "mAP": num(result.mAP),
        "per_class": {str(c): num(ap) for c, ap in result.per_class.items()},
        "group_mAP": {k: num(v) for k, v in result.group_mAP.items()},
        "protocol": result.protocol,
        "num_gt": {str(c): n for c, n in result.num_gt.items()},
        "num_det": {str(c): n for c, n in result.num_det.items()},
    }


def format_table(result: MapResult) -> str:
    """Per-class AP (%) with names and counts, then group means and mAP."""

    def pct(x: float) -> str:
        return "   n/a" if math.isnan(x) else f"{100 * x:6.2f}"

    width = max([len(n) for n in result.class_names.values()] + [20])
    lines = [f"{'id':>3}  {'action':<{width}}  {'AP %':>6}  {'#gt':>7}  {'#det':>8}"]
    for c, ap in result.per_class.items():
        lines.append(f"{c:>3}  {result.class_names[c]:<{width}}  {pct(ap)}  {result.num_gt[c]:>7}  "
                     f"{result.num_det[c]:>8}")
    lines.append("")
    for name, value in result.group_mAP.items():
        lines.append(f"     {name:<{width}}  {pct(value)}")
    lines.append(f"     {'mAP@0.5IOU (' + result.protocol + ')':<{width}}  {pct(result.mAP)}")
    return "\n".join(lines)


def _write_json_atomic(path: str, payload: dict) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    """Runs the evaluation; returns the exit code (0 ok, 1 bad input; argparse errors exit 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        if not args.checkpoint:
            parser.error("--config needs --checkpoint")
        raise NotImplementedError("--config/--checkpoint mode (model inference) is not implemented yet")
    missing = [f"--{n.replace('_', '-')}" for n in ("gt", "pred", "label_map") if not getattr(args, n)]
    if missing:
        parser.error(f"the following arguments are required without --config: {', '.join(missing)}")
    t0 = time.perf_counter()
    try:
        label_map = read_label_map(args.label_map)
        exclusions = read_exclusions(args.exclusions)
        gt = read_annotation_rows(args.gt)
        det = read_results_csv(args.pred)
        t1 = time.perf_counter()
        result = evaluate_frame_map(gt, det, label_map, exclusions, protocol=args.protocol)
    except (AnnotationError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    t2 = time.perf_counter()
    print(format_table(result))
    print(f"\n{len(gt)} GT rows, {len(det)} detection rows, {len(label_map)} classes, "
          f"{len(exclusions)} excluded keyframes; read {t1 - t0:.1f} s, evaluated {t2 - t1:.1f} s")
    if args.json:
        _write_json_atomic(args.json, result_to_json(result))
        print(f"wrote {args.json}")
    return 0
