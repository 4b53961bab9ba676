"""Preflight: what a job will need later, checked in seconds before any stage does work.

Why: on a real AVA run the expensive stages come first. A Kinetics checkpoint that is missing or of
another architecture used to be opened first inside a Ray Train worker, after ~4.4 core-hours of
prepare, and retried `train.max_failures` times; a bad `--operators` was refused after prepare,
baseline and bank; GPUs asked of a cluster that has none and cannot add any made Ray Train wait
forever; a relative path in a submitted job resolved against Ray's package cache on the head node.
Each of those is now one line here, before anything runs.

Each check returns `Problem`s (the config key, flag or file, and what is wrong and how to fix it);
`run_preflight` runs the checks a job needs and raises `PreflightError` with one line per problem.
`jobs/pipeline.py --check` runs only these checks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from lfb_ray.config import OPERATORS, Config, ConfigError, path_values
from lfb_ray.redaction import RedactedMessage

__all__ = ["SMOKE_OVERRIDES", "PreflightError", "Problem", "check_checkpoint", "check_data_inputs",
           "check_operators", "check_outputs", "check_resources", "check_submitted_paths", "check_tracking",
           "has_autoscaler", "is_submitted", "run_preflight"]

# The documented way to try a cluster config on a laptop or a CPU-only cluster before paying for GPUs
# (docs/ava.md, docs/cluster.md): one CPU worker, no GPU, a few iterations of one epoch, no waiting
# for an autoscaler, and a few keyframes of each split (`data.max_keyframes_per_split`: prepare, the
# bank and val inference see only those, and val mAP is scored on them: the capped val). Everything
# else (the model, the data, the paths) stays as the config says.
SMOKE_OVERRIDES: tuple[str, ...] = (
    "cluster.device=cpu", "cluster.num_workers=1", "cluster.cpus_per_worker=1", "cluster.data_cpus=1",
    "cluster.max_gpus=0", "train.epochs=1", "train.max_iters_per_epoch=2", "train.batch_size_per_worker=2",
    "bank.cpus_per_actor=1", "bank.max_actors=1", "data.max_keyframes_per_split=4",
)

Job = Literal["pipeline", "prepare", "train", "bank"]


@dataclass(frozen=True)
class Problem:
    """One thing a job would fail on later: `where` is the config key, flag or file."""

    where: str
    message: str

    def line(self) -> str:
        return f"preflight: {self.where}: {self.message}"


class PreflightError(RedactedMessage, RuntimeError):
    """Some checks failed; the message is one line per `Problem` (credentials in a URI redacted)."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = tuple(problems)
        super().__init__("\n".join(p.line() for p in self.problems))


def is_submitted() -> bool:
    """Whether this driver runs as a job on a cluster: `ray job submit` (its runtime env) or
    RAY_ADDRESS set (the driver joins a cluster whose other nodes do not share its directory)."""
    return bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or os.environ.get("RAY_ADDRESS", "").strip())


# ---------------------------------------------------------------------------------------------
# Checks without Ray


def check_operators(operators: Iterable[str], flag: str = "--operators") -> list[Problem]:
    bad = [o for o in operators if o not in OPERATORS]
    if bad:
        return [Problem(flag, f"unknown operator(s) {', '.join(bad)}; allowed: {', '.join(OPERATORS)}")]
    return []


def check_submitted_paths(cfg: Config) -> list[Problem]:
    """Relative local paths in a config *as given* (before `resolve_paths`), for a submitted job.

    Under `ray job submit` the driver's directory is Ray's package cache on the head node: a relative
    path resolves there (and `/data/`, `/runs/` are not even uploaded), and the other nodes cannot
    see it. Outputs and inputs must be URIs or absolute paths on storage every node mounts.
    """
    from lfb_ray.storage import is_uri

    out = []
    for key, value in path_values(cfg).items():
        if value and not is_uri(value) and not os.path.isabs(value):
            out.append(Problem(key, f"{value!r} is a relative path, which a job submitted to a cluster resolves "
                                    f"against Ray's package cache on the head node: give a URI (s3://...) or an "
                                    f"absolute path on storage every node mounts (docs/cluster.md: "
                                    f"workdir=s3://BUCKET/lfb/ava data.root=/mnt/ava ...)"))
    return out


def check_checkpoint(path: str, cfg: Config, where: str, *, backbone_only: bool = False) -> list[Problem]:
    """`path` exists and loads strictly into the model of `cfg.model` (every key and shape), as the
    job will load it later (`lfb_ray.models.checkpoint.load_checkpoint`)."""
    from lfb_ray.storage import StorageError, checkpoint_file, exists, resolve

    try:
        fs, inner = resolve(checkpoint_file(path))
        if not exists(fs, inner):
            return [Problem(where, f"checkpoint {path} does not exist (docs/ava.md, section 1, downloads the "
                                   f"mmaction2 checkpoints the configs name)")]
    except StorageError as e:
        return [Problem(where, str(e))]
    from lfb_ray.models.checkpoint import load_checkpoint
    from lfb_ray.models.detector import build_detector

    try:
        load_checkpoint(build_detector(cfg.model), checkpoint_file(path), backbone_only=backbone_only,
                        expect=cfg.model)
    except Exception as e:  # CheckpointError (keys/shapes), an unreadable or refused file
        what = "its backbone" if backbone_only else f"a model.fbo={cfg.model.fbo} detector"
        return [Problem(where, f"{path} does not load into {what} of depth {cfg.model.depth}: "
                               f"{str(e).splitlines()[0][:400]}")]
    return []


def check_data_inputs(cfg: Config) -> list[Problem]:
    """The annotation files and the videos folder the prepare stage reads."""
    from lfb_ray.data.prep import VIDEO_EXTENSIONS, PrepareError, find_videos
    from lfb_ray.storage import file_exists

    d = cfg.data
    out = []
    for key in ("train_csv", "val_csv", "label_map", "train_exclusions", "val_exclusions", "train_proposals",
                "val_proposals"):
        rel = getattr(d, key)
        if not rel:
            continue
        path = cfg.data_path(rel)
        try:
            ok = file_exists(path)
        except OSError:
            ok = False
        if not ok:
            out.append(Problem(f"data.{key}", f"{path} does not exist (data.root={d.root}; docs/ava.md, section 1)"))
    videos = cfg.data_path(d.videos_dir)
    try:
        found = find_videos(videos)
    except (PrepareError, OSError) as e:
        out.append(Problem("data.videos_dir", f"{videos.partition('?')[0]}: {e}"))
    else:
        if not found:
            out.append(Problem("data.videos_dir", f"{videos.partition('?')[0]} holds no "
                                                  f"{'/'.join(sorted(VIDEO_EXTENSIONS))} files"))
    return out


def check_outputs(locations: Mapping[str, str]) -> list[Problem]:
    """Each output location (key -> path or URI) can be written (a probe file is written and removed)."""
    from lfb_ray.storage import check_writable

    out = []
    for key, uri in locations.items():
        try:
            check_writable(uri)
        except OSError as e:
            out.append(Problem(key, str(e)))
    return out


def _reachable(uri: str, timeout_s: float = 5.0) -> str | None:
    """None when an http(s) tracking server answers its /health endpoint, else the reason."""
    import urllib.request

    base = uri.rstrip("/")
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=timeout_s) as r:
            return None if r.status == 200 else f"HTTP {r.status}"
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def check_tracking(cfg: Config, *, scalable: bool, alive_nodes: int = 1) -> list[Problem]:
    """MLflow: a store every node reaches, and a server that answers.

    Args:
        scalable: the cluster may add nodes (an autoscaler, `cluster.max_gpus > 0`) or the job was
            submitted to a cluster: a store on one node's disk is then refused even while that node
            is the only one up (a guard counting the nodes alive at start-up passed on a cluster at
            zero workers, and the GPU nodes added later logged nowhere).
    """
    from lfb_ray.tracking import is_node_local, redact

    if not cfg.tracking.enabled:
        return []
    try:
        uri = cfg.tracking_uri
    except ConfigError as e:
        return [Problem("tracking.tracking_uri", str(e))]
    if is_node_local(uri):
        if scalable or alive_nodes > 1:
            why = (f"the cluster has {alive_nodes} nodes" if alive_nodes > 1 else
                   "this cluster can add nodes (an autoscaler, or cluster.max_gpus > 0) or the job was submitted to it")
            return [Problem("tracking.tracking_uri", f"{redact('uri', uri)} is a store on one node's disk, but {why}: "
                                                     "runs on other nodes would log to stores of their own; point "
                                                     "tracking.tracking_uri (or MLFLOW_TRACKING_URI in the job's "
                                                     "runtime env) at a tracking server, or tracking.enabled=false")]
        return []
    if uri.lower().startswith(("http://", "https://")):
        reason = _reachable(uri)
        if reason:
            return [Problem("tracking.tracking_uri", f"the MLflow server {redact('uri', uri)} does not answer "
                                                     f"({reason}); start it or fix the URI")]
    return []


# ---------------------------------------------------------------------------------------------
# The cluster


def has_autoscaler(wait_s: float = 15.0) -> bool | None:
    """Whether the connected Ray cluster has an autoscaler that can add nodes; None when unknown.

    A cluster this process started (`ray.init()` locally) has none. Otherwise the cluster's monitor
    reports its node types: autoscaler v2 publishes the cluster config (node groups); v1 publishes a
    status whose node types are the config's names, while the monitor of a cluster started by hand
    (`ray start`, no autoscaling config) runs read-only and names every node `node_<node id>`.
    """
    import ray

    if not ray.is_initialized():
        return None
    node = getattr(ray._private.worker.global_worker, "node", None)
    if node is not None and getattr(node, "head", False):
        return False  # this driver started the cluster: nothing can add nodes to it
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
        if config is not None and len(config.node_group_configs) > 0:
            return True
    except Exception:
        pass
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    deadline = time.monotonic() + wait_s
    while True:
        try:
            raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
            report = json.loads(raw).get("autoscaler_report") if raw else None
        except Exception:
            report = None
        if report is not None:
            mapping = report.get("node_type_mapping") or {}
            return any(t != f"node_{nid}" for nid, t in mapping.items())
        if time.monotonic() >= deadline:
            return None
        time.sleep(1.0)


def check_resources(cfg: Config, resources: Mapping[str, float], autoscaler: bool | None) -> tuple[list[Problem], list[str]]:
    """Whether one training run's workers can ever be placed: (problems, notes to print).

    GPUs asked of a cluster that has fewer now and no autoscaler to add them is an error naming the
    keys to change; with an autoscaler (or when that is unknown) the run waits at most
    `cluster.resource_wait_s`, and a note says what it waits for.
    """
    cl = cfg.cluster
    problems: list[Problem] = []
    notes: list[str] = []
    smoke = " ".join(SMOKE_OVERRIDES)
    if cl.uses_gpu(resources):
        have = resources.get("GPU", 0.0)
        if have < cl.num_workers:
            if autoscaler is False:
                problems.append(Problem("cluster.device", (
                    f"{cl.device} asks for cluster.num_workers={cl.num_workers} GPUs, but the cluster has {have:g} and "
                    f"no autoscaler to add any (cluster.max_gpus={cl.max_gpus} only says what an autoscaler could "
                    f"add): on a fixed GPU cluster set cluster.num_workers to its GPUs; to try the config without "
                    f"GPUs add the smoke overrides: {smoke}")))
            elif cl.max_gpus < cl.num_workers:
                problems.append(Problem("cluster.max_gpus", (
                    f"{cl.max_gpus}: a run needs cluster.num_workers={cl.num_workers} GPUs and the cluster has {have:g}; "
                    f"set cluster.max_gpus to the GPUs the autoscaler can add (or lower cluster.num_workers)")))
            else:
                notes.append(f"[preflight] the cluster has {have:g} GPU(s); a run asks for {cl.num_workers}: waiting up "
                             f"to cluster.resource_wait_s={cl.resource_wait_s:g} s for the autoscaler to add them")
    else:
        cpus = resources.get("CPU", 0.0)
        need = cl.num_workers * cl.cpus_per_worker
        if autoscaler is False and need > cpus:
            problems.append(Problem("cluster.num_workers", (
                f"{cl.num_workers} workers x cluster.cpus_per_worker={cl.cpus_per_worker:g} need {need:g} CPUs; the "
                f"cluster has {cpus:g} and no autoscaler: lower cluster.num_workers or cluster.cpus_per_worker")))
    return problems, notes


# ---------------------------------------------------------------------------------------------
# A job's checks


def _operator_cfg(cfg: Config, op: str) -> Config:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, fbo=op))


def run_preflight(cfg: Config, job: Job, *, operators: Sequence[str] = (), baseline_cfg: Config | None = None,
                  checkpoint: str | None = None, init_checkpoint: str | None = None,
                  given: Config | None = None, with_cluster: bool = True) -> list[str]:
    """Run the checks `job` needs; return the notes to print.

    Args:
        cfg: the job's config, paths resolved.
        job: "pipeline" (every stage), "prepare", "train" (`model.fbo`, or each of `operators`) or
            "bank" (with the baseline `checkpoint`).
        baseline_cfg: the pipeline's baseline config (default: `cfg` with `model.fbo=none`).
        init_checkpoint: a detector whose backbone a training run starts from (`--init-backbone`).
        given: the config as given, before `resolve_paths` (relative paths of a submitted job).
        with_cluster: also check tracking and resources against the connected Ray cluster.

    Raises:
        PreflightError: one line per problem.
    """
    problems: list[Problem] = check_operators(operators)
    if given is not None and is_submitted():
        problems += check_submitted_paths(given)
        if baseline_cfg is not None:
            problems += [p for p in check_submitted_paths(baseline_cfg) if p not in problems]
    train_cfgs: list[tuple[Config, str | None]] = []
    if job == "pipeline":
        problems += check_data_inputs(cfg)
        base = baseline_cfg or _operator_cfg(cfg, "none")
        train_cfgs.append((base, None))
        if not check_operators(operators):
            start = "baseline" if cfg.model.init_backbone_from_baseline else None
            train_cfgs += [(_operator_cfg(cfg, op), start) for op in operators]
        outputs = {"workdir": cfg.workdir, "data.prepared_dir": cfg.prepared_dir, "bank.path": cfg.bank_dir,
                   "train.storage_path": cfg.storage_path}
    elif job == "prepare":
        problems += check_data_inputs(cfg)
        outputs = {"data.prepared_dir": cfg.prepared_dir}
    elif job == "train":
        ops = list(operators) or [cfg.model.fbo]
        for op in ops if not check_operators(ops) else []:
            c = _operator_cfg(cfg, op)
            start = init_checkpoint or (cfg.bank.checkpoint if c.model.uses_bank and c.model.init_backbone_from_baseline
                                        else None)
            train_cfgs.append((c, start))
        outputs = {"workdir": cfg.workdir, "train.storage_path": cfg.storage_path}
    elif job == "bank":
        if checkpoint:
            problems += check_checkpoint(checkpoint, _operator_cfg(cfg, "none"), "--checkpoint/bank.checkpoint")
        outputs = {"bank.path": cfg.bank_dir}
    else:
        raise ValueError(f"unknown job {job!r}")

    checked: set[str] = set()  # each checkpoint once: only its backbone is loaded, whatever the operator
    for c, start in train_cfgs:
        if start == "baseline":
            continue  # the pipeline's own baseline: made by its baseline stage
        path, where = (start, "--init-backbone/bank.checkpoint") if start else (c.model.pretrained, "model.pretrained")
        if not path or path in checked:
            continue
        checked.add(path)
        problems += check_checkpoint(path, c, where, backbone_only=True)
    problems += check_outputs(outputs)

    notes: list[str] = []
    if with_cluster:
        import ray

        autoscaler = has_autoscaler() if ray.is_initialized() else None
        resources = ray.cluster_resources() if ray.is_initialized() else {}
        alive = sum(1 for n in ray.nodes() if n.get("Alive")) if ray.is_initialized() else 1
        scalable = bool(autoscaler) or cfg.cluster.max_gpus > 0 or is_submitted()
        problems += check_tracking(cfg, scalable=scalable, alive_nodes=alive)
        if train_cfgs:  # (the bank build takes a GPU only where the cluster has one now)
            p, n = check_resources(train_cfgs[0][0], resources, autoscaler)
            problems += p
            notes += n
    if problems:
        raise PreflightError(problems)
    return notes
