"""mmaction2 bank pickles <-> lfb_ray banks: exact fp16 round trips and refusal of unsafe pickles."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from lfb_ray.bank import BankError, FeatureBank, export_mmaction2, import_mmaction2, write_bank

DIM = 8


def mmaction2_lfb(seed: int, videos: list[str]) -> dict[str, dict[int, list[torch.Tensor]]]:
    """Reference layout with awkward fp16 values (NaN, inf, -0.0, subnormals) to check bit-exactness."""
    g = torch.Generator().manual_seed(seed)
    lfb = {}
    for v in videos:
        lfb[v] = {}
        for sec in range(902, 902 + int(torch.randint(1, 6, (1,), generator=g))):
            n = int(torch.randint(1, 5, (1,), generator=g))
            lfb[v][sec] = [torch.randn(DIM, generator=g).half() for _ in range(n)]
    lfb[videos[0]][902][0][:4] = torch.tensor([float("nan"), float("inf"), -0.0, 1e-7]).half()
    return lfb


def assert_same_lfb(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for v in a:
        assert a[v].keys() == b[v].keys(), v
        for s in a[v]:
            x, y = torch.stack(list(a[v][s])), torch.stack(list(b[v][s]))
            assert x.dtype == y.dtype == torch.float16
            assert torch.equal(x.view(torch.int16), y.view(torch.int16)), (v, s)  # bitwise


def test_import_export_round_trip_exact(tmp_path):
    train, val = mmaction2_lfb(0, ["t1", "t2", "shared"]), mmaction2_lfb(1, ["v1", "shared"])
    src = tmp_path / "mm"
    src.mkdir()
    torch.save(train, src / "lfb_train.pkl")
    torch.save(val, src / "lfb_val.pkl")
    summaries = import_mmaction2(src, tmp_path / "bank", metadata={"origin": "test"})
    assert set(summaries) == {"train", "val"} and summaries["train"].feature_dim == DIM
    bank = FeatureBank.open(tmp_path / "bank")
    assert bank.videos == ("shared", "t1", "t2", "v1")
    first = torch.from_numpy(bank.features_at("shared", 902).copy())
    assert torch.equal(first.view(torch.int16), torch.stack(val["shared"][902]).view(torch.int16))  # val wins
    assert bank.manifests[0]["metadata"]["origin"] == "test"

    out = tmp_path / "out"
    written = export_mmaction2(tmp_path / "bank", out)
    assert sorted(p.name for p in written) == ["lfb_train.pkl", "lfb_val.pkl"]
    for name, ref in (("train", train), ("val", val)):
        got = torch.load(out / f"lfb_{name}.pkl", map_location="cpu", weights_only=True)
        assert all(isinstance(f, list) and f[0].shape == (DIM,) for per in got.values() for f in per.values())
        assert_same_lfb(ref, got)
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # no temp files left


def test_export_import_round_trip_exact(tmp_path):
    rng = np.random.default_rng(0)
    n = 40
    feats = rng.standard_normal((n, DIM)).astype(np.float16)
    vids = rng.choice(["a", "b", "c"], n)
    secs = np.arange(n) // 3
    person = np.arange(n) % 3
    write_bank(tmp_path / "mybank", video_ids=vids, seconds=secs, person_index=person,
               boxes=np.zeros((n, 4)), scores=np.ones(n), features=feats)
    (file,) = export_mmaction2(tmp_path / "mybank", tmp_path / "mm")
    assert file.name == "lfb_mybank.pkl"
    import_mmaction2(tmp_path / "mm", tmp_path / "back", splits=["mybank"])
    a, b = FeatureBank.open(tmp_path / "mybank"), FeatureBank.open(tmp_path / "back" / "mybank")
    assert a.videos == b.videos
    for v in a.videos:
        assert np.array_equal(a.seconds_of(v), b.seconds_of(v))
        for s in a.seconds_of(v):
            assert np.array_equal(a.features_at(v, s).view(np.int16), b.features_at(v, s).view(np.int16))


def test_import_stacked_tensor_variant(tmp_path):
    stacked = {"v": {5: torch.randn(3, DIM).half(), 6: torch.randn(1, DIM).half()}}
    torch.save(stacked, tmp_path / "lfb_val.pkl")
    import_mmaction2(tmp_path, tmp_path / "bank")
    bank = FeatureBank.open(tmp_path / "bank")
    assert np.array_equal(bank.features_at("v", 5), stacked["v"][5].numpy())


class Exploit:
    """Pickles to a call of os.system; a full unpickler would run it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_import_refuses_arbitrary_objects(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"v": {902: [Exploit(marker)]}}, tmp_path / "lfb_train.pkl")
    with pytest.raises(BankError, match="refused to unpickle"):
        import_mmaction2(tmp_path, tmp_path / "bank")
    assert not marker.exists()
    assert not (tmp_path / "bank").exists()


def test_import_bad_structure_and_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        import_mmaction2(tmp_path, tmp_path / "bank")
    torch.save({"v": {902: "not features"}}, tmp_path / "lfb_train.pkl")
    with pytest.raises(BankError, match="expected a list of"):
        import_mmaction2(tmp_path, tmp_path / "bank")


def test_import_bank_job_script(tmp_path):
    """jobs/import_bank.py (the command of docs/ava.md) turns mmaction2 pickles into a bank that opens,
    merged as the reference merges them, and refuses a bank of another width than the config's model."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    train, val = mmaction2_lfb(0, ["t1", "shared"]), mmaction2_lfb(1, ["v1", "shared"])
    src = tmp_path / "lfb_half"
    src.mkdir()
    torch.save(train, src / "lfb_train.pkl")
    torch.save(val, src / "lfb_val.pkl")

    def job(*args):
        return subprocess.run([sys.executable, str(repo / "jobs" / "import_bank.py"), *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)

    # configs/tiny.yaml's backbone (depth 18, width 8) computes 64-wide features, not DIM: refused.
    cfg = repo / "configs" / "tiny.yaml"
    res = job("--config", str(cfg), "--out", str(tmp_path / "bank"), "--lfb", str(src / "lfb_train.pkl"),
              str(src / "lfb_val.pkl"))
    assert res.returncode == 1 and "expects" in res.stderr, res.stdout + res.stderr  # width != the model's
    # Width 1 of depth 18: DIM (= 8) wide features. Overrides go before --lfb (which takes every file after it).
    res = job("--config", str(cfg), "--out", str(tmp_path / "bank8"), "model.base_channels=1",
              "--lfb", str(src / "lfb_train.pkl"), str(src / "lfb_val.pkl"))
    assert res.returncode == 0, res.stdout + res.stderr
    bank = FeatureBank.open(tmp_path / "bank8", expected_dim=DIM)
    assert bank.videos == ("shared", "t1", "v1")
    got = torch.from_numpy(bank.features_at("shared", 902).copy())
    assert torch.equal(got.view(torch.int16), torch.stack(val["shared"][902]).view(torch.int16))  # val wins
    assert f"bank.path={tmp_path / 'bank8'}" in res.stdout

    res = job("--config", str(cfg), "--lfb", str(src / "train.pkl"))
    assert res.returncode == 2 and "lfb_<split>.pkl" in res.stderr
