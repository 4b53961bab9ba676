"""The run plumbing on the driver: one Ray Train `TorchTrainer` run per model (baseline or one FBO
operator) with `fit`, several at once with `fit_many`, the operators under one MLflow parent run
with `fit_operators`.

`fit` names the run (`lfb_ray.runs.run_name_for`, so a rerun resumes it), opens its MLflow run,
sizes the workers (`lfb_ray.train.resources`) and hands `lfb_ray.train.recipe.train_loop_per_worker`
to the trainer; what each worker does is there.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from lfb_ray.config import (
    Config,
    ConfigError,
    config_hash,
    config_to_dict,
    flatten_config,
    resolve_paths,
)
from lfb_ray.redaction import redact_text
from lfb_ray.runs import identity_dict, operator_tag, run_name_for
from lfb_ray.storage import is_uri, join_uri, resolve
from lfb_ray.train.recipe import train_loop_per_worker
from lfb_ray.train.resources import device_note, failure_config, plan_concurrency, scaled, scaling_config
from lfb_ray.train.run_args import RunArgs

__all__ = ["FitManyError", "FitResult", "check_tracking_store", "fit", "fit_many", "fit_operators"]


@dataclass
class FitResult:
    run_name: str
    mlflow_run_id: str | None
    metrics: dict
    checkpoint_path: str | None
    model_path: str | None
    seconds: float


def _scaling(cfg: Config):
    """The run's `ScalingConfig` (`lfb_ray.train.resources.scaling_config`), the device decision printed."""
    import ray

    resources = ray.cluster_resources()
    note = device_note(cfg, resources)
    if note:
        print(note, flush=True)
    return scaling_config(cfg, resources)


def _checkpoint_uri(checkpoint, storage_path: str) -> str:
    """A Ray Train checkpoint's location as a path or URI that `lfb_ray.storage.resolve` opens.

    `Checkpoint.path` drops the scheme and the options of remote storage (`bucket/run/ckpt` for
    `s3://bucket/run/ckpt?endpoint_override=...`): the configured storage URI supplies them.
    """
    fs = getattr(checkpoint, "filesystem", None)
    if fs is None or getattr(fs, "type_name", "local") == "local" or not is_uri(storage_path):
        return checkpoint.path
    _, base_inner = resolve(storage_path)
    if not checkpoint.path.startswith(base_inner.rstrip("/") + "/"):
        raise ValueError(f"checkpoint {checkpoint.path} is not under train.storage_path {redact_text(storage_path)}")
    return join_uri(storage_path, checkpoint.path[len(base_inner.rstrip("/")) + 1:])


def fit(cfg: Config, *, fresh: bool = False, parent_run_id: str | None = None,
        init_checkpoint: str | None = None) -> FitResult:
    """Train one model with a `TorchTrainer`; rerunning the same config resumes it.

    Its MLflow run is RUNNING while it trains and ends FINISHED, FAILED (an exception) or KILLED
    (Ctrl-C, SIGTERM/`ray job stop`).

    Args:
        fresh: start a new run (new Ray run name and MLflow run) instead of resuming.
        parent_run_id: MLflow parent run (the `--operators` submission, a pipeline invocation).
        init_checkpoint: a detector checkpoint whose backbone the new run starts from (the head
            stays freshly initialised); the lr is then scaled by `train.finetune_lr_scale`. LFB
            models with `model.init_backbone_from_baseline` default to `bank.checkpoint`.

    Raises:
        ConfigError: also when a multi-node cluster is given a node-local tracking store
            (`check_tracking_store`).
    """
    from lfb_ray.tracking import tracked_run

    t0 = time.time()
    cfg = resolve_paths(cfg)
    if cfg.model.uses_bank and cfg.model.init_backbone_from_baseline:
        init_checkpoint = init_checkpoint or cfg.bank.checkpoint
        if not init_checkpoint:
            raise ConfigError("model.init_backbone_from_baseline=true needs the baseline checkpoint: set "
                              "bank.checkpoint (the pipeline passes its baseline automatically)")
    if init_checkpoint and not is_uri(init_checkpoint):
        # The workers run in other directories: a relative path would not be found there.
        init_checkpoint = os.path.abspath(init_checkpoint)
    from lfb_ray.identity import run_inputs

    inputs = run_inputs(cfg, init_checkpoint)
    name = run_name_for(cfg, init_checkpoint, inputs)
    if fresh:
        name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if cfg.tracking.enabled:
        check_tracking_store(cfg)
    with tracked_run(cfg, name, params=flatten_config(cfg), parent_run_id=parent_run_id, fresh=fresh,
                     tags={"lfb_ray.operator": operator_tag(cfg, init_checkpoint)},
                     config_yaml=_redacted_yaml(cfg)) as run:
        if run.run_id:
            from lfb_ray.tracking import log_dataset_inputs

            log_dataset_inputs(cfg.tracking_uri, run.run_id, cfg, inputs)
        return _fit_run(cfg, name=name, run_id=run.run_id, init_checkpoint=init_checkpoint, inputs=inputs, t0=t0)


class ResourcesUnavailableError(RuntimeError):
    """A run's workers could not be placed for `cluster.resource_wait_s`; its checkpoints are kept."""


def _placement_error(cfg: Config, name: str, e: BaseException) -> ResourcesUnavailableError | None:
    """The error to raise when Ray Train gave up starting the run's worker group (its bounded
    controller retries, `lfb_ray.train.resources.failure_config`), else None.

    Why: Ray Train's own message ("Training failed due to controller error: ... worker group startup
    timed out") names neither the resources asked for, the setting that bounds the wait, nor what to
    do; a cluster that lost a node mid-run, or cannot add the GPUs asked for, ends here.
    """
    from ray.train.v2._internal.exceptions import (
        WorkerGroupStartupFailedError,
        WorkerGroupStartupTimeoutError,
    )

    cause = getattr(e, "controller_failure", None)
    if not isinstance(cause, (WorkerGroupStartupTimeoutError, WorkerGroupStartupFailedError)):
        return None
    from lfb_ray.train.resources import start_timeout_s

    cl = cfg.cluster
    ask = {"CPU": cl.cpus_per_worker, **({"GPU": 1} if cl.uses_gpu({}) else {})}
    return ResourcesUnavailableError(
        f"run {name}: its {cl.num_workers} workers of {ask} could not be placed for about "
        f"cluster.resource_wait_s={cl.resource_wait_s:g} s ({start_timeout_s():g} s per attempt): the cluster lost "
        f"nodes or cannot provide them. Its checkpoints are kept: rerun the same command to resume once the "
        f"resources are back, or lower cluster.num_workers / cluster.cpus_per_worker. Ray Train: "
        f"{type(cause).__name__}: {str(cause).splitlines()[0][:300]}")


def check_tracking_store(cfg: Config) -> None:
    """With tracking on, a cluster of more than one alive node, or a workdir that is a URI, needs a
    tracking server.

    Raises:
        ConfigError: naming the URI and the fix (`lfb_ray.tracking.check_store_reaches_all_nodes`,
            `lfb_ray.tracking.check_artifact_store`; also `Config.tracking_uri`'s).
    """
    import ray

    from lfb_ray.tracking import check_artifact_store, check_store_reaches_all_nodes

    if not cfg.tracking.enabled:
        return
    try:
        check_artifact_store(cfg.tracking_uri, cfg.workdir)
        if ray.is_initialized():
            check_store_reaches_all_nodes(cfg.tracking_uri, sum(1 for n in ray.nodes() if n.get("Alive")))
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _fit_run(cfg: Config, *, name: str, run_id: str | None, init_checkpoint: str | None, inputs: dict[str, str],
             t0: float) -> FitResult:
    """The `TorchTrainer` run of `fit`, which owns the MLflow run `run_id` (ended FINISHED here).
    `inputs` (`lfb_ray.identity.run_inputs`) go into the saved model's meta (`CheckpointMeta`)."""
    from ray.train import CheckpointConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from lfb_ray.data.dataset import count_rows
    from lfb_ray.identity import bank_checkpoint
    storage = cfg.storage_path
    # The val result CSVs: `<workdir>/results/<run>/`, on S3 too when the workdir is a URI (`_evaluate`).
    results_dir = (join_uri(cfg.workdir, "results", name) if is_uri(cfg.workdir)
                   else os.path.join(os.path.abspath(cfg.workdir), "results", name))
    # Each worker reads the (small) keyframe table and builds its own shuffled epoch of decoded
    # samples (`train_samples`): no dataset goes through Ray Train's streaming split, whose
    # assignment of rows to workers is not reproducible.
    n_train = count_rows(cfg, "train", drop_excluded=True)
    per_worker = math.ceil(n_train / cfg.cluster.num_workers)
    iters = max(1, math.ceil(per_worker / cfg.train.batch_size_per_worker))
    if cfg.train.max_iters_per_epoch:
        iters = min(iters, cfg.train.max_iters_per_epoch)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run": RunArgs(
            cfg=cfg, results_dir=results_dir, iters_per_epoch=iters, mlflow_run_id=run_id,
            init_checkpoint=init_checkpoint,
            provenance={"run_name": name, "mlflow_run_id": run_id or "", "inputs": inputs,
                        "bank_checkpoint": bank_checkpoint(cfg.bank_dir) if cfg.model.uses_bank else ""})},
        scaling_config=_scaling(cfg),
        run_config=RunConfig(name=name, storage_path=storage,
                             failure_config=failure_config(cfg),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    try:
        result = trainer.fit()
    except Exception as e:
        placement = _placement_error(cfg, name, e)
        if placement is None:
            raise
        raise placement from e
    ckpt_path = _checkpoint_uri(result.checkpoint, storage) if result.checkpoint else None
    model_path = join_uri(ckpt_path, "model.pt") if ckpt_path else None
    metrics = dict(result.metrics or {})
    if run_id:
        from lfb_ray.tracking import Tracker

        tr = Tracker(cfg.tracking_uri, run_id)
        from lfb_ray.tracking import read_pending_of, redact

        tr.set_tag("lfb_ray.checkpoint", redact("checkpoint", str(ckpt_path)))  # URIs may carry user:secret@
        if result.checkpoint:  # what rank 0 could not send at the end (the server was down): once more
            tr.replay(read_pending_of(result.checkpoint))
        if model_path and cfg.tracking.log_model:
            _log_model(cfg, run_id, model_path, metrics)
        tr.log_metrics({"wall_seconds": time.time() - t0}, step=int(metrics.get("epoch", 0)))
        tr.flush(wait=True)
        tr.set_terminated("FINISHED")
    return FitResult(run_name=name, mlflow_run_id=run_id, metrics=metrics, checkpoint_path=ckpt_path,
                     model_path=model_path, seconds=time.time() - t0)


def _log_model(cfg: Config, run_id: str, model_path: str, metrics: dict) -> None:
    """The run's model.pt as its MLflow model (`lfb_ray.mlflow_model`), once: a rerun of a finished
    run finds it logged. A failure is a warning (the run and its model.pt stand) and a tag on the run."""
    import mlflow

    from lfb_ray.mlflow_model import log_run_model, logged_model_of

    try:
        if logged_model_of(cfg.tracking_uri, run_id):
            return
        uri = log_run_model(cfg, run_id, model_path, metrics, registered_model=cfg.tracking.registered_model)
        print(f"[lfb_ray] MLflow model of run {run_id}: {uri}"
              + (f" (registered as {cfg.tracking.registered_model})" if cfg.tracking.registered_model else ""),
              flush=True)
    except Exception as e:  # an export or server failure must not lose the trained run
        print(f"[lfb_ray] WARNING: could not log the MLflow model of run {run_id}: {type(e).__name__}: "
              f"{redact_text(e)[:300]}", flush=True)
        try:
            mlflow.MlflowClient(cfg.tracking_uri).set_tag(run_id, "lfb_ray.model_error", redact_text(e)[:250])
        except Exception:  # the server is what failed: the warning above stands alone
            pass


def _redacted_yaml(cfg: Config) -> str:
    """The resolved config as YAML (the MLflow `config.yaml` artifact), secrets redacted."""
    import yaml

    from lfb_ray.tracking import redact

    def walk(prefix: str, x):
        if isinstance(x, dict):
            return {k: walk(f"{prefix}{k}.", v) for k, v in x.items()}
        return redact(prefix.rstrip("."), x)

    return yaml.safe_dump(walk("", config_to_dict(cfg)), sort_keys=False)


def _with_operator(cfg: Config, op: str) -> Config:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, fbo=op))


class FitManyError(RuntimeError):
    """Runs of `fit_many` failed for good; raised only once every other run has finished.

    Attributes:
        failures: key -> the error of each failed attempt of that run ("Type: message"), in order.
        results: key -> `FitResult` of every run that finished (`on_done` was called for each).
    """

    def __init__(self, failures: dict[str, list[str]], results: dict[str, FitResult]):
        self.failures, self.results = failures, results
        lines = [f"  {key} ({len(errs)} attempt{'s' if len(errs) > 1 else ''}): {errs[-1]}"
                 for key, errs in failures.items()]
        super().__init__(
            f"{len(failures)} of {len(failures) + len(results)} runs failed: {', '.join(failures)}; finished: "
            f"{', '.join(results) or 'none'}. Rerunning the same command trains only what is missing: "
            "finished runs resume from their last checkpoint under the same run name.\n" + "\n".join(lines))


def _error_text(e: BaseException) -> str:
    """'Type: message' of a run's error; for an exception raised inside a Ray task, the original one."""
    cause = getattr(e, "cause", None)  # ray.exceptions.RayTaskError keeps the task's exception
    err = cause if isinstance(cause, BaseException) else e
    return f"{type(err).__name__}: {redact_text(err)}"  # printed, raised (FitManyError), stored


def fit_many(cfgs: dict[str, Config], *, fresh: bool = False, parent_run_id: str | None = None,
             init_checkpoint: str | None = None,
             on_done: Callable[[str, FitResult], None] | None = None) -> dict[str, FitResult]:
    """Fit several runs (one per key), as many at once as `plan_concurrency` allows.

    Concurrent runs are driven from Ray tasks of 0 CPUs (each holds a `TorchTrainer` driver);
    a new run starts as soon as one finishes, in the order of `cfgs` (put the longest first).
    `on_done(key, result)` is called on this process as each run finishes, so that a caller can
    record it before the others end (the pipeline's resumable operators stage). Run names do not
    depend on the scaled reservations (`run_name_for`), so a rerun resumes the same runs.

    Failures are isolated: a run that fails is reported (its error printed at once) and the others
    go on; once all of them have finished, `FitManyError` lists the failed runs with their errors.
    A run whose driver task *died* (its process or node lost: a Ray system error, not an exception
    raised by `fit`) is started again, up to `train.max_failures` times: Ray Train's own
    `FailureConfig(max_failures)` restarts failed *workers* from the last checkpoint, but it runs in
    that task and cannot outlive it. An exception raised by `fit` is not retried here: it either
    comes after Ray Train has already spent its restarts on the same failure (`TrainingFailedError`),
    or it is deterministic (a config, bank or data error) and would fail the same way again.

    Raises:
        FitManyError: some runs failed for good; `.results` holds the finished ones.
    """
    import ray
    from ray.exceptions import RayError, RayTaskError

    if not cfgs:
        return {}
    first = next(iter(cfgs.values()))
    slots, scale = plan_concurrency(first, len(cfgs), ray.cluster_resources())
    kw = dict(fresh=fresh, parent_run_id=parent_run_id, init_checkpoint=init_checkpoint)
    out: dict[str, FitResult] = {}
    failures: dict[str, list[str]] = {}

    def finished(key: str, result: FitResult) -> None:
        out[key] = result
        if on_done:
            on_done(key, result)

    def failed(key: str, e: BaseException, retry: bool) -> bool:
        """Record a failed attempt; whether the run is to be started again."""
        errs = failures.setdefault(key, [])
        errs.append(_error_text(e))
        again = retry and len(errs) <= cfgs[key].train.max_failures
        why = (f"its task died, starting it again (attempt {len(errs) + 1} of {cfgs[key].train.max_failures + 1})"
               if again else "the other runs go on")
        print(f"[lfb_ray] run {key} failed ({why}): {errs[-1]}", flush=True)
        return again

    if slots <= 1:
        # In this process: a run that fails is reported and the next one starts (a crash of this
        # process ends them all; the rerun resumes them).
        for key, c in cfgs.items():
            try:
                result = fit(c, **kw)
            except Exception as e:  # not lost: every failed run is in the FitManyError raised below
                failed(key, e, retry=False)
                continue
            finished(key, result)
    else:
        note = (f" (cluster.concurrent_runs={first.cluster.concurrent_runs}): CPU reservations scaled by "
                  f"{scale:.2f} so that they fit") if scale < 1.0 else ""
        print(f"[lfb_ray] {len(cfgs)} runs, {slots} at a time{note}", flush=True)
        remote_fit = ray.remote(num_cpus=0, max_retries=0)(fit)
        pending = list(cfgs.items())
        running: dict = {}
        while pending or running:
            while pending and len(running) < slots:
                key, c = pending.pop(0)
                running[remote_fit.remote(scaled(c, scale), **kw)] = key
            ready, _ = ray.wait(list(running), num_returns=1)
            key = running.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except RayTaskError as e:  # raised by fit itself
                failed(key, e, retry=False)
                continue
            except RayError as e:  # the task's process or node died
                if failed(key, e, retry=True):
                    pending.append((key, cfgs[key]))
                continue
            failures.pop(key, None)  # a retried run that finished
            finished(key, result)
    if failures:
        raise FitManyError(failures, {key: out[key] for key in cfgs if key in out})
    return {key: out[key] for key in cfgs}


def fit_operators(cfg: Config, operators: list[str], *, fresh: bool = False,
                  init_checkpoint: str | None = None) -> dict[str, FitResult]:
    """One `TorchTrainer` run per operator under one MLflow parent run, as many at once as the
    cluster holds (`fit_many`, `cluster.concurrent_runs`), so an autoscaling cluster scales up.

    The parent run ends FINISHED with `summary.csv`/`summary.md` (the child runs' metrics), or
    FAILED/KILLED with the same summary of what ran (children still RUNNING end likewise).
    """
    from lfb_ray.tracking import tracked_run

    cfg = resolve_paths(cfg)
    if cfg.tracking.enabled:
        check_tracking_store(cfg)
    with tracked_run(cfg, f"operators-{'-'.join(operators)}-{config_hash(identity_dict(cfg))}", kind="operators",
                     params={"operators": ",".join(operators)}, fresh=fresh) as parent:
        results = fit_many({op: _with_operator(cfg, op) for op in operators}, fresh=fresh,
                           parent_run_id=parent.run_id, init_checkpoint=init_checkpoint,
                           on_done=lambda _, r: parent.add_runs([r.mlflow_run_id]))
    return results
