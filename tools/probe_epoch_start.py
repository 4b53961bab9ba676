"""Time to the first batch of each epoch of the training input, with and without cached raw rows.

    python tools/probe_epoch_start.py --config configs/synthetic.yaml --cache off
    python tools/probe_epoch_start.py --config configs/synthetic.yaml --cache on

Builds the train input as `lfb_ray.train.fit` does (read_split -> [materialize] -> decode map ->
streaming_split(1)) on a local 2-CPU Ray, consumes three epochs in the driver with a fixed sleep per
batch standing in for a training step, and prints per epoch the first-batch latency and the wait
after it. Needs a prepared dataset (jobs/prepare_data.py).
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--cache", choices=["on", "off"], required=True)
    p.add_argument("--step-seconds", type=float, default=0.25)
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()

    import ray

    from lfb_ray.config import config_to_dict, load_config, resolve_paths
    from lfb_ray.data.dataset import decode_train_rows, read_split
    from lfb_ray.train.loop import TrainCollate

    cfg = resolve_paths(load_config(args.config))
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    t0 = time.time()
    raw = read_split(cfg, "train")
    if args.cache == "on":
        raw = raw.materialize()
    print(f"cache={args.cache}: materialize {time.time() - t0:.1f} s", flush=True)
    ds = raw.map_batches(decode_train_rows, batch_size=16, num_cpus=cfg.cluster.data_cpus,
                         fn_kwargs={"cfg_data": config_to_dict(cfg)["data"]})
    (it,) = ds.streaming_split(1, equal=True)
    collate = TrainCollate(cfg.data.mean, cfg.data.std)
    for ep in range(args.epochs):
        t, first, n = time.time(), None, 0
        for _ in it.iter_torch_batches(batch_size=cfg.train.batch_size_per_worker, collate_fn=collate,
                                       prefetch_batches=2):
            if first is None:
                first = time.time() - t
            n += 1
            time.sleep(args.step_seconds)
        wall = time.time() - t
        print(f"cache={args.cache} epoch {ep}: first batch {first:.1f} s, epoch {wall:.1f} s, {n} batches, "
              f"wait after the first batch {wall - first - args.step_seconds * n:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
