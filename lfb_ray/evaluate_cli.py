"""Command line of `jobs/evaluate.py`: score a result CSV against AVA GT and print/write frame-mAP.

Mode 1: `--gt GT.csv --pred PRED.csv --label-map MAP.pbtxt [--exclusions EXCL.csv]
[--protocol official|mmaction2|both] [--json OUT.json]`. Mode 2: `--checkpoint CKPT [--config CFG]
[key=value ...] [--csv OUT.csv] [--json OUT.json]` scores the val split with the model (Ray Data
actor pool, `lfb_ray.inference.infer_split`), writes the result CSV and evaluates it the same way;
the config defaults to the one the checkpoint saved (`lfb_ray.cli.config_of_checkpoint`).

`--protocol both` prints the official ActivityNet evaluator and mmaction2's side by side: the seed
table's numbers (24.11 / 22.15 / 20.17) come from mmaction2's own evaluator, which keeps every
detection of a keyframe (the official one keeps the 50 best) and differs on exclusions and empty
classes (it still counts the GT of excluded keyframes, and leaves out a class without detections
instead of scoring it 0), so a comparison with them needs its column.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

from lfb_ray.data.annotations import AnnotationError, read_annotation_rows, read_exclusions, read_label_map
from lfb_ray.evaluation import MapResult, evaluate_frame_map, read_results_csv
from lfb_ray.redaction import redact_text
from lfb_ray.storage import atomic_path

__all__ = ["PROTOCOLS", "build_parser", "format_side_by_side", "format_table", "main", "result_to_json"]

PROTOCOLS = ("official", "mmaction2")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; the CSV-mode inputs are required only without `--checkpoint`."""
    p = argparse.ArgumentParser(
        prog="jobs/evaluate.py",
        description="AVA frame-mAP@0.5 of a result CSV: the official ActivityNet evaluator, "
                    "mmaction2 1.x's ava_eval, or both.")
    files = p.add_argument_group("evaluate a result CSV")
    files.add_argument("--gt", help="GT CSV, e.g. ava_val_v2.1.csv")
    files.add_argument("--pred", help="result CSV: video_id,timestamp,x1,y1,x2,y2,action_id,score")
    files.add_argument("--label-map", help="label map .pbtxt; only its ids are evaluated")
    files.add_argument("--exclusions", default="", help="excluded-timestamps CSV (optional)")
    p.add_argument("--protocol", choices=(*PROTOCOLS, "both"), default=None,
                   help="official ActivityNet evaluator (default; with --checkpoint: eval.protocol), "
                        "mmaction2's variant (no 50-per-keyframe cap: the protocol of mmaction2's published "
                        "LFB numbers), or both side by side")
    p.add_argument("--json", default="", help="also write the metrics as JSON here")
    model = p.add_argument_group("run a model first (Ray Data inference on the val split)")
    model.add_argument("--checkpoint", default="", help="the model: model.pt, Ray checkpoint folder or mmaction2 .pth")
    model.add_argument("--config", default="", help="config YAML of the model (default: the config saved in "
                                                    "--checkpoint; needed for mmaction2/converted files)")
    model.add_argument("--csv", default="", help="result CSV to write (default <workdir>/results/infer_<fbo>.csv)")
    model.add_argument("overrides", nargs="*", help="dotted config overrides with --checkpoint, e.g. eval.batch_size=16")
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


def format_side_by_side(results: list[MapResult]) -> str:
    """Per-class AP (%) of the same detections under several protocols, one column each, then the
    group means and the mAPs (#gt and #det as counted by the first protocol)."""

    def pct(x: float) -> str:
        return "   n/a" if math.isnan(x) else f"{100 * x:6.2f}"

    first = results[0]
    width = max([len(n) for n in first.class_names.values()] + [20])
    cols = "  ".join(f"{r.protocol:>9}" for r in results)
    lines = [f"{'id':>3}  {'action':<{width}}  {cols}  {'#gt':>7}  {'#det':>8}"]
    for c in first.per_class:
        aps = "  ".join(f"{pct(r.per_class.get(c, float('nan'))):>9}" for r in results)
        lines.append(f"{c:>3}  {first.class_names[c]:<{width}}  {aps}  {first.num_gt[c]:>7}  {first.num_det[c]:>8}")
    lines.append("")
    for name in first.group_mAP:
        vals = "  ".join(f"{pct(r.group_mAP.get(name, float('nan'))):>9}" for r in results)
        lines.append(f"     {name:<{width}}  {vals}")
    lines.append(f"     {'mAP@0.5IOU':<{width}}  " + "  ".join(f"{pct(r.mAP):>9}" for r in results))
    return "\n".join(lines)


def _evaluate_and_print(gt, det, label_map, exclusions, protocol: str, json_path: str) -> MapResult:
    """Evaluate under `protocol` (or both), print the table, write the JSON (for `both`:
    `{"official": {...}, "mmaction2": {...}}`). Returns the first protocol's result."""
    names = PROTOCOLS if protocol == "both" else (protocol,)
    results = [evaluate_frame_map(gt, det, label_map, exclusions, protocol=p) for p in names]
    print(format_side_by_side(results) if len(results) > 1 else format_table(results[0]))
    if json_path:
        payload = ({r.protocol: result_to_json(r) for r in results} if len(results) > 1
                   else result_to_json(results[0]))
        _write_json_atomic(json_path, payload)
    return results[0]


def _write_json_atomic(path: str, payload: dict) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")


def main(argv: list[str] | None = None) -> int:
    """Runs the evaluation; returns the exit code (0 ok, 1 bad input; argparse errors exit 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config or args.checkpoint:
        if not args.checkpoint:
            parser.error("--config needs --checkpoint")
        given = [f"--{n.replace('_', '-')}" for n in ("gt", "pred", "label_map", "exclusions") if getattr(args, n)]
        if given:
            parser.error(f"{', '.join(given)} cannot be combined with --checkpoint (the config names the GT)")
        return _run_model(args)
    if args.overrides or args.csv:
        parser.error("config overrides and --csv need --checkpoint")
    missing = [f"--{n.replace('_', '-')}" for n in ("gt", "pred", "label_map") if not getattr(args, n)]
    if missing:
        parser.error(f"the following arguments are required without --checkpoint: {', '.join(missing)}")
    args.protocol = args.protocol or "official"
    t0 = time.perf_counter()
    try:
        label_map = read_label_map(args.label_map)
        exclusions = read_exclusions(args.exclusions)
        gt = read_annotation_rows(args.gt)
        det = read_results_csv(args.pred)
        t1 = time.perf_counter()
        _evaluate_and_print(gt, det, label_map, exclusions, args.protocol, args.json)
    except (AnnotationError, OSError, ValueError) as e:
        print(f"error: {redact_text(e)}", file=sys.stderr)
        return 1
    t2 = time.perf_counter()
    print(f"\n{len(gt)} GT rows, {len(det)} detection rows, {len(label_map)} classes, "
          f"{len(exclusions)} excluded keyframes; read {t1 - t0:.1f} s, evaluated {t2 - t1:.1f} s")
    if args.json:
        print(f"wrote {args.json}")
    return 0


def _run_model(args: argparse.Namespace) -> int:
    """Mode 2: Ray Data inference of the val split, then the same table and JSON as mode 1.

    `infer_split` writes the CSV and returns only the mAP summary, so the CSV it wrote is scored
    again here for the full per-class table (a pure-numpy pass over the same rows).
    """
    from lfb_ray.cli import config_of_checkpoint, init_ray
    from lfb_ray.config import ConfigError, load_config, resolve_paths
    from lfb_ray.data.prep import PrepareError
    from lfb_ray.inference import infer_split
    from lfb_ray.models.checkpoint import CheckpointError
    from lfb_ray.storage import StorageError, exists, is_uri, join_uri, resolve, upload_file

    try:  # a local path or a URI (s3://... of a cluster's checkpoints)
        found = exists(*resolve(args.checkpoint))
    except (StorageError, OSError):
        found = False
    if not found:
        print(f"error: checkpoint {redact_text(args.checkpoint)} does not exist", file=sys.stderr)
        return 1
    overrides = list(args.overrides) + ([f"eval.protocol={args.protocol}"] if args.protocol in PROTOCOLS else [])
    try:
        cfg = resolve_paths(load_config(args.config, overrides) if args.config
                            else config_of_checkpoint(args.checkpoint, overrides))
    except (ConfigError, CheckpointError, OSError) as e:
        print(f"error: {redact_text(e)}", file=sys.stderr)
        return 1
    # The result CSV: `--csv` or <workdir>/results/infer_<fbo>.csv, either a local path or a URI
    # (written locally, scored, then uploaded).
    target = args.csv or join_uri(cfg.workdir, "results", f"infer_{cfg.model.fbo}.csv")
    tmp = tempfile.TemporaryDirectory(prefix="lfb_ray_eval_") if is_uri(target) else None
    csv_path = os.path.join(tmp.name, "results.csv") if tmp else os.path.abspath(target)
    init_ray(cfg)
    try:
        inferred = infer_split(cfg, args.checkpoint, csv_path)
        if tmp:
            upload_file(csv_path, target)
        label_map = read_label_map(cfg.data_path(cfg.data.label_map))
        exclusions = read_exclusions(cfg.data_path(cfg.data.val_exclusions)) if cfg.data.val_exclusions else set()
        gt = read_annotation_rows(cfg.data_path(cfg.data.val_csv))
        det = read_results_csv(csv_path)
        t1 = time.perf_counter()
        _evaluate_and_print(gt, det, label_map, exclusions, "both" if args.protocol == "both" else cfg.eval.protocol,
                            args.json)
    except (AnnotationError, PrepareError, OSError, ValueError) as e:
        print(f"error: {redact_text(e)}", file=sys.stderr)
        return 1
    finally:
        if tmp:
            tmp.cleanup()
    t2 = time.perf_counter()
    print(f"\n{inferred.num_boxes} boxes of the val split scored by {redact_text(args.checkpoint)} (fbo={cfg.model.fbo}) "
          f"in {inferred.seconds:.1f} s; {len(det)} detection rows in {target}; {len(gt)} GT rows, "
          f"{len(label_map)} classes, {len(exclusions)} excluded keyframes; evaluated {t2 - t1:.1f} s")
    if args.json:
        print(f"wrote {args.json}")
    return 0
