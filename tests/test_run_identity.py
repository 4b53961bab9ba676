"""Run identity: names and stage keys from what a run is (config as given + content of its inputs),
not from where it runs.

The pipeline tests here replace the expensive work (prepare's decoding, training, the bank's forward
passes) with fakes that write what the real stages commit (the prepared manifest, a model file, the
bank's build marker), so the stage-key logic is checked in seconds and without Ray.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import REPO

from lfb_ray.config import load_config, resolve_paths, unresolve_paths
from tests.helpers import fake_stages


def _name(config: str, *overrides: str, inputs=None) -> str:
    from lfb_ray.runs import run_name_for

    return run_name_for(resolve_paths(load_config(REPO / "configs" / config, list(overrides))), inputs=inputs)


def test_the_same_command_names_the_same_run_from_any_directory(tmp_path, monkeypatch):
    """configs/lfb_nl.yaml with train.storage_path on S3 (docs/cluster.md's submission) gave
    nl-1cbe7c29d7 from one directory and nl-80da09f71f from another: a resubmission started over."""
    names = set()
    for d in ("a", "b/c"):
        (tmp_path / d).mkdir(parents=True)
        monkeypatch.chdir(tmp_path / d)
        names.add(_name("lfb_nl.yaml", "train.storage_path=s3://b/ray"))
    assert len(names) == 1


def test_paths_as_given_round_trip(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO / "configs" / "lfb_nl.yaml", ["bank.path=s3://bk/bank", "data.root=/mnt/ava"])
    assert unresolve_paths(resolve_paths(cfg)) == cfg


def test_inputs_are_part_of_the_name():
    a = _name("lfb_nl.yaml", inputs={"prepared": "p1", "bank": "b1"})
    assert a == _name("lfb_nl.yaml", inputs={"prepared": "p1", "bank": "b1"})
    assert a != _name("lfb_nl.yaml", inputs={"prepared": "p1", "bank": "b2"})
    assert a != _name("lfb_nl.yaml", inputs={"prepared": "p2", "bank": "b1"})


def _manifest(root: Path, videos: list[tuple[str, str, str]]) -> None:
    from lfb_ray.data.schema import SCHEMA_VERSION

    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps({
        "schema_version": SCHEMA_VERSION, "settings": {"short_side": 320}, "created": "now",
        "videos": [{"split": s, "video_id": v, "hash": h, "rows": 3, "bytes": 10,
                    "files": [f"{s}/{v}/frames.arrow"]} for s, v, h in videos]}))


def test_identities_follow_content(tmp_path):
    from lfb_ray.identity import InputError, bank_id, checkpoint_id, describe_changes, prepared_id

    _manifest(tmp_path / "p", [("train", "v1", "h1"), ("val", "v2", "h2")])
    first = prepared_id(str(tmp_path / "p"))
    (tmp_path / "p" / "manifest.json").write_text(
        (tmp_path / "p" / "manifest.json").read_text().replace('"now"', '"later"'))
    assert prepared_id(str(tmp_path / "p")) == first  # its creation time is not its content
    _manifest(tmp_path / "p", [("train", "v1", "h1"), ("val", "v2", "h3")])
    assert prepared_id(str(tmp_path / "p")) != first
    with pytest.raises(InputError, match="prepare"):
        prepared_id(str(tmp_path / "nothing"))

    ck = tmp_path / "model.pt"
    ck.write_bytes(b"weights-1")
    c1 = checkpoint_id(str(ck))
    ck.write_bytes(b"weights-2")
    os.utime(ck, ns=(1, 1))
    assert checkpoint_id(str(ck)) != c1
    with pytest.raises(InputError, match="does not exist"):
        checkpoint_id(str(tmp_path / "missing.pt"))

    (tmp_path / "bank").mkdir()
    (tmp_path / "bank" / "build.json").write_text(json.dumps({"build_hash": "abc"}))
    assert bank_id(str(tmp_path / "bank")) == "abc"
    with pytest.raises(InputError, match="feature bank"):
        bank_id(str(tmp_path / "nobank"))
    assert describe_changes({"prepared": "a", "bank": "b"}, {"prepared": "a", "bank": "c"}) == \
        "the feature bank changed (b -> c)"
    assert describe_changes(None, {"bank": "c"}) is None



def test_the_prepared_identity_is_stable_across_versions(tmp_path):
    """Run names and the pipeline's stage keys hash `prepared_id`: a change of its formula (here when
    it moved to `data.prep.prepared_data_id`) would make every existing run and bank look stale."""
    from lfb_ray.data.prep import prepared_data_id
    from lfb_ray.identity import prepared_id

    _manifest(tmp_path / "p", [("train", "v1", "h1"), ("val", "v2", "h2")])
    assert prepared_id(str(tmp_path / "p")) == prepared_data_id(str(tmp_path / "p")) == "c25585bd87b19d5e"

def test_the_bank_build_id_depends_on_the_prepared_data(tmp_path):
    """A bank built before a video was re-prepared was returned as complete (its build marker did
    not depend on the prepared data)."""
    from lfb_ray.bank.build import build_identity

    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"workdir={tmp_path}"])
    _manifest(tmp_path / "prepared", [("train", "v1", "h1")])
    _, one = build_identity(cfg, "sha")
    _manifest(tmp_path / "prepared", [("train", "v1", "h2")])
    _, two = build_identity(cfg, "sha")
    assert one != two
    assert build_identity(cfg, "sha")[1] == two
    assert build_identity(cfg, "other")[1] != two


# --- the pipeline's stages with fake work ----------------------------------------------------------


@pytest.fixture
def fake_work(monkeypatch):
    """Replace prepare, fit, fit_many and build_bank by fakes that commit what the real ones do."""
    import lfb_ray.bank.build as build
    import lfb_ray.storage as storage
    from lfb_ray.identity import run_inputs
    from lfb_ray.runs import run_name_for

    calls: list[str] = []

    def fit(c, init_checkpoint=None, parent_run_id=None):
        c = resolve_paths(c)
        name = run_name_for(c, init_checkpoint, run_inputs(c, init_checkpoint))
        calls.append(f"fit {c.model.fbo}")
        model = Path(c.workdir) / "models" / f"{name}.pt"
        model.parent.mkdir(parents=True, exist_ok=True)
        model.write_bytes(name.encode())
        return SimpleNamespace(run_name=name, mlflow_run_id=None, model_path=str(model), metrics={"val/mAP": 0.5})

    def build_bank(cfg, checkpoint):
        calls.append("bank")
        cfg = resolve_paths(cfg)
        _, h = build.build_identity(cfg, storage.file_sha256(checkpoint))
        Path(cfg.bank_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.bank_dir) / "build.json").write_text(json.dumps({"build_hash": h}))
        return fake_stages.bank_summary(cfg.bank_dir)

    fake_stages.install(monkeypatch, prepare=fake_stages.fake_prepare(calls), fit=fit, build_bank=build_bank)
    return calls


def _pipeline(*overrides: str):
    from lfb_ray.pipeline import run_pipeline

    cfg = load_config(REPO / "configs" / "tiny.yaml", ["workdir=runs/t", "data.root=data", "tracking.enabled=false",
                                                       "model.init_backbone_from_baseline=true", *overrides])
    return run_pipeline(cfg, operators=("nl",))


def test_a_moved_project_resumes_and_a_reprepared_video_rebuilds_what_depends_on_it(
        synthetic_root, tmp_path, monkeypatch, fake_work, capsys):
    a = tmp_path / "a"
    a.mkdir()
    shutil.copytree(synthetic_root, a / "data")  # copy2: sizes and mtimes kept
    monkeypatch.chdir(a)
    _pipeline()
    assert fake_work == ["prepare", "fit none", "bank", "fit nl", "fit none"]

    # The same project from another directory (another package-cache folder, a retry cluster):
    # relative paths now resolve elsewhere, yet every stage is the same stage.
    shutil.copytree(a, tmp_path / "b", symlinks=True)
    monkeypatch.chdir(tmp_path / "b")
    fake_work.clear()
    capsys.readouterr()
    _pipeline()
    assert fake_work == []
    assert capsys.readouterr().out.count("up to date, skipped") == 5

    # One video changes on disk: prepare, the baseline, the bank and the LFB runs are redone, and
    # the log says which input changed.
    video = next((tmp_path / "b" / "data" / "videos").iterdir())
    os.utime(video, (1_000_000_000, 1_000_000_000))
    _pipeline()
    assert fake_work == ["prepare", "fit none", "bank", "fit nl", "fit none"]
    out = capsys.readouterr().out
    assert "[pipeline] baseline: running again: the prepared data changed" in out
    assert "[pipeline] bank: running again: the baseline checkpoint changed" in out
    assert "the prepared data changed" in out.split("[pipeline] bank:")[1]
    assert "[pipeline] operators: running again: the feature bank changed" in out
