"""Forward+backward throughput of the LFB-NL detector (SlowOnly-R50 by default).

On CUDA it compares fp32 with bf16 autocast + channels_last_3d in the same process, so the
ratios are like-for-like. Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from lfb_ray.config import ModelConfig
from lfb_ray.models.detector import LFBDetector, build_detector

__all__ = ["BenchResult", "BenchSize", "format_table", "main", "run_benchmark", "time_train_step"]


@dataclass(frozen=True)
class BenchSize:
    """Input sizes of one benchmark run."""

    clips: int = 2  # B
    frames: int = 4  # T
    crop_pixels: int = 256  # H = W
    rois_per_clip: int = 4
    bank_slots: int = 300  # S
    warmup_iters: int = 1
    iters: int = 3


QUICK = BenchSize(clips=1, crop_pixels=64, rois_per_clip=2, bank_slots=60, warmup_iters=1, iters=2)
DEFAULT = BenchSize()
CUDA_DEFAULT = BenchSize(clips=12, warmup_iters=3, iters=10)  # one worker's batch (configs/lfb_*.yaml)


@dataclass(frozen=True)
class BenchResult:
    mode: str
    clips_per_second: float
    seconds_per_iter: float
    peak_memory_mib: float | None = None


def _inputs(size: BenchSize, channels: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, p = size.clips, size.crop_pixels
    clips = torch.randn(b, 3, size.frames, p, p, generator=g)
    r = size.rois_per_clip
    xy1 = torch.rand(b * r, 2, generator=g) * p / 2
    wh = torch.rand(b * r, 2, generator=g) * p / 2 + 8
    batch_index = torch.arange(b).repeat_interleave(r).float().unsqueeze(1)
    rois = torch.cat([batch_index, xy1, xy1 + wh], dim=1)  # [R, 5]
    # Bank features are post-ReLU and often zero-padded: keep a third of the slots empty.
    lt = torch.rand(b * r, size.bank_slots, channels, generator=g)
    lt[:, : size.bank_slots // 3] = 0
    labels = (torch.rand(b * r, 81, generator=g) < 0.05).float()
    labels[:, 1] = 1.0
    return clips.to(device), rois.to(device), lt.half().to(device), labels.to(device)


def _time_mode(model: LFBDetector, inputs, size: BenchSize, device: torch.device, bf16: bool,
               channels_last: bool, optimizer: torch.optim.Optimizer | None = None) -> BenchResult:
    """Seconds per iteration of forward + loss + backward (+ `optimizer.step()` when given)."""
    clips, rois, lt, labels = inputs
    if model.fbo is None:
        lt = None
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
        clips = clips.contiguous(memory_format=torch.channels_last_3d)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def step() -> None:
        with autocast:
            logits = model(clips, rois, lt)
        model.loss(logits.float(), labels).backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(size.warmup_iters):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(size.iters):
        step()
    sync()
    seconds = (time.perf_counter() - start) / size.iters
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    name = "bf16 autocast + channels_last_3d" if bf16 and channels_last else ("bf16 autocast" if bf16 else "fp32")
    return BenchResult(name, size.clips / seconds, seconds, peak)


def time_train_step(*, device: str, size: BenchSize, fbo: str = "nl", bf16: bool, channels_last: bool,
                    depth: int = 50, base_channels: int = 64) -> BenchResult:
    """One whole SGD training step (forward, loss, backward, `optimizer.step()`) of a fresh detector.

    The optimiser is the training loop's (`lfb_ray.train.schedule.build_optimizer`: SGD, momentum
    0.9); inputs are clips [B, 3, T, P, P], `rois_per_clip` RoIs per clip and, for LFB models, an
    fp16 bank [R, S, 2048].
    """
    from lfb_ray.config import TrainConfig
    from lfb_ray.train.schedule import build_optimizer

    dev = torch.device(device)
    torch.manual_seed(0)
    model = build_detector(ModelConfig(depth=depth, base_channels=base_channels, fbo=fbo)).to(dev).train()
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    optimizer = build_optimizer(model.parameters(), TrainConfig(), 0.01)
    return _time_mode(model, _inputs(size, model.feature_channels, dev), size, dev, bf16, channels_last, optimizer)


def run_benchmark(*, device: str = "cpu", size: BenchSize = DEFAULT, depth: int = 50,
                  base_channels: int = 64) -> list[BenchResult]:
    """Time forward+backward (loss included, no optimiser step) of the LFB-NL detector.

    Inputs: clips [B, 3, T, P, P], `rois_per_clip` RoIs per clip, an fp16 bank [R, S, C].
    CPU runs fp32 only; CUDA runs fp32, bf16 autocast, and bf16 autocast + channels_last_3d.

    Returns:
        one `BenchResult` per mode, fp32 first.
    """
    dev = torch.device(device)
    torch.manual_seed(0)
    model = build_detector(ModelConfig(depth=depth, base_channels=base_channels, fbo="nl")).to(dev).train()
    inputs = _inputs(size, model.feature_channels, dev)
    modes = [(False, False)] if dev.type == "cpu" else [(False, False), (True, False), (True, True)]
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return [_time_mode(model, inputs, size, dev, bf16, cl) for bf16, cl in modes]


def format_table(results: list[BenchResult], size: BenchSize, device: str) -> str:
    """Plain-text table with absolute numbers and the ratio to the first (fp32) row."""
    base = results[0].clips_per_second
    header = (f"device={device} B={size.clips} T={size.frames} crop={size.crop_pixels} "
              f"rois/clip={size.rois_per_clip} slots={size.bank_slots} iters={size.iters}")
    lines = [header, f"{'mode':<34} {'clips/s':>9} {'s/iter':>8} {'x fp32':>7} {'peak MiB':>9}"]
    for r in results:
        peak = f"{r.peak_memory_mib:9.0f}" if r.peak_memory_mib is not None else f"{'-':>9}"
        lines.append(f"{r.mode:<34} {r.clips_per_second:9.2f} {r.seconds_per_iter:8.3f} "
                     f"{r.clips_per_second / base:7.2f} {peak}")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """`python jobs/benchmark.py model [--quick] [--device cuda]`: `--quick` is tiny sizes (< 1 min on
    2 CPU cores); on CUDA it compares fp32 with bf16 autocast (+ channels_last_3d)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny batch and crop, few iterations")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    if args.quick:
        size = QUICK
    else:
        size = CUDA_DEFAULT if args.device == "cuda" else DEFAULT
    print(format_table(run_benchmark(device=args.device, size=size), size, args.device))
