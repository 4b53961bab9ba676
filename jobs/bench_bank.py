"""Benchmark the feature bank: batched sampling vs the mmaction2 loop, shared-mmap vs per-process memory.

    python jobs/bench_bank.py [--quick]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lfb_ray.bank.bench import main  # noqa: E402

if __name__ == "__main__":
    main()
