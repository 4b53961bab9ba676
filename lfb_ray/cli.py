"""Shared command-line plumbing of the jobs: `--config PATH key=value ...` and Ray start-up."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from lfb_ray.config import Config, ConfigError, load_config, resolve_paths
from lfb_ray.progress import INTERACTIVE_ENV, driver_is_interactive, stdout_is_terminal
from lfb_ray.redaction import redact_text

__all__ = ["base_parser", "config_of_checkpoint", "configure_ray_output", "driver_runtime_env", "init_ray",
           "job_runtime_env", "load_for_checkpoint", "load_from_args", "load_given", "preflight_or_exit",
           "quiet_ray_train_reports", "set_output_env", "wait_for_cluster"]


def _redacting_excepthook(exc_type, exc, tb) -> None:
    """`sys.excepthook` of the jobs: the traceback of an uncaught error, credentials redacted
    (`lfb_ray.redaction.redact_text`; an exception's text may hold an `s3://KEY:SECRET@` URI)."""
    import traceback

    sys.stderr.write(redact_text("".join(traceback.format_exception(exc_type, exc, tb))))


def base_parser(description: str, *, config_in_checkpoint: bool = False) -> argparse.ArgumentParser:
    """`--config PATH` and dotted overrides; the description (a job's docstring, its usage examples
    one per line) is printed as written, not reflowed into one paragraph. Also installs
    `_redacting_excepthook` (every job calls this first).

    With `config_in_checkpoint` (jobs that score a `--checkpoint`) `--config` is optional: the
    default is the config the checkpoint saved (`load_for_checkpoint`)."""
    sys.excepthook = _redacting_excepthook
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if config_in_checkpoint:
        p.add_argument("--config", default="", help="YAML config (configs/*.yaml); default: the config saved in "
                                                    "--checkpoint (a model.pt trained by lfb_ray)")
    else:
        p.add_argument("--config", required=True, help="YAML config (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=2 model.fbo=avg")
    return p


def load_given(args: argparse.Namespace) -> Config:
    """The config of `--config` and the overrides as given (paths not resolved); exit 2 if invalid."""
    try:
        return load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {redact_text(e)}", file=sys.stderr)
        raise SystemExit(2) from None


def load_from_args(args: argparse.Namespace) -> Config:
    """`load_given` with the paths made absolute (`resolve_paths`), as the workers need them."""
    return resolve_paths(load_given(args))


def config_of_checkpoint(checkpoint: str, overrides=()) -> Config:
    """The config a trained `model.pt` (or a Ray checkpoint folder holding one) saved in its meta,
    with dotted overrides applied; paths as the run resolved them.

    Raises:
        ConfigError: the file holds no config (an mmaction2 or converted file, or one of ours saved
            before lfb_ray stored it): pass --config.
    """
    from lfb_ray.config import with_overrides
    from lfb_ray.models.checkpoint import read_meta
    from lfb_ray.storage import checkpoint_file

    meta = read_meta(checkpoint_file(checkpoint))
    if meta is None:
        raise ConfigError(f"{checkpoint} holds no config (an mmaction2 or converted file, or an lfb_ray model.pt "
                          "saved before checkpoints carried one): pass --config")
    return with_overrides(meta.to_config(), overrides)


def load_for_checkpoint(args: argparse.Namespace) -> Config:
    """`load_from_args` when `--config` is given, else `config_of_checkpoint(args.checkpoint)`
    with the overrides; exit 2 when neither gives a config."""
    if args.config:
        return load_from_args(args)
    from lfb_ray.models.checkpoint import CheckpointError

    try:
        return resolve_paths(config_of_checkpoint(args.checkpoint, args.overrides))
    except (ConfigError, CheckpointError, FileNotFoundError, OSError) as e:
        print(f"error: {redact_text(e)}", file=sys.stderr)
        raise SystemExit(2) from None


def preflight_or_exit(cfg: Config, job: str, **kwargs) -> None:
    """`lfb_ray.preflight.run_preflight`: print its notes; on problems print one line each to stderr
    and exit 2, before any stage does work (and without Ray Train retrying anything)."""
    from lfb_ray.preflight import PreflightError, run_preflight

    t0 = time.monotonic()
    try:
        notes = run_preflight(cfg, job, **kwargs)
    except PreflightError as e:
        print(redact_text(e), file=sys.stderr)
        print(f"error: {len(e.problems)} preflight check(s) failed; nothing was run", file=sys.stderr)
        raise SystemExit(2) from None
    for n in notes:
        print(redact_text(n), flush=True)
    print(f"[preflight] ok ({time.monotonic() - t0:.1f} s)", flush=True)


# Ray Data reads it when a process imports ray.data: "1" turns every progress bar off.
DATA_PROGRESS_ENV = "RAY_DATA_DISABLE_PROGRESS_BARS"
COLOR_PREFIX_ENV = "RAY_COLOR_PREFIX"  # read by the driver when it prints its workers' output: "0" = no colours
# Read by each Ray Train worker at start: "0" leaves `print` alone (see `set_output_env`).
TRAIN_PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"
# Variables a driver passes on to its Ray workers when the job's runtime env does not already hold them.
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "PYTHONPATH", INTERACTIVE_ENV, DATA_PROGRESS_ENV, TRAIN_PRINT_PATCH_ENV)
CONNECT_TIMEOUT_ENV = "LFB_RAY_CONNECT_TIMEOUT_S"
DEFAULT_CONNECT_TIMEOUT_S = 60.0


def job_runtime_env() -> dict:
    """The runtime env this driver was submitted with by `ray job submit` ({} when it was not).

    Ray's job supervisor hands it to the entrypoint in RAY_JOB_CONFIG_JSON_ENV_VAR and merges it
    into the driver's `ray.init(runtime_env=...)`, failing on any field or env var key given twice.
    """
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    return json.loads(raw).get("runtime_env") or {}


def driver_runtime_env(job_env: dict | None = None) -> dict:
    """What the driver adds to the job's runtime env: the `FORWARDED_ENV` variables set here that
    the job does not declare itself (those reach the workers already, and declaring them again is
    an error)."""
    job_env = job_runtime_env() if job_env is None else job_env
    declared = set(job_env.get("env_vars") or {})
    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ and k not in declared}
    return {"env_vars": env_vars} if env_vars else {}


def _connect_timeout_s() -> float:
    raw = os.environ.get(CONNECT_TIMEOUT_ENV, "")
    try:
        return float(raw) if raw else DEFAULT_CONNECT_TIMEOUT_S
    except ValueError:
        raise SystemExit(f"error: {CONNECT_TIMEOUT_ENV}={raw!r} is not a number of seconds") from None


def _gcs_host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a `host:port` or `ray://host:port` address; None for others (Ray judges those)."""
    rest = address[len("ray://"):] if address.startswith("ray://") else address
    if "://" in rest or ":" not in rest:
        return None
    host, _, port = rest.rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        return None


def wait_for_cluster(address: str, timeout_s: float) -> None:
    """Return once a TCP connection to `address` (RAY_ADDRESS) succeeds; fail after `timeout_s`.

    `ray.init(address=...)` retries an unreachable GCS for minutes without saying so (measured with
    Ray 2.60: still waiting after 2 min); this bounded probe turns that into an error that names
    the address and the fix.

    Raises:
        SystemExit: nothing accepts connections at `address` within `timeout_s`.
    """
    import socket
    import time

    hp = _gcs_host_port(address)
    if hp is None:
        return
    deadline = time.monotonic() + timeout_s
    last: OSError | None = None
    while True:
        try:
            with socket.create_connection(hp, timeout=min(5.0, max(0.5, timeout_s))):
                return
        except OSError as e:
            last = e
        if time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    raise SystemExit(
        f"error: RAY_ADDRESS={address}: no Ray cluster answers at {hp[0]}:{hp[1]} after {timeout_s:.0f} s "
        f"({type(last).__name__}: {last}). Start the cluster (`ray start --head`) or fix RAY_ADDRESS; unset it "
        f"to run on a new local cluster; {CONNECT_TIMEOUT_ENV} sets the wait.")


def init_ray(cfg: Config | None = None) -> None:
    """Connect to the cluster in RAY_ADDRESS (set by `ray job submit`), or start a local one on loopback.

    * RAY_ADDRESS set: wait at most LFB_RAY_CONNECT_TIMEOUT_S (60 s) for it to answer, then connect,
      adding to the job's runtime env only what it lacks (`driver_runtime_env`).
    * RAY_ADDRESS unset: always a new local cluster (`address="local"`), never one found in Ray's
      address file (`<temp dir>/ray/ray_current_cluster`): a file left by a crashed `ray start` made
      a plain `ray.init()` wait forever for a cluster that was gone.
    """
    import ray

    if ray.is_initialized():
        return
    set_output_env(stdout_is_terminal())
    configure_ray_output()
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address:
        if address == "auto":
            from ray._private.services import canonicalize_bootstrap_address

            try:
                address = canonicalize_bootstrap_address("auto") or address
            except ConnectionError as e:
                raise SystemExit(f"error: RAY_ADDRESS=auto: {e}") from None
        wait_for_cluster(address, _connect_timeout_s())
        ray.init(address=address, runtime_env=driver_runtime_env() or None, log_to_driver=True)
        return
    _note_running_cluster()
    runtime_env = driver_runtime_env({})
    # No dashboard locally, hence no State API: Ray Train's PlacementGroupCleaner actor then logs
    # "Failed to query Ray Train Controller actor state" every few seconds for the whole fit.
    # A local cluster dies with its driver (taking any placement group with it), so the hook
    # raises only that logger's level in Ray's worker processes.
    runtime_env["worker_process_setup_hook"] = "lfb_ray.cli.quiet_local_ray_workers"
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, runtime_env=runtime_env,
             configure_logging=True, logging_level="WARNING")


def _note_running_cluster() -> None:
    """Say so when Ray's address file names a cluster that answers: this run does not use it."""
    import socket

    try:
        from ray._private.utils import read_ray_address

        recorded = read_ray_address()
    except Exception:
        return
    hp = _gcs_host_port(recorded or "")
    if hp is None:
        return
    try:
        with socket.create_connection(hp, timeout=0.5):
            pass
    except OSError:
        return  # a stale file from a cluster that is gone: nothing to say
    print(f"[lfb_ray] RAY_ADDRESS is unset: starting a new local Ray cluster; the cluster {recorded} started "
          f"with `ray start` on this machine is not used (set RAY_ADDRESS={recorded} to run there)", flush=True)


def quiet_local_ray_workers() -> None:
    """`worker_process_setup_hook` of local clusters: silence the State-API-less cleaner's warnings."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def set_output_env(interactive: bool) -> None:
    """Record in this process's environment where the driver's stdout goes, for its Ray workers
    (`FORWARDED_ENV` hands both variables on; their own stdout is a log file either way).

    Not a terminal (a redirected run, `ray job submit`): `DATA_PROGRESS_ENV=1`, since Ray Data's
    bars, redrawn with escape codes several times a second by every execution (each Train worker's
    epoch and evaluation included), made most of a 12.5 MB log; and `COLOR_PREFIX_ENV=0`, so the
    driver prints the workers' "(pid=...)" prefixes without colour codes. Values the user set are kept.

    Either way `TRAIN_PRINT_PATCH_ENV=0`: Ray Train 2.60 routes a worker's `print` to its logger and
    also to the original print whenever `sys.stdout` is not `sys.__stdout__`, which in a Ray worker
    (stdout reopened on its log file) is always, so every line the train loop printed came twice.
    """
    os.environ.setdefault(TRAIN_PRINT_PATCH_ENV, "0")
    if interactive:
        os.environ[INTERACTIVE_ENV] = "1"
    else:
        os.environ.pop(INTERACTIVE_ENV, None)
        os.environ.setdefault(DATA_PROGRESS_ENV, "1")
        os.environ.setdefault(COLOR_PREFIX_ENV, "0")


def configure_ray_output() -> None:
    """Apply `set_output_env`'s choice to this process's current Ray Data `DataContext`.

    Called by the driver (`init_ray`: its prepare and bank executions) and by each Train worker
    (`lfb_ray.train.recipe`): a Train worker's context is the copy Ray Train took where the
    trainer was created, which for concurrent runs is a Ray task, not the driver. Ray Data reads
    `DATA_PROGRESS_ENV` only when it is first imported, hence the explicit assignment. Off a
    terminal, executions also skip their "Starting execution ... / Execution plan ..." lines.
    """
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = os.environ.get(DATA_PROGRESS_ENV, "0").strip() not in ("1", "true", "True")
    ctx.print_on_execution_start = driver_is_interactive()


def quiet_ray_train_reports() -> None:
    """In a Train worker: drop Ray Train's INFO line per `ray.train.report` ("Reporting training
    result N: ..."; one per checkpoint and epoch, with its metrics dict, on every rank).

    Ray 2.60 logs it with a logger named by its module's file path, not "ray.train", so
    `RunConfig(logging_config=LoggingConfig(log_level=...))`, whose filter matches "ray.train*",
    does not reach it; its warnings and errors still print.
    """
    import logging

    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)
