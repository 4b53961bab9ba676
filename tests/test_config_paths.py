"""Path keys of a config: `resolve_paths` is called at every entry point (sometimes twice in a row),
so a resolved config must resolve to itself, from any directory."""

from pathlib import Path

from lfb_ray.config import PATH_KEYS, load_config, path_values, resolve_paths, unresolve_paths

GIVEN = ["workdir=runs/t", "data.root=data/../data/synthetic", "data.prepared_dir=", "bank.path=bank",
         "bank.checkpoint=ckpt/model.pt", "model.pretrained=w.pth", "train.storage_path=s3://bucket/x"]


def test_resolve_paths_is_idempotent_from_any_directory(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a")
    monkeypatch.chdir(tmp_path / "link")  # a symlinked working directory: resolved paths name the target
    cfg = load_config(None, GIVEN)
    once = resolve_paths(cfg)
    values = path_values(once)
    assert set(values) == set(PATH_KEYS)
    assert values["workdir"] == str(tmp_path / "a" / "runs" / "t")
    assert values["data.root"] == str(tmp_path / "a" / "data" / "synthetic")
    assert values["data.prepared_dir"] == "" and values["train.storage_path"] == "s3://bucket/x"
    assert all(not v or v.startswith("s3://") or Path(v).is_absolute() for v in values.values())
    assert resolve_paths(once) == once
    monkeypatch.chdir(tmp_path / "b")
    assert resolve_paths(once) == once  # elsewhere, too: nothing is resolved against the new directory


def test_unresolve_paths_gives_back_the_paths_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, [g for g in GIVEN if not g.startswith("data.root=")] + ["data.root=data/synthetic"])
    assert unresolve_paths(resolve_paths(cfg)) == cfg
    assert unresolve_paths(resolve_paths(resolve_paths(cfg))) == cfg
