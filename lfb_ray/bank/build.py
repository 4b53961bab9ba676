"""The bank stage: run the short-term baseline over every keyframe and write the feature bank.

A Ray Data actor pool (`map_batches(BankExtractor, compute=ActorPoolStrategy(min, max))`, one GPU
per actor on GPU clusters) loads the baseline once per actor. Work is one prepared Parquet part per
item: the actor decodes its keyframes with the test transform, computes one 2048-d (model width)
fp16 feature per detected person (proposals at `bank.person_score_thr` with the max-score and
whole-frame fallbacks of `select_proposals`) and writes a bank part atomically. Parts that already exist
are skipped, so an interrupted build resumes, and a crashed actor's item is retried by Ray.
Keyframes of a part go through the network `bank.batch_size` at a time (channels-last-3d and bf16
autocast on CUDA); the model is in eval mode, so a keyframe's features do not depend on its batch
neighbours or on the pool size (up to float rounding). Finally
the parts of each split are merged into `train/` and `val/` sub-banks (`write_bank_parts`, one part
in memory at a time), which
`FeatureBank.open(bank_dir)` merges with val winning, as the reference.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass

import numpy as np

from lfb_ray.config import Config, config_to_dict, resolve_paths
from lfb_ray.redaction import redact_text
from lfb_ray.storage import (
    check_writable,
    exists,
    file_sha256,
    is_uri,
    join,
    join_uri,
    read_json,
    resolve,
    write_json_atomic,
)

__all__ = ["BankBuildSummary", "BankExtractor", "build_bank", "build_identity"]


@dataclass
class BankBuildSummary:
    keyframes: int
    features: int
    bytes: int
    seconds: float
    skipped_parts: int
    path: str

    def line(self) -> str:
        return (f"bank: {self.keyframes} keyframes, {self.features} features, {self.bytes / 1e9:.3f} GB, "
                f"{self.features / max(self.seconds, 1e-9):.1f} features/s ({self.seconds:.1f} s, "
                f"{self.skipped_parts} parts reused) -> {self.path}")


class BankExtractor:
    """Ray Data actor: one prepared part in, one bank part written, a summary row out.

    `cfg.model` is the short-term baseline that computes the bank (`ModelConfig.baseline`).
    """

    def __init__(self, cfg: Config, checkpoint: str, parts_dir: str):
        from lfb_ray.data.clips import ClipSpec
        from lfb_ray.models.device import best_device, load_model

        self.cfg = cfg
        self.device = best_device()
        self.model = load_model(self.cfg, checkpoint, self.device)
        self.parts_dir = parts_dir
        self.spec = ClipSpec.from_config(self.cfg.data)

    def _features(self, clips: list[np.ndarray], boxes: list[np.ndarray]) -> list[np.ndarray]:
        """RoI features of keyframes, up to `bank.batch_size` clips per forward pass.

        Args:
            clips: uint8 [T, H, W, 3] per keyframe (test transform applied); only clips of the
                same shape share a batch.
            boxes: float32 [N_i, 4] pixel boxes per keyframe (N_i may be 0: no forward pass).
        Returns:
            float16 [N_i, C] per keyframe, in input order.
        """
        import itertools

        import torch

        from lfb_ray.data.dataset import normalise
        from lfb_ray.models.device import autocast_for, to_model_layout

        out = [np.zeros((0, self.model.feature_channels), np.float16) for _ in clips]
        todo = sorted((i for i in range(len(clips)) if len(boxes[i])), key=lambda i: clips[i].shape)
        size = max(1, self.cfg.bank.batch_size)
        for _, same in itertools.groupby(todo, key=lambda i: clips[i].shape):
            same = list(same)
            for start in range(0, len(same), size):
                idx = same[start:start + size]
                counts = [len(boxes[i]) for i in idx]
                rois = torch.cat([torch.cat([torch.full((n, 1), float(j)), torch.from_numpy(boxes[i])], 1)
                                  for j, (i, n) in enumerate(zip(idx, counts))])  # [sum N, 5]
                frames = torch.from_numpy(np.stack([clips[i] for i in idx])).to(self.device)  # uint8
                clip = to_model_layout(normalise(frames, self.cfg.data.mean, self.cfg.data.std))
                with torch.no_grad(), autocast_for(self.device, self.cfg.train.amp):
                    fmap = self.model.backbone(clip)
                    feats = self.model.roi_features(fmap, rois.to(self.device)).float().cpu().numpy()
                for i, f in zip(idx, np.split(feats.astype(np.float16), np.cumsum(counts)[:-1])):
                    out[i] = f
        return out

    def _decode(self, row: dict):
        """One keyframe row → (uint8 clip [T, H, W, 3], float32 pixel boxes [N, 4], proposals [N, 5])."""
        from lfb_ray.data.clips import select_proposals, test_transform
        from lfb_ray.data.dataset import clip_frames
        from lfb_ray.data.schema import row_proposals

        frames = clip_frames(row, self.spec, None, self.cfg.prepared_dir)
        props = select_proposals(row_proposals(row), self.cfg.bank.person_score_thr, self.cfg.data.max_proposals)
        frames, px = test_transform(frames, props[:, :4], self.spec)
        return frames, px.astype(np.float32), props

    def _decoded(self, rows: list[dict]):
        """`_decode` of each row, in order, by `bank.cpus_per_actor` threads that run ahead of the
        caller (at most two batches), so JPEG decoding overlaps the forward pass; PIL decodes and
        resizes without the GIL."""
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        ahead = 2 * max(self.cfg.bank.batch_size, self.cfg.bank.cpus_per_actor)
        with ThreadPoolExecutor(self.cfg.bank.cpus_per_actor) as pool:
            pending = deque(pool.submit(self._decode, row) for row in rows[:ahead])
            for row in rows[ahead:]:
                yield pending.popleft().result()
                pending.append(pool.submit(self._decode, row))
            while pending:
                yield pending.popleft().result()

    def _extract(self, path: str) -> dict:
        """Features of one video's keyframe table (`path` inside the prepared set's filesystem)."""
        import pyarrow.parquet as pq

        fs, _ = resolve(self.cfg.prepared_dir)
        with fs.open_input_file(path) as f:
            rows = pq.read_table(f).to_pylist()
        props_all, feats, clips, boxes = [], [], [], []  # clips/boxes: the batch being filled
        for frames, px, props in self._decoded(rows):
            props_all.append(props)
            clips.append(frames)
            boxes.append(px)
            if len(clips) == self.cfg.bank.batch_size:
                feats += self._features(clips, boxes)
                clips, boxes = [], []
        feats += self._features(clips, boxes)
        out = {"video_id": [], "second": [], "person_index": []}
        for row, props in zip(rows, props_all):
            n = len(props)
            out["video_id"] += [row["video_id"]] * n
            out["second"] += [int(row["timestamp"])] * n
            out["person_index"] += list(range(n))
        return {"video_id": np.array(out["video_id"], dtype=str), "second": np.array(out["second"], np.int32),
                "person_index": np.array(out["person_index"], np.int32),
                "box": (np.concatenate([p[:, :4] for p in props_all]).astype(np.float32) if props_all
                        else np.zeros((0, 4), np.float32)),
                "score": (np.concatenate([p[:, 4] for p in props_all]).astype(np.float32) if props_all
                          else np.zeros(0, np.float32)),
                "feature": (np.concatenate(feats) if feats
                            else np.zeros((0, self.model.feature_channels), np.float16)),
                "keyframes": np.array(len(rows))}

    def __call__(self, batch: dict) -> dict:
        from lfb_ray.bank.parts import write_part

        summaries = []
        for item in batch["item"]:
            item = json.loads(item)
            fs, root = resolve(self.parts_dir)
            dst = join(root, item["split"], item["part_id"] + ".npz")
            if not exists(fs, dst):
                write_part(fs, dst, self._extract(item["uri"]))
                status = "done"
            else:
                status = "skipped"
            summaries.append(json.dumps({"part_id": item["part_id"], "split": item["split"], "status": status}))
        return {"summary": np.array(summaries, dtype=object)}


def merge_split_parts(fs, part_paths: list[str], split_dir: str, metadata: dict) -> tuple[int, int, int]:
    """Merge the bank parts at `part_paths` (on `fs`) into the sub-bank `split_dir`.

    Streamed (`write_bank_parts`): one part's features in memory at a time, not the split's; the
    sub-bank is the one `write_bank` writes for all parts together, and appears only when complete.

    Returns:
        (keyframes, features, bytes of the sub-bank's files).
    """
    from lfb_ray.bank import write_bank_parts
    from lfb_ray.bank.parts import NpzPart

    parts = [NpzPart(fs, path) for path in part_paths]
    summary = write_bank_parts(split_dir, parts, metadata=metadata)
    return sum(p.keyframes() for p in parts), summary.num_features, summary.nbytes


def build_identity(cfg: Config, checkpoint_sha256: str) -> tuple[dict, str]:
    """(build key, build hash) of the bank that `cfg` and the baseline checkpoint with this SHA-256
    build: the model, the bank's sampling and test transform settings, and the prepared data's
    identity (`lfb_ray.data.prep.prepared_data_id`), so that re-prepared data rebuilds the bank (its
    per-video parts are keyed by content and reused where nothing changed).

    Raises:
        lfb_ray.data.prep.PrepareError: the prepared data has no manifest.
    """
    from lfb_ray.data.prep import prepared_data_id

    d = config_to_dict(cfg)  # hashed: the bank's identity, as plain data
    # The weights come from the checkpoint: where model.pretrained lies is not part of the bank. The
    # model's groups stay as configured (not `ModelConfig.baseline()`'s): existing banks keep their hash.
    model = {k: v for k, v in d["model"].items() if k != "pretrained"} | {"fbo": "none"}
    build_key = {"checkpoint_sha256": checkpoint_sha256, "model": model,
                 "person_score_thr": cfg.bank.person_score_thr, "prepared": prepared_data_id(resolve_paths(cfg).prepared_dir),
                 "data": {k: v for k, v in d["data"].items()
                          if k in ("test_short_side", "clip_frames", "frame_interval", "mean", "std", "max_proposals")}}
    return build_key, hashlib.sha256(json.dumps(build_key, sort_keys=True).encode()).hexdigest()[:16]


def build_bank(cfg: Config, checkpoint: str, *, max_parts: int | None = None) -> BankBuildSummary:
    """Build (or resume building) the bank of `cfg` with the baseline `checkpoint`.

    Args:
        max_parts: process at most this many missing parts, then stop without merging (used to
            simulate an interrupted build in tests).
    """
    import ray

    from lfb_ray.bank import FeatureBank
    from lfb_ray.data.prep import prepared_files, read_manifest

    t0 = time.time()
    cfg = resolve_paths(cfg)
    if not is_uri(checkpoint):  # the actors run in other directories; a URI stays as it is
        checkpoint = os.path.abspath(checkpoint)
    bank_dir = cfg.bank_dir
    check_writable(bank_dir)
    ckpt_hash = file_sha256(checkpoint)
    build_key, build_hash = build_identity(cfg, ckpt_hash)
    _, root = resolve(cfg.prepared_dir)
    manifest = read_manifest(cfg.prepared_dir)
    bank_fs, bank_root = resolve(bank_dir)
    parts_dir = join_uri(bank_dir, "_parts", build_hash)  # URI (its ?options kept last) or local path
    parts_root = join(bank_root, "_parts", build_hash)
    items = []
    video_hash = {v["video_id"] + "/" + v["split"]: v["hash"] for v in manifest["videos"]}
    for split, csv in (("train", cfg.data.train_csv), ("val", cfg.data.val_csv)):
        if not csv:  # a split the config does not use
            continue
        for uri in prepared_files(cfg.prepared_dir, split):  # raises if a used split has no rows
            rel = uri[len(root):].strip("/")
            _, vid, fname = rel.split("/")[-3:]
            pid = hashlib.sha256(f"{rel}:{video_hash[vid + '/' + split]}".encode()).hexdigest()[:16]
            items.append({"split": split, "uri": uri, "part_id": pid})
    done_marker = join(bank_root, "build.json")
    if exists(bank_fs, done_marker) and read_json(bank_fs, done_marker).get("build_hash") == build_hash:
        info = read_json(bank_fs, done_marker)
        return BankBuildSummary(info["keyframes"], info["features"], info["bytes"], time.time() - t0,
                                len(items), bank_dir)
    missing = [it for it in items if not exists(bank_fs, join(parts_root, it["split"], it["part_id"] + ".npz"))]
    skipped = len(items) - len(missing)
    if max_parts is not None:
        missing = missing[:max_parts]
    if missing:
        gpus = ray.cluster_resources().get("GPU", 0)
        use_gpu = gpus > 0 and cfg.cluster.device != "cpu"
        ds = ray.data.from_items([{"item": json.dumps(it)} for it in missing], override_num_blocks=len(missing))
        ds = ds.map_batches(
            BankExtractor, batch_size=1,
            compute=ray.data.ActorPoolStrategy(min_size=cfg.bank.min_actors, max_size=cfg.bank.max_actors),
            num_gpus=1 if use_gpu else 0, num_cpus=cfg.bank.cpus_per_actor,
            # A killed actor is restarted and its part retried: Ray Data's own defaults for actor pools
            # (max_restarts=-1, max_task_retries=-1); passing them as ray_remote_args is deprecated
            # (removed in Ray 2.64) and printed a RayDeprecationWarning in every bank build.
            fn_constructor_kwargs={"cfg": dataclasses.replace(cfg, model=cfg.model.baseline()),
                                   "checkpoint": checkpoint, "parts_dir": parts_dir})
        ds.take_all()
    if max_parts is not None:
        return BankBuildSummary(0, 0, 0, time.time() - t0, skipped, bank_dir)
    total_kf, total_feat, total_bytes = 0, 0, 0
    for split in ("train", "val"):
        split_items = [it for it in items if it["split"] == split]
        if not split_items:
            continue
        kf, feat, nbytes = merge_split_parts(
            bank_fs, [join(parts_root, split, it["part_id"] + ".npz") for it in split_items],
            join_uri(bank_dir, split),
            metadata={"checkpoint_sha256": ckpt_hash, "build_hash": build_hash, "split": split, "config": build_key})
        total_kf, total_feat, total_bytes = total_kf + kf, total_feat + feat, total_bytes + nbytes
    FeatureBank.open(bank_dir)  # validate before declaring success
    write_json_atomic(bank_fs, done_marker, {"build_hash": build_hash, "keyframes": total_kf,
                                              "features": total_feat, "bytes": total_bytes,
                                              "checkpoint_sha256": ckpt_hash,
                                              # where the baseline was: what a model trained on the bank
                                              # names as its bank model (CheckpointMeta.bank_checkpoint)
                                              "checkpoint": redact_text(checkpoint)})
    return BankBuildSummary(total_kf, total_feat, total_bytes, time.time() - t0, skipped, bank_dir)
