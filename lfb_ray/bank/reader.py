"""Long-term feature bank on disk: an uncompressed Arrow IPC file, memory-mapped and shared by processes.

Reading a feature bank (`lfb_ray.bank.writer` writes it): `FeatureBank.open`
maps one or several banks and `FeatureBank.sample` draws the LFB window of each RoI (W seconds
around its keyframe, at most K features per second), vectorised. `sample` is two steps that can run
apart: `window_rows` (which bank rows fill each slot: int32, host-side, all the randomness) and
`gather` (fetching them from the memory map); `lfb_ray.bank.window` gathers on the GPU instead.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch

from lfb_ray import cache
from lfb_ray.bank.format import BankError, leaf_banks, read_manifest, split_location
from lfb_ray.bank.sources import Source, download, map_source, unpin

__all__ = ["MISSING_VIDEO_MODES", "FeatureBank"]

_SECOND_BIAS = 2**31  # key = video_code << 32 | (second + 2**31), sortable int64
# What `FeatureBank.sample` does for a video the bank does not hold: "error" (BankError naming it,
# as mmaction2's `lfb[video_id]` raises KeyError) or "zeros" (an all-zero window: an explicit opt-out).
MISSING_VIDEO_MODES = ("error", "zeros")
_NAMED = 5  # missing videos named in an error message; the rest are counted


def _name_some(videos: Sequence[str]) -> str:
    """'a', 'b', 'c' (+N more): the first few of a sorted list of video ids, and how many others."""
    shown = ", ".join(repr(v) for v in videos[:_NAMED])
    return shown + (f" (+{len(videos) - _NAMED} more)" if len(videos) > _NAMED else "")


def _check_out(out: torch.Tensor, shape: tuple[int, int, int]) -> None:
    """Refuse an `out` that `gather` cannot fill in place: a contiguous CPU float32 [R, S, C] `shape`."""
    if out.shape != shape or out.dtype != torch.float32 or out.device.type != "cpu" or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous CPU float32 tensor of shape {shape}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")


class FeatureBank:
    """Read-only, memory-mapped long-term feature bank; cheap to open in many processes.

    Merged banks keep one owner per video (the last bank listing it). Pickling reopens from the paths,
    so a bank handed to another process maps the same files instead of copying the features.
    """

    def __init__(self, sources: list[Source], spec: tuple[Any, ...], missing_videos: str = "error") -> None:
        if missing_videos not in MISSING_VIDEO_MODES:
            raise BankError(f"missing_videos must be one of {', '.join(MISSING_VIDEO_MODES)}, got {missing_videos!r}")
        self._sources = sources
        self._spec = spec
        self._missing_videos = missing_videos
        self._local = threading.local()
        dims = {s.manifest["feature_dim"] for s in sources}
        if len(dims) != 1:
            raise BankError("merged banks have different feature dims: "
                            + ", ".join(f"{s.path}: {s.manifest['feature_dim']}" for s in sources))
        self._dim = dims.pop()
        owner: dict[str, int] = {}
        for i, s in enumerate(sources):
            for v in s.index.column("video_id").unique().to_pylist():
                owner[v] = i  # later sources win per video
        self._owner = owner
        self._videos = tuple(sorted(owner))
        self._video_code = {v: c for c, v in enumerate(self._videos)}
        parts, row_offset = [], 0
        for i, s in enumerate(sources):
            names = s.index.column("video_id").combine_chunks().dictionary_encode()
            glob = np.array([self._video_code[v] if owner[v] == i else -1 for v in names.dictionary.to_pylist()],
                            dtype=np.int64)
            codes = glob[names.indices.to_numpy()]  # -1: the video is shadowed by a later bank
            keep = codes >= 0
            parts.append((
                codes[keep],
                s.index.column("second").to_numpy()[keep].astype(np.int64),
                s.index.column("row_start").to_numpy()[keep] + row_offset,
                s.index.column("count").to_numpy()[keep].astype(np.int64),
            ))
            row_offset += s.table.num_rows
        codes, secs, row_starts, counts = (np.concatenate(p) for p in zip(*parts, strict=True))
        order = np.lexsort((secs, codes))
        self._codes, self._seconds = codes[order], secs[order]
        self._row_starts, self._counts = row_starts[order], counts[order]
        self._keys = (self._codes << 32) | (self._seconds + _SECOND_BIAS)
        self._video_offsets = np.searchsorted(self._codes, np.arange(len(self._videos) + 1))
        # Global row space: sources one after another, each split into its record-batch chunks.
        self._chunks = [c for s in sources for c in s.chunks]
        base = np.cumsum([0] + [s.table.num_rows for s in sources])[:-1]
        self._chunk_starts = np.concatenate([s.chunk_starts + b for s, b in zip(sources, base, strict=True)])

    @classmethod
    def open(
        cls,
        path: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        expected_dim: int | None = None,
        filesystem: pafs.FileSystem | None = None,
        cache_dir: str | os.PathLike | None = None,
        missing_videos: str = "error",
    ) -> FeatureBank:
        """Map a bank, a split folder (`train/` + `val/`, val wins per video), or a list of those.

        Args:
            path: bank folder, split folder, or list of them (later wins per video); local paths or
                URIs. Remote banks are downloaded once per node to `<cache root>/banks` and mapped from
                there (`lfb_ray.cache`: LRU eviction within `LFB_RAY_CACHE_MAX_GB`).
            expected_dim: feature dim C the model expects; checked here so a mismatch fails early.
            filesystem: pyarrow filesystem the path(s) live on, instead of inferring it from URIs.
            cache_dir: the node cache root for remote banks (default `$LFB_RAY_CACHE`, else
                `~/.cache/lfb_ray`); they go under its `banks/`.
            missing_videos: "error" (default): `sample` and `require_videos` raise `BankError` for a
                video the bank does not hold; "zeros": `sample` gives such a video an all-zero window
                and `require_videos` only warns (`bank.missing_videos`).

        Raises:
            BankError: missing/incomplete bank (no manifest), corrupt files, dims that differ between
                merged banks or from `expected_dim`.
        """
        paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
        if not paths:
            raise BankError("FeatureBank.open needs at least one path")
        cache_root = Path(cache_dir) if cache_dir is not None else cache.cache_root()
        sources, pinned = [], []
        try:
            for p in paths:
                fs, root, local = split_location(p, filesystem)
                for leaf in leaf_banks(fs, root):
                    manifest = read_manifest(fs, leaf)
                    if local:
                        sources.append(map_source(leaf, Path(leaf), manifest))
                        continue
                    folder, source = download(fs, leaf, manifest, cache_root, f"{fs.type_name}://{leaf}")
                    pinned.append(folder)
                    sources.append(source)
            bank = cls(sources, (paths, filesystem, expected_dim, cache_dir), missing_videos)
            if expected_dim is not None and bank.feature_dim != expected_dim:
                raise BankError(f"bank {os.fspath(paths[0]) if len(paths) == 1 else paths} has feature dim "
                                f"{bank.feature_dim}, model expects {expected_dim}")
        except BaseException:
            unpin(tuple(pinned))
            raise
        weakref.finalize(bank, unpin, tuple(pinned))  # its node-cache copies may be evicted once it is gone
        return bank

    def __reduce__(self) -> tuple[Any, ...]:
        paths, filesystem, expected_dim, cache_dir = self._spec
        return (_reopen, (paths, filesystem, expected_dim, cache_dir, self._missing_videos))

    @property
    def path(self) -> str:
        """Where the bank was opened from, for messages (a URI's `?query` options left out)."""
        return ", ".join(os.fspath(p).partition("?")[0] for p in self._spec[0])

    @property
    def missing_videos(self) -> str:
        """What `sample` does for a video the bank does not hold (`MISSING_VIDEO_MODES`)."""
        return self._missing_videos

    def require_videos(self, videos: Sequence[str], split: str) -> tuple[str, ...]:
        """Check that the bank holds every video of `split` that a run will sample, before it starts.

        Args:
            videos: video ids the run reads (e.g. those of the split's annotation CSV).
            split: name for the message ("train", "val").

        Returns:
            the sorted missing videos: always () in "error" mode; in "zeros" mode the videos whose
            windows will be zeros (a warning naming them is printed).

        Raises:
            BankError: in "error" mode, naming the split, the first missing videos, their count and
                the bank path.
        """
        missing = tuple(sorted({str(v) for v in videos} - set(self._video_code)))
        if not missing:
            return ()
        what = (f"the feature bank at {self.path} lacks {len(missing)} of the {len(set(videos))} {split} "
                f"videos: {_name_some(missing)}")
        if self._missing_videos == "error":
            raise BankError(f"{what}. Rebuild the bank for these videos (jobs/build_bank.py), or set "
                            "bank.missing_videos=zeros to give them all-zero long-term features")
        print(f"[lfb_ray] WARNING: {what}; their long-term features are zeros (bank.missing_videos=zeros)",
              flush=True)
        return missing

    @property
    def feature_dim(self) -> int:
        return self._dim

    def checkpoint_sha256s(self) -> set[str]:
        """sha256 of the checkpoint(s) that computed the merged banks (manifest metadata)."""
        return {str(s.manifest.get("metadata", {}).get("checkpoint_sha256", "")) for s in self._sources}

    def entries(self) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        """Every stored entry of the videos this bank owns (shadowed videos of merged banks left out).

        Returns:
            video_ids [N], seconds int64 [N], boxes float32 [N, 4] (normalised x1, y1, x2, y2),
            features float16 [N, C] (a copy: N x C x 2 bytes).
        """
        vids, secs, boxes, feats = [], [], [], []
        for i, s in enumerate(self._sources):
            v = s.table.column("video_id").to_pylist()
            keep = np.array([self._owner[x] == i for x in v], dtype=bool)
            vids += [x for x, k in zip(v, keep, strict=True) if k]
            secs.append(s.table.column("second").to_numpy().astype(np.int64)[keep])
            boxes.append(np.asarray(s.table.column("box").to_pylist(), dtype=np.float32).reshape(-1, 4)[keep])
            feats.append(np.concatenate(s.chunks)[keep] if s.chunks else np.zeros((0, self._dim), np.float16))
        return vids, np.concatenate(secs), np.concatenate(boxes), np.concatenate(feats)

    @property
    def num_features(self) -> int:
        """Features reachable after merging (rows of videos shadowed by a later bank excluded)."""
        return int(self._counts.sum())

    @property
    def videos(self) -> tuple[str, ...]:
        """Sorted video ids."""
        return self._videos

    @property
    def nbytes(self) -> int:
        """Bytes of mapped feature data (all source banks, including shadowed videos)."""
        return int(sum(c.nbytes for c in self._chunks))

    @property
    def manifests(self) -> tuple[dict[str, Any], ...]:
        """Manifest of each source bank in merge order (its `metadata` holds checkpoint hash, config)."""
        return tuple(s.manifest for s in self._sources)

    def __len__(self) -> int:
        return len(self._videos)

    def __contains__(self, video_id: object) -> bool:
        return video_id in self._video_code

    def __repr__(self) -> str:
        return (f"FeatureBank(videos={len(self._videos)}, seconds={len(self._keys)}, "
                f"features={self.num_features}, dim={self._dim}, sources={len(self._sources)})")

    def seconds_of(self, video_id: str) -> np.ndarray:
        """Sorted seconds of `video_id` that have features, [S] int64 (read-only). KeyError if unknown."""
        c = self._video_code[video_id]
        out = self._seconds[self._video_offsets[c]:self._video_offsets[c + 1]]
        out.flags.writeable = False
        return out

    def features_at(self, video_id: str, second: int) -> np.ndarray:
        """Features of one keyframe in person order, [n, C] float16, a read-only view of the mapped
        file ([0, C] if the second has none). KeyError if the video is unknown."""
        c = self._video_code[video_id]
        key = (c << 32) | (int(second) + _SECOND_BIAS)
        i = int(np.searchsorted(self._keys, key))
        if i == len(self._keys) or self._keys[i] != key:
            return np.zeros((0, self._dim), np.float16)
        return self._gather_range(int(self._row_starts[i]), int(self._counts[i]))

    def _gather_range(self, start: int, count: int) -> np.ndarray:
        k = int(np.searchsorted(self._chunk_starts, start, side="right")) - 1
        lo = start - int(self._chunk_starts[k])
        chunk = self._chunks[k]
        if lo + count <= len(chunk):
            return chunk[lo:lo + count]
        return self._gather(np.arange(start, start + count))  # spans record batches: a copy

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        """[M] global rows -> [M, C] float16 copy, one fancy-index per record-batch chunk."""
        if len(self._chunks) == 1:
            return self._chunks[0][rows]
        k = np.searchsorted(self._chunk_starts, rows, side="right") - 1
        out = np.empty((len(rows), self._dim), np.float16)
        for c in np.unique(k):
            m = k == c
            out[m] = self._chunks[c][rows[m] - self._chunk_starts[c]]
        return out

    def _scratch(self, rows: int) -> np.ndarray:
        """A reused per-thread [rows, C] float16 buffer: fresh pages cost more than the sampling."""
        buf = getattr(self._local, "window", None)
        if buf is None or len(buf) < rows:
            buf = self._local.window = np.empty((rows, self._dim), np.float16)
        return buf[:rows]

    def window_rows(
        self,
        video_ids: Sequence[str],
        seconds: Sequence[int] | np.ndarray,
        rng: np.random.Generator,
        *,
        window_seconds: int = 60,
        max_feats_per_second: int = 5,
    ) -> np.ndarray:
        """Which bank entries fill each RoI's LFB window: `sample` without fetching any feature.

        Why: the window's *rows* are a few hundred KB of int32 that the host computes from the index
        alone; the features they name ([R, W*K, C], ~147 MB fp32 at the AVA shape) can then be
        gathered where the features live (`gather` on the host, `lfb_ray.bank.window.DeviceFeatures`
        on a GPU), off the host's critical path.

        Same semantics and RNG contract as `sample` (see there): the same `rng` draws in the same
        order, so `gather(window_rows(...))` equals `sample(...)` bitwise.

        Args:
            video_ids: [R] video id of each RoI.
            seconds: [R] keyframe second t of each RoI.
            rng: the only source of randomness.
            window_seconds: W.
            max_feats_per_second: K.

        Returns:
            int32 [R, W*K]: the global bank row of each window slot (slot j*K + i: the i-th draw of
            second t - W//2 + j), -1 where the window is empty (zeros).

        Raises:
            BankError: a video the bank does not hold (in "error" mode), naming it and the bank path.
        """
        W, K = window_seconds, max_feats_per_second
        if W < 1 or K < 1:
            raise ValueError(f"window_seconds and max_feats_per_second must be >= 1, got {W}, {K}")
        R = len(video_ids)
        t = np.asarray(seconds, dtype=np.int64).reshape(-1)
        if len(t) != R:
            raise ValueError(f"{R} video ids but {len(t)} seconds")
        codes = np.fromiter((self._video_code.get(v, -1) for v in video_ids), dtype=np.int64, count=R)
        if self._missing_videos == "error" and (codes < 0).any():
            missing = sorted({str(v) for v, c in zip(video_ids, codes, strict=True) if c < 0})
            raise BankError(f"the feature bank at {self.path} has no features for video(s) {_name_some(missing)} "
                            f"({int((codes < 0).sum())} of {R} RoIs); set bank.missing_videos=zeros to sample "
                            "all-zero windows for them instead")
        out = np.full((R, W * K), -1, np.int32)
        if R == 0 or len(self._keys) == 0:
            return out
        if self.num_rows >= 2**31:
            raise BankError(f"the feature bank at {self.path} has {self.num_rows} rows, more than int32 rows address")
        secs = t[:, None] + (np.arange(W) - W // 2)  # [R, W] second of each window slot
        valid = (codes[:, None] >= 0) & (secs >= -_SECOND_BIAS) & (secs < _SECOND_BIAS)
        query = ((codes[:, None] << 32) | (secs + _SECOND_BIAS)).ravel()
        pos = np.minimum(np.searchsorted(self._keys, query), len(self._keys) - 1)
        pair = np.flatnonzero(valid.ravel() & (self._keys[pos] == query))  # [P] flat r*W + j
        if len(pair) == 0:
            return out
        entry = pos[pair]
        n = self._counts[entry]
        # A random permutation of each second's n features: argsort of uniform keys, padding last.
        width = int(n.max())
        keys = rng.random((len(pair), width))
        keys[np.arange(width) >= n[:, None]] = 2.0
        take = min(K, width)
        perm = np.argsort(keys, axis=1)[:, :take]  # [P, take]
        used = np.arange(take) < np.minimum(n, K)[:, None]  # [P, take]
        rows = (self._row_starts[entry][:, None] + perm)[used]
        dst = (pair[:, None] * K + np.arange(take))[used]  # slot in the flat [R*W*K] window
        out.reshape(-1)[dst] = rows
        return out

    @property
    def num_rows(self) -> int:
        """Rows of the global row space that `window_rows` indexes: every mapped row of every source
        bank, shadowed videos included (`num_features` counts only the reachable ones)."""
        return int(sum(len(c) for c in self._chunks))

    def gather(self, rows: np.ndarray, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """The features of `window_rows`' rows, read from the memory-mapped bank on the host.

        The window is assembled in a reused per-thread fp16 buffer (half the bytes to zero and
        scatter, and no fresh pages to fault in), then converted to fp32 in one vectorised torch
        copy into `out`; numpy's own fp16 casts are several times slower than torch's.

        Args:
            rows: int [R, S] global bank rows (S = W*K), -1 for an empty slot.
            out: optional contiguous CPU float32 [R, S, C] tensor to fill, e.g. a reused or pinned
                buffer; reusing one roughly halves the cost, which is otherwise dominated by the
                kernel zero-filling fresh pages for the new output.

        Returns:
            [R, S, C] float32 on the CPU (`out` when given): zeros where `rows` is -1.
        """
        rows = np.asarray(rows)
        if rows.ndim != 2:
            raise ValueError(f"rows must be [R, S], got shape {rows.shape}")
        R, S = rows.shape
        C = self._dim
        if out is None:
            out = torch.empty((R, S, C), dtype=torch.float32)
        else:
            _check_out(out, (R, S, C))
        flat = rows.reshape(-1)
        dst = np.flatnonzero(flat >= 0)
        if len(dst) == 0:
            return out.zero_()
        window = self._scratch(R * S)
        window.fill(0)
        window[dst] = self._gather(flat[dst].astype(np.int64))
        out.copy_(torch.from_numpy(window).view(R, S, C))
        return out

    def sample(
        self,
        video_ids: Sequence[str],
        seconds: Sequence[int] | np.ndarray,
        rng: np.random.Generator,
        *,
        window_seconds: int = 60,
        max_feats_per_second: int = 5,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sample the long-term features of each RoI, all RoIs at once: `gather(window_rows(...))`.

        Slot j of the window holds second `t - W//2 + j` (the current second at slot W//2). For each
        such second present in the bank with n features, a uniformly random subset of min(n, K) of
        them, without replacement and in random order, goes to rows j*K .. j*K+min(n,K)-1. Everything
        else (missing seconds, beyond the video edges, unused rows) is zero. A video the bank does
        not hold is a `BankError`, unless the bank was opened with `missing_videos="zeros"` (then its
        windows are zero). Draws are independent per RoI, including RoIs of the same keyframe, and
        reproducible from `rng`.

        Args:
            video_ids: [R] video id of each RoI.
            seconds: [R] keyframe second t of each RoI.
            rng: the only source of randomness.
            window_seconds: W.
            max_feats_per_second: K.
            out: optional contiguous CPU float32 [R, W*K, C] tensor to fill, e.g. a reused pinned
                buffer; reusing one roughly halves the cost, which is otherwise dominated by the
                kernel zero-filling fresh pages for the new output.

        Returns:
            [R, W*K, C] float32.

        Raises:
            BankError: a video the bank does not hold (in "error" mode), naming it and the bank path.
        """
        W, K = window_seconds, max_feats_per_second
        if out is not None:  # refused before any draw from `rng`
            _check_out(out, (len(video_ids), W * K, self._dim))
        rows = self.window_rows(video_ids, seconds, rng, window_seconds=W, max_feats_per_second=K)
        return self.gather(rows, out=out)


def _reopen(paths: Any, filesystem: Any, expected_dim: Any, cache_dir: Any, missing_videos: str = "error") -> FeatureBank:
    return FeatureBank.open(paths, expected_dim=expected_dim, filesystem=filesystem, cache_dir=cache_dir,
                            missing_videos=missing_videos)
