"""jobs/evaluate.py: CSV files in, table and JSON out; result CSV writer round trip."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lfb_ray.data.annotations import read_annotation_rows, read_exclusions, read_label_map
from lfb_ray.evaluate_cli import main
from lfb_ray.evaluation import build_result_rows, evaluate_frame_map, read_results_csv, write_results_csv

REPO = Path(__file__).resolve().parents[1]
PBTXT = 'item {\n  name: "bend/bow (at the waist)"\n  id: 1\n}\nitem {\n  name: "crawl"\n  id: 2\n}\n' \
        'item {\n  name: "fight/hit (a person)"\n  id: 64\n}\n'
GT = ("vid_a,0902,0.1,0.1,0.4,0.4,1,0\n"
      "vid_a,0902,0.1,0.1,0.4,0.4,64,0\n"
      "vid_a,0903,0.5,0.5,0.9,0.9,2,1\n"
      "vid_b,0902,0.2,0.2,0.6,0.6,1,0\n")
PRED = ("vid_a,902,0.1,0.1,0.4,0.4,1,0.9\n"
        "vid_a,902,0.1,0.1,0.4,0.4,64,0.8\n"
        "vid_b,902,0.5,0.5,0.9,0.9,1,0.95\n"  # FP ranked above the vid_a TP
        "vid_a,903,0.5,0.5,0.9,0.9,2,0.7\n")


@pytest.fixture
def files(tmp_path):
    paths = {}
    for name, text in (("map.pbtxt", PBTXT), ("gt.csv", GT), ("pred.csv", PRED), ("excl.csv", "vid_a,0903\n")):
        paths[name] = tmp_path / name
        paths[name].write_text(text)
    return paths


def _args(files, tmp_path, *extra):
    return ["--gt", str(files["gt.csv"]), "--pred", str(files["pred.csv"]), "--label-map", str(files["map.pbtxt"]),
            "--json", str(tmp_path / "out" / "metrics.json"), *extra]


def test_main_prints_table_and_writes_json(files, tmp_path, capsys):
    assert main(_args(files, tmp_path)) == 0
    out = capsys.readouterr().out
    assert "bend/bow (at the waist)" in out and "person_interaction" in out and "mAP@0.5IOU (official)" in out
    data = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(data) == {"mAP", "per_class", "group_mAP", "protocol", "num_gt", "num_det"}
    assert data["protocol"] == "official"
    # class 1: ranks FP (vid_b), TP (vid_a), GT 2 -> precision 1/2 at recall 1/2 -> 0.25
    assert data["per_class"] == {"1": pytest.approx(0.25), "2": 1.0, "64": 1.0}
    assert data["mAP"] == pytest.approx(0.75)
    assert data["group_mAP"] == {"person_movement": pytest.approx(0.625), "object_manipulation": None,
                                 "person_interaction": 1.0}
    assert data["num_gt"] == {"1": 2, "2": 1, "64": 1} and data["num_det"] == {"1": 2, "2": 1, "64": 1}


def test_main_exclusions_and_mmaction2(files, tmp_path):
    assert main(_args(files, tmp_path, "--exclusions", str(files["excl.csv"]), "--protocol", "mmaction2")) == 0
    data = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert data["protocol"] == "mmaction2"
    assert data["per_class"]["2"] is None  # only detection was on the excluded keyframe: left out
    assert data["num_gt"]["2"] == 1  # mmaction2 still counts the excluded GT


def test_main_both_protocols_side_by_side(files, tmp_path, capsys):
    """`--protocol both`: one column per protocol; the JSON holds each protocol's full result. With
    vid_a 903 excluded, class 2 has no GT left (official: n/a, mmaction2: n/a too, its only
    detection being excluded) and the official class-1 AP stays 0.25."""
    assert main(_args(files, tmp_path, "--exclusions", str(files["excl.csv"]), "--protocol", "both")) == 0
    out = capsys.readouterr().out
    head = out.splitlines()[0].split()
    assert head[:2] == ["id", "action"] and head[-4:] == ["official", "mmaction2", "#gt", "#det"]
    row1 = next(line for line in out.splitlines() if "bend/bow" in line).split()
    assert row1[-4:-2] == ["25.00", "25.00"]
    assert "mAP@0.5IOU" in out
    data = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(data) == {"official", "mmaction2"}
    assert data["official"]["protocol"] == "official" and data["mmaction2"]["protocol"] == "mmaction2"
    assert data["mmaction2"]["num_gt"]["2"] == 1 and data["official"]["num_gt"]["2"] == 0
    mm_line = next(line for line in out.splitlines() if line.strip().startswith("mAP@0.5IOU")).split()
    assert mm_line[-2:] == [f"{100 * data['official']['mAP']:.2f}", f"{100 * data['mmaction2']['mAP']:.2f}"]


def test_main_matches_library(files, tmp_path):
    assert main(_args(files, tmp_path, "--exclusions", str(files["excl.csv"]))) == 0
    data = json.loads((tmp_path / "out" / "metrics.json").read_text())
    res = evaluate_frame_map(read_annotation_rows(files["gt.csv"]), read_results_csv(files["pred.csv"]),
                             read_label_map(files["map.pbtxt"]), read_exclusions(files["excl.csv"]))
    assert data["mAP"] == pytest.approx(res.mAP)
    assert data["per_class"]["2"] is None and math.isnan(res.per_class[2])


def test_main_bad_input_returns_1(files, tmp_path, capsys):
    files["pred.csv"].write_text(PRED + "vid_a,902,0.1,0.1,0.4,0.4,1\n")
    assert main(_args(files, tmp_path)) == 1
    assert f"{files['pred.csv']}:5: expected 8" in capsys.readouterr().err


def test_main_argument_errors(files, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["--gt", str(files["gt.csv"])])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(_args(files, tmp_path, "--protocol", "voc"))
    with pytest.raises(SystemExit):
        main(["--config", str(REPO / "configs" / "tiny.yaml")])  # no --checkpoint
    with pytest.raises(SystemExit):
        main(["--config", str(REPO / "configs" / "tiny.yaml"), "--checkpoint", "c.pt", "--gt", str(files["gt.csv"])])
    with pytest.raises(SystemExit):
        main(_args(files, tmp_path, "model.fbo=avg"))  # overrides need --config


def test_main_config_mode_bad_input_returns_1(tmp_path, capsys):
    cfg = str(REPO / "configs" / "tiny.yaml")
    assert main(["--config", cfg, "--checkpoint", str(tmp_path / "missing.pt")]) == 1
    assert "missing.pt does not exist" in capsys.readouterr().err
    assert main(["--config", cfg, "--checkpoint", str(tmp_path), "model.nope=1"]) == 1
    assert "model.nope" in capsys.readouterr().err


def test_script_runs_without_install(files, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "evaluate.py"), *_args(files, tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["mAP"] == pytest.approx(0.75)


def test_write_results_csv_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    scores = rng.random((3, 81)).astype(np.float32)
    boxes = np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.9, 0.9], [0.0, 0.0, 1.0, 1.0]], np.float32)
    path = tmp_path / "res" / "val.csv"
    n = write_results_csv(path, ["a", "a", "b"], [902, 903, 1000], boxes, scores, action_thr=0.5)
    rows = read_results_csv(path)
    expected = int((scores[:, 1:] > 0.5).sum())
    assert n == len(rows) == expected
    assert set(rows.action_ids.tolist()) <= set(range(1, 81))
    np.testing.assert_allclose(rows.scores, scores[np.searchsorted([902, 903, 1000], rows.timestamps),
                                                   rows.action_ids], atol=5e-7)
    assert path.read_text().splitlines()[0].startswith("a,902,0.100000,0.200000,0.300000,0.400000,")
    mem = build_result_rows(["a", "a", "b"], [902, 903, 1000], boxes, scores, action_thr=0.5)
    assert mem.action_ids.tolist() == rows.action_ids.tolist()
    assert write_results_csv(path, ["a"], [902], boxes[:1], scores[:1]) == 80  # None: every class
    assert write_results_csv(path, ["a"], [902], boxes[:1], scores[:1], class_ids=[1, 64]) == 2
    assert [p.name for p in path.parent.iterdir()] == ["val.csv"]  # no temp files left behind


@pytest.mark.ray
def test_main_config_mode_runs_inference(prepared, tmp_path, capsys):
    """Random-weight baseline through the Ray Data inference path: CSV rows, table, JSON."""
    import torch

    from lfb_ray.data.annotations import read_annotation_rows
    from lfb_ray.models import build_detector, save_checkpoint

    cfg, _ = prepared
    overrides = [f"workdir={cfg.workdir}", f"data.root={cfg.data.root}", "model.fbo=none"]
    torch.manual_seed(0)
    ckpt = tmp_path / "model.pt"
    save_checkpoint(build_detector(dataclasses.replace(cfg.model, fbo="none")).state_dict(), ckpt)
    out_json = tmp_path / "metrics.json"
    assert main(["--config", str(REPO / "configs" / "tiny.yaml"), "--checkpoint", str(ckpt), *overrides,
                 "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert "mAP@0.5IOU (official)" in printed and "boxes of the val split" in printed

    csv_path = Path(cfg.workdir) / "results" / "infer_none.csv"  # the default location
    lines = csv_path.read_text().splitlines()
    fields = [ln.split(",") for ln in lines]
    assert lines and all(len(f) == 8 for f in fields)
    assert all(len(x.split(".")[1]) == 6 for f in fields for x in f[2:6] + f[7:])  # 6 decimals
    boxes = np.array([[float(x) for x in f[2:6]] for f in fields])
    assert ((boxes >= 0) & (boxes <= 1)).all()
    per_box: dict[tuple, list[int]] = {}
    for f in fields:
        per_box.setdefault((f[0], f[1], *f[2:6]), []).append(int(f[6]))
    assert all(sorted(ids) == list(range(1, 81)) for ids in per_box.values())  # 80 per box
    val_videos = set(read_annotation_rows(Path(cfg.data.root) / cfg.data.val_csv).video_ids.tolist())
    assert {k[0] for k in per_box} <= val_videos

    data = json.loads(out_json.read_text())
    assert set(data) == {"mAP", "per_class", "group_mAP", "protocol", "num_gt", "num_det"}
    assert data["protocol"] == "official"
    assert data["mAP"] is None or 0.0 <= data["mAP"] <= 1.0
    assert set(data["num_det"]) == set(data["per_class"])
    assert sum(data["num_det"].values()) <= len(lines)

    # The same with the checkpoint and the result CSV given as URIs (as on a cluster: s3://...; here
    # file://, which goes through the same pyarrow filesystem path): read from and uploaded to them.
    uri_csv = tmp_path / "remote" / "val.csv"
    assert main(["--config", str(REPO / "configs" / "tiny.yaml"), "--checkpoint", f"file://{ckpt}", *overrides,
                 "--csv", f"file://{uri_csv}", "--protocol", "both"]) == 0
    assert uri_csv.read_text() == csv_path.read_text()
    assert "mmaction2" in capsys.readouterr().out.splitlines()[0]


def test_main_config_mode_refuses_a_missing_checkpoint_uri(tmp_path, capsys):
    assert main(["--config", str(REPO / "configs" / "tiny.yaml"), "--checkpoint", f"file://{tmp_path}/none.pt",
                 f"workdir={tmp_path}"]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_evaluation_and_the_bank_builder_keep_their_layers():
    """`lfb_ray.evaluation` is pure numpy (no torch, Ray or model), and the bank builder runs the
    detector through `lfb_ray.models.device`, not the val inference module."""
    import subprocess

    code = ("import sys, lfb_ray.evaluation, lfb_ray.evaluation.families, lfb_ray.synthetic.report;"
            "bad = [m for m in ('torch', 'ray', 'lfb_ray.inference', 'lfb_ray.models') if m in sys.modules];"
            "import lfb_ray.bank.build, lfb_ray.models.device;"
            "bad += [m for m in ('lfb_ray.inference',) if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "[]"
