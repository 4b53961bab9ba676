"""The training recipe: what every Ray Train worker runs (`train_loop_per_worker`).

The whole loop, top to bottom: model, SGD with warmup + steps, AMP on GPU, bank sampling per RoI,
checkpoints through `ray.train.report`, val mAP during training, and rank-0 MLflow logging. Same
code for 1 or N workers, CPU (gloo, fp32) or GPU (nccl, bf16). The driver side that starts it (one
`TorchTrainer` per model) is `lfb_ray.train.driver`.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import tempfile
import time

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from lfb_ray.config import Config, config_to_dict
from lfb_ray.data.dataset import epoch_order, train_samples
from lfb_ray.models.card import CheckpointMeta
from lfb_ray.progress import driver_is_interactive, progress_every, progress_line
from lfb_ray.redaction import redact_text
from lfb_ray.train.best import BestEpoch
from lfb_ray.train.schedule import build_optimizer, lr_at

__all__ = ["TrainCollate", "eval_generator", "flush_denormals", "seed_step", "train_loop_per_worker", "train_step"]

_PINNED = ("clip", "rois", "labels")  # the tensors of a train batch that go to the device


class TrainCollate(NumpyBatchCollateFn):
    """`iter_torch_batches` collate: numpy train batch → normalised tensors + per-RoI bank keys.

    With `pin_memory` (a CUDA run) the clip, RoIs and labels are pinned here, in Ray Data's collate
    threads off the loop's critical path, so the loop's `non_blocking` copies really overlap. (Ray's
    own `iter_torch_batches(pin_memory=True)` pins only all-tensor batches; ours carries lists too.)
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], pin_memory: bool = False):
        self.mean, self.std = tuple(mean), tuple(std)
        self.pin_memory = pin_memory

    def __call__(self, batch: dict) -> dict:
        from lfb_ray.data.dataset import collate_train

        out = collate_train(batch, self.mean, self.std)
        if self.pin_memory:
            for k in _PINNED:
                out[k] = out[k].pin_memory()
        return out


def train_step(model, core, optimizer, batch: dict, device: torch.device, *, amp: str, grad_clip: float,
               windows=None, rng: np.random.Generator | None = None) -> torch.Tensor:
    """One SGD step on one train batch; returns its loss, detached and still on the device.

    Nothing here waits for the device: the batch's (pinned) tensors go up without blocking, the LFB
    window is gathered where the bank lives (`lfb_ray.bank.window.WindowSampler`: only the int32
    rows are computed on the host), and the loss is not read (no `.item()` / `float()`), so the
    host runs ahead and queues the next step while this one computes. Callers read losses at
    logging points only.

    Args:
        model: the (DDP-wrapped) detector; `core` the unwrapped one (its `loss`).
        batch: `TrainCollate`'s output: clip [B, 3, T, H, W], rois [R, 5], labels [R, num_classes],
            roi_video_ids [R], roi_seconds [R].
        windows: the `WindowSampler` of an LFB model ([R, W*K, C] float32 on `device`), else None.
        rng: the bank sampling generator (with `windows`).

    Returns:
        the loss, a 0-d float32 tensor on `device`.
    """
    from lfb_ray.models.device import autocast_for, to_model_layout

    clip = to_model_layout(batch["clip"].to(device, non_blocking=True))
    rois = batch["rois"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    lt = windows(batch["roi_video_ids"], batch["roi_seconds"], rng) if windows is not None else None
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


def _param_agreement(model, world: int) -> dict:
    """Checksum of the parameters on every rank: DDP must keep them identical."""
    import torch.distributed as dist

    local = float(sum(p.detach().double().sum().item() for p in model.parameters()))
    sums = [local]
    if world > 1:
        sums = [None] * world
        dist.all_gather_object(sums, local)
    return {"ddp/param_checksum": local, "ddp/param_checksums_equal": float(len(set(sums)) == 1)}


def _val_predictions(model, cfg: Config, windows, rank: int, world: int, device, rng) -> dict:
    """This rank's share of val predictions (files split round-robin across ranks)."""
    import ray

    from lfb_ray.data.dataset import collate_test, decode_test_rows
    from lfb_ray.data.prep import prepared_files
    from lfb_ray.inference import concat_predictions, predict_batch
    from lfb_ray.storage import resolve

    files = prepared_files(cfg.prepared_dir, "val")[rank::world]
    preds = []
    if files:
        fs, _ = resolve(cfg.prepared_dir)
        ds = ray.data.read_parquet(files, filesystem=fs, num_cpus=cfg.cluster.data_cpus).map_batches(
            decode_test_rows, batch_size=max(16, cfg.eval.batch_size), num_cpus=cfg.cluster.data_cpus,
            fn_kwargs={"data": cfg.data, "prepared_uri": cfg.prepared_dir,
                       "score_thr": cfg.data.val_person_score_thr})
        for batch in ds.iter_batches(batch_size=cfg.eval.batch_size, batch_format="numpy"):
            preds.append(predict_batch(model, collate_test(batch, cfg.data.mean, cfg.data.std), windows=windows,
                                       rng=rng, device=device, amp=cfg.train.amp))
    return concat_predictions(preds, cfg.model.num_classes)


def _evaluate(model, cfg: Config, windows, ctx, device, epoch: int, results_dir: str, rng) -> dict:
    """Distributed val inference; rank 0 gathers, writes the CSV and computes frame-mAP.

    `val/csv` is the CSV in `results_dir`. When that is a URI, the CSV is written to a local
    temporary folder first (the evaluator and MLflow's `log_artifact` read local files) and then
    copied there; `_csv_local` names the local copy, which the caller removes once logged.
    """
    import torch.distributed as dist

    from lfb_ray.inference import concat_predictions, write_and_evaluate
    from lfb_ray.storage import is_uri, join_uri, upload_file

    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    mine = _val_predictions(model, cfg, windows, rank, world, device, rng)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    if rank != 0:
        return {}
    pred = concat_predictions([g for g in gathered if len(g["video_ids"])], cfg.model.num_classes)
    csv_name = f"val_results_epoch{epoch + 1:03d}.csv"
    remote = is_uri(results_dir)
    csv_path = os.path.join(tempfile.mkdtemp(prefix="lfb_ray_val_") if remote else results_dir, csv_name)
    res = write_and_evaluate(cfg, pred, csv_path)
    out = {"val/mAP": res["mAP"], "val/csv": csv_path}
    if remote:
        out["val/csv"] = join_uri(results_dir, csv_name)
        upload_file(csv_path, out["val/csv"])
        out["_csv_local"] = csv_path
    for g, v in res["group_mAP"].items():
        out[f"val/mAP_{g}"] = v
    for protocol, v in res["protocol_mAP"].items():  # val/mAP_official, val/mAP_mmaction2
        out[f"val/mAP_{protocol}"] = v
    out["_per_class"] = res["per_class"]
    from lfb_ray.evaluation.families import family_means, label_families

    out.update(family_means(res["per_class"], label_families(cfg.data_path("dataset.json"))))
    return out


def _epochs(cfg: Config, init_checkpoint: str | None) -> int:
    """Epochs of this run: `train.finetune_epochs` when it starts from a trained detector (and that is
    not -1), else `train.epochs`."""
    tc = cfg.train
    return tc.finetune_epochs if init_checkpoint and tc.finetune_epochs >= 0 else tc.epochs


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


def _warm_up(core, cfg: Config, checkpoint: str) -> None:
    """`train.head_warmup_steps` Adam steps on the bank's train features (lfb_ray.train.head_warmup),
    on rank 0 only: DDP's wrap then broadcasts the warmed-up head to the other ranks (the warm-up is
    small next to training and not worth splitting).

    It runs on the worker's own torch threads: its ops are small, so more threads gain little
    (docs/training.md, "CPU notes").
    """
    from lfb_ray.storage import join_uri
    from lfb_ray.train.head_warmup import warm_up_head

    tc = cfg.train
    log = lambda m: print(m, flush=True)  # noqa: E731
    res = warm_up_head(core, join_uri(cfg.bank_dir, "train"), cfg.data_path(cfg.data.train_csv),
                       steps=tc.head_warmup_steps, lr=tc.head_warmup_lr, batch=tc.head_warmup_batch,
                       seed=tc.seed, window_seconds=cfg.bank.window_seconds,
                       max_feats_per_second=cfg.bank.max_feats_per_second, checkpoint=checkpoint,
                       bank_device=cfg.bank.device, log=log)
    log(f"[lfb_ray] head warm-up: {res.steps} steps on {res.entries} bank entries, loss {res.loss_first:.4f} -> "
        f"{res.loss_last:.4f}, {res.seconds:.0f} s on {torch.get_num_threads()} CPU thread(s)")


class EpochLoss:
    """The running mean of an epoch's training loss, which survives a resume.

    A checkpoint inside an epoch (`train.checkpoint_every_iters`) records the sum and count of the
    losses so far (`state()`, into state.pt), and the resumed worker starts from them
    (`restore`), so `train/loss_epoch` is the mean over all of the epoch's iterations and not only
    the ones run since the resume; a resume at the epoch's last iteration, which runs none, logged
    0.0 before. It is rank 0's loss (rank 0 writes state.pt and logs), as without a resume.
    """

    def __init__(self) -> None:
        self._sum, self.count = 0.0, 0
        self._pending: torch.Tensor | None = None  # the float64 running sum, on the device, not read yet

    def add(self, loss: float | torch.Tensor) -> None:
        """Count one iteration's loss. A tensor is summed where it is, in float64, without reading
        it (no host sync per iteration); `sum` reads it when a checkpoint or the epoch's end needs
        it. The running sum starts from the host's (a Python scalar operand: no copy, no sync) and
        adds the same float32 losses in the same order as `float()`s did: the same float64 value."""
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().to(torch.float64)
            self._pending = (loss + self._sum) if self._pending is None else self._pending + loss
        else:
            self.sum = self.sum + float(loss)
        self.count += 1

    @property
    def sum(self) -> float:
        """The sum of the losses so far (reads the device-side running sum: a host sync)."""
        if self._pending is not None:
            self._sum, self._pending = float(self._pending), None
        return self._sum

    @sum.setter
    def sum(self, value: float) -> None:
        self._sum, self._pending = float(value), None

    @property
    def mean(self) -> float:
        """The mean loss; NaN when the epoch has no iteration at all (never 0.0, a real loss)."""
        return self.sum / self.count if self.count else float("nan")

    def state(self, epoch: int) -> dict:
        """What state.pt keeps: the sums of `epoch`, the epoch a checkpoint written now resumes."""
        return {"epoch": int(epoch), "sum": float(self.sum), "count": int(self.count)}

    @classmethod
    def restore(cls, saved: dict | None, epoch: int) -> EpochLoss:
        """The running loss of `epoch` when resuming: `saved` (state.pt's `epoch_loss`) if it is
        this epoch's, else empty (a checkpoint at an epoch's end, or of an older version)."""
        out = cls()
        if saved and int(saved.get("epoch", -1)) == epoch:
            out.sum, out.count = float(saved["sum"]), int(saved["count"])
        return out


def model_meta(cfg: Config, config: dict, *, epoch: int, global_step: int, val_map: float | None,
               best: bool) -> CheckpointMeta:
    """The `CheckpointMeta` of the run's `model.pt`: what it is and what it came from
    (`config["provenance"]`, set by `lfb_ray.train.driver`); credentials in URIs are not stored."""
    from lfb_ray.models.card import code_version
    from lfb_ray.redaction import redact_obj

    prov = config.get("provenance") or {}
    return CheckpointMeta(
        operator=cfg.model.fbo, epoch=int(epoch), global_step=int(global_step),
        selected_on="best val mAP" if best else "last epoch",
        val_map=None if val_map is None or math.isnan(float(val_map)) else float(val_map),
        config=redact_obj(config_to_dict(cfg)), inputs=dict(prov.get("inputs") or {}),
        init_checkpoint=redact_text(config.get("init_checkpoint") or ""),
        bank_checkpoint=str(prov.get("bank_checkpoint") or ""), run_name=prov.get("run_name", ""),
        mlflow_run_id=prov.get("mlflow_run_id", ""), code=code_version())


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker entry point. `config` = {"cfg": the run's `Config`, "mlflow_run_id": ...}."""
    import ray.train
    import ray.train.torch

    from lfb_ray.cli import configure_ray_output, quiet_ray_train_reports
    from lfb_ray.models import build_detector, load_checkpoint, save_checkpoint
    from lfb_ray.models.device import to_model_layout
    from lfb_ray.tracking import NullTracker, Tracker, read_pending, write_pending

    cfg: Config = config["cfg"]
    tc = cfg.train
    configure_ray_output()  # this worker's Ray Data executions (train batches, val) print as the driver's stdout suits
    quiet_ray_train_reports()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        flush_denormals()
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    random.seed(tc.seed)

    # --- model: pretrained weights, then a checkpoint to resume or a backbone to start from, then DDP
    core = to_model_layout(build_detector(cfg.model).to(device))
    bank = None
    if cfg.model.uses_bank:
        # Before any work (the head warm-up included): a bank that lacks videos this run trains or
        # evaluates on is refused, naming them, unless bank.missing_videos=zeros.
        from lfb_ray.bank.coverage import open_checked

        bank = open_checked(cfg, ("train", "val"), expected_dim=core.feature_channels)
    if cfg.model.pretrained:
        load_checkpoint(core, cfg.model.pretrained)  # Kinetics backbone or a whole detector
    start_epoch, skip_iters, global_step, best_map = 0, 0, 0, float("nan")
    state = None
    pending_metrics: list = []  # MLflow rows the checkpoint carries unsent (lfb_ray.tracking.write_pending)
    best = BestEpoch()  # train.save_best: rank 0's copy of the best evaluated weights
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
            if tc.save_best and rank == 0:
                best = BestEpoch.load(d)
            if rank == 0:
                pending_metrics = read_pending(d)
        core.load_state_dict(state["model"])
        start_epoch, skip_iters, global_step = state["epoch"], state["iter_in_epoch"], state["global_step"]
        best_map = state.get("best_map", float("nan"))
        if rank == 0:
            print(f"[lfb_ray] resumed from checkpoint at epoch {start_epoch + 1}, iteration {skip_iters}, "
                  f"global step {global_step}", flush=True)
    elif config.get("init_checkpoint"):  # a new LFB run starting from the baseline's backbone
        what = load_checkpoint(core, config["init_checkpoint"], backbone_only=True)
        if rank == 0:
            print(f"[lfb_ray] initialised the backbone from {redact_text(config['init_checkpoint'])} ({what})", flush=True)
            if tc.head_warmup_steps > 0:
                _warm_up(core, cfg, config["init_checkpoint"])
    # DDP broadcasts rank 0's parameters and buffers when it wraps the model, so the head that rank 0
    # warmed up reaches every rank (the others wait here meanwhile).
    model = ray.train.torch.prepare_model(core)
    core = model.module if hasattr(model, "module") else model
    global_batch = tc.batch_size_per_worker * world
    base_lr = tc.base_lr * global_batch / tc.reference_batch  # linear scaling rule
    if config.get("init_checkpoint"):  # fine-tuning from a trained detector's backbone
        base_lr *= tc.finetune_lr_scale
    optimizer = build_optimizer(model.parameters(), tc, base_lr)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    tracker = (Tracker(cfg.tracking_uri, config["mlflow_run_id"])
               if rank == 0 and config.get("mlflow_run_id") else NullTracker())
    tracker.replay(pending_metrics)  # sent at the next flush, minus the steps MLflow already has
    monitor = None
    if isinstance(tracker, Tracker):
        from lfb_ray.system_metrics import start_system_metrics

        monitor = start_system_metrics(cfg.tracking_uri, config["mlflow_run_id"],
                                       cfg.tracking.system_metrics_interval_s, node=f"rank{rank}")
    results_dir = config["results_dir"]
    iters_per_epoch = config["iters_per_epoch"]

    epoch_loss = EpochLoss.restore(state.get("epoch_loss") if state else None, start_epoch)
    windows = None  # the LFB window of each batch, gathered where the bank lives (bank.device)
    if bank is not None:
        from lfb_ray.bank.window import WindowSampler

        windows = WindowSampler.for_config(bank, device, cfg.bank,
                                           log=lambda m: print(m, flush=True) if rank == 0 else None)
        if rank == 0:
            print(f"[lfb_ray] LFB windows are gathered on the {windows.where} (bank.device={cfg.bank.device})",
                  flush=True)

    def report(metrics: dict, epoch: int, iter_in_epoch: int, final: bool = False) -> None:
        """Flush MLflow, then checkpoint (rank 0 writes, all ranks call report).

        The flush comes first and what it could not send (the server is down or hung; the flush
        returns within lfb_ray.tracking.FLUSH_DEADLINE_S either way) goes into the checkpoint
        (`write_pending`) before `ray.train.report` commits it: a worker killed after the commit
        loses no step, since the resumed one replays those rows. Flushing after the commit, as
        before, lost them when the worker died between the two or the server was down.
        """
        with tempfile.TemporaryDirectory() as tmp:
            ckpt_obj = None
            if rank == 0:
                tracker.flush()
                write_pending(tracker, tmp)
                # At an epoch's end (iter_in_epoch 0 of the next), the next epoch's loss starts empty.
                running = epoch_loss.state(epoch) if iter_in_epoch else EpochLoss().state(epoch)
                torch.save({"model": core.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                            "iter_in_epoch": iter_in_epoch, "global_step": global_step, "best_map": best_map,
                            "epoch_loss": running}, os.path.join(tmp, "state.pt"))
                if tc.save_best:
                    best.save(tmp)
                if final:
                    use_best = tc.save_best and best.state is not None
                    meta = model_meta(cfg, config, epoch=best.epoch if use_best else epoch, global_step=global_step,
                                      val_map=best.mAP if use_best else metrics.get("val/mAP"), best=use_best)
                    save_checkpoint(best.state if use_best else core.state_dict(), os.path.join(tmp, "model.pt"),
                                    source=f"lfb_ray {cfg.model.fbo} epoch {meta.epoch}"
                                           + (" (best val mAP)" if use_best else ""),
                                    model_config=config_to_dict(cfg)["model"], meta=meta)
                ckpt_obj = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({k: v for k, v in metrics.items() if not k.startswith("_")}, checkpoint=ckpt_obj)

    def finish(metrics: dict, done: int, *, evaluate: bool, final: bool, line: str, tail: str = "") -> None:
        """End of an epoch (`done` epochs completed; 0 = the starting model of `finetune_epochs=0`):
        evaluate when due, print, log to MLflow, checkpoint and report, attach the val CSV."""
        nonlocal best_map
        if evaluate:
            ev = _evaluate(core, cfg, windows, ctx, device, done - 1, results_dir, eval_generator(tc.seed, rank, done))
            metrics.update(ev)
            if rank == 0 and not math.isnan(ev.get("val/mAP", float("nan"))):
                best_map = ev["val/mAP"] if math.isnan(best_map) else max(best_map, ev["val/mAP"])
            if rank == 0 and tc.save_best and best.offer(done, ev, core):
                tail += ", best so far (saved as the run's result)"
        if rank == 0:
            val = f", val mAP {metrics['val/mAP']:.4f}" if "val/mAP" in metrics else ""
            print(f"{line}{val}{tail}", flush=True)
            tracker.log_metrics({k: v for k, v in metrics.items()
                                 if isinstance(v, (int, float)) and k != "global_step"}, step=done)
            if "_per_class" in metrics:
                tracker.log_metrics({f"val_ap/{k}": v for k, v in metrics["_per_class"].items() if v == v}, step=done)
        if final:
            metrics.update(_param_agreement(core, world))
            if tc.save_best and rank == 0 and best.state is not None:
                metrics = best.result_metrics(metrics)
                print(f"[lfb_ray] {cfg.model.fbo}: the result is epoch {best.epoch} (val mAP {best.mAP:.4f}; "
                      f"last epoch {metrics.get('last/val/mAP', float('nan')):.4f})", flush=True)
                tracker.log_metrics({"best/epoch": best.epoch, "best/val_mAP": best.mAP}, step=done)
        report(metrics, done, 0, final=final)
        if rank == 0 and "val/csv" in metrics:
            tracker.log_artifact(metrics.get("_csv_local", metrics["val/csv"]), "results")
            if "_csv_local" in metrics:  # the local copy of a CSV on S3 (`_evaluate`)
                shutil.rmtree(os.path.dirname(metrics["_csv_local"]), ignore_errors=True)

    # --- epochs
    epochs = _epochs(cfg, config.get("init_checkpoint"))
    t_run = time.time()
    if epochs == 0 and start_epoch == 0:
        # finetune_epochs=0: the (warmed-up) model is evaluated as it is, and saved as the result.
        finish({"epoch": 0, "global_step": 0}, 0, evaluate=True, final=True,
               line=f"[lfb_ray] {cfg.model.fbo} without fine-tuning")
    train_table = None
    if start_epoch < epochs:
        from lfb_ray.data.dataset import read_keyframes

        train_table = read_keyframes(cfg, "train", drop_excluded=True)
    for epoch in range(start_epoch, epochs):
        model.train()
        t_epoch = time.time()
        t_wait = 0.0
        n_clips = 0
        # This rank's keyframes of the epoch, in order (lfb_ray.data.dataset.epoch_order); a
        # mid-epoch resume starts after the ones its checkpoint had already trained on.
        first = skip_iters if epoch == start_epoch else 0
        mine = epoch_order(train_table.num_rows, tc.seed, epoch, world)[rank]
        if tc.max_iters_per_epoch:
            mine = mine[: tc.max_iters_per_epoch * tc.batch_size_per_worker]
        mine = mine[first * tc.batch_size_per_worker:]
        it = first
        # The epoch's last iteration also logs the loss, so a run shorter than log_every_iters still
        # has a loss curve (compare's plot reads it).
        last_it = first + -(-len(mine) // tc.batch_size_per_worker) - 1
        # Rank 0's progress lines inside the epoch (lfb_ray.progress): a multiple of log_every_iters,
        # so they fall where the loss is read anyway.
        every = progress_every(tc.log_every_iters, last_it + 1, driver_is_interactive())
        t_last = time.time()
        # The epoch's loss so far: restored for the epoch a checkpoint resumes (`EpochLoss`).
        if epoch != start_epoch:
            epoch_loss = EpochLoss()
        iters_here = 0  # run in this process (the it/s figure)
        samples = train_samples(cfg, train_table, mine, epoch)
        collate = TrainCollate(cfg.data.mean, cfg.data.std, pin_memory=device.type == "cuda")
        for it, batch in enumerate(samples.iter_torch_batches(batch_size=tc.batch_size_per_worker,
                                                              collate_fn=collate, prefetch_batches=2), start=first):
            t_wait += time.time() - t_last
            lr = lr_at(epoch + it / iters_per_epoch, tc, base_lr)
            for g in optimizer.param_groups:
                g["lr"] = lr
            # No host sync in the step: the loss stays on the device until a logging point reads it.
            loss = train_step(model, core, optimizer, batch, device, amp=tc.amp, grad_clip=tc.grad_clip,
                              windows=windows, rng=seed_step(tc.seed, rank, epoch, it))
            global_step += 1
            n_clips += batch["num_clips"]
            epoch_loss.add(loss)
            iters_here += 1
            if global_step % tc.log_every_iters == 0 or it == last_it:
                loss_now = float(loss.detach())
                tracker.log_metrics({"train/loss": loss_now, "train/lr": lr}, step=global_step)
                if rank == 0 and global_step % every == 0 and it != last_it:  # the epoch's line follows last_it
                    ran = time.time() - t_epoch
                    print(progress_line(cfg.model.fbo, epoch + 1, epochs, it + 1, last_it + 1, loss=loss_now, lr=lr,
                                        clips_per_s=n_clips * world / max(ran, 1e-9),
                                        eta_s=ran / iters_here * (last_it - it)), flush=True)
            if tc.checkpoint_every_iters and global_step % tc.checkpoint_every_iters == 0:
                report({"epoch": epoch, "global_step": global_step, "train/loss": float(loss.detach())},
                       epoch, it + 1)
            t_last = time.time()
        elapsed = time.time() - t_epoch
        clips_per_s = n_clips * world / max(elapsed, 1e-9)
        metrics = {"epoch": epoch + 1, "global_step": global_step,
                   "train/loss_epoch": epoch_loss.mean, "train/clips_per_s": clips_per_s,
                   "train/data_wait_frac": t_wait / max(elapsed, 1e-9), "train/epoch_seconds": elapsed}
        last = epoch + 1 == epochs
        eta = (time.time() - t_run) / (epoch + 1 - start_epoch) * (epochs - epoch - 1)
        finish(metrics, epoch + 1, final=last,
               evaluate=last or bool(tc.eval_every_epochs and (epoch + 1) % tc.eval_every_epochs == 0),
               line=(f"[lfb_ray] {cfg.model.fbo} epoch {epoch + 1}/{epochs}: loss {metrics['train/loss_epoch']:.4f}, "
                     f"{iters_here / max(elapsed, 1e-9):.2f} it/s, {clips_per_s:.1f} clips/s, data wait "
                     f"{100 * metrics['train/data_wait_frac']:.1f}%"),
               tail=f", ETA {eta:.0f} s")
    if monitor is not None:
        monitor.finish()
    if not tracker.flush(wait=True):
        print("[lfb_ray] WARNING: some metrics could not be sent to MLflow; the final checkpoint keeps them "
              "(pending_metrics.json) and the driver tries them again", flush=True)

