"""Generate the synthetic AVA-format dataset (videos, CSVs, label map, proposals, dataset.json).

python jobs/make_synthetic_ava.py --out data/synthetic_ava            # demo defaults
python jobs/make_synthetic_ava.py --out data/synthetic_small --videos 3 --seconds 20   # a quick one

What the videos show, the labels, the split and the files: docs/synthetic_dataset.md.
"""

import argparse
import os
import sys
import time
from pathlib import Path

from lfb_ray.synthetic import dataset_matches, generate_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="output directory (missing or empty)")
    # 160 videos, a quarter in val: 120 training videos (~300 training actors). With 60 the NL
    # head learns the training actors' roles by heart instead of reading the bank (README).
    parser.add_argument("--videos", type=int, default=160)
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--height", type=int, default=120)
    parser.add_argument("--val-fraction", type=float, default=0.25)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    parser.add_argument("--if-missing", action="store_true",
                        help="do nothing if --out already holds this exact dataset (same seed and sizes)")
    args = parser.parse_args(argv)
    same = dict(num_videos=args.videos, seconds=args.seconds, seed=args.seed, width=args.width,
                height=args.height, val_fraction=args.val_fraction)
    if args.if_missing and dataset_matches(args.out, **same):
        print(f"{args.out}: synthetic dataset already generated (seed {args.seed}), nothing to do")
        return 0

    start = time.perf_counter()
    try:
        info = generate_dataset(args.out, **same, overwrite=args.overwrite, workers=args.workers)
    except FileExistsError:
        what = "a different synthetic dataset (other generator version, seed or sizes)" if (
            Path(args.out) / "dataset.json").exists() else "other files"
        print(f"error: {args.out} already holds {what}; remove it or pass --overwrite", file=sys.stderr)
        return 2
    print(
        f"wrote {info.out_dir}: videos train={len(info.train_videos)} val={len(info.val_videos)}, "
        f"keyframes train={info.keyframes['train']} val={info.keyframes['val']}, "
        f"boxes train={info.boxes['train']} val={info.boxes['val']}, {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
