"""Benchmark forward+backward of the LFB-NL detector (SlowOnly-R50, bank [R, 300, 2048]).

    python jobs/bench_model.py --quick              # tiny sizes, < 1 min on 2 CPU cores
    python jobs/bench_model.py --device cuda        # fp32 vs bf16 autocast (+ channels_last_3d)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lfb_ray.models import bench  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny batch and crop, few iterations")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    if args.quick:
        size = bench.QUICK
    else:
        size = bench.CUDA_DEFAULT if args.device == "cuda" else bench.DEFAULT
    results = bench.run_benchmark(device=args.device, size=size)
    print(bench.format_table(results, size, args.device))


if __name__ == "__main__":
    main()
