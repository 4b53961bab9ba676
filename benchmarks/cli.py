"""Benchmarks of the pipeline stages, each against a baseline measured in the same run (BENCHMARKS.md).

    python jobs/benchmark.py prepare [--quick]      # Ray Data prepare vs sequential / per-keyframe decode
    python jobs/benchmark.py ava-scale [--quick]    # prepared format at AVA size vs v1 rows and mmaction2 rawframes
    python jobs/benchmark.py bank-build [--quick]   # build_bank with 1 vs 2 actors
    python jobs/benchmark.py train [--quick]        # Ray Train loop vs a plain torch loop
    python jobs/benchmark.py eval [--quick]         # vectorised frame-mAP vs the loop reference
    python jobs/benchmark.py all [--quick]          # all four, one after another
    python jobs/benchmark.py gpu [--quick] [--prepared DIR]  # R50 training clips/s, bank keyframes/s (CUDA)
    python jobs/benchmark.py bank-read [--quick]    # FeatureBank.sample vs the mmaction2 loop; shared mmap memory
    python jobs/benchmark.py model [--quick] [--device cuda]  # detector forward+backward, fp32 vs bf16
    python jobs/benchmark.py bank-step [--quick]    # the bank's cost in one LFB iteration: before vs after (+CUDA)
    python jobs/benchmark.py loader [--quick] [--prepared DIR]  # training clips/s: real loader vs step only
    python jobs/benchmark.py gpu-session --prepared DIR [--budget-s 480] [--out DIR]  # all GPU checks, one run

Synthetic videos are generated once under --workdir and reused. Prints tables; asserts no timings.
Exit code 0 when every benchmark ran (and its correctness checks held), 1 when one failed (`all`
runs the others, then names the failed ones). `bank-read` and `model` take their own flags
(`python jobs/benchmark.py bank-read --help`).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

from benchmarks.table import cpu_count

__all__ = ["main"]

COMMANDS = ("prepare", "bank-build", "train", "eval")
OWN_FLAGS = ("bank-read", "model")  # subcommands that parse the rest of the command line themselves


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in OWN_FLAGS:
        if argv[0] == "bank-read":
            from benchmarks import bank

            bank.main(argv[1:], prog="benchmark.py bank-read")
        else:
            from benchmarks import model

            model.main(argv[1:], prog="benchmark.py model")
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=[*COMMANDS, "all", "gpu", "ava-scale", "bank-step", "loader",
                                            "gpu-session", *OWN_FLAGS])
    parser.add_argument("--quick", action="store_true", help="small sizes (< 1 min each on 2 CPUs)")
    parser.add_argument("--workdir", default="runs/bench", help="synthetic data and scratch outputs")
    parser.add_argument("--prepared", default=None,
                        help="gpu, loader, gpu-session: an existing prepared folder (then Ray is not needed)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="gpu-session: the whole run's time budget")
    parser.add_argument("--out", default=None, help="gpu-session: also write each section's output to OUT/<section>.txt")
    args = parser.parse_args(argv)
    if args.command == "gpu-session":
        from benchmarks import gpu_session

        return gpu_session.run(prepared=args.prepared, quick=args.quick, workdir=args.workdir,
                               budget_s=args.budget_s, out=args.out)
    if args.command == "loader":
        from benchmarks import loader

        return 0 if _attempt("loader", lambda: loader.run(quick=args.quick, workdir=args.workdir,
                                                          prepared=args.prepared)) else 1
    if args.command == "gpu":  # not part of `all`: it needs a CUDA machine to mean anything
        from benchmarks import gpu

        return 0 if _attempt("gpu", lambda: gpu.run(quick=args.quick, workdir=args.workdir,
                                                    prepared=args.prepared)) else 1
    if args.prepared:
        parser.error("--prepared is only for the gpu, loader and gpu-session commands")
    if args.command == "ava-scale":  # not part of `all`: 15-minute videos, ~15 min on 2 CPUs
        from benchmarks import ava_scale

        ava_scale.run(quick=args.quick, workdir=args.workdir)
        return 0
    if args.command == "bank-step":  # not part of `all`: CPU rows here, CUDA rows where there is a GPU
        from benchmarks import bank_step

        return 0 if _attempt("bank-step", lambda: bank_step.run(quick=args.quick, workdir=args.workdir)) else 1

    import ray

    from benchmarks import bank_build, evaluation, prepare, start_local_ray, train
    commands = COMMANDS if args.command == "all" else (args.command,)
    run = {"prepare": lambda: prepare.run(quick=args.quick, workdir=args.workdir),
           "bank-build": lambda: bank_build.run(quick=args.quick, workdir=args.workdir),
           "train": lambda: train.run(quick=args.quick, workdir=args.workdir),
           "eval": lambda: evaluation.run(quick=args.quick)}
    started = False
    failed = []
    for name in commands:
        if args.command == "all" and name in ("bank-build", "train"):
            started = start_local_ray(cpu_count()) or started  # one cluster for both; prepare runs its own
        elif started:  # no idle Ray cluster while eval is timed
            ray.shutdown()
            started = False
        if not _attempt(name, run[name]):
            failed.append(name)
    if started:
        ray.shutdown()
    if failed:
        print(f"error: {len(failed)} of {len(commands)} benchmark(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _attempt(name: str, fn) -> bool:
    """Run one benchmark; on an exception print its traceback and return False (the next one runs)."""
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as e:  # reported in full here and in main's exit code and summary line
        traceback.print_exc()
        print(f"[{name}] FAILED after {time.perf_counter() - t0:.0f} s: {type(e).__name__}: {e}\n",
              file=sys.stderr, flush=True)
        return False
    print(f"[{name}] done in {time.perf_counter() - t0:.0f} s\n", flush=True)
    return True
