"""Credentials never printed, raised or stored: storage errors, the pipeline's output and state,
the training driver's warnings, MLflow params and tags (issue 32)."""

from __future__ import annotations

import json
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import REPO

from lfb_ray.config import load_config, resolve_paths
from tests.helpers import fake_stages

SECRETS = ("AKIAEXAMPLE", "SECRETEXAMPLE", "pw@", "u:pw", "TOKENEXAMPLE")
S3 = "s3://AKIAEXAMPLE:SECRETEXAMPLE@bucket/x?endpoint_override=127.0.0.1:1"
TRACKING = "http://u:pw@127.0.0.1:5000"


def _clean(text: str, where: str) -> None:
    for s in SECRETS:
        assert s not in text, f"{s!r} in {where}: {text}"


def test_redact_text_hides_every_form_and_keeps_the_location():
    from lfb_ray.redaction import redact_text

    text = (f"{S3} {TRACKING} s3://b/p?Access_Key=AKIAEXAMPLE&SECRET_KEY=SECRETEXAMPLE&session_token=TOKENEXAMPLE "
            "https://h/p?token=TOKENEXAMPLE&password=SECRETEXAMPLE {'secret_key': 'SECRETEXAMPLE'}")
    out = redact_text(text)
    _clean(out, "redact_text")
    assert "s3://***:***@bucket/x?endpoint_override=127.0.0.1:1" in out and "http://***:***@127.0.0.1:5000" in out
    assert "Access_Key=***" in out and "session_token=***" in out
    assert redact_text("/data/ava/frames, 10:30 a=b") == "/data/ava/frames, 10:30 a=b"


def test_stripped_reference_gets_its_credentials_back_from_the_config():
    from lfb_ray.redaction import restore_credentials, strip_credentials

    model = "s3://AKIAEXAMPLE:SECRETEXAMPLE@bucket/x/run/checkpoint_000001/model.pt?endpoint_override=127.0.0.1:1"
    ref = strip_credentials(model)
    _clean(ref, "the reference")
    assert ref == "s3://bucket/x/run/checkpoint_000001/model.pt?endpoint_override=127.0.0.1:1"
    assert restore_credentials(ref, ["/local/workdir", S3]) == model
    q = "s3://bucket/x?access_key=AKIAEXAMPLE&secret_key=SECRETEXAMPLE"
    ref = strip_credentials("s3://bucket/x/m.pt?access_key=AKIAEXAMPLE&secret_key=SECRETEXAMPLE")
    assert ref == "s3://bucket/x/m.pt"
    assert restore_credentials(ref, [q]) == "s3://bucket/x/m.pt?access_key=AKIAEXAMPLE&secret_key=SECRETEXAMPLE"
    assert restore_credentials("s3://other/m.pt", [S3]) == "s3://other/m.pt"  # another bucket: not its keys


def test_storage_errors_carry_no_credentials(tmp_path, monkeypatch):
    import pyarrow.fs as pafs

    import lfb_ray.storage as storage

    with pytest.raises(storage.StorageError) as e:
        storage.resolve(S3 + "&not_an_option=1")  # pyarrow refuses it before any network access
    text = "".join(traceback.format_exception(e.value))  # the chained causes included
    _clean(text, "resolve's error")
    assert "s3://***:***@bucket/x" in str(e.value) and "not_an_option" in str(e.value)

    blocker = tmp_path / "a_file"  # a file where the folder would go (root writes anywhere else)
    blocker.write_text("x")
    monkeypatch.setattr(storage, "resolve", lambda uri: (pafs.LocalFileSystem(), str(blocker / "sub")))
    with pytest.raises(storage.StorageError) as e:
        storage.check_writable(S3)
    _clean("".join(traceback.format_exception(e.value)), "check_writable's error")
    assert "is not writable" in str(e.value)
    _clean(str(storage.StorageError(f"cannot read {S3}")), "a StorageError")


@pytest.fixture
def fake_s3_work(monkeypatch):
    """Prepare, fit, the bank, the checkpoints' identities and the comparison as fakes; fit's models
    are under train.storage_path (an S3 URI with credentials) as the real fit's are. Records the
    URIs the stages are given to open."""
    import lfb_ray.compare as compare
    import lfb_ray.identity as identity
    import lfb_ray.storage as storage
    import lfb_ray.tracking.lifecycle as lifecycle  # tracked_run looks find_or_create_run up there
    from lfb_ray.runs import run_name_for
    from lfb_ray.storage import join_uri

    opened: list[str] = []

    def fit(c, init_checkpoint=None, parent_run_id=None):
        c = resolve_paths(c)
        name = run_name_for(c, init_checkpoint, identity.run_inputs(c, init_checkpoint))
        model = join_uri(c.storage_path, name, "checkpoint_000001", "model.pt")
        csv = join_uri(c.storage_path, name, "val.csv")
        return SimpleNamespace(run_name=name, mlflow_run_id=None, model_path=model,
                               metrics={"val/mAP": 0.5, "val/csv": csv})

    def build_bank(cfg, checkpoint):
        opened.append(checkpoint)
        cfg = resolve_paths(cfg)
        Path(cfg.bank_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.bank_dir) / "build.json").write_text(json.dumps({"build_hash": "h"}))
        return fake_stages.bank_summary(cfg.bank_dir)

    def checkpoint_id(path):
        opened.append(path)
        return "ckpt"

    def file_sha256(path):
        opened.append(path)
        return "0" * 64

    def find_or_create_run(uri, *a, **k):  # what MLflow raises for a server that does not answer
        raise ConnectionError(f"Max retries exceeded with url: {uri}/api/2.0/mlflow/runs/create")

    fake_stages.install(monkeypatch, prepare=fake_stages.fake_prepare(), fit=fit, build_bank=build_bank)
    monkeypatch.setattr(storage, "file_sha256", file_sha256)
    monkeypatch.setattr(identity, "checkpoint_id", checkpoint_id)
    monkeypatch.setattr(compare, "compare", lambda *a, **k: ("table", []))
    monkeypatch.setattr(lifecycle, "find_or_create_run", find_or_create_run)
    return opened


def test_pipeline_prints_and_stores_no_credentials_yet_opens_with_them(
        synthetic_root, tmp_path, monkeypatch, fake_s3_work, capsys):
    from lfb_ray.pipeline import run_pipeline

    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        "workdir=runs/t", f"data.root={synthetic_root}", "tracking.enabled=true", f"tracking.tracking_uri={TRACKING}",
        f"train.storage_path={S3}", "model.init_backbone_from_baseline=true"])
    run_pipeline(cfg, operators=("nl",))
    out = capsys.readouterr()
    _clean(out.out + out.err, "the pipeline's output")
    assert "MLflow unavailable at http://***:***@127.0.0.1:5000" in out.out
    state_text = (tmp_path / "runs" / "t" / "pipeline.json").read_text()
    _clean(state_text, "pipeline.json")
    state = json.loads(state_text)
    assert state["baseline"]["result"]["model"].startswith("s3://bucket/x/")  # the reference
    # ...and what the stages open has the credentials back: the checkpoint, the bank's input, the CSVs.
    assert fake_s3_work and all(u.startswith("s3://AKIAEXAMPLE:SECRETEXAMPLE@bucket/x/") for u in fake_s3_work)

    # A rerun finds every stage up to date from the stored references, and still opens with credentials.
    fake_s3_work.clear()
    run_pipeline(cfg, operators=("nl",))
    out = capsys.readouterr()
    _clean(out.out + out.err, "the rerun's output")
    assert out.out.count("up to date, skipped") == 6
    assert all(u.startswith("s3://AKIAEXAMPLE:SECRETEXAMPLE@bucket/x/") for u in fake_s3_work)


def test_fit_warning_names_the_tracking_server_without_its_password(tmp_path, monkeypatch, capsys):
    import lfb_ray.identity as identity
    import lfb_ray.tracking.lifecycle as lifecycle  # tracked_run looks find_or_create_run up there
    import lfb_ray.train.driver as driver

    def find_or_create_run(uri, *a, **k):
        raise ConnectionError(f"Max retries exceeded with url: {uri}/api/2.0/mlflow/runs/create")

    monkeypatch.setattr(lifecycle, "find_or_create_run", find_or_create_run)
    monkeypatch.setattr(identity, "run_inputs", lambda cfg, init=None: {"prepared": "p"})
    monkeypatch.setattr(driver, "_fit_run", lambda cfg, **k: "ran")
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"workdir={tmp_path}", "tracking.enabled=true",
                                                       f"tracking.tracking_uri={TRACKING}"])
    assert driver.fit(cfg) == "ran"
    out = capsys.readouterr()
    _clean(out.out + out.err, "fit's output")
    assert "MLflow unavailable at http://***:***@127.0.0.1:5000" in out.out
    _clean(driver._error_text(ValueError(S3)), "a failed run's error (printed, in FitManyError)")


def test_mlflow_params_and_error_tags_hold_no_credentials(tmp_path):
    from mlflow.tracking import MlflowClient

    from lfb_ray.config import flatten_config
    from lfb_ray.storage import StorageError, resolve
    from lfb_ray.tracking import close_parent_run, find_or_create_run

    store = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        f"workdir={tmp_path}", f"tracking.tracking_uri={TRACKING}", f"train.storage_path={S3}",
        "data.root=s3://bucket/ava?access_key=AKIAEXAMPLE&secret_key=SECRETEXAMPLE&session_token=TOKENEXAMPLE"])
    run = find_or_create_run(store, "e", "r", params=flatten_config(cfg), artifact_root=(tmp_path / "a").as_uri())
    parent = find_or_create_run(store, "e", "p", params={}, artifact_root=(tmp_path / "a").as_uri(), fresh=True)
    try:
        resolve(S3 + "&not_an_option=1")  # a pipeline that stops on a storage error
    except StorageError as e:
        close_parent_run(store, parent, e)
    client = MlflowClient(store)
    params = client.get_run(run).data.params
    _clean(json.dumps(params), "MLflow params")
    assert params["train.storage_path"].startswith("s3://***:***@bucket/x")
    assert params["tracking.tracking_uri"] == "http://***:***@127.0.0.1:5000"
    tags = client.get_run(parent).data.tags
    assert "lfb_ray.error" in tags
    _clean(json.dumps(tags), "MLflow tags")


def test_a_jobs_uncaught_error_prints_no_credentials(capsys):
    """Every job calls `base_parser`, which installs the redacting `sys.excepthook`."""
    import sys

    from lfb_ray.cli import base_parser

    old = sys.excepthook
    try:
        base_parser("a job")
        try:
            raise ValueError(f"cannot read {S3} (via {TRACKING})")
        except ValueError as e:
            sys.excepthook(type(e), e, e.__traceback__)
    finally:
        sys.excepthook = old
    err = capsys.readouterr().err
    _clean(err, "the traceback")
    assert "ValueError: cannot read s3://***:***@bucket/x" in err
