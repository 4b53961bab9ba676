"""Frame-mAP@0.5 of an AVA result CSV (official ActivityNet protocol or mmaction2 1.x's).

    python jobs/evaluate.py --gt ava_val_v2.1.csv --pred results.csv \
        --label-map ava_action_list_v2.1_for_activitynet_2018.pbtxt \
        --exclusions ava_val_excluded_timestamps_v2.1.csv [--protocol mmaction2] [--json out.json]

    python jobs/evaluate.py --config configs/synthetic.yaml --checkpoint runs/.../model.pt [--csv OUT.csv]

The GT/pred mode needs no Ray; the --config/--checkpoint mode runs inference over the val shards
with a Ray Data actor pool first. All logic lives in `lfb_ray.evaluate_cli`.
"""

from lfb_ray.evaluate_cli import main

if __name__ == "__main__":
    raise SystemExit(main())
