"""The config's schema and defaults: one frozen dataclass per section, each checking its own values,
and `Config`, which holds them and checks what spans sections."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lfb_ray.redaction import RedactedMessage

__all__ = ["BankConfig", "ClusterConfig", "Config", "ConfigError", "check_exclusive_groups", "DataConfig", "EvalConfig", "ModelConfig", "TrackingConfig", "TrainConfig"]


class ConfigError(RedactedMessage, ValueError):
    """A config file or override is invalid; the message names the key."""



@dataclass(frozen=True)
class DataConfig:
    """Where the AVA-format data lives and how clips are sampled and transformed."""

    root: str = "data/synthetic"  # dataset root; relative paths below are resolved against it
    videos_dir: str = "videos"  # folder of <video_id>.mp4/.mkv/.webm
    train_csv: str = "annotations/train.csv"
    val_csv: str = "annotations/val.csv"
    train_exclusions: str = "annotations/train_excluded_timestamps.csv"  # "" = none
    val_exclusions: str = "annotations/val_excluded_timestamps.csv"  # "" = none
    label_map: str = "annotations/label_map.pbtxt"
    train_proposals: str = "annotations/train_proposals.pkl"
    val_proposals: str = "annotations/val_proposals.pkl"
    prepared_dir: str = ""  # output of the prepare job; "" = <workdir>/prepared; may be s3://
    video_start_second: int = -1  # AVA second at file time 0: 900 trimmed, 0 full movie, -1 detect
    clip_frames: int = 4  # frames per clip (T)
    frame_interval: int = 16  # stride between clip frames, in frames at reference_fps
    reference_fps: float = 30.0  # fps the frame_interval is expressed in (AVA rawframes)
    temporal_jitter: bool = True  # train-time jitter of each frame in [jitter_min, jitter_max]
    jitter_min: int = -8
    jitter_max: int = 7
    # Frames are stored at this short side (or the source's, when smaller: never upsampled). At
    # least max(train_scale_range), so training never upsamples a frame that prepare shrank.
    short_side: int = 320
    jpeg_quality: int = 90
    failure_budget: int = 0  # videos allowed to fail before the prepare job exits non-zero
    train_person_score_thr: float = 0.9
    val_person_score_thr: float = 0.9
    max_proposals: int = 1000
    train_scale_range: tuple[int, int] = (256, 320)  # random short side at train time
    train_crop_size: int = 256
    flip_ratio: float = 0.5
    test_short_side: int = 256
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    max_rois_per_keyframe: int = 32
    pos_iou_thr: float = 0.9  # proposals with IoU >= this to a GT box become training RoIs
    num_classes: int = 81  # AVA: 80 actions + unused index 0
    # Keep only the first N keyframes (by video id, then second) of each split's annotations, 0 = all:
    # the smoke overrides (`lfb_ray.preflight.SMOKE_OVERRIDES`) use it to try a config end to end
    # (prepare, train, bank, val) before paying for the full set. It caps everything downstream:
    # prepare prepares only those keyframes, so training, the bank and val inference read only
    # them, and val mAP is computed against the GT of those keyframes only (the capped val). It is
    # part of the run's identity (run names, stage keys): a capped run is another run.
    max_keyframes_per_split: int = 0

    def __post_init__(self) -> None:
        if self.max_keyframes_per_split < 0:
            raise ConfigError(f"data.max_keyframes_per_split must be >= 0 (0 = all), got {self.max_keyframes_per_split}")
        if self.jitter_min > self.jitter_max:
            raise ConfigError(f"data.jitter_min ({self.jitter_min}) > data.jitter_max ({self.jitter_max})")
        lo, hi = self.train_scale_range
        if not 0 < lo <= hi:
            raise ConfigError(f"data.train_scale_range must be 0 < lo <= hi, got {self.train_scale_range}")
        if self.train_crop_size > lo:
            raise ConfigError("data.train_crop_size must be <= data.train_scale_range[0]")
        if self.short_side < hi:
            raise ConfigError(
                f"data.short_side ({self.short_side}) < max(data.train_scale_range) ({hi}): frames would be "
                f"stored smaller than training rescales them and upsampled at every step; set data.short_side "
                f">= {hi} (prepare keeps a smaller source at its own size)")
        if self.clip_frames < 1 or self.frame_interval < 1:
            raise ConfigError("data.clip_frames and data.frame_interval must be >= 1")


def check_exclusive_groups(groups, num_classes: int) -> tuple[tuple[int, ...], ...]:
    """Validate exclusive label groups: each >= 2 distinct class ids in 1..num_classes-1, groups
    disjoint. Returns them as a tuple of tuples.

    Raises:
        ValueError: naming the offending group.
    """
    out, seen = [], set()
    for g in groups:
        g = tuple(int(c) for c in g)
        if len(g) < 2 or len(set(g)) != len(g):
            raise ValueError(f"exclusive group {list(g)}: need at least two distinct class ids")
        bad = [c for c in g if not 1 <= c < num_classes]
        if bad:
            raise ValueError(f"exclusive group {list(g)}: class ids {bad} are outside 1..{num_classes - 1}")
        if seen & set(g):
            raise ValueError(f"exclusive group {list(g)}: class ids {sorted(seen & set(g))} are in another group too")
        seen |= set(g)
        out.append(g)
    return tuple(out)


# `model.fbo`: the feature-bank operator, "none" for the short-term baseline (no bank).
Operator = Literal["none", "nl", "avg", "max"]
OPERATORS: tuple[str, ...] = typing.get_args(Operator)


@dataclass(frozen=True)
class ModelConfig:
    """SlowOnly backbone, RoI head, feature-bank operator and classifier."""

    depth: Literal[18, 34, 50, 101] = 50
    base_channels: int = 64  # width of res2; 64 gives the 2048-d features of SlowOnly-R50
    fbo: Operator = "nl"
    latent_channels: int = 512  # FBO-NL latent width
    num_nl_layers: int = 2
    st_feat_dropout: float = 0.2
    lt_feat_dropout: float = 0.2
    nl_dropout: float = 0.2
    head_dropout: float = 0.5
    num_classes: int = 81
    roi_output_size: int = 8
    pretrained: str = ""  # mmaction2-format Kinetics/AVA checkpoint for initialisation ("" = none)
    # LFB models (fbo != none) start from the backbone of the baseline that computed the bank
    # (the pipeline passes it; jobs/train.py uses bank.checkpoint) instead of `pretrained`.
    init_backbone_from_baseline: bool = False
    # Groups of mutually exclusive class ids (a box has at most one of each group): softmax
    # cross-entropy in the loss and softmax scores for their columns; () = mmaction2's sigmoid BCE.
    exclusive_groups: tuple[tuple[int, ...], ...] = ()
    exclusive_group_weight: float = 1.0  # weight of each group's cross-entropy next to the mean BCE
    # false: the pipeline trains the short-term baseline (which only supplies the backbone and the
    # bank) with mmaction2's sigmoid BCE for every class, and the groups apply to the models that
    # start from it (LFB operators and the control).
    exclusive_groups_in_baseline: bool = True

    def __post_init__(self) -> None:
        if self.base_channels < 1 or self.latent_channels < 1:
            raise ConfigError("model.base_channels and model.latent_channels must be >= 1")
        try:
            check_exclusive_groups(self.exclusive_groups, self.num_classes)
        except ValueError as e:
            raise ConfigError(f"model.exclusive_groups: {e}") from None

    @property
    def uses_bank(self) -> bool:
        """Whether this model reads a feature bank (any operator but "none", the baseline)."""
        return self.fbo != "none"

    def baseline(self) -> ModelConfig:
        """The short-term baseline of this model: the run that computes its bank and whose backbone it
        may start from. No operator; the exclusive groups only with `exclusive_groups_in_baseline`."""
        from dataclasses import replace

        return replace(self, fbo="none", exclusive_groups=self.exclusive_groups if self.exclusive_groups_in_baseline else ())


@dataclass(frozen=True)
class BankConfig:
    """Long-term feature bank: how it is built and sampled."""

    path: str = ""  # bank folder; "" = <workdir>/bank; may be s3://
    checkpoint: str = ""  # baseline checkpoint that computes the bank; "" = the baseline run's
    window_seconds: int = 60
    max_feats_per_second: int = 5
    person_score_thr: float = 0.9
    batch_size: int = 4  # keyframes per forward pass of a bank actor
    cpus_per_actor: int = 1  # CPUs reserved per actor = its JPEG decode threads (decode overlaps the forward)
    min_actors: int = 1
    max_actors: int = 2
    # A video that training or evaluation reads but the bank does not hold: "error" (refused when the
    # bank is opened, naming the videos; mmaction2's `lfb[video_id]` raises KeyError) or "zeros"
    # (all-zero long-term windows for it, with a warning naming the videos: an explicit opt-out).
    missing_videos: Literal["error", "zeros"] = "error"
    # Where training gathers each batch's LFB window: "auto" = on the GPU (the bank held there in fp16)
    # when training runs on one and the bank fits in a quarter of its free memory, else from the
    # memory-mapped bank on the host; "cuda" = on the GPU or an error; "cpu" = always the host.
    # Same windows either way (lfb_ray.bank.window), so not part of a run's name.
    device: Literal["auto", "cuda", "cpu"] = "auto"

    def __post_init__(self) -> None:
        if self.window_seconds < 1 or self.max_feats_per_second < 1:
            raise ConfigError("bank.window_seconds and bank.max_feats_per_second must be >= 1")
        if not 1 <= self.min_actors <= self.max_actors:
            raise ConfigError("bank: need 1 <= min_actors <= max_actors")
        if self.batch_size < 1 or self.cpus_per_actor < 1:
            raise ConfigError("bank.batch_size and bank.cpus_per_actor must be >= 1")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation recipe (optimiser, warm-up, step schedule) and checkpointing."""

    epochs: int = 20
    batch_size_per_worker: int = 12
    base_lr: float = 0.15  # learning rate at reference_batch, scaled linearly with global batch
    reference_batch: int = 96
    momentum: float = 0.9
    weight_decay: float = 1e-5
    warmup_epochs: float = 5.0
    warmup_factor: float = 0.1
    lr_steps: tuple[int, ...] = (10, 15)
    lr_gamma: float = 0.1
    grad_clip: float = 40.0  # L2 max norm; 0 disables
    seed: int = 0
    checkpoint_every_iters: int = 0  # extra mid-epoch checkpoints; 0 = per epoch only
    eval_every_epochs: int = 1  # 0 = only at the end
    # mmaction2 0.x's save_best='mAP@0.5IOU': the run's model.pt and result are its best evaluated
    # epoch (val frame-mAP), not its last (lfb_ray.train.best); needs eval_every_epochs > 0 to choose.
    save_best: bool = False
    amp: Literal["auto", "bf16", "off"] = "auto"  # auto = bf16 on GPU, fp32 on CPU
    storage_path: str = ""  # Ray Train storage; "" = <workdir>/ray_results; may be s3://
    run_name: str = ""  # "" = deterministic from the config (rerun resumes)
    max_failures: int = 2
    log_every_iters: int = 10
    max_iters_per_epoch: int = 0  # cap for smoke runs; 0 = full epoch
    # Multiplies base_lr for a run whose backbone starts from a trained detector (an LFB model with
    # model.init_backbone_from_baseline, or `jobs/train.py --init-backbone`): fine-tuning from the
    # baseline wants a smaller step than training it from scratch. Not applied to model.pretrained
    # (mmaction2's Kinetics recipe keeps one lr).
    finetune_lr_scale: float = 1.0
    # "sgd": mmaction2's recipe (momentum, weight_decay). "adamw": the same lr schedule and weight
    # decay with AdamW (betas 0.9/0.999), whose per-parameter step size does not depend on the
    # gradient scale that a mean BCE over 81 classes gives a freshly initialised head.
    optimizer: Literal["sgd", "adamw"] = "sgd"
    # Runs that start from a trained detector (see finetune_lr_scale): first train the head
    # (operator + fc_cls) for this many Adam steps on the bank's own train features, with the
    # backbone untouched (lfb_ray.train.head_warmup; needs the bank computed by that detector).
    # 0 = off (mmaction2's recipe).
    head_warmup_steps: int = 0
    head_warmup_lr: float = 1e-3
    head_warmup_batch: int = 32
    # Epochs of end-to-end training for runs that start from a trained detector; -1 = `epochs`.
    # 0 = the warmed-up head on the frozen baseline backbone is the model (evaluated as is).
    finetune_epochs: int = -1

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size_per_worker < 1:
            raise ConfigError("train.epochs and train.batch_size_per_worker must be >= 1")
        if self.head_warmup_steps < 0 or self.head_warmup_lr <= 0 or self.head_warmup_batch < 1:
            raise ConfigError("train.head_warmup_steps must be >= 0, head_warmup_lr > 0, head_warmup_batch >= 1")
        if self.finetune_epochs < -1:
            raise ConfigError(f"train.finetune_epochs must be >= 0 or -1 (= epochs), got {self.finetune_epochs}")
        if self.finetune_lr_scale <= 0:
            raise ConfigError(f"train.finetune_lr_scale must be > 0, got {self.finetune_lr_scale}")
        if list(self.lr_steps) != sorted(self.lr_steps):
            raise ConfigError(f"train.lr_steps must be increasing, got {self.lr_steps}")


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation protocol and inference settings."""

    protocol: Literal["official", "mmaction2"] = "official"
    batch_size: int = 4
    action_thr: float = 0.0  # rows with score <= thr are not written to the result CSV


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking."""

    enabled: bool = True
    tracking_uri: str = ""  # "" = MLFLOW_TRACKING_URI or sqlite:///<workdir>/mlflow.db
    experiment: str = "lfb_ray"
    # Each finished run's model.pt as the run's MLflow model (torch.export pt2: lfb_ray.mlflow_model).
    log_model: bool = True
    registered_model: str = ""  # also a new version of this registered model ("" = not registered)
    system_metrics_interval_s: float = 10.0  # CPU/memory/GPU of the rank-0 worker's node (0 = off)


@dataclass(frozen=True)
class ClusterConfig:
    """Ray resources of one training run."""

    num_workers: int = 8
    device: Literal["auto", "cpu", "gpu"] = "auto"  # auto = GPU if the cluster has one *now*; gpu = ask for GPUs
    cpus_per_worker: float = 1.0
    data_cpus: float = 1.0  # CPUs left to Ray Data per worker for decode/augment
    # Operator runs at once (pipeline operators stage, `jobs/train.py --operators`). 0: as many as
    # the cluster's CPUs/GPUs hold at the reservations above (one after another if one fits).
    # N >= 1: at most N, each run's CPU reservations scaled down so that N fit (the runs then share
    # the cores: worth it when a run leaves cores idle, like the synthetic head-only runs while
    # NL's head warm-up keeps one core busy and its other worker waits).
    concurrent_runs: int = 0
    # GPUs the cluster can scale up to (GPU node types x their max_workers in the autoscaler's
    # config): GPU runs plan their concurrency for this many instead of the GPUs up now, so that
    # runs asked for at once make an autoscaler scaling from 0 GPU nodes add nodes for all of them.
    # 0: a fixed cluster, only the GPUs up now count. Ignored by CPU runs.
    max_gpus: int = 0
    # How long a job waits for the GPUs it asks for on a cluster whose autoscaler can add them (Ray
    # Train's worker-group start-up is retried for this long, then the run fails with a message);
    # a cluster without an autoscaler and without the GPUs fails at once (`lfb_ray.preflight`).
    resource_wait_s: float = 1800.0

    def __post_init__(self) -> None:
        if self.resource_wait_s < 0:
            raise ConfigError(f"cluster.resource_wait_s must be >= 0, got {self.resource_wait_s}")
        if self.num_workers < 1:
            raise ConfigError("cluster.num_workers must be >= 1")
        if self.concurrent_runs < 0:
            raise ConfigError("cluster.concurrent_runs must be >= 0 (0 = as many as the cluster holds)")
        if self.max_gpus < 0:
            raise ConfigError(f"cluster.max_gpus must be >= 0 (0 = only the GPUs up now), got {self.max_gpus}")
        if self.device != "cpu" and 0 < self.max_gpus < self.num_workers:
            raise ConfigError(f"cluster.max_gpus={self.max_gpus} cannot hold one run of cluster.num_workers="
                              f"{self.num_workers} workers with a GPU each: set max_gpus >= num_workers (or 0)")

    def uses_gpu(self, cluster_resources: typing.Mapping[str, float]) -> bool:
        """Whether the work (training workers, bank actors, inference actors) takes GPUs: the one
        device rule of every stage.

        `gpu` is True even with no GPU node up yet (an autoscaler adds nodes only for resources that
        are asked for); `cpu` is False; `auto` is whether `cluster_resources`
        (`ray.cluster_resources()`, only "GPU" read) has a GPU now.
        """
        if self.device == "gpu":
            return True
        if self.device == "cpu":
            return False
        return cluster_resources.get("GPU", 0) > 0


@dataclass(frozen=True)
class Config:
    """The whole typed configuration; each section is one dataclass above."""

    workdir: str = "runs/default"  # where derived outputs go (prepared, bank, runs, mlflow); may be s3://
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        # Both sections need the class count (the readers check label ids, the model sizes its
        # classifier): they must agree, or the model's scores would not line up with the labels.
        if self.data.num_classes != self.model.num_classes:
            raise ConfigError(f"data.num_classes={self.data.num_classes} and model.num_classes="
                              f"{self.model.num_classes} differ: set both to the label map's largest id + 1")

    # Derived paths: one place decides where each stage writes.
    def data_path(self, rel: str) -> str:
        """Resolve a data-relative path (absolute paths and URIs pass through)."""
        from lfb_ray.storage import is_uri, join_uri  # lazily: pyarrow is not needed to read a config

        if not rel or is_uri(rel) or Path(rel).is_absolute():
            return rel
        if is_uri(self.data.root):  # s3://bucket/ava?endpoint_override=...: the options stay last
            return join_uri(self.data.root, rel)
        return str(Path(self.data.root) / rel)

    def _in_workdir(self, name: str, *, absolute: bool = False) -> str:
        """`<workdir>/<name>`: a URI when the workdir is one (`s3://bucket/run?options` keeps its
        options at the end), else a local path (made absolute if `absolute`)."""
        from lfb_ray.storage import is_uri, join_uri

        if is_uri(self.workdir):
            return join_uri(self.workdir, name)
        return str((Path(self.workdir).resolve() if absolute else Path(self.workdir)) / name)

    @property
    def prepared_dir(self) -> str:
        return self.data.prepared_dir or self._in_workdir("prepared")

    @property
    def bank_dir(self) -> str:
        return self.bank.path or self._in_workdir("bank")

    @property
    def storage_path(self) -> str:
        return self.train.storage_path or self._in_workdir("ray_results", absolute=True)

    @property
    def tracking_uri(self) -> str:
        """`tracking.tracking_uri`, else MLFLOW_TRACKING_URI, else `sqlite:///<workdir>/mlflow.db`.

        Raises:
            ConfigError: neither is set and the workdir is a URI (SQLite needs a local file).
        """
        import os

        if self.tracking.tracking_uri:
            return self.tracking.tracking_uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        from lfb_ray.storage import is_uri

        if is_uri(self.workdir):
            from lfb_ray.redaction import redact_obj

            raise ConfigError(f"workdir is a URI ({redact_obj(self.workdir, 'workdir')}), where the default MLflow store "
                              "(sqlite:///<workdir>/mlflow.db) cannot be: set tracking.tracking_uri (or "
                              "MLFLOW_TRACKING_URI) to a tracking server, or tracking.enabled=false")
        return "sqlite:///" + str(Path(self.workdir).resolve() / "mlflow.db")
