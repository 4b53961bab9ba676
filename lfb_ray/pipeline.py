"""The whole product in one command: prepare → baseline → bank → nl/avg/max → evaluate → compare.

When the LFB models start from the baseline's backbone (`model.init_backbone_from_baseline`), the
operators stage also trains the control: the baseline fine-tuned from its own backbone with the
same schedule, so that a gain is not just the extra training (row "none-ft" of the comparison).

Each stage reads the previous stage's outputs from the paths in the config. A stage whose outputs
are complete and whose inputs/config are unchanged is skipped (state in `<workdir>/pipeline.json`,
keyed by a hash of what the stage depends on); `--from STAGE` reruns from that stage on.

The workdir may be a URI (`s3://bucket/prefix`): the state, the val result CSVs and the comparison
are then objects there (written through `lfb_ray.storage`), as are the prepared data, checkpoints
and bank unless their own keys say otherwise, so a driver whose working directory is temporary
(`ray job submit`) or another machine resumes from the same state. Tracking then needs a server.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import TYPE_CHECKING

from lfb_ray.config import (
    Config,
    config_hash,
    path_values,
    resolve_paths,
    unresolve_paths,
)
from lfb_ray.redaction import redact_obj, redact_text, restore_credentials, strip_credentials
from lfb_ray.runs import CONTROL, identity_dict, run_name_for
from lfb_ray.storage import exists, join_uri, read_json, resolve, write_bytes_atomic

if TYPE_CHECKING:
    from lfb_ray.tracking import TrackedRun

__all__ = ["STAGES", "run_models", "run_pipeline"]

STAGES = ("prepare", "baseline", "bank", "operators", "evaluate", "compare")


def _load_state(path: str) -> dict:
    """The pipeline state at `path` (a local path or URI); {} when there is none yet."""
    fs, inner = resolve(path)
    return read_json(fs, inner) if exists(fs, inner) else {}


def run_models(workdir: str | os.PathLike) -> dict[str, str]:
    """Run name -> model ("baseline", `CONTROL`, "nl", ...) of the last pipeline run in `workdir`;
    {} when it has no readable `pipeline.json`."""
    try:
        state = _load_state(join_uri(os.fspath(workdir), "pipeline.json"))
    except (OSError, ValueError):
        return {}
    out = {}
    if "run_name" in state.get("baseline", {}).get("result", {}):
        out[state["baseline"]["result"]["run_name"]] = "baseline"
    for op, r in state.get("operators", {}).get("result", {}).items():
        out[r.get("run_name", "")] = op
    return out


def _fit_key(cfg: Config, init_checkpoint: str | None = None) -> tuple[str, dict[str, str]]:
    """A training stage's key and the identities of its inputs: the run's name, which hashes the
    config as given without the resource hints plus what the run consumes
    (`lfb_ray.runs.run_name_for`, `lfb_ray.identity.run_inputs`). The same pipeline rerun from
    another directory, with another `cluster.concurrent_runs`, CPU share or bank actor pool skips the
    runs it already has; re-prepared data, a retrained baseline or a rebuilt bank trains them again.

    Raises:
        lfb_ray.identity.InputError: an input of the run is missing.
    """
    from lfb_ray.identity import run_inputs

    inputs = run_inputs(cfg, init_checkpoint)
    return run_name_for(cfg, init_checkpoint, inputs), inputs


def _ref(uri: str | None) -> str | None:
    """What the state keeps of a URI: `lfb_ray.redaction.strip_credentials` (no secret in
    `pipeline.json`, which anyone who can list the workdir reads)."""
    return strip_credentials(uri) if uri else uri


def _credential_sources(*cfgs: Config | None) -> list[str]:
    """The configs' path keys (`PATH_KEYS`, `train.storage_path` among them): the URIs that hold the
    credentials as the user gave them, which `_usable` puts back on a stored reference."""
    out = []
    for c in cfgs:
        if c is None:
            continue
        out += [v for v in path_values(c).values() if v]
        out.append(c.storage_path)
    return out


def _usable(ref: str | None, sources: list[str]) -> str | None:
    """The URI to open for the stored reference `ref` (a model, a result CSV): its credentials
    restored from the config (`lfb_ray.redaction.restore_credentials`)."""
    return restore_credentials(ref, sources) if ref else ref


def _fit_summary(r) -> dict:
    """What the pipeline state keeps of a `FitResult`.

    The model's and the CSV's URIs are kept without credentials (`_ref`): a checkpoint under
    `train.storage_path=s3://KEY:SECRET@bucket/...` would otherwise put the secret into
    `pipeline.json`. The stored location cannot be recomputed from the config alone (it holds Ray
    Train's checkpoint folder), so the reference is the URI with the credentials removed, and the
    stages that open it re-add them from the config's path keys that hold them (`_usable`): a
    rotated key in the config is then used too.
    """
    from lfb_ray.evaluation.families import family_maps

    return {"run_name": r.run_name, "run_id": r.mlflow_run_id, "model": _ref(r.model_path),
            "mAP": r.metrics.get("val/mAP"), "csv": _ref(r.metrics.get("val/csv")),
            "families": family_maps(r.metrics)}


def _save_state(path: str, state: dict) -> None:
    """Write the state to `path` (a local path or URI) under a temporary name, then move it into place.

    Every string in it goes through `lfb_ray.redaction.redact_obj` on the way, a last guard: the
    URIs the stages read back are stored credential-free already (`_fit_summary`)."""
    fs, inner = resolve(path)
    write_bytes_atomic(fs, inner, json.dumps(redact_obj(state), indent=1).encode())


def run_pipeline(cfg: Config, *, operators: tuple[str, ...] = ("nl", "avg", "max"), start_from: str | None = None,
                 baseline_cfg: Config | None = None) -> dict:
    """Run every stage (skipping completed ones); returns {"maps": {...}, "stage_seconds": {...}}.

    With tracking on, each invocation is one MLflow parent run (`pipeline-<config hash>`, tag
    `lfb_ray.kind=pipeline`) under which the runs it trains (baseline, operators, control) and the
    comparison are nested; it lists the runs it took as they were (up-to-date stages, resumed runs:
    tag `lfb_ray.runs`). It ends FINISHED with the stage times and `summary.csv`/`summary.md` (its
    runs' metrics), or FAILED/KILLED (`lfb_ray.tracking.tracked_run`).

    Raises:
        ValueError: an unknown operator (checked first).
        ConfigError: a multi-node cluster with a node-local tracking store (checked first).
    """
    from lfb_ray.preflight import check_operators
    from lfb_ray.tracking import Tracker, tracked_run
    from lfb_ray.train.driver import check_tracking_store

    bad = check_operators(operators)
    if bad:  # before any stage: not after prepare, baseline and bank have run
        raise ValueError(bad[0].line())
    cfg = resolve_paths(cfg)
    baseline_cfg = resolve_paths(baseline_cfg) if baseline_cfg else None
    if cfg.tracking.enabled:
        check_tracking_store(cfg)
    params = {"operators": ",".join(operators), "from": start_from or "",
              "baseline_config": "given" if baseline_cfg else "derived"}
    with tracked_run(cfg, f"pipeline-{config_hash(unresolve_paths(cfg))}", kind="pipeline", fresh=True,
                     params=params, log="[pipeline]") as parent:
        out = _run_stages(cfg, operators=operators, start_from=start_from, baseline_cfg=baseline_cfg, parent=parent)
        if parent.run_id:
            tr = Tracker(cfg.tracking_uri, parent.run_id)
            tr.log_metrics({f"stage_seconds/{k}": v for k, v in out["stage_seconds"].items()}, step=0)
            tr.flush()
    return out


class _Stages:
    """The stages of one pipeline invocation over its state file `<workdir>/pipeline.json`.

    Each stage is a method that runs its work through `run`, which skips it when the state holds the
    same key (a hash of what the stage depends on) and otherwise records its result, wall time and
    the content ids of its inputs, so that a rerun says which of them changed. `cfg` and
    `baseline_cfg` come with their paths resolved (`run_pipeline`); the training runs and the
    comparison nest under `parent`, which lists every training run of this invocation, trained now
    or found up to date (`TrackedRun.add_runs`).
    """

    def __init__(self, cfg: Config, *, baseline_cfg: Config | None, start_from: str | None,
                 parent: TrackedRun) -> None:
        self.cfg = cfg
        self.base_cfg = baseline_cfg or dataclasses.replace(cfg, model=cfg.model.baseline())
        self.parent = parent
        self.given = identity_dict(cfg)  # the config as written, without resource hints: cwd-independent keys
        self.cred_sources = _credential_sources(cfg, baseline_cfg)
        self.times: dict[str, float] = {}
        fs, inner = resolve(cfg.workdir)
        fs.create_dir(inner, recursive=True)
        self.state_path = join_uri(cfg.workdir, "pipeline.json")
        self.state = _load_state(self.state_path)
        if start_from:
            if start_from not in STAGES:
                raise ValueError(f"--from {start_from!r}: allowed stages: {', '.join(STAGES)}")
            for s in STAGES[STAGES.index(start_from):]:
                self.state.pop(s, None)
                self.state.pop(f"{s}_partial", None)

    def run(self, name: str, key: str, fn, inputs: dict[str, str] | None = None):
        """`fn()`'s result, or the recorded one when the state holds stage `name` with this `key`."""
        from lfb_ray.identity import describe_changes

        t0 = time.time()
        prev = self.state.get(name, {})
        if prev.get("key") == key:
            print(f"[pipeline] {name}: up to date, skipped", flush=True)
            self.times[name] = 0.0
            return self.state[name]["result"]
        why = describe_changes(prev.get("inputs"), inputs or {})
        print(f"[pipeline] {name}: running" + (f" again: {why}" if why else ""), flush=True)
        result = fn()
        self.times[name] = time.time() - t0
        self.state[name] = {"key": key, "result": result, "seconds": self.times[name], "inputs": inputs or {}}
        self._save()
        print(f"[pipeline] {name}: done in {self.times[name]:.0f} s", flush=True)
        return result

    def _save(self) -> None:
        _save_state(self.state_path, self.state)

    def _fit(self, c: Config, init: str | None = None) -> dict:
        from lfb_ray.train import fit

        return _fit_summary(fit(c, init_checkpoint=init, parent_run_id=self.parent.run_id))

    def prepare(self) -> None:
        """Decode the videos into the prepared set; again when the inputs' fingerprint changed (a
        dataset regenerated in place) or a prepared video's files are damaged."""
        from lfb_ray.data.prep import build_tasks, damaged_videos, inputs_fingerprint, prepare_dataset

        cfg = self.cfg
        built = build_tasks(cfg)  # read once: the stage's key and, when it runs, its tasks

        def work():
            s = prepare_dataset(cfg, built=built)
            print(redact_text(s.line()), flush=True)
            return {"keyframes": s.keyframes, "bytes": s.bytes, "failures": len(s.failures)}

        sources = inputs_fingerprint(*built)
        key = json.dumps([config_hash(self.given, ["data"]), sources])
        if self.state.get("prepare", {}).get("key") == key:
            damaged = damaged_videos(cfg.prepared_dir)  # sizes against the markers: one metadata call a file
            if damaged:
                print(f"[pipeline] prepare: {len(damaged)} prepared video(s) damaged ({'; '.join(damaged[:3])}"
                      f"{' ...' if len(damaged) > 3 else ''}): preparing them again", flush=True)
                self.state.pop("prepare")
        self.run("prepare", key, work, {"sources": sources})

    def baseline(self) -> tuple[dict, str]:
        """Train the short-term baseline: (its `_fit_summary`, its model's URI with credentials)."""
        name, inputs = _fit_key(self.base_cfg)
        base = self.run("baseline", name, lambda: self._fit(self.base_cfg), inputs)
        self.parent.add_runs([base.get("run_id")])
        return base, _usable(base["model"], self.cred_sources)  # with its credentials again: it is opened

    def bank(self, base_model: str) -> None:
        """Build the baseline's feature bank. Its key: the baseline checkpoint's bytes, the prepared
        data's identity and the settings that change features (not the actor pool's size or CPUs),
        and where it goes."""
        from lfb_ray.bank.build import build_bank, build_identity
        from lfb_ray.identity import prepared_id
        from lfb_ray.storage import file_sha256

        cfg = self.cfg

        def work():
            s = build_bank(cfg, base_model)
            print(redact_text(s.line()), flush=True)
            return {"features": s.features, "bytes": s.bytes, "path": _ref(s.path)}

        ckpt_sha = file_sha256(base_model)
        _, build_hash = build_identity(cfg, ckpt_sha)
        self.run("bank", json.dumps([build_hash, config_hash(self.given, ["bank"])]), work,
                 {"prepared": prepared_id(cfg.prepared_dir), "checkpoint": ckpt_sha[:16]})

    def operators(self, operators: tuple[str, ...], base_model: str) -> dict[str, dict]:
        """Train the LFB models (and the control when they start from the baseline's backbone), as
        many at once as the cluster allows; {operator: `_fit_summary`}. Each finished model is
        recorded at once, so an interrupted or partly failed stage trains only the missing ones."""
        from lfb_ray.identity import bank_id
        from lfb_ray.train import FitManyError, fit_many

        cfg = self.cfg
        op_cfgs = {op: dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, fbo=op)) for op in operators}
        if cfg.model.init_backbone_from_baseline:
            # The LFB models get the baseline's training plus their own; the control gets the same.
            op_cfgs[CONTROL] = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, fbo="none"))
        init = base_model if cfg.model.init_backbone_from_baseline else None
        # The runs' names hold the bank's build id and the initial checkpoint's bytes.
        key = json.dumps({op: _fit_key(c, init)[0] for op, c in op_cfgs.items()})

        def work():
            done = self.state.get("operators_partial", {})
            done = done["result"] if done.get("key") == key else {}
            for op in done:
                print(f"[pipeline] operators: {op} already trained ({done[op]['run_name']}), skipped", flush=True)

            def record(op: str, r) -> None:
                done[op] = _fit_summary(r)
                self.parent.add_runs([r.mlflow_run_id])
                self.state["operators_partial"] = {"key": key, "result": done}
                self._save()

            # A failed run does not stop the others; each finished one is recorded by `record`
            # before fit_many raises, so the rerun trains only the failed ones.
            try:
                fit_many({op: c for op, c in op_cfgs.items() if op not in done}, on_done=record,
                         parent_run_id=self.parent.run_id, init_checkpoint=init)
            except FitManyError as e:
                print(f"[pipeline] operators: {len(done)} of {len(op_cfgs)} models recorded ({', '.join(sorted(done))}); "
                      f"failed: {', '.join(e.failures)}; rerun to train only those", flush=True)
                raise
            self.state.pop("operators_partial", None)
            return {op: done[op] for op in op_cfgs}

        ops = self.run("operators", key, work, {"bank": bank_id(cfg.bank_dir)} if op_cfgs else {})
        self.parent.add_runs([r.get("run_id") for r in ops.values()])
        return ops

    def evaluate(self, base: dict, ops: dict[str, dict]) -> dict[str, dict]:
        """{operator ("none" = baseline): mAP and label-family mAPs}, as each run's evaluation
        computed them; logged as the runs' final values."""
        from lfb_ray.evaluation.families import label_families
        from lfb_ray.tracking import Tracker

        cfg = self.cfg

        def work():
            declared = label_families(cfg.data_path("dataset.json"))
            out = {}
            for op, r in [("none", base), *ops.items()]:
                if "families" not in r and declared:
                    print(f"[pipeline] evaluate: run {r.get('run_name')} was recorded without its label-family mAPs "
                          "(before they were part of a run's result): rerun with --from baseline for them", flush=True)
                fam = r.get("families", {})
                if r.get("run_id") and fam and cfg.tracking.enabled:
                    # The result's (with train.save_best, the best epoch's) as the run's final values.
                    tr = Tracker(cfg.tracking_uri, r["run_id"])
                    tr.log_metrics({k: v for k, v in fam.items() if not math.isnan(v)}, step=cfg.train.epochs)
                    tr.flush()
                out[op] = {"mAP": r["mAP"], **fam}
            return out

        return self.run("evaluate", json.dumps([base, ops]), work)

    def compare(self, base: dict, ops: dict[str, dict], evals: dict[str, dict]) -> None:
        """The side-by-side table and plot of this invocation's runs, nested under its parent run."""
        from lfb_ray.compare import compare

        cfg = self.cfg
        if not cfg.tracking.enabled:
            return

        def work():
            ids = [base["run_id"]] + [r["run_id"] for r in ops.values()]
            table, _ = compare(cfg.tracking_uri, cfg.tracking.experiment, join_uri(cfg.workdir, "comparison"),
                               run_ids=[i for i in ids if i], nest_under=self.parent.run_id)
            print(table, flush=True)
            return {"table": table}

        self.run("compare", json.dumps([evals]), work)

    def print_summary(self, evals: dict[str, dict], ops: dict[str, dict]) -> None:
        print("\n[pipeline] summary (val frame-mAP@0.5, %)")
        for op in ("none", *[o for o in ops if o != "none"]):
            e = evals.get(op, {})
            fams = "  ".join(f"{k.split('_family_')[1]} {100 * v:.2f}" for k, v in e.items() if "_family_" in k)
            name = {"none": "baseline", CONTROL: "control"}.get(op, op)
            print(f"  {name:9s} mAP {100 * (e.get('mAP') or float('nan')):6.2f}  {fams}")
        print("[pipeline] stage wall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in self.times.items()))


def _run_stages(cfg: Config, *, operators: tuple[str, ...], start_from: str | None, baseline_cfg: Config | None,
                parent: TrackedRun) -> dict:
    """`run_pipeline`'s stages in order; {"maps": {operator: mAPs}, "stage_seconds": {stage: s}}."""
    stages = _Stages(cfg, baseline_cfg=baseline_cfg, start_from=start_from, parent=parent)
    stages.prepare()                                  # 1. videos -> prepared frame stores
    base, base_model = stages.baseline()              # 2. the short-term baseline
    stages.bank(base_model)                           # 3. its long-term feature bank
    ops = stages.operators(operators, base_model)     # 4. LFB models (and the control)
    evals = stages.evaluate(base, ops)                # 5. each run's mAPs as its final values
    stages.compare(base, ops, evals)                  # 6. side by side in MLflow
    stages.print_summary(evals, ops)
    return {"maps": evals, "stage_seconds": stages.times}
