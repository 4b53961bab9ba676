"""The training recipe: what every Ray Train worker runs (`train_loop_per_worker`, `LFBRecipe`).

The whole loop, top to bottom: model, SGD with warmup + steps, AMP on GPU, bank sampling per RoI,
checkpoints through `ray.train.report`, val mAP during training, and rank-0 MLflow logging. Same
code for 1 or N workers, CPU (gloo, fp32) or GPU (nccl, bf16). The driver side that starts it (one
`TorchTrainer` per model) is `lfb_ray.train.driver`; one step and its seeding are
`lfb_ray.train.step`, the val evaluation `lfb_ray.train.evaluate`.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from lfb_ray.config import Config, config_to_dict
from lfb_ray.data.dataset import epoch_order, train_samples
from lfb_ray.progress import driver_is_interactive, progress_every, progress_line
from lfb_ray.redaction import redact_text
from lfb_ray.train.best import BestEpoch
from lfb_ray.train.epoch_loss import EpochLoss
from lfb_ray.train.evaluate import EvalResult, evaluate_val
from lfb_ray.train.run_args import RunArgs, model_meta
from lfb_ray.train.schedule import build_optimizer, lr_at
from lfb_ray.train.step import TrainCollate, eval_generator, flush_denormals, seed_step, train_step

__all__ = ["EpochLoss", "EpochStats", "EvalResult", "LFBRecipe", "RunArgs", "TrainCollate", "eval_generator",
           "flush_denormals", "seed_step", "train_loop_per_worker", "train_step"]


@dataclass(frozen=True)
class EpochStats:
    """What one epoch of training measured on this rank (rank 0's are logged)."""

    done: int  # epochs completed (the epoch's 0-based index + 1)
    global_step: int
    loss: float  # the epoch's mean training loss (`EpochLoss.mean`)
    clips_per_s: float  # all ranks together
    data_wait_frac: float  # share of the epoch spent waiting for batches
    seconds: float
    iters_per_s: float  # iterations run in this process per second

    def metrics(self) -> dict:
        return {"epoch": self.done, "global_step": self.global_step, "train/loss_epoch": self.loss,
                "train/clips_per_s": self.clips_per_s, "train/data_wait_frac": self.data_wait_frac,
                "train/epoch_seconds": self.seconds}


def _param_agreement(model, world: int) -> dict:
    """Checksum of the parameters on every rank: DDP must keep them identical."""
    import torch.distributed as dist

    local = float(sum(p.detach().double().sum().item() for p in model.parameters()))
    sums = [local]
    if world > 1:
        sums = [None] * world
        dist.all_gather_object(sums, local)
    return {"ddp/param_checksum": local, "ddp/param_checksums_equal": float(len(set(sums)) == 1)}


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


class LFBRecipe:
    """One worker's share of a training run (baseline or one operator), in the order it runs:
    `setup`, then `train_epoch` + `end_epoch` per epoch (`evaluate` and `save_checkpoint` inside),
    then `cleanup`. Rank 0 alone writes checkpoints and logs to MLflow; every rank reports.

    Every step's randomness derives from (seed, rank, epoch, iteration) (`seed_step`), each
    evaluation's from its own stream (`eval_generator`), so a resumed run trains what the
    uninterrupted one did.
    """

    def __init__(self, args: RunArgs):
        self.args, self.cfg, self.tc = args, args.cfg, args.cfg.train
        self.epochs = args.epochs
        self._train_table = None  # the train keyframes, read at the first epoch trained here

    # --- 1. setup

    def setup(self) -> None:
        """The model (pretrained weights, then the checkpoint to resume or the backbone to start from,
        then DDP), the optimizer, the tracker and the bank windows. The model is built right after
        the generators are seeded: its initialisation draws from them."""
        import ray.train
        import ray.train.torch

        from lfb_ray.cli import configure_ray_output, quiet_ray_train_reports

        tc = self.tc
        # This worker's Ray Data executions (train batches, val) print as the driver's stdout suits.
        configure_ray_output()
        quiet_ray_train_reports()
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        if self.device.type == "cpu":
            flush_denormals()
        torch.manual_seed(tc.seed)
        np.random.seed(tc.seed)
        random.seed(tc.seed)
        state, bank = self._setup_model()
        self._setup_optimizer(state)
        self._setup_tracker()
        self.epoch_loss = EpochLoss.restore(state.get("epoch_loss") if state else None, self.start_epoch)
        self.windows = self._bank_windows(bank)
        self.t_run = time.time()

    def _setup_model(self) -> tuple[dict | None, object]:
        """Build the model and load its weights; the resume state (state.pt, None for a new run) and
        the opened bank (None without one). Sets the resume position, the best epoch so far and the
        MLflow rows the checkpoint carries unsent (`lfb_ray.tracking.write_pending`)."""
        import ray.train
        import ray.train.torch

        from lfb_ray.models import build_detector, load_checkpoint
        from lfb_ray.models.device import to_model_layout
        from lfb_ray.tracking import read_pending

        cfg, tc, rank, args = self.cfg, self.tc, self.rank, self.args
        core = to_model_layout(build_detector(cfg.model).to(self.device))
        bank = None
        if cfg.model.uses_bank:
            # Before any work (the head warm-up included): a bank that lacks videos this run trains or
            # evaluates on is refused, naming them, unless bank.missing_videos=zeros.
            from lfb_ray.bank.coverage import open_checked

            bank = open_checked(cfg, ("train", "val"), expected_dim=core.feature_channels)
        if cfg.model.pretrained:
            load_checkpoint(core, cfg.model.pretrained)  # Kinetics backbone or a whole detector
        self.start_epoch, self.skip_iters, self.global_step, self.best_map = 0, 0, 0, float("nan")
        self.pending_metrics: list = []
        self.best = BestEpoch()  # train.save_best: rank 0's copy of the best evaluated weights
        state = None
        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
                if tc.save_best and rank == 0:
                    self.best = BestEpoch.load(d)
                if rank == 0:
                    self.pending_metrics = read_pending(d)
            core.load_state_dict(state["model"])
            self.start_epoch, self.skip_iters = state["epoch"], state["iter_in_epoch"]
            self.global_step, self.best_map = state["global_step"], state.get("best_map", float("nan"))
            if rank == 0:
                print(f"[lfb_ray] resumed from checkpoint at epoch {self.start_epoch + 1}, iteration "
                      f"{self.skip_iters}, global step {self.global_step}", flush=True)
        elif args.init_checkpoint:  # a new LFB run starting from the baseline's backbone
            what = load_checkpoint(core, args.init_checkpoint, backbone_only=True)
            if rank == 0:
                print(f"[lfb_ray] initialised the backbone from {redact_text(args.init_checkpoint)} ({what})",
                      flush=True)
                if tc.head_warmup_steps > 0:
                    _warm_up(core, cfg, args.init_checkpoint)
        # DDP broadcasts rank 0's parameters and buffers when it wraps the model, so the head that rank 0
        # warmed up reaches every rank (the others wait here meanwhile).
        self.model = ray.train.torch.prepare_model(core)
        self.core = self.model.module if hasattr(self.model, "module") else self.model
        return state, bank

    def _setup_optimizer(self, state: dict | None) -> None:
        tc = self.tc
        global_batch = tc.batch_size_per_worker * self.world
        self.base_lr = tc.base_lr * global_batch / tc.reference_batch  # linear scaling rule
        if self.args.init_checkpoint:  # fine-tuning from a trained detector's backbone
            self.base_lr *= tc.finetune_lr_scale
        self.optimizer = build_optimizer(self.model.parameters(), tc, self.base_lr)
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])

    def _setup_tracker(self) -> None:
        """Rank 0's MLflow tracker (a no-op one elsewhere or without tracking) and its system metrics."""
        from lfb_ray.tracking import NullTracker, Tracker

        run_id = self.args.mlflow_run_id
        self.tracker = Tracker(self.cfg.tracking_uri, run_id) if self.rank == 0 and run_id else NullTracker()
        self.tracker.replay(self.pending_metrics)  # sent at the next flush, minus the steps MLflow already has
        self.monitor = None
        if isinstance(self.tracker, Tracker):
            from lfb_ray.system_metrics import start_system_metrics

            self.monitor = start_system_metrics(self.cfg.tracking_uri, run_id,
                                                self.cfg.tracking.system_metrics_interval_s, node=f"rank{self.rank}")

    def _bank_windows(self, bank):
        """The LFB window of each batch, gathered where the bank lives (bank.device); None without a bank."""
        if bank is None:
            return None
        from lfb_ray.bank.window import WindowSampler

        rank = self.rank
        windows = WindowSampler.for_config(bank, self.device, self.cfg.bank,
                                           log=lambda m: print(m, flush=True) if rank == 0 else None)
        if rank == 0:
            print(f"[lfb_ray] LFB windows are gathered on the {windows.where} (bank.device={self.cfg.bank.device})",
                  flush=True)
        return windows

    # --- 2. one epoch

    def train_epoch(self, epoch: int) -> EpochStats:
        """Train this rank's keyframes of `epoch` (0-based; a resumed epoch starts after the ones its
        checkpoint had trained on), with a mid-epoch checkpoint every `train.checkpoint_every_iters`."""
        from lfb_ray.data.dataset import read_keyframes

        cfg, tc, rank, world, device = self.cfg, self.tc, self.rank, self.world, self.device
        if self._train_table is None:
            self._train_table = read_keyframes(cfg, "train", drop_excluded=True)
        self.model.train()
        t_epoch = time.time()
        t_wait = 0.0
        n_clips = 0
        # This rank's keyframes of the epoch, in order (lfb_ray.data.dataset.epoch_order); a
        # mid-epoch resume starts after the ones its checkpoint had already trained on.
        first = self.skip_iters if epoch == self.start_epoch else 0
        mine = epoch_order(self._train_table.num_rows, tc.seed, epoch, world)[rank]
        if tc.max_iters_per_epoch:
            mine = mine[: tc.max_iters_per_epoch * tc.batch_size_per_worker]
        mine = mine[first * tc.batch_size_per_worker:]
        # The epoch's last iteration also logs the loss, so a run shorter than log_every_iters still
        # has a loss curve (compare's plot reads it).
        last_it = first + -(-len(mine) // tc.batch_size_per_worker) - 1
        # Rank 0's progress lines inside the epoch (lfb_ray.progress): a multiple of log_every_iters,
        # so they fall where the loss is read anyway.
        every = progress_every(tc.log_every_iters, last_it + 1, driver_is_interactive())
        t_last = time.time()
        # The epoch's loss so far: restored for the epoch a checkpoint resumes (`EpochLoss`).
        if epoch != self.start_epoch:
            self.epoch_loss = EpochLoss()
        iters_here = 0  # run in this process (the it/s figure)
        samples = train_samples(cfg, self._train_table, mine, epoch)
        collate = TrainCollate(cfg.data.mean, cfg.data.std, pin_memory=device.type == "cuda")
        for it, batch in enumerate(samples.iter_torch_batches(batch_size=tc.batch_size_per_worker,
                                                              collate_fn=collate, prefetch_batches=2), start=first):
            t_wait += time.time() - t_last
            lr = lr_at(epoch + it / self.args.iters_per_epoch, tc, self.base_lr)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            # No host sync in the step: the loss stays on the device until a logging point reads it.
            loss = train_step(self.model, self.core, self.optimizer, batch, device, amp=tc.amp, grad_clip=tc.grad_clip,
                              windows=self.windows, rng=seed_step(tc.seed, rank, epoch, it))
            self.global_step += 1
            n_clips += batch.num_clips
            self.epoch_loss.add(loss)
            iters_here += 1
            if self.global_step % tc.log_every_iters == 0 or it == last_it:
                loss_now = float(loss.detach())
                self.tracker.log_metrics({"train/loss": loss_now, "train/lr": lr}, step=self.global_step)
                if rank == 0 and self.global_step % every == 0 and it != last_it:  # the epoch's line follows last_it
                    ran = time.time() - t_epoch
                    print(progress_line(cfg.model.fbo, epoch + 1, self.epochs, it + 1, last_it + 1, loss=loss_now,
                                        lr=lr, clips_per_s=n_clips * world / max(ran, 1e-9),
                                        eta_s=ran / iters_here * (last_it - it)), flush=True)
            if tc.checkpoint_every_iters and self.global_step % tc.checkpoint_every_iters == 0:
                self.save_checkpoint({"epoch": epoch, "global_step": self.global_step,
                                      "train/loss": float(loss.detach())}, epoch, it + 1)
            t_last = time.time()
        elapsed = time.time() - t_epoch
        return EpochStats(done=epoch + 1, global_step=self.global_step, loss=self.epoch_loss.mean,
                          clips_per_s=n_clips * world / max(elapsed, 1e-9), data_wait_frac=t_wait / max(elapsed, 1e-9),
                          seconds=elapsed, iters_per_s=iters_here / max(elapsed, 1e-9))

    def end_epoch(self, stats: EpochStats) -> None:
        """After a trained epoch: evaluate when due (always after the last), log, checkpoint."""
        tc, done = self.tc, stats.done
        last = done == self.epochs
        eta = (time.time() - self.t_run) / (done - self.start_epoch) * (self.epochs - done)
        self._conclude(stats.metrics(), done, final=last,
                       evaluate=last or bool(tc.eval_every_epochs and done % tc.eval_every_epochs == 0),
                       line=(f"[lfb_ray] {self.cfg.model.fbo} epoch {done}/{self.epochs}: loss {stats.loss:.4f}, "
                             f"{stats.iters_per_s:.2f} it/s, {stats.clips_per_s:.1f} clips/s, data wait "
                             f"{100 * stats.data_wait_frac:.1f}%"),
                       tail=f", ETA {eta:.0f} s")

    def end_untrained(self) -> None:
        """`train.finetune_epochs=0`: the (warmed-up) starting model is evaluated as it is, and saved
        as the result."""
        self._conclude({"epoch": 0, "global_step": 0}, 0, evaluate=True, final=True,
                       line=f"[lfb_ray] {self.cfg.model.fbo} without fine-tuning")

    def evaluate(self, done: int) -> EvalResult | None:
        """Val mAP of the model after `done` epochs; every rank calls it, rank 0 gets the result."""
        return evaluate_val(self.core, self.cfg, self.windows, self.rank, self.world, self.device, done - 1,
                            self.args.results_dir, eval_generator(self.tc.seed, self.rank, done))

    def _conclude(self, metrics: dict, done: int, *, evaluate: bool, final: bool, line: str, tail: str = "") -> None:
        """End of an epoch (`done` epochs completed; 0 = the starting model of `finetune_epochs=0`):
        evaluate when due, print, log to MLflow, checkpoint and report, attach the val CSV."""
        tc, rank = self.tc, self.rank
        ev = self.evaluate(done) if evaluate else None
        if ev is not None:  # rank 0
            metrics.update(ev.metrics())
            if not math.isnan(ev.mAP):
                self.best_map = ev.mAP if math.isnan(self.best_map) else max(self.best_map, ev.mAP)
            if tc.save_best and self.best.offer(done, ev.metrics(), self.core):
                tail += ", best so far (saved as the run's result)"
        if rank == 0:
            val = f", val mAP {metrics['val/mAP']:.4f}" if "val/mAP" in metrics else ""
            print(f"{line}{val}{tail}", flush=True)
            self.tracker.log_metrics({k: v for k, v in metrics.items()
                                      if isinstance(v, (int, float)) and k != "global_step"}, step=done)
            if ev is not None:
                self.tracker.log_metrics({f"val_ap/{k}": v for k, v in ev.per_class.items() if v == v}, step=done)
        if final:
            metrics.update(_param_agreement(self.core, self.world))
            if tc.save_best and rank == 0 and self.best.state is not None:
                metrics = self.best.result_metrics(metrics)
                print(f"[lfb_ray] {self.cfg.model.fbo}: the result is epoch {self.best.epoch} (val mAP "
                      f"{self.best.mAP:.4f}; last epoch {metrics.get('last/val/mAP', float('nan')):.4f})", flush=True)
                self.tracker.log_metrics({"best/epoch": self.best.epoch, "best/val_mAP": self.best.mAP}, step=done)
        self.save_checkpoint(metrics, done, 0, final=final)
        if rank == 0 and ev is not None:
            # This epoch's CSV (not the final metrics' val/csv: with train.save_best that is the best
            # epoch's, logged when it was evaluated).
            self.tracker.log_artifact(ev.csv_local or ev.csv, "results")
            if ev.csv_local:  # the local copy of a CSV on S3 (`evaluate_val`)
                shutil.rmtree(os.path.dirname(ev.csv_local), ignore_errors=True)

    # --- 3. checkpoints

    def save_checkpoint(self, metrics: dict, epoch: int, iter_in_epoch: int, *, final: bool = False) -> None:
        """Flush MLflow, then checkpoint (rank 0 writes, all ranks call `ray.train.report`). The state
        resumes at iteration `iter_in_epoch` of `epoch` (0-based; iteration 0 of the next epoch at an
        epoch's end); `final` adds the run's `model.pt` (the best epoch's with `train.save_best`).

        The flush comes first and what it could not send (the server is down or hung; the flush
        returns within lfb_ray.tracking.FLUSH_DEADLINE_S either way) goes into the checkpoint
        (`write_pending`) before `ray.train.report` commits it: a worker killed after the commit
        loses no step, since the resumed one replays those rows. Flushing after the commit, as
        before, lost them when the worker died between the two or the server was down.
        """
        import ray.train

        from lfb_ray.models import save_checkpoint
        from lfb_ray.tracking import write_pending

        tc = self.tc
        with tempfile.TemporaryDirectory() as tmp:
            ckpt_obj = None
            if self.rank == 0:
                self.tracker.flush()
                write_pending(self.tracker, tmp)
                # At an epoch's end (iter_in_epoch 0 of the next), the next epoch's loss starts empty.
                running = self.epoch_loss.state(epoch) if iter_in_epoch else EpochLoss().state(epoch)
                torch.save({"model": self.core.state_dict(), "optimizer": self.optimizer.state_dict(), "epoch": epoch,
                            "iter_in_epoch": iter_in_epoch, "global_step": self.global_step,
                            "best_map": self.best_map, "epoch_loss": running}, os.path.join(tmp, "state.pt"))
                if tc.save_best:
                    self.best.save(tmp)
                if final:
                    best = self.best
                    use_best = tc.save_best and best.state is not None
                    meta = model_meta(self.args, epoch=best.epoch if use_best else epoch, global_step=self.global_step,
                                      val_map=best.mAP if use_best else metrics.get("val/mAP"), best=use_best)
                    save_checkpoint(best.state if use_best else self.core.state_dict(), os.path.join(tmp, "model.pt"),
                                    source=f"lfb_ray {self.cfg.model.fbo} epoch {meta.epoch}"
                                           + (" (best val mAP)" if use_best else ""),
                                    model_config=config_to_dict(self.cfg)["model"], meta=meta)
                ckpt_obj = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt_obj)

    # --- 4. cleanup

    def cleanup(self) -> None:
        """Stop the system metrics and send what MLflow still lacks."""
        if self.monitor is not None:
            self.monitor.finish()
        if not self.tracker.flush(wait=True):
            print("[lfb_ray] WARNING: some metrics could not be sent to MLflow; the final checkpoint keeps them "
                  "(pending_metrics.json) and the driver tries them again", flush=True)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker entry point: one rank of one model's training run.

    `config` is the driver's `train_loop_config`: {"run": `RunArgs`} (the run's `Config`, MLflow run,
    results folder, epoch length, provenance).

    1. Set up the model, its bank windows, the state to resume, the optimizer and the tracker.
    2. With nothing to train (`train.finetune_epochs=0`), evaluate the starting model as the result.
    3. Train each remaining epoch; after it, evaluate when due, log and checkpoint.
    4. Clean up: stop the system metrics, send the metrics still pending.
    """
    recipe = LFBRecipe(config["run"])
    recipe.setup()
    if recipe.epochs == 0 and recipe.start_epoch == 0:
        recipe.end_untrained()
    for epoch in range(recipe.start_epoch, recipe.epochs):
        recipe.end_epoch(recipe.train_epoch(epoch))
    recipe.cleanup()
