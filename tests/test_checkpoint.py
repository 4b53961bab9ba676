"""Checkpoint I/O: mmaction2 key mapping round trip, strict errors, backbone-only loads,
safe reading (metadata dropped, hostile pickles refused and not executed), conversion job."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from lfb_ray.config import ModelConfig
from lfb_ray.models.checkpoint import (
    FORMAT,
    CheckpointError,
    infer_model_config,
    load_checkpoint,
    load_mmaction2_state_dict,
    read_checkpoint_file,
    to_mmaction2_state_dict,
)
from lfb_ray.models.detector import LFBDetector, build_detector

REPO = Path(__file__).resolve().parents[1]
KEYS_FILE = REPO / "tests" / "data" / "mmaction2_state_dict_keys.txt"  # also read by test_backbone.py
SMALL = ModelConfig(depth=18, base_channels=8, fbo="nl", latent_channels=16)
CLIPS = torch.randn(2, 3, 2, 32, 32, generator=torch.Generator().manual_seed(1))
ROIS = torch.tensor([[0, 0.0, 0.0, 20.0, 30.0], [1, 5.0, 5.0, 31.0, 31.0]])
LT = torch.rand(2, 6, 64, generator=torch.Generator().manual_seed(2))


def model(cfg: ModelConfig = SMALL, seed: int = 0) -> LFBDetector:
    torch.manual_seed(seed)
    m = build_detector(cfg)
    with torch.no_grad():  # BN statistics and zero-init gammas would hide mapping mistakes
        for name, t in m.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if "running_var" in name else torch.randn_like(t) * 0.1)
    return m.eval()


def outputs(m: LFBDetector) -> torch.Tensor:
    with torch.no_grad():
        return m(CLIPS, ROIS, LT if m.fbo is not None else None)


def mmaction2_keys(*sections: str) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the named sections of the reference list, with the given prefixes."""
    wanted = dict(sections)
    out, prefix = {}, None
    for line in KEYS_FILE.read_text().splitlines():
        if line.startswith("#"):
            header = line.lstrip("# ").strip()
            prefix = wanted.pop(header, None) if header in wanted else None
        elif "\t" in line and prefix is not None:
            key, shape, _ = line.split("\t")
            out[prefix + key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return out


def test_r50_nl_mapping_equals_mmaction2_key_list() -> None:
    with torch.device("meta"):
        nl = build_detector(ModelConfig(fbo="nl"))
    ours = {k: tuple(v.shape) for k, v in to_mmaction2_state_dict(nl).items()}
    theirs = mmaction2_keys(
        ("ResNet3dSlowOnly(depth=50) state_dict", "backbone."),
        ("FBOHead(fbo_cfg.type='non_local') state_dict (FBOHead.lfb is not an nn.Module -> no keys)",
         "roi_head.shared_head."),
        ("BBoxHeadAVA state_dict", "roi_head.bbox_head."),  # first BBoxHeadAVA section: 2560
    )
    assert theirs["roi_head.bbox_head.fc_cls.weight"] == (81, 2560)
    assert ours == theirs


def test_round_trip_all_operators() -> None:
    for fbo in ("none", "nl", "avg", "max"):
        cfg = ModelConfig(depth=18, base_channels=8, fbo=fbo, latent_channels=16)
        src, dst = model(cfg, seed=0), model(cfg, seed=1)
        sd = to_mmaction2_state_dict(src)
        assert all(k.startswith(("backbone.", "roi_head.shared_head.fbo.", "roi_head.bbox_head.fc_cls."))
                   for k in sd)
        load_mmaction2_state_dict(dst, sd)
        for k, v in src.state_dict().items():
            assert torch.equal(dst.state_dict()[k], v), k
        if fbo == "nl":  # same weights, same outputs (and they differed before the load)
            assert not torch.equal(outputs(model(cfg, seed=1)), outputs(src))
            torch.testing.assert_close(outputs(dst), outputs(src), rtol=0, atol=0)


def test_wrapper_and_module_prefix() -> None:
    src, dst = model(), model(seed=1)
    wrapped = {"state_dict": {"module." + k: v for k, v in to_mmaction2_state_dict(src).items()},
               "meta": {"epoch": 20}}
    load_mmaction2_state_dict(dst, wrapped)
    torch.testing.assert_close(outputs(dst), outputs(src), rtol=0, atol=0)


def test_strict_errors_list_keys() -> None:
    sd = to_mmaction2_state_dict(model())
    del sd["backbone.layer2.0.conv1.bn.running_mean"]
    sd["roi_head.shared_head.fbo.extra.weight"] = torch.zeros(1)
    sd["roi_head.bbox_head.fc_cls.weight"] = torch.zeros(81, 999)
    with pytest.raises(CheckpointError) as info:
        load_mmaction2_state_dict(model(seed=1), sd)
    err = info.value
    assert err.missing == ["backbone.layer2.0.conv1.bn.running_mean"]
    assert err.unexpected == ["fbo.extra.weight"]
    assert err.mismatched == [("fc_cls.weight", (81, 999), (81, 80))]
    for text in ("backbone.layer2.0.conv1.bn.running_mean", "fbo.extra.weight", "fc_cls.weight", "999"):
        assert text in str(err)
    # An NL checkpoint does not fit a max model: unexpected FBO keys and fc width.
    with pytest.raises(CheckpointError, match="non_local_layer_1"):
        load_mmaction2_state_dict(model(ModelConfig(depth=18, base_channels=8, fbo="max")),
                                  to_mmaction2_state_dict(model()))


def test_kinetics_backbone_only() -> None:
    src, dst = model(seed=0), model(seed=1)
    kinetics = {k: v for k, v in to_mmaction2_state_dict(src).items() if k.startswith("backbone.")}
    kinetics["cls_head.fc_cls.weight"] = torch.zeros(400, 64)
    kinetics["cls_head.fc_cls.bias"] = torch.zeros(400)
    head_before = {k: v.clone() for k, v in dst.state_dict().items() if not k.startswith("backbone.")}
    load_mmaction2_state_dict(dst, kinetics)
    for k, v in dst.state_dict().items():
        want = src.state_dict()[k] if k.startswith("backbone.") else head_before[k]
        assert torch.equal(v, want), k
    del kinetics["backbone.conv1.conv.weight"]
    with pytest.raises(CheckpointError, match="backbone.conv1.conv.weight"):
        load_mmaction2_state_dict(model(), kinetics)
    with pytest.raises(CheckpointError, match="missing keys"):  # forcing a full load fails
        load_mmaction2_state_dict(model(), {k: v for k, v in kinetics.items()}, backbone_only=False)


def _fake_module(monkeypatch: pytest.MonkeyPatch, name: str) -> types.ModuleType:
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    return sys.modules[name]


def test_reads_mmengine_metadata_without_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mod = _fake_module(monkeypatch, "mmengine.logging.history_buffer")

    class HistoryBuffer:
        def __init__(self) -> None:
            self._log_history = np.arange(3.0)

    HistoryBuffer.__module__, HistoryBuffer.__qualname__ = mod.__name__, "HistoryBuffer"
    mod.HistoryBuffer = HistoryBuffer
    src = model()
    path = tmp_path / "lfb_nl.pth"
    torch.save({"state_dict": to_mmaction2_state_dict(src),
                "meta": {"message_hub": {"loss": HistoryBuffer()}, "lr": np.float64(0.15), "epoch": 20}}, path)
    for key in [k for k in sys.modules if k.startswith("mmengine")]:
        monkeypatch.delitem(sys.modules, key)
    with pytest.raises(Exception):  # noqa: B017  the plain weights-only load refuses it
        torch.load(path, weights_only=True)
    sd = read_checkpoint_file(path)
    assert set(sd) == set(to_mmaction2_state_dict(src))
    dst = model(seed=1)
    assert load_checkpoint(dst, path) == "mmaction2"
    torch.testing.assert_close(outputs(dst), outputs(src), rtol=0, atol=0)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("zip_format", [True, False])
def test_hostile_checkpoint_refused_not_executed(tmp_path: Path, zip_format: bool) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"backbone.x": torch.zeros(1)}, "meta": _Evil(marker)}, path,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError, match="system|refused"):
        read_checkpoint_file(path)
    with pytest.raises(CheckpointError):
        load_checkpoint(model(), path)
    assert not marker.exists()


def test_metadata_namespace_globals_are_never_called(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "called"
    mod = _fake_module(monkeypatch, "mmengine.evil")

    def touch(p: str) -> None:
        Path(p).touch()

    touch.__module__, touch.__qualname__ = mod.__name__, "touch"
    mod.touch = touch

    class Payload:
        def __reduce__(self):
            return touch, (str(marker),)

    path = tmp_path / "sneaky.pth"
    torch.save({"state_dict": {"backbone.x": torch.ones(2)}, "meta": Payload()}, path)
    assert torch.equal(read_checkpoint_file(path)["backbone.x"], torch.ones(2))  # module still importable
    assert not marker.exists()


def test_infer_model_config() -> None:
    for cfg in (SMALL, ModelConfig(depth=18, base_channels=8, fbo="none"),
                ModelConfig(depth=34, base_channels=4, fbo="avg", num_nl_layers=2)):
        with torch.device("meta"):
            sd = to_mmaction2_state_dict(build_detector(cfg))
        assert infer_model_config(sd) == cfg
    with torch.device("meta"):
        assert infer_model_config(to_mmaction2_state_dict(build_detector(ModelConfig(depth=101, fbo="nl")))) \
            == ModelConfig(depth=101, fbo="nl")


def test_convert_checkpoint_job(tmp_path: Path) -> None:
    src = model()
    in_path, out_path, cfg_path = tmp_path / "in.pth", tmp_path / "out" / "lfb.pt", tmp_path / "tiny.yaml"
    torch.save({"state_dict": to_mmaction2_state_dict(src), "meta": {"epoch": 3}}, in_path)
    cfg_path.write_text("model:\n  depth: 18\n  base_channels: 8\n  fbo: nl\n  latent_channels: 16\n")
    proc = subprocess.run([sys.executable, "jobs/convert_checkpoint.py", str(in_path), str(out_path),
                           "--config", str(cfg_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    payload = torch.load(out_path, weights_only=True)
    assert payload["format"] == FORMAT and payload["source"] == str(in_path)
    assert set(payload["model"]) == set(src.state_dict())
    assert list(out_path.parent.iterdir()) == [out_path]  # no temp file left
    dst = model(seed=1)
    assert load_checkpoint(dst, out_path) == FORMAT
    torch.testing.assert_close(outputs(dst), outputs(src), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["lfb_ray", "mmaction2"])
def test_baseline_backbone_into_an_lfb_model(tmp_path: Path, fmt: str) -> None:
    """`init_backbone_from_baseline`: the baseline's backbone loads into an NL model (head differs)."""
    from lfb_ray.models import save_checkpoint

    base = model(ModelConfig(depth=18, base_channels=8, fbo="none"), seed=0)
    path = tmp_path / "base.pt"
    if fmt == "lfb_ray":
        save_checkpoint(base.state_dict(), path)
    else:
        torch.save({"state_dict": to_mmaction2_state_dict(base)}, path)
    lfb = model(SMALL, seed=1)
    fbo_before = {k: v.clone() for k, v in lfb.state_dict().items() if not k.startswith("backbone.")}
    with pytest.raises(CheckpointError):  # whole-detector load: the heads do not fit
        load_checkpoint(model(SMALL, seed=1), path)
    assert load_checkpoint(lfb, path, backbone_only=True).endswith("backbone")
    for k, v in lfb.state_dict().items():
        if k.startswith("backbone."):
            assert torch.equal(v, base.state_dict()[k]), k
        else:
            assert torch.equal(v, fbo_before[k]), k


def _meta(cfg, **kw):
    from lfb_ray.config import config_to_dict
    from lfb_ray.models.card import CheckpointMeta

    args = dict(operator=cfg.model.fbo, epoch=3, global_step=12, selected_on="best val mAP", val_map=0.25,
                config=config_to_dict(cfg), inputs={"prepared": "p1", "bank": "b1", "init": "c1"},
                init_checkpoint="/runs/base/model.pt", run_name="nl-abc", mlflow_run_id="r1",
                code={"lfb_ray": "0.1.0", "git": "deadbeef"})
    args.update(kw)
    return CheckpointMeta(**args)


def test_a_checkpoint_says_what_it_is_and_refuses_another_model(tmp_path):
    """model.pt carries a CheckpointMeta (plain data, read with weights_only=True): its config,
    operator, epoch, the mAP it was selected on, the ids of its inputs and the code version. A model
    of another operator (avg vs max: same weights) or shape is refused, naming both."""
    import dataclasses

    from lfb_ray.config import load_config
    from lfb_ray.models import build_detector
    from lfb_ray.models.checkpoint import CheckpointError, load_checkpoint, read_meta, save_checkpoint

    avg = load_config(REPO / "configs" / "tiny.yaml", ["model.fbo=avg"])
    path = tmp_path / "avg.pt"
    save_checkpoint(build_detector(avg.model).state_dict(), path, source="lfb_ray avg epoch 3", meta=_meta(avg))
    meta = read_meta(path)
    assert meta == _meta(avg) and meta.to_config() == avg
    assert "LFB-avg, epoch 3 (best val mAP, val mAP 0.2500), run nl-abc" in meta.describe()
    assert load_checkpoint(build_detector(avg.model), path, expect=avg.model) == "lfb_ray/v1"
    mx = dataclasses.replace(avg.model, fbo="max")
    with pytest.raises(CheckpointError, match=r"holds a model.fbo=avg .* asks for model.fbo=max"):
        load_checkpoint(build_detector(mx), path, expect=mx)
    deep = dataclasses.replace(avg.model, depth=34)
    with pytest.raises(CheckpointError, match=r"model.depth=18 .* asks for .*model.depth=34"):
        load_checkpoint(build_detector(deep), path, expect=deep)
    # The backbone alone goes into any operator's model (an LFB run starts from the baseline's).
    load_checkpoint(build_detector(mx), path, backbone_only=True, expect=mx)


def test_old_weight_only_files_load_with_a_warning_and_foreign_meta_is_ignored(tmp_path):
    from lfb_ray.config import load_config
    from lfb_ray.models import build_detector, to_mmaction2_state_dict
    from lfb_ray.models.checkpoint import load_checkpoint, read_meta, save_checkpoint

    cfg = load_config(REPO / "configs" / "tiny.yaml", ["model.fbo=none"])
    model = build_detector(cfg.model)
    old = tmp_path / "old.pt"
    save_checkpoint(model.state_dict(), old, source="lfb_ray none epoch 2")  # as lfb_ray wrote it before
    assert read_meta(old) is None
    with pytest.warns(UserWarning, match="holds weights only"):
        load_checkpoint(build_detector(cfg.model), old, expect=cfg.model)
    mm = tmp_path / "mm.pth"  # mmaction2's own `meta` (mmengine) is not ours
    torch.save({"state_dict": to_mmaction2_state_dict(model), "meta": {"epoch": 20}}, mm)
    assert read_meta(mm) is None


def test_jobs_take_the_config_from_the_checkpoint(tmp_path, capsys):
    """evaluate/visualize need only --checkpoint when it carries its config; one without says to pass --config."""
    from lfb_ray.cli import config_of_checkpoint
    from lfb_ray.config import ConfigError, load_config
    from lfb_ray.evaluate_cli import main
    from lfb_ray.models import build_detector
    from lfb_ray.models.checkpoint import save_checkpoint

    cfg = load_config(REPO / "configs" / "tiny.yaml", ["model.fbo=none"])
    path = tmp_path / "model.pt"
    save_checkpoint(build_detector(cfg.model).state_dict(), path, meta=_meta(cfg))
    assert config_of_checkpoint(str(path)) == cfg
    assert config_of_checkpoint(str(tmp_path), ["eval.batch_size=3"]).eval.batch_size == 3  # a checkpoint folder
    old = tmp_path / "old" / "m.pt"
    save_checkpoint(build_detector(cfg.model).state_dict(), old)
    with pytest.raises(ConfigError, match="holds no config"):
        config_of_checkpoint(str(old))
    assert main(["--checkpoint", str(old)]) == 1
    err = capsys.readouterr().err
    assert "holds no config" in err and "pass --config" in err
