"""Finding or creating a run by its identity name, with its params, config and dataset inputs.

A rerun of the same command finds the same run (tag `lfb_ray.run_name`), so a resumed training
continues it instead of starting another.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from lfb_ray.redaction import redact_text
from lfb_ray.runs import display_name
from lfb_ray.tracking.store import redact, setup_mlflow_env

#: The dataset inputs of a training run (MLflow's Dataset column): `lfb_ray.identity` names.
_DATASETS = {"prepared": ("prepared AVA data", "prepared_dir"), "bank": ("long-term feature bank", "bank_dir")}


def log_dataset_inputs(tracking_uri: str, run_id: str, cfg, inputs: dict[str, str]) -> None:
    """Log the prepared data and (LFB runs) the bank a run consumes as its MLflow dataset inputs,
    with their content ids (`lfb_ray.identity.run_inputs`) as digests, so the UI's Dataset column
    tells runs over different data apart. An input already logged with the same digest is not repeated.
    """
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    have = {(d.dataset.name, d.dataset.digest) for d in client.get_run(run_id).inputs.dataset_inputs}
    new = []
    for key, (name, attr) in _DATASETS.items():
        if key in inputs and (name, inputs[key]) not in have:
            source = json.dumps({"uri": redact_text(str(getattr(cfg, attr)))})
            new.append(DatasetInput(Dataset(name=name, digest=inputs[key], source_type="lfb_ray", source=source),
                                    tags=[InputTag("mlflow.data.context", "training")]))
    if new:
        client.log_inputs(run_id, datasets=new)



def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def find_or_create_run(tracking_uri: str, experiment: str, run_name: str, *, params: dict[str, Any],
                       artifact_root: str | None = None, parent_run_id: str | None = None,
                       fresh: bool = False, tags: dict[str, str] | None = None,
                       config_yaml: str | None = None) -> str:
    """The MLflow run id of `run_name` in `experiment`, created (with params) if absent, RUNNING.

    A rerun of the same command finds the same run (tag `lfb_ray.run_name`), so a resumed
    training continues the same MLflow run: it is set RUNNING again and stays nested under the
    parent that created it (a run of none is nested under `parent_run_id`, the parent that runs it
    now; that parent lists a run it resumes, `TrackedRun.add_runs`). `fresh=True` always creates a new run.
    `artifact_root` is the artifact location of the experiment if this creates it
    (`artifact_location`). A training run (tag `lfb_ray.operator`) is shown in the MLflow UI under
    its role (`lfb_ray.runs.display_name`, e.g. `LFB-NL-378ea6131b`); it is found by `run_name`.
    """
    import ray
    import torch
    from mlflow.tracking import MlflowClient

    setup_mlflow_env(tracking_uri)
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment, artifact_location=artifact_root)
    if not fresh:
        runs = client.search_runs([exp_id], f"tags.`lfb_ray.run_name` = '{run_name}'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        if runs:
            run = runs[0]
            if run.info.status != "RUNNING":  # it runs again (a resume): FINISHED/FAILED/KILLED no more
                client.update_run(run.info.run_id, status="RUNNING")
            if parent_run_id and not run.data.tags.get("mlflow.parentRunId"):
                client.set_tag(run.info.run_id, "mlflow.parentRunId", parent_run_id)
            return run.info.run_id
    all_tags = {"lfb_ray.run_name": run_name, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    op = all_tags.get("lfb_ray.operator")
    run = client.create_run(exp_id, run_name=display_name(run_name, op) if op else run_name, tags=all_tags)
    safe = {k: redact_text(str(redact(k, v)))[:500] for k, v in params.items()}
    safe.update({"version.ray": ray.__version__, "version.torch": torch.__version__,
                 "version.python": sys.version.split()[0], "git_commit": _git_commit()})
    items = sorted(safe.items())
    from mlflow.entities import Param

    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
    if config_yaml:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "config.yaml")
            with open(path, "w") as f:
                f.write(config_yaml)
            client.log_artifact(run.info.run_id, path)
    return run.info.run_id

