r"""Action detection on any video: every person's actions at every second, with the video's own bank.

    python jobs/detect.py --video MOVIE.mp4 --checkpoint MODEL.pt --out DIR \
        [--persons PROPOSALS.pkl|CSV | --detector-weights FILE] [--start S --end E] [key=value ...]

A model.pt trained by lfb_ray carries its config and the baseline that computes its bank; for
mmaction2 .pth files (or older weight-only model.pt files) pass --config and --bank-checkpoint.

Writes DIR/detections.csv (AVA result format), DIR/detections_short_term.csv (LFB models: the
baseline's scores for the same boxes), DIR/tracks.json (per-person tracks with their top actions),
DIR/<video>_detections.mp4 (upscaled to a short side of at least 480 px, the actions in a side
panel), DIR/bank/ (the video's bank) and, with --frame-png S, DIR/<video>_S.png.
Runs in this process; no Ray cluster. See docs/detect.md.
"""

from __future__ import annotations

import argparse
import sys

from lfb_ray.redaction import redact_text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video", required=True, help="video file (anything decord/ffmpeg reads)")
    p.add_argument("--checkpoint", required=True, help="LFB (or baseline) model: model.pt, Ray checkpoint dir, "
                                                       "mmaction2 .pth or its jobs/convert_checkpoint.py output")
    p.add_argument("--bank-checkpoint", default="", help="the short-term baseline that computes the bank (LFB "
                                                         "models; default: the one --checkpoint was trained from)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", default="", help="the model's config (data/bank settings, exclusive label groups); "
                                                "default: the config saved in --checkpoint, else lfb_ray's "
                                                "defaults and the layout read from the weights")
    p.add_argument("overrides", nargs="*", help="dotted config overrides (of --config, else of the checkpoint's "
                                                "saved config), e.g. bank.window_seconds=60")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--persons", default="", help="person boxes: FAIR/mmaction2 proposals .pkl or AVA-style .csv")
    src.add_argument("--detector-weights", default="",
                     help="state dict of torchvision's fasterrcnn_resnet50_fpn_v2 (COCO_V1), a local file")
    p.add_argument("--start", type=int, default=None, help="first keyframe second (AVA time), default the video's first")
    p.add_argument("--end", type=int, default=None, help="last keyframe second (inclusive), default the video's last")
    p.add_argument("--video-id", default="", help="id in the persons file and the outputs (default: the file name)")
    p.add_argument("--video-start-second", type=int, default=None,
                   help="AVA second of file time 0 (900 for AVA's trimmed clips and the synthetic set; default: "
                        "the config's data.video_start_second, else 900 if the persons file says so, else 0)")
    p.add_argument("--device", default="", help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--top-k", type=int, default=3, help="actions per person in the JSON and the video")
    p.add_argument("--draw-thr", type=float, default=0.3, help="actions at or below this score are not drawn")
    p.add_argument("--track-iou", type=float, default=0.2,
                   help="IoU that links a box to a track's last box (or that box moved at the track's velocity)")
    p.add_argument("--detector-min-size", type=int, default=800, help="detector input short side")
    p.add_argument("--no-video", action="store_true", help="skip the annotated mp4")
    p.add_argument("--frame-png", type=int, default=None, metavar="SECOND",
                   help="also write the annotated frame of keyframe second SECOND (AVA time) as "
                        "DIR/<video>_SECOND.png, drawn as in the mp4")
    p.add_argument("--keep-work", action="store_true", help="keep DIR/_work (the decoded clips)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    from lfb_ray.config import Config, ConfigError, load_config, with_overrides
    from lfb_ray.detect import DetectError, detect_video
    from lfb_ray.detect.checkpoints import read_state, saved_meta

    args = build_parser().parse_args(argv)
    cfg = None
    try:
        if args.config:
            cfg = load_config(args.config, args.overrides)
        elif args.overrides:
            read_state(args.checkpoint, "--checkpoint")
            meta = saved_meta(args.checkpoint, "--checkpoint")
            cfg = with_overrides(meta.to_config() if meta else Config(), args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {redact_text(e)}", file=sys.stderr)
        return 2
    except DetectError as e:
        print(f"error: {redact_text(e)}", file=sys.stderr)
        return 2
    try:
        res = detect_video(args.video, args.checkpoint, args.out, config=cfg, bank_checkpoint=args.bank_checkpoint or None,
                           persons=args.persons or None, detector_weights=args.detector_weights or None,
                           start=args.start, end=args.end, video_id=args.video_id or None,
                           video_start_second=args.video_start_second, device=args.device or None, top_k=args.top_k,
                           draw_thr=args.draw_thr, track_iou=args.track_iou,
                           detector_min_size=args.detector_min_size, render=not args.no_video, frame_png=args.frame_png,
                           keep_work=args.keep_work, progress=not args.quiet)
    except DetectError as e:
        print(f"error: {redact_text(e)}", file=sys.stderr)
        return 2
    print(redact_text(res.line()))
    for path in (res.csv, res.short_term_csv, res.tracks_json, res.mp4, res.png):
        if path:
            print(f"  {redact_text(path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
