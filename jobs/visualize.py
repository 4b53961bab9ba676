r"""Draw a model's detections on one video: GT/predicted boxes per keyframe (+ NL attention timelines).

    python jobs/visualize.py --checkpoint runs/.../model.pt --video 1j20qq1JyX4 \
        [--config CFG] [key=value ...] [--split val] [--out DIR] [--max-keyframes 16] [--top-k 3]

The model's config (data, bank, operator) is the one its model.pt saved unless --config is given.
Writes <out>/<video>_grid.png and <out>/<video>.mp4 (default out: <workdir>/visualize). Runs in
this process from the prepared shards; no Ray cluster needed. LFB models also read the bank.
"""

import sys

from lfb_ray.cli import base_parser, load_for_checkpoint
from lfb_ray.redaction import redact_text


def main(argv=None) -> int:
    from lfb_ray.visualize import visualize_video

    p = base_parser(__doc__, config_in_checkpoint=True)
    p.add_argument("--checkpoint", required=True, help="model.pt, Ray checkpoint dir or mmaction2 .pth")
    p.add_argument("--video", required=True, help="video id (as in the annotation CSVs)")
    p.add_argument("--split", default="val", choices=("train", "val"))
    p.add_argument("--out", default="", help="output folder (default <workdir>/visualize)")
    p.add_argument("--max-keyframes", type=int, default=16, help="keyframes shown, spread over the video")
    p.add_argument("--top-k", type=int, default=3, help="labels per predicted box")
    p.add_argument("--score-thr", type=float, default=0.3, help="labels at or below this score are not drawn")
    args = p.parse_args(argv)
    cfg = load_for_checkpoint(args)
    try:
        vis = visualize_video(cfg, args.checkpoint, args.video, split=args.split, out_dir=args.out,
                              max_keyframes=args.max_keyframes, top_k=args.top_k, score_thr=args.score_thr)
    except ValueError as e:
        print(f"error: {redact_text(e)}", file=sys.stderr)
        return 1
    print(f"{len(vis.timestamps)} keyframes of {args.video}: {vis.png}  {vis.mp4}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
