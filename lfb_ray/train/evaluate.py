"""Val evaluation during training: every rank scores its share of the val files, rank 0 gathers
them, writes the result CSV and computes frame-mAP (`evaluate_val` -> `EvalResult`)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass

from lfb_ray.config import Config
from lfb_ray.predictions import Predictions

__all__ = ["EvalResult", "evaluate_val", "val_predictions"]


@dataclass(frozen=True)
class EvalResult:
    """One evaluation of the model after an epoch, on rank 0.

    `csv` is where the result CSV lives (`results_dir`, a local path or URI); `csv_local` is the
    local copy written first when that is a URI (the evaluator and MLflow's `log_artifact` read
    local files), which the caller removes once logged, else None.
    """

    mAP: float
    csv: str
    csv_local: str | None
    group_mAP: Mapping[str, float]  # group name -> mAP
    protocol_mAP: Mapping[str, float]  # "official" / "mmaction2" -> mAP
    per_class: Mapping  # class id -> AP
    family_mAP: Mapping[str, float]  # "val/mAP_family_<name>" -> mAP (`family_means`)

    def metrics(self) -> dict:
        """The `val/*` metrics logged to MLflow and reported to Ray Train, in this order."""
        out = {"val/mAP": self.mAP, "val/csv": self.csv}
        out.update({f"val/mAP_{g}": v for g, v in self.group_mAP.items()})
        out.update({f"val/mAP_{p}": v for p, v in self.protocol_mAP.items()})  # val/mAP_official, ..._mmaction2
        out.update(self.family_mAP)
        return out


def val_predictions(model, cfg: Config, windows, rank: int, world: int, device, rng) -> Predictions:
    """This rank's share of val predictions (files split round-robin across ranks)."""
    import ray

    from lfb_ray.data.dataset import collate_test, decode_test_rows
    from lfb_ray.data.prep import prepared_files
    from lfb_ray.inference import predict_batch
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
    return Predictions.concat(preds, cfg.model.num_classes)


def evaluate_val(model, cfg: Config, windows, rank: int, world: int, device, epoch: int, results_dir: str,
                 rng) -> EvalResult | None:
    """Distributed val inference after `epoch` (0-based); all ranks call it.

    Returns:
        rank 0: the `EvalResult`, its CSV `val_results_epoch<epoch + 1>.csv` in `results_dir`;
        other ranks: None.
    """
    import torch.distributed as dist

    from lfb_ray.evaluation.families import family_means, label_families
    from lfb_ray.inference import write_and_evaluate
    from lfb_ray.storage import is_uri, join_uri, upload_file

    mine = val_predictions(model, cfg, windows, rank, world, device, rng)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    if rank != 0:
        return None
    pred = Predictions.concat([g for g in gathered if len(g)], cfg.model.num_classes)
    csv_name = f"val_results_epoch{epoch + 1:03d}.csv"
    remote = is_uri(results_dir)
    csv_path = os.path.join(tempfile.mkdtemp(prefix="lfb_ray_val_") if remote else results_dir, csv_name)
    res = write_and_evaluate(cfg, pred, csv_path)
    csv = csv_path
    if remote:
        csv = join_uri(results_dir, csv_name)
        upload_file(csv_path, csv)
    return EvalResult(mAP=res["mAP"], csv=csv, csv_local=csv_path if remote else None,
                      group_mAP=res["group_mAP"], protocol_mAP=res["protocol_mAP"], per_class=res["per_class"],
                      family_mAP=family_means(res["per_class"], label_families(cfg.data_path("dataset.json"))))
