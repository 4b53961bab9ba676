"""Compare trained operators side by side from MLflow: a seed-style table, a PNG, logged back.

Which runs (`select_runs`): those of one pipeline (its MLflow parent run; by default the latest one
with finished runs), a named set of runs, or the runs of an experiment that match an MLflow filter;
never the latest run per operator across an experiment, which mixes pipelines that share it. Prints
operator → mAP (+ group and label-family means, epochs, wall time, clips/s, run id), writes a PNG
(per-operator mAP with the per-class AP spread, and the training-loss curves) plus the table as
Markdown and every number of it as CSV, all logged to a `comparison` run nested under the parent compared.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field

from lfb_ray.redaction import redact_text
from lfb_ray.runs import CONTROL

__all__ = ["CONTROL", "PARENT_KINDS", "ComparisonRow", "RunSet", "collect_runs", "compare", "format_csv",
           "format_seed_table", "format_table", "select_runs"]

ORDER = {"none": 0, CONTROL: 1, "avg": 2, "max": 3, "nl": 4}
NAMES = {"none": "baseline", CONTROL: "control (baseline, LFB head recipe)", "avg": "LFB-Avg", "max": "LFB-Max",
         "nl": "LFB-NL"}
#: `lfb_ray.kind` of the parent runs whose runs form one comparison: a pipeline invocation, an
#: `--operators` submission.
PARENT_KINDS = ("pipeline", "operators")


@dataclass
class ComparisonRow:
    operator: str
    run_id: str
    run_name: str
    metrics: dict
    per_class: dict
    loss_curve: list


@dataclass(frozen=True)
class RunSet:
    """The runs of one comparison and what they are (printed by the job: which pipeline, which set).

    `parent_run_id`: the parent whose runs these are, under which the comparison run is logged.
    `left_out`: the runs, or newer parents, passed over, each with why."""

    run_ids: tuple[str, ...]
    label: str
    parent_run_id: str | None = None
    left_out: tuple[str, ...] = field(default=())


def _comparable(run) -> bool:
    return bool(run.data.tags.get("lfb_ray.operator")) and "val/mAP" in run.data.metrics


def _latest_per_operator(runs: list) -> tuple[list, list[str]]:
    """The newest comparable run of each operator, oldest first; and a note per run passed over."""
    keep: dict[str, object] = {}
    notes = []
    for r in sorted(runs, key=lambda r: r.info.start_time, reverse=True):
        op = r.data.tags.get("lfb_ray.operator")
        if op in keep:
            notes.append(f"run {r.info.run_id} ({op}): an older run of the same operator")
        else:
            keep[op] = r
    return sorted(keep.values(), key=lambda r: r.info.start_time), notes


def select_runs(tracking_uri: str, experiment: str, *, parent_run_id: str | None = None,
                run_ids: list[str] | None = None, filter_string: str | None = None) -> RunSet:
    """The runs to compare: at most one of

    - `run_ids`: exactly those (in that order; one without a `val/mAP` is left out, with a note);
    - `parent_run_id`: the runs of that parent run (`lfb_ray.tracking.parent_runs`: its children and
      the runs it lists), the newest per operator;
    - `filter_string`: the runs of `experiment` that match this MLflow search filter (e.g.
      `"attributes.status = 'FINISHED'"`), the newest per operator;
    - none: the runs of the newest parent run (`PARENT_KINDS`) of `experiment` that has any.

    Raises:
        ValueError: two selections at once; no such experiment, parent run or run; a bad filter; nothing to compare.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from lfb_ray.tracking import parent_runs, setup_mlflow_env

    if sum(bool(x) for x in (parent_run_id, run_ids, filter_string)) > 1:
        raise ValueError("name one set of runs: a parent run, run ids, or a filter")
    setup_mlflow_env(tracking_uri)  # sets mlflow's URI without leaking it into os.environ
    client = MlflowClient(tracking_uri)
    where = redact_text(tracking_uri)

    def get(run_id: str):
        try:
            return client.get_run(run_id)
        except MlflowException as e:
            raise ValueError(f"no MLflow run {run_id} at {where}: {redact_text(e)[:200]}") from e

    def described(run) -> str:
        return f"{run.data.tags.get('lfb_ray.kind', 'parent')} run {run.info.run_name} ({run.info.run_id})"

    if run_ids:
        runs = [get(r) for r in run_ids]
        notes = tuple(f"run {r.info.run_id}: no val/mAP ({r.info.status})" for r in runs if not _comparable(r))
        keep = tuple(r.info.run_id for r in runs if _comparable(r))
        return RunSet(keep, f"{len(keep)} named run(s)", None, notes)
    if parent_run_id:
        parent = get(parent_run_id)
        runs, notes = _latest_per_operator([r for r in parent_runs(client, parent_run_id) if _comparable(r)])
        if not runs:
            raise ValueError(f"{described(parent)} has no run with a val/mAP to compare")
        return RunSet(tuple(r.info.run_id for r in runs), f"the runs of {described(parent)}", parent_run_id,
                      tuple(notes))
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"no MLflow experiment {experiment!r} at {where}")
    if filter_string:
        try:
            found = client.search_runs([exp.experiment_id], filter_string, max_results=5000)
        except MlflowException as e:
            raise ValueError(f"--filter {filter_string!r}: {redact_text(e)[:300]}") from e
        runs, notes = _latest_per_operator([r for r in found if _comparable(r)])
        if not runs:
            raise ValueError(f"no run of experiment {experiment!r} with a val/mAP matches {filter_string!r}")
        return RunSet(tuple(r.info.run_id for r in runs), f"the runs of experiment {experiment!r} matching "
                      f"{filter_string!r}", None, tuple(notes))
    parents = [p for p in client.search_runs([exp.experiment_id], "tags.`lfb_ray.kind` != ''",
                                             order_by=["attributes.start_time DESC"], max_results=1000)
               if p.data.tags.get("lfb_ray.kind") in PARENT_KINDS]
    skipped = []
    for parent in parents:
        runs, notes = _latest_per_operator([r for r in parent_runs(client, parent.info.run_id) if _comparable(r)])
        if runs:
            return RunSet(tuple(r.info.run_id for r in runs), f"the runs of {described(parent)}, the newest "
                          "with runs to compare", parent.info.run_id, tuple(skipped + notes))
        skipped.append(f"{described(parent)}: newer, but no run with a val/mAP yet")
    raise ValueError(f"no pipeline parent run in experiment {experiment!r} has runs with a val/mAP: name the "
                     "runs with --runs, --parent or --filter (e.g. --filter \"attributes.status = 'FINISHED'\")")


def collect_runs(tracking_uri: str, experiment: str, run_ids: list[str] | None = None,
                 families: dict[str, tuple[int, ...]] | None = None) -> list[ComparisonRow]:
    """The rows of runs `run_ids` (default: `select_runs`'s default set of `experiment`), by operator order.

    `families` (label family -> class ids, see `lfb_ray.evaluation.families`) fills in family mAPs a
    run did not log, from its logged per-class APs (`val_ap/<id>`; `family_maps`).
    """
    from mlflow.tracking import MlflowClient

    from lfb_ray.evaluation.families import family_maps
    from lfb_ray.tracking import setup_mlflow_env

    if not run_ids:
        run_ids = list(select_runs(tracking_uri, experiment).run_ids)
    setup_mlflow_env(tracking_uri)
    client = MlflowClient(tracking_uri)
    rows: list[ComparisonRow] = []
    for run in (client.get_run(r) for r in run_ids):
        if not _comparable(run):
            continue
        per_class = {k.split("/", 1)[1]: v for k, v in run.data.metrics.items() if k.startswith("val_ap/")}
        metrics = {**run.data.metrics, **family_maps(run.data.metrics, per_class, families)}
        hist = client.get_metric_history(run.info.run_id, "train/loss")
        curve = sorted((m.step, m.value) for m in hist)
        rows.append(ComparisonRow(run.data.tags["lfb_ray.operator"], run.info.run_id,
                                  run.data.tags.get("lfb_ray.run_name", ""), metrics, per_class, curve))
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


@dataclass(frozen=True)
class Column:
    """A number of the table: its header in the table and in the CSV, its metric key, its kind
    ("mAP": a fraction shown in percent; "epochs"; "seconds"; "rate")."""

    head: str
    csv_name: str
    key: str
    kind: str = "mAP"

    def cell(self, metrics: dict) -> str:
        v = metrics.get(self.key)
        if self.kind == "mAP":
            return _fmt(v)
        if self.kind == "epochs":
            return str(int(v or 0))
        nan = float("nan") if v is None else v
        return f"{nan:.0f}" if self.kind == "seconds" else f"{nan:.1f}"

    def value(self, metrics: dict) -> str:
        """The CSV's value: unrounded, empty when the run did not log it."""
        v = metrics.get(self.key)
        if self.kind == "epochs":
            return str(int(v or 0))
        return "" if v is None else repr(float(v))


def columns(rows: list[ComparisonRow], protocols: bool = False) -> list[Column]:
    """The table's numbers: mAP, each evaluator's (`protocols`), the label families (a dataset
    that declares them) or else AVA's category groups, epochs, wall time, clips/s."""
    fam_keys = sorted({k for r in rows for k in r.metrics if k.startswith("val/mAP_family_")})
    # AVA's category groups are defined by AVA's class ids; a dataset that declares its own label
    # families (the synthetic set) gets those columns instead.
    groups = [] if fam_keys else [Column(h, k.replace("val/", ""), k) for k, h in AVA_GROUP_KEYS.items()]
    return ([Column("mAP", "mAP", "val/mAP")]
            + [Column(k.replace("val/", ""), k.replace("val/", ""), k) for k in (PROTOCOL_KEYS if protocols else ())]
            + [Column(k.replace("val/mAP_family_", "mAP "), k.replace("val/", ""), k) for k in fam_keys] + groups
            + [Column("epochs", "epochs", "epoch", "epochs"), Column("wall s", "wall_seconds", "wall_seconds", "seconds"),
               Column("clips/s", "clips_per_s", "train/clips_per_s", "rate")])


def format_table(rows: list[ComparisonRow], markdown: bool = True, protocols: bool = False) -> str:
    """Seed-style table: mAP in percent, as the LFB paper and mmaction2 report it.

    `protocols`: also the mAP under each evaluator (official ActivityNet, mmaction2's: the protocol of
    mmaction2's published LFB numbers), as every run's evaluation logs both ("-" for runs that
    predate it)."""
    cols = columns(rows, protocols)
    head = ["model"] + [c.head for c in cols] + ["run id"]
    lines = [[NAMES.get(r.operator, r.operator)] + [c.cell(r.metrics) for c in cols] + [r.run_id[:12]] for r in rows]
    return _render(head, lines, markdown)


def format_csv(rows: list[ComparisonRow]) -> str:
    """Every number of the table (with both evaluators' mAP) per run, unrounded (mAPs as
    fractions), with the operator and the run's id and name: `comparison.csv`."""
    cols = columns(rows, protocols=True)
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["model", "operator", "run_id", "run_name"] + [c.csv_name for c in cols])
    for r in rows:
        w.writerow([NAMES.get(r.operator, r.operator), r.operator, r.run_id, r.run_name]
                   + [c.value(r.metrics) for c in cols])
    return out.getvalue()


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
            nest_under: str | None = None, protocols: bool = False,
            selection: RunSet | None = None) -> tuple[str, list[ComparisonRow]]:
    """Build the comparison of `selection` (default: `run_ids`, else `select_runs`'s default set),
    write table/CSV/PNG into `out_dir` (a local folder or a URI such as `s3://bucket/prefix`), log
    them to MLflow (a `comparison` run, nested under `nest_under`, else under the parent compared);
    return the plain table and the rows."""
    if selection is None:
        selection = (RunSet(tuple(run_ids), f"{len(run_ids)} named run(s)") if run_ids
                     else select_runs(tracking_uri, experiment))
    rows = collect_runs(tracking_uri, experiment, list(selection.run_ids), families=families)
    if not rows:
        raise ValueError(f"no finished lfb_ray runs with a val/mAP among {selection.label}")
    nest_under = nest_under or selection.parent_run_id
    import tempfile

    from lfb_ray.storage import is_uri, join_uri, resolve, upload_file, write_bytes_atomic

    names = ("comparison.md", "comparison.csv", "comparison.png")
    with tempfile.TemporaryDirectory(prefix="lfb_ray_compare_") as tmp:
        # A URI `out_dir` (s3://...): the files are written locally (matplotlib and MLflow's
        # log_artifact need local files) and then copied there.
        local = tmp if is_uri(out_dir) else os.path.abspath(out_dir)
        for name, text in (("comparison.md", format_table(rows, markdown=True, protocols=protocols) + "\n"),
                           ("comparison.csv", format_csv(rows))):
            write_bytes_atomic(*resolve(os.path.join(local, name)), text.encode())
        plot(rows, os.path.join(local, "comparison.png"))
        if log_to_mlflow:
            import mlflow

            from lfb_ray.tracking import setup_mlflow_env

            setup_mlflow_env(tracking_uri)
            mlflow.set_experiment(experiment)
            tags = {"lfb_ray.kind": "comparison", **({"mlflow.parentRunId": nest_under} if nest_under else {})}
            with mlflow.start_run(run_name="comparison", tags=tags):
                for name in names:
                    mlflow.log_artifact(os.path.join(local, name))
                mlflow.log_param("runs", ",".join(r.run_id for r in rows))
        if is_uri(out_dir):
            for name in names:
                upload_file(os.path.join(local, name), join_uri(out_dir, name))
    return format_table(rows, markdown=False, protocols=protocols), rows
