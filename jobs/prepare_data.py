"""Stage 1: AVA videos + annotations → per-video frame stores and keyframe tables (Ray Data, decord).

    python jobs/prepare_data.py --config configs/synthetic.yaml
    python jobs/prepare_data.py --config configs/synthetic.yaml --verify   # checksums; redo damaged videos
    ray job submit --working-dir . -- python jobs/prepare_data.py --config configs/lfb_nl.yaml
"""

import sys

from lfb_ray.cli import base_parser, init_ray, load_given, preflight_or_exit
from lfb_ray.progress import JobSummary
from lfb_ray.redaction import redact_text


def main(argv=None) -> int:
    from lfb_ray.config import resolve_paths

    p = base_parser(__doc__)
    p.add_argument("--verify", action="store_true", help="recompute the SHA-256 of every prepared video's files "
                   "(sizes are always checked) and prepare the damaged ones again")
    args = p.parse_args(argv)
    from lfb_ray.data.prep import PrepareError, prepare_dataset  # after parsing, so --help is instant

    given = load_given(args)
    cfg = resolve_paths(given)
    init_ray(cfg)
    preflight_or_exit(cfg, "prepare", given=given, with_cluster=False)
    try:
        summary = prepare_dataset(cfg, verify=args.verify)
    except PrepareError as e:
        print(f"error: {redact_text(e)}", file=sys.stderr)
        return 1
    print(redact_text(summary.line()))
    JobSummary("prepare", [("prepared set (frame stores + keyframe tables)", cfg.prepared_dir)]).print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
