"""One training step of a worker and its randomness: the batch collate, the SGD step, the
per-step seeding that makes a resumed run draw what the uninterrupted one did."""

from __future__ import annotations

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from lfb_ray.data.batches import TrainBatch

__all__ = ["TrainCollate", "eval_generator", "flush_denormals", "seed_step", "train_step"]


class TrainCollate(NumpyBatchCollateFn):
    """`iter_torch_batches` collate: numpy train batch → `TrainBatch` (normalised tensors + per-RoI
    bank keys); Ray Data hands it to the loop as it is (not a plain tensor container).

    With `pin_memory` (a CUDA run) the clip, RoIs and labels are pinned here, in Ray Data's collate
    threads off the loop's critical path, so the loop's `non_blocking` copies really overlap. (Ray's
    own `iter_torch_batches(pin_memory=True)` pins only all-tensor batches; ours carries lists too.)
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], pin_memory: bool = False):
        self.mean, self.std = tuple(mean), tuple(std)
        self.pin_memory = pin_memory

    def __call__(self, batch: dict) -> TrainBatch:
        from lfb_ray.data.dataset import collate_train

        out = collate_train(batch, self.mean, self.std)
        return out.pin_memory() if self.pin_memory else out


def train_step(model, core, optimizer, batch: TrainBatch, device: torch.device, *, amp: str, grad_clip: float,
               windows=None, rng: np.random.Generator | None = None) -> torch.Tensor:
    """One SGD step on one train batch; returns its loss, detached and still on the device.

    Nothing here waits for the device: the batch's (pinned) tensors go up without blocking, the LFB
    window is gathered where the bank lives (`lfb_ray.bank.window.WindowSampler`: only the int32
    rows are computed on the host), and the loss is not read (no `.item()` / `float()`), so the
    host runs ahead and queues the next step while this one computes. Callers read losses at
    logging points only.

    Args:
        model: the (DDP-wrapped) detector; `core` the unwrapped one (its `loss`).
        batch: `TrainCollate`'s output (clip [B, 3, T, H, W], rois [R, 5], labels [R, num_classes]).
        windows: the `WindowSampler` of an LFB model ([R, W*K, C] float32 on `device`), else None.
        rng: the bank sampling generator (with `windows`).

    Returns:
        the loss, a 0-d float32 tensor on `device`.
    """
    from lfb_ray.models.device import autocast_for, to_model_layout

    clip = to_model_layout(batch.clip.to(device, non_blocking=True))
    rois = batch.rois.to(device, non_blocking=True)
    labels = batch.labels.to(device, non_blocking=True)
    lt = windows(batch.roi_video_ids, batch.roi_seconds, rng) if windows is not None else None
    with autocast_for(device, amp):
        logits = model(clip, rois, lt)
    loss = core.loss(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.detach()


_STEP_STREAM, _EVAL_STREAM = 0x57E9, 0xE7A1  # keep the training steps' and the evaluations' draws apart


def seed_step(seed: int, rank: int, epoch: int, iteration: int) -> np.random.Generator:
    """Seed one training step's randomness from (`seed`, `rank`, `epoch`, `iteration`) alone.

    Seeds torch's default generators (dropout, CPU and CUDA) and returns the step's bank-sampling
    generator. Stateless, rather than one generator saved and restored with the checkpoint: a
    resumed step draws exactly what the uninterrupted run's did, with no state to carry, whatever
    ran before it in this process (a restart, an evaluation, a rank that state.pt does not hold).
    The data path is stateless the same way (`epoch_order`, `decode_train_rows`).
    """
    bank_seq, torch_seq = np.random.SeedSequence([seed, rank, epoch, iteration, _STEP_STREAM]).spawn(2)
    torch.manual_seed(int(torch_seq.generate_state(1, np.uint64)[0]))
    return np.random.default_rng(bank_seq)


def eval_generator(seed: int, rank: int, epoch: int) -> np.random.Generator:
    """The bank-sampling generator of the evaluation after `epoch` (1-based) on `rank`: its own
    stream, so val windows depend neither on the training steps run in this process nor on a resume."""
    return np.random.default_rng([seed, rank, epoch, 0, _EVAL_STREAM])


def flush_denormals() -> bool:
    """Flush subnormal floats to zero on this thread's CPU math (and threads it starts later).

    Why: once the NL head's attention sharpens, many softmax weights and gradients become subnormal,
    and x86 arithmetic on subnormals is many times slower (docs/training.md, "CPU notes"); values
    that small carry nothing the model uses. CPU only (GPUs have no such penalty). Ray Train runs
    the train function on its own thread, so the loop calls it there.

    Returns:
        whether the CPU supports it (x86 with SSE3).
    """
    return torch.set_flush_denormal(True)
