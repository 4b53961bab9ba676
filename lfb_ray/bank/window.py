"""The LFB window of a training batch, gathered where the bank's features live.

Why: every LFB iteration needs an [R, W*K, C] float32 window (60 RoIs x 300 slots x 2048 at the AVA
shape: ~147 MB). Sampling it on the host and copying it synchronously from pageable memory costs
~95 ms per iteration, more than twice an H100 step (BENCHMARKS.md, "bank-step"). So the work is
split: the host computes only *which* bank rows fill each slot (`FeatureBank.window_rows`, int32
[R, W*K], ~72 KB), and the features are gathered where they are held:

- on a GPU (`DeviceFeatures`): the whole bank sits in device memory in fp16 (AVA v2.1's ~270k
  2048-d entries: ~1.1 GB), the rows go up through pinned memory without blocking, and one
  `index_select` on the device builds the window;
- on the host (`FeatureBank.gather`): the memory-mapped bank is read into a reused buffer (pinned
  when the window then goes to a GPU, so the copy is asynchronous).

`WindowSampler` picks one of the two (`bank.device`: auto | cuda | cpu) and is what the training
loop calls. Both paths give the same window, bitwise, for the same `rng`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from lfb_ray.bank.format import BankError
from lfb_ray.bank.reader import FeatureBank

if TYPE_CHECKING:
    from lfb_ray.config import BankConfig

__all__ = ["BANK_DEVICES", "DEVICE_FRACTION", "DeviceFeatures", "WindowSampler", "place_features"]

BANK_DEVICES = ("auto", "cuda", "cpu")
# "auto" holds the bank on the GPU only if it takes at most this share of the device memory free when
# the training loop starts (after the model is built): the rest stays for activations and gradients.
DEVICE_FRACTION = 0.25


class DeviceFeatures:
    """A bank's features as one torch tensor on `device` (fp16 by default), row 0 all zeros.

    Row i + 1 holds global bank row i (`FeatureBank.window_rows`' row space), so the empty slot -1
    maps to the zero row 0 and the gather is a single `index_select`, no masking.
    """

    def __init__(self, bank: FeatureBank, device: torch.device | str, dtype: torch.dtype = torch.float16) -> None:
        self.device = torch.device(device)
        self.dim = bank.feature_dim
        n = bank.num_rows
        self.features = torch.empty((n + 1, self.dim), dtype=dtype, device=self.device)  # [N + 1, C]
        self.features[0].zero_()
        row = 1
        with warnings.catch_warnings():  # the mapped chunks are read-only; torch only reads them here
            warnings.simplefilter("ignore", UserWarning)
            for chunk in bank._chunks:  # [rows, C] fp16 views of the mapped file, in global row order
                self.features[row:row + len(chunk)].copy_(torch.from_numpy(chunk))
                row += len(chunk)

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size()

    def gather(self, rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The window of `rows`, on the device.

        Args:
            rows: int32 or int64 [R, S] global bank rows (S = W*K), -1 for an empty slot; on any
                device (moved to this one, without blocking if pinned).
            dtype: of the result; float32 (default) equals `FeatureBank.gather` exactly, since
                fp16 -> fp32 is exact.

        Returns:
            [R, S, C] `dtype` on `self.device`: zeros where `rows` is -1.
        """
        R, S = rows.shape
        idx = rows.to(self.device, non_blocking=True).reshape(-1).long() + 1  # [R*S]
        return self.features.index_select(0, idx).view(R, S, self.dim).to(dtype)


def _bank_bytes(bank: FeatureBank) -> int:
    return (bank.num_rows + 1) * bank.feature_dim * 2


def place_features(bank: FeatureBank, device: torch.device | str, mode: str = "auto",
                   log: Callable[[str], None] = print) -> DeviceFeatures | None:
    """Where the training loop gathers windows from: `DeviceFeatures` on `device`, or None (the host).

    Args:
        bank: the opened bank.
        device: the training device.
        mode: `bank.device`. "auto": on the GPU when `device` is CUDA and the bank (fp16) fits in
            `DEVICE_FRACTION` of its free memory, else on the host with one line saying why; "cuda":
            on the GPU whenever it fits in the free memory at all, else `BankError`; "cpu": the host.
        log: where the one-line reason for the host path goes.

    Raises:
        BankError: "cuda" and the device is not a GPU or the bank does not fit.
    """
    if mode not in BANK_DEVICES:
        raise BankError(f"bank.device must be one of {', '.join(BANK_DEVICES)}, got {mode!r}")
    device = torch.device(device)
    if mode == "cpu":
        return None
    if device.type != "cuda":
        if mode == "cuda":
            raise BankError(f"bank.device=cuda but training runs on {device}; use bank.device=auto or cpu")
        return None
    need = _bank_bytes(bank)
    free, _total = torch.cuda.mem_get_info(device)
    limit = free if mode == "cuda" else int(DEVICE_FRACTION * free)
    if need > limit:
        why = (f"the feature bank ({need / 2**30:.2f} GiB fp16) does not fit in "
               f"{'the' if mode == 'cuda' else f'{DEVICE_FRACTION:.0%} of the'} {free / 2**30:.2f} GiB free on {device}")
        if mode == "cuda":
            raise BankError(f"bank.device=cuda: {why}")
        log(f"[lfb_ray] {why}: LFB windows are gathered on the host (bank.device=auto)")
        return None
    return DeviceFeatures(bank, device)


class WindowSampler:
    """The LFB window of each training batch, on the training device: what the loop calls.

    Per call the host runs only `FeatureBank.window_rows` (the RNG draws and index lookups); the
    features are gathered on the device (`DeviceFeatures`) or, on the host path, read into a reused
    buffer (pinned and copied without blocking when the device is a GPU). Nothing here waits for
    the device.
    """

    def __init__(self, bank: FeatureBank, device: torch.device | str, *, window_seconds: int,
                 max_feats_per_second: int, mode: str = "auto", log: Callable[[str], None] = print) -> None:
        self.bank = bank
        self.device = torch.device(device)
        self.window_seconds, self.max_feats_per_second = window_seconds, max_feats_per_second
        self.on_device = place_features(bank, self.device, mode, log)
        self._pin = self.device.type == "cuda"
        self._buffer: torch.Tensor | None = None  # the host path's reused CPU window (not pinned)

    @classmethod
    def for_config(cls, bank: FeatureBank, device: torch.device | str, bank_cfg: BankConfig,
                   log: Callable[[str], None] = print) -> WindowSampler:
        """The sampler of a run's `bank` section: its window, features per second and `bank.device`."""
        return cls(bank, device, window_seconds=bank_cfg.window_seconds,
                   max_feats_per_second=bank_cfg.max_feats_per_second, mode=bank_cfg.device, log=log)

    @property
    def where(self) -> str:
        """"device" or "host": where the windows are gathered."""
        return "device" if self.on_device is not None else "host"

    def _host_out(self, shape: tuple[int, int, int]) -> torch.Tensor:
        """A float32 CPU tensor of `shape` to gather into.

        On a CUDA run, a pinned tensor from torch's caching host allocator: it is reused once the
        asynchronous copy that read it has finished (the allocator records that copy's event), so
        the next batch never overwrites a window still in flight. On CPU, one reused buffer: the
        step that read it is over when the next batch is sampled (CPU ops are synchronous).
        """
        numel = shape[0] * shape[1] * shape[2]
        if self._pin:
            return torch.empty(shape, dtype=torch.float32, pin_memory=True)
        if self._buffer is None or self._buffer.numel() < numel:
            self._buffer = torch.empty(numel, dtype=torch.float32)
        return self._buffer[:numel].view(shape)

    def __call__(self, video_ids: Sequence[str], seconds: Sequence[int] | np.ndarray,
                 rng: np.random.Generator) -> torch.Tensor:
        """[R, W*K, C] float32 on the training device; on CPU a view of a buffer the next call reuses.

        Equal, bitwise, to `bank.sample(video_ids, seconds, rng, ...)` (same `rng` draws).
        """
        rows = self.bank.window_rows(video_ids, seconds, rng, window_seconds=self.window_seconds,
                                     max_feats_per_second=self.max_feats_per_second)  # int32 [R, W*K]
        if self.on_device is not None:
            idx = torch.from_numpy(rows)
            if self._pin:
                idx = idx.pin_memory()  # ~72 KB; the caching host allocator recycles it after the copy
            return self.on_device.gather(idx)
        out = self.bank.gather(rows, out=self._host_out((*rows.shape, self.bank.feature_dim)))
        return out.to(self.device, non_blocking=True) if self.device.type != "cpu" else out
