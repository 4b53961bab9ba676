"""Compare trained operators side by side from MLflow: a seed-style table, a PNG, logged back.

Reads runs with `mlflow.search_runs` (local store or a tracking server), keeps the latest finished
run per operator, prints operator → mAP (+ group and label-family means, epochs, wall time,
clips/s, run id), and writes a PNG (per-operator mAP with the per-class AP spread, and the
training-loss curves) plus the table as CSV and Markdown, all logged to a `comparison` run.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from lfb_ray.redaction import redact_text
from lfb_ray.runs import CONTROL

__all__ = ["CONTROL", "ComparisonRow", "collect_runs", "compare", "format_seed_table", "format_table"]

ORDER = {"none": 0, CONTROL: 1, "avg": 2, "max": 3, "nl": 4}
NAMES = {"none": "baseline", CONTROL: "control (baseline, LFB head recipe)", "avg": "LFB-Avg", "max": "LFB-Max",
         "nl": "LFB-NL"}


@dataclass
class ComparisonRow:
    operator: str
    run_id: str
    run_name: str
    metrics: dict
    per_class: dict
    loss_curve: list


def collect_runs(tracking_uri: str, experiment: str, run_ids: list[str] | None = None,
                 latest_per_operator: bool = True,
                 families: dict[str, tuple[int, ...]] | None = None) -> list[ComparisonRow]:
    """Runs of `experiment` (or exactly `run_ids`) that carry an operator tag, best first by order.

    `families` (label family -> class ids, see `lfb_ray.evaluation.families`) fills in family mAPs a
    run did not log, from its logged per-class APs (`val_ap/<id>`).
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    from lfb_ray.tracking import setup_mlflow_env

    setup_mlflow_env(tracking_uri)  # sets mlflow's URI without leaking it into os.environ
    client = MlflowClient(tracking_uri)
    if run_ids:
        runs = [client.get_run(r) for r in run_ids]
    else:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise ValueError(f"no MLflow experiment {experiment!r} at {redact_text(tracking_uri)}")
        df = mlflow.search_runs([exp.experiment_id], filter_string="tags.`lfb_ray.operator` != ''",
                                order_by=["attributes.start_time DESC"])
        runs = [client.get_run(r) for r in df["run_id"]] if len(df) else []
    rows: list[ComparisonRow] = []
    seen: set[str] = set()
    for run in runs:
        op = run.data.tags.get("lfb_ray.operator")
        if not op or (latest_per_operator and not run_ids and op in seen):
            continue
        if "val/mAP" not in run.data.metrics:
            continue
        seen.add(op)
        per_class = {k.split("/", 1)[1]: v for k, v in run.data.metrics.items() if k.startswith("val_ap/")}
        metrics = dict(run.data.metrics)
        if families and per_class:
            from lfb_ray.evaluation.families import family_means

            for k, v in family_means(per_class, families).items():
                metrics.setdefault(k, v)
        hist = client.get_metric_history(run.info.run_id, "train/loss")
        curve = sorted((m.step, m.value) for m in hist)
        rows.append(ComparisonRow(op, run.info.run_id, run.data.tags.get("lfb_ray.run_name", ""),
                                  metrics, per_class, curve))
    rows.sort(key=lambda r: ORDER.get(r.operator, 9))
    return rows


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def _render(head: list[str], lines: list[list[str]], markdown: bool) -> str:
    """A Markdown table, or a plain one with space-padded columns."""
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(x) + " |" for x in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(x[i]) for x in lines)) if lines else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    out += ["  ".join(x[i].ljust(widths[i]) for i in range(len(head))) for x in lines]
    return "\n".join(out)


PROTOCOL_KEYS = ("val/mAP_official", "val/mAP_mmaction2")
AVA_GROUP_KEYS = {"val/mAP_person_movement": "movement", "val/mAP_object_manipulation": "object",
                  "val/mAP_person_interaction": "interaction"}


def format_table(rows: list[ComparisonRow], markdown: bool = True, protocols: bool = False) -> str:
    """Seed-style table: mAP in percent, as the LFB paper and mmaction2 report it.

    `protocols`: also the mAP under each evaluator (official ActivityNet, mmaction2's: the protocol of
    mmaction2's published LFB numbers), as every run's evaluation logs both ("-" for runs that
    predate it)."""
    fam_keys = sorted({k for r in rows for k in r.metrics if k.startswith("val/mAP_family_")})
    # AVA's category groups are defined by AVA's class ids; a dataset that declares its own label
    # families (the synthetic set) gets those columns instead.
    grp_keys = [] if fam_keys else list(AVA_GROUP_KEYS)
    proto_keys = list(PROTOCOL_KEYS) if protocols else []
    head = (["model", "mAP"] + [k.replace("val/", "") for k in proto_keys]
            + [k.replace("val/mAP_family_", "mAP ") for k in fam_keys]
            + [AVA_GROUP_KEYS[k] for k in grp_keys] + ["epochs", "wall s", "clips/s", "run id"])
    lines = []
    for r in rows:
        m = r.metrics
        lines.append([NAMES.get(r.operator, r.operator), _fmt(m.get("val/mAP"))]
                     + [_fmt(m.get(k)) for k in proto_keys] + [_fmt(m.get(k)) for k in fam_keys] + [_fmt(m.get(k)) for k in grp_keys]
                     + [str(int(m.get("epoch", 0))), f"{m.get('wall_seconds', float('nan')):.0f}",
                        f"{m.get('train/clips_per_s', float('nan')):.1f}", r.run_id[:12]])
    return _render(head, lines, markdown)


def format_seed_table(per_seed: dict[str, list[ComparisonRow]], markdown: bool = True) -> str:
    """Operators over several dataset seeds: mean and range of mAP and of each label family's mAP.

    Args:
        per_seed: seed label (e.g. the experiment name) -> that seed's rows from `collect_runs`.

    Every operator must be present in every seed: a mean over a subset of seeds would compare
    operators on different data, so a missing one is an error naming the seed.
    """
    ops = sorted({r.operator for rows in per_seed.values() for r in rows}, key=lambda o: ORDER.get(o, 9))
    for seed, rows in per_seed.items():
        missing = [o for o in ops if o not in {r.operator for r in rows}]
        if missing:
            raise ValueError(f"seed {seed!r} has no finished run for operator(s) {missing}")
    keys = ["val/mAP"] + sorted({k for rows in per_seed.values() for r in rows for k in r.metrics
                                 if k.startswith("val/mAP_family_")})
    head = ["model"] + [k.replace("val/mAP_family_", "mAP ").replace("val/mAP", "mAP") for k in keys] + ["seeds"]
    lines = []
    for op in ops:
        cells = [NAMES.get(op, op)]
        for k in keys:
            vals = [100 * r.metrics[k] for rows in per_seed.values() for r in rows
                    if r.operator == op and k in r.metrics and r.metrics[k] == r.metrics[k]]
            cells.append("-" if not vals else
                         f"{sum(vals) / len(vals):.2f} ({min(vals):.2f}-{max(vals):.2f})")
        cells.append(str(len(per_seed)))
        lines.append(cells)
    return _render(head, lines, markdown)


def tick_label(name: str, width: int = 14) -> str:
    """A model name wrapped onto lines of at most `width` characters (where it has spaces), so the
    long names ("control (baseline, LFB head recipe)") do not run into their neighbours' labels."""
    import textwrap

    return "\n".join(textwrap.wrap(name, width)) or name


def plot(rows: list[ComparisonRow], path: str) -> None:
    """PNG: per-operator mAP bars with per-class AP points, and training-loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    names = [NAMES.get(r.operator, r.operator) for r in rows]
    maps = [100 * r.metrics.get("val/mAP", float("nan")) for r in rows]
    a1.bar(range(len(rows)), maps, color="#8fb3d9", label="mAP")
    rng = np.random.default_rng(0)
    for i, r in enumerate(rows):
        aps = [100 * v for v in r.per_class.values() if v == v]
        a1.scatter(i + rng.uniform(-0.2, 0.2, len(aps)), aps, s=10, color="#1f3b63", alpha=0.7,
                   label="per-class AP" if i == 0 else None)
    a1.set_xticks(range(len(rows)), [tick_label(n) for n in names], fontsize=8)
    a1.set_ylabel("val frame-mAP@0.5 (%)")
    a1.set_title("operators")
    a1.legend(loc="lower right", fontsize=8)
    for r, n in zip(rows, names):
        if r.loss_curve:
            s, v = zip(*r.loss_curve)
            a2.plot(s, v, label=n)
    a2.set_xlabel("iteration")
    a2.set_ylabel("train loss")
    a2.set_title("training loss")
    if any(r.loss_curve for r in rows):
        a2.legend(fontsize=8)
    without = [n for r, n in zip(rows, names) if not r.loss_curve]
    if without:  # e.g. LFB heads trained by warm-up only (train.finetune_epochs=0): no SGD steps to plot
        a2.text(0.98, 0.80, "no end-to-end training steps:\n" + "\n".join(without), transform=a2.transAxes,
                fontsize=7, ha="right", va="top", color="#555555")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(tracking_uri: str, experiment: str, out_dir: str, run_ids: list[str] | None = None,
            log_to_mlflow: bool = True,
            families: dict[str, tuple[int, ...]] | None = None,
            parent_run_id: str | None = None, protocols: bool = False) -> tuple[str, list[ComparisonRow]]:
    """Build the comparison, write table/PNG into `out_dir` (a local folder or a URI such as
    `s3://bucket/prefix`), log them to MLflow (a `comparison` run, nested under `parent_run_id` if
    given); return the table."""
    rows = collect_runs(tracking_uri, experiment, run_ids, families=families)
    if not rows:
        raise ValueError(f"no finished lfb_ray runs with a val/mAP in experiment {experiment!r}")
    import tempfile

    from lfb_ray.storage import is_uri, join_uri, upload_file

    names = ("comparison.md", "comparison.csv", "comparison.png")
    with tempfile.TemporaryDirectory(prefix="lfb_ray_compare_") as tmp:
        # A URI `out_dir` (s3://...): the files are written locally (matplotlib and MLflow's
        # log_artifact need local files) and then copied there.
        local = tmp if is_uri(out_dir) else out_dir
        os.makedirs(local, exist_ok=True)
        md = format_table(rows, markdown=True, protocols=protocols)
        with open(os.path.join(local, "comparison.md"), "w") as f:
            f.write(md + "\n")
        with open(os.path.join(local, "comparison.csv"), "w") as f:
            f.write("operator,run_id,mAP\n")
            for r in rows:
                f.write(f"{r.operator},{r.run_id},{r.metrics.get('val/mAP', float('nan')):.6f}\n")
        plot(rows, os.path.join(local, "comparison.png"))
        if log_to_mlflow:
            import mlflow

            from lfb_ray.tracking import setup_mlflow_env

            setup_mlflow_env(tracking_uri)
            mlflow.set_experiment(experiment)
            tags = {"lfb_ray.kind": "comparison", **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
            with mlflow.start_run(run_name="comparison", tags=tags):
                for name in names:
                    mlflow.log_artifact(os.path.join(local, name))
                mlflow.log_param("runs", ",".join(r.run_id for r in rows))
        if local != out_dir:
            for name in names:
                upload_file(os.path.join(local, name), join_uri(out_dir, name))
    return format_table(rows, markdown=False, protocols=protocols), rows
