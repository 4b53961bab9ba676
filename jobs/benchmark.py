"""Benchmarks of the pipeline stages against same-run baselines; the code is in `benchmarks/`.

    python jobs/benchmark.py --help    # the subcommands: prepare, ava-scale, bank-build, train, eval,
                                       # all, gpu, bank-read, model, bank-step,
                                       # loader, gpu-session
"""

from benchmarks.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
