"""Config schema: every shipped YAML loads, overrides are typed, errors name the key."""

from pathlib import Path

import pytest

from lfb_ray.config import Config, ConfigError, config_from_dict, config_to_dict, flatten_config, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_is_complete(path):
    import yaml

    cfg = load_config(path)
    assert isinstance(cfg, Config)
    raw = yaml.safe_load(path.read_text())
    # flat and complete: the file lists every field of every section
    assert raw == config_to_dict(cfg)


def test_operator_configs_differ_only_in_operator():
    a, b, c = (flatten_config(load_config(f"configs/lfb_{op}.yaml")) for op in ("nl", "avg", "max"))
    for other in (b, c):
        diff = {k for k in a if a[k] != other[k]}
        assert diff == {"model.fbo"}
    assert a["model.depth"] == 50 and a["model.base_channels"] == 64
    assert a["train.base_lr"] == 0.15 and a["train.reference_batch"] == 96 and a["train.epochs"] == 20
    assert a["bank.window_seconds"] == 60 and a["bank.max_feats_per_second"] == 5


def test_head_width_follows_operator():
    from lfb_ray.models import build_detector

    widths = {}
    for op in ("none", "nl", "avg", "max"):
        m = build_detector(load_config("configs/tiny.yaml", [f"model.fbo={op}"]).model)
        fc = [mod for mod in m.modules() if mod.__class__.__name__ == "Linear"][-1]
        widths[op] = fc.in_features
    c = 8 * 8  # tiny: depth 18, base 8 -> 64-d features
    assert widths == {"none": c, "nl": c + 16, "avg": 2 * c, "max": 2 * c}


def test_dotted_overrides_are_typed():
    cfg = load_config("configs/tiny.yaml", ["train.epochs=3", "model.fbo=avg", "data.train_scale_range=[120,128]",
                                            "train.lr_steps=[2]"])
    assert cfg.train.epochs == 3 and cfg.model.fbo == "avg"
    assert cfg.data.train_scale_range == (120, 128) and cfg.train.lr_steps == (2,)
    assert isinstance(cfg.train.base_lr, float)


@pytest.mark.parametrize("override,needle", [
    ("train.epochs=two", "train.epochs: expected an integer"),
    ("model.fbo=mean", "model.fbo: 'mean' is not allowed; allowed values: 'none', 'nl', 'avg', 'max'"),
    ("train.epoch=3", "unknown key(s) train.epoch"),
    ("nosection.x=1", "unknown key(s) nosection"),
    ("data.temporal_jitter=3", "data.temporal_jitter: expected true/false"),
    ("model.depth=152", "model.depth: 152 is not allowed"),
    ("train.lr_steps=[15,10]", "lr_steps must be increasing"),
    ("cluster.num_workers=0", "cluster.num_workers must be >= 1"),
    ("train.finetune_lr_scale=0", "train.finetune_lr_scale must be > 0"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny.yaml", [override])
    assert needle in str(e.value)
    assert "tiny.yaml" in str(e.value)


def test_unknown_key_in_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  fbo: nl\n  widht: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) model.widht .*allowed: depth"):
        load_config(p)


def test_round_trip_through_plain_dict():
    cfg = load_config("configs/synthetic.yaml")
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_derived_paths(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(None, [f"workdir={tmp_path}"])
    assert cfg.prepared_dir == f"{tmp_path}/prepared" and cfg.bank_dir == f"{tmp_path}/bank"
    assert cfg.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert cfg.tracking_uri == "http://127.0.0.1:5000"
    assert cfg.data_path("a/b.csv") == "data/synthetic/a/b.csv" and cfg.data_path("/abs") == "/abs"



def test_derived_paths_of_a_uri_workdir(monkeypatch):
    """A workdir on S3: the derived locations are URIs under it (options kept at the end), and there
    is no default local MLflow store; a node-local store is refused (its artifacts go to the workdir)."""
    from lfb_ray.train.driver import check_tracking_store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    work = "s3://key:secret@bucket/run?endpoint_override=127.0.0.1:9000&scheme=http"
    cfg = load_config(None, [f"workdir={work}"])
    opts = "?endpoint_override=127.0.0.1:9000&scheme=http"
    assert cfg.prepared_dir == "s3://key:secret@bucket/run/prepared" + opts
    assert cfg.bank_dir == "s3://key:secret@bucket/run/bank" + opts
    assert cfg.storage_path == "s3://key:secret@bucket/run/ray_results" + opts
    with pytest.raises(ConfigError, match="set tracking.tracking_uri") as e:
        cfg.tracking_uri  # noqa: B018
    assert "secret" not in str(e.value)
    with pytest.raises(ConfigError, match="store on this machine's disk"):
        check_tracking_store(load_config(None, [f"workdir={work}", "tracking.tracking_uri=sqlite:////tmp/x.db"]))
    check_tracking_store(load_config(None, [f"workdir={work}", "tracking.tracking_uri=http://127.0.0.1:5000"]))
    check_tracking_store(load_config(None, [f"workdir={work}", "tracking.enabled=false"]))

def test_short_side_below_the_largest_train_scale_is_refused():
    """Frames stored smaller than training rescales them would be upsampled at every step."""
    with pytest.raises(ConfigError, match=r"data.short_side \(256\) < max\(data.train_scale_range\) \(320\)"):
        load_config("configs/baseline.yaml", ["data.short_side=256"])
    assert load_config("configs/baseline.yaml").data.short_side == 320


def test_the_class_counts_of_data_and_model_must_agree():
    with pytest.raises(ConfigError, match=r"data.num_classes=60 and model.num_classes=81 differ"):
        load_config(None, ["data.num_classes=60"])
    assert load_config(None, ["data.num_classes=60", "model.num_classes=60"]).model.num_classes == 60
