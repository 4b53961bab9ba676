"""LFB windows as rows + gather (lfb_ray.bank.window, issue 33): the same windows as the old
`FeatureBank.sample`, bitwise, on every path; and a training step that never waits for the device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lfb_ray.bank import BankError, FeatureBank, write_bank
from lfb_ray.bank import writer as writer_module
from lfb_ray.bank.reader import _SECOND_BIAS, _name_some
from lfb_ray.bank.window import DeviceFeatures, WindowSampler, place_features
from lfb_ray.data.batches import TestBatch, TrainBatch


def old_sample(bank: FeatureBank, video_ids, seconds, rng, *, window_seconds=60, max_feats_per_second=5):
    """`FeatureBank.sample` as it was before the rows/gather split (commit 52751df), verbatim in logic."""
    W, K, C = window_seconds, max_feats_per_second, bank._dim
    R = len(video_ids)
    t = np.asarray(seconds, dtype=np.int64).reshape(-1)
    out = torch.empty((R, W * K, C), dtype=torch.float32)
    codes = np.fromiter((bank._video_code.get(v, -1) for v in video_ids), dtype=np.int64, count=R)
    if bank._missing_videos == "error" and (codes < 0).any():
        missing = sorted({str(v) for v, c in zip(video_ids, codes, strict=True) if c < 0})
        raise BankError(f"no features for video(s) {_name_some(missing)}")
    if R == 0 or len(bank._keys) == 0:
        return out.zero_()
    secs = t[:, None] + (np.arange(W) - W // 2)
    valid = (codes[:, None] >= 0) & (secs >= -_SECOND_BIAS) & (secs < _SECOND_BIAS)
    query = ((codes[:, None] << 32) | (secs + _SECOND_BIAS)).ravel()
    pos = np.minimum(np.searchsorted(bank._keys, query), len(bank._keys) - 1)
    pair = np.flatnonzero(valid.ravel() & (bank._keys[pos] == query))
    if len(pair) == 0:
        return out.zero_()
    entry = pos[pair]
    n = bank._counts[entry]
    width = int(n.max())
    keys = rng.random((len(pair), width))
    keys[np.arange(width) >= n[:, None]] = 2.0
    take = min(K, width)
    perm = np.argsort(keys, axis=1)[:, :take]
    used = np.arange(take) < np.minimum(n, K)[:, None]
    rows = (bank._row_starts[entry][:, None] + perm)[used]
    dst = (pair[:, None] * K + np.arange(take))[used]
    window = np.zeros((R * W * K, C), np.float16)
    window[dst] = bank._gather(rows)
    out.copy_(torch.from_numpy(window).view(R, W * K, C))
    return out


def random_bank(path, seed: int, *, videos: int = 5, seconds: int = 40, dim: int = 6, max_persons: int = 9,
                **kwargs) -> dict[str, int]:
    """Random fp16 features; Poisson-ish persons per second with many missing seconds (0) and seconds
    with more persons than K. Returns {video: first second}."""
    rng = np.random.default_rng(seed)
    vids, secs, pidx = [], [], []
    first = {}
    for v in range(videos):
        name = f"vid{v}"
        first[name] = int(rng.integers(0, 900))
        for s in range(first[name], first[name] + seconds):
            n = int(rng.integers(0, max_persons + 1)) if rng.random() > 0.3 else 0
            vids += [name] * n
            secs += [s] * n
            pidx += list(range(n))
    n = len(vids)
    write_bank(path, video_ids=vids, seconds=np.array(secs), person_index=np.array(pidx),
               boxes=np.zeros((n, 4), np.float32), scores=np.ones(n, np.float32),
               features=rng.standard_normal((n, dim)).astype(np.float16), **kwargs)
    return first


def queries(first: dict[str, int], seed: int, rois: int, extra_videos=()) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    names = sorted(first) + list(extra_videos)
    vids = [names[i] for i in rng.integers(0, len(names), rois)]
    # keyframes inside, near and beyond both video edges
    secs = np.array([first.get(v, 500) + int(rng.integers(-15, 55)) for v in vids])
    return vids, secs


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("window,k", [(7, 1), (11, 3), (20, 5), (4, 12)])
def test_rows_then_gather_equal_the_old_sample_bitwise(tmp_path, seed, window, k):
    first = random_bank(tmp_path / "bank", seed)
    bank = FeatureBank.open(tmp_path / "bank")
    vids, secs = queries(first, seed, rois=23)
    ref = old_sample(bank, vids, secs, np.random.default_rng(seed), window_seconds=window, max_feats_per_second=k)
    rng = np.random.default_rng(seed)
    rows = bank.window_rows(vids, secs, rng, window_seconds=window, max_feats_per_second=k)
    assert rows.dtype == np.int32 and rows.shape == (23, window * k)
    assert (rows >= -1).all() and (rows < bank.num_rows).all() and (rows == -1).any()
    got = bank.gather(rows)
    assert torch.equal(got, ref)
    # the same draws: the generator is left in the same state as the old sample left it
    ref_rng = np.random.default_rng(seed)
    old_sample(bank, vids, secs, ref_rng, window_seconds=window, max_feats_per_second=k)
    assert rng.random() == ref_rng.random()
    new = bank.sample(vids, secs, np.random.default_rng(seed), window_seconds=window, max_feats_per_second=k)
    assert torch.equal(new, ref)
    out = torch.full_like(ref, 7.0)  # a dirty reused buffer
    assert torch.equal(bank.sample(vids, secs, np.random.default_rng(seed), window_seconds=window,
                                   max_feats_per_second=k, out=out), ref)


def test_missing_videos_in_both_modes(tmp_path):
    first = random_bank(tmp_path / "bank", 3)
    vids, secs = queries(first, 3, rois=17, extra_videos=("absent_a", "absent_b"))
    assert {"absent_a", "absent_b"} & set(vids)
    strict = FeatureBank.open(tmp_path / "bank")
    with pytest.raises(BankError, match="absent_"):
        strict.window_rows(vids, secs, np.random.default_rng(0), window_seconds=9, max_feats_per_second=5)
    with pytest.raises(BankError, match="absent_"):
        strict.sample(vids, secs, np.random.default_rng(0), window_seconds=9, max_feats_per_second=5)
    zeros = FeatureBank.open(tmp_path / "bank", missing_videos="zeros")
    ref = old_sample(zeros, vids, secs, np.random.default_rng(5), window_seconds=9, max_feats_per_second=5)
    rows = zeros.window_rows(vids, secs, np.random.default_rng(5), window_seconds=9, max_feats_per_second=5)
    absent = np.array([v.startswith("absent") for v in vids])
    assert (rows[absent] == -1).all()
    assert torch.equal(zeros.gather(rows), ref)
    assert torch.equal(zeros.sample(vids, secs, np.random.default_rng(5), window_seconds=9,
                                    max_feats_per_second=5), ref)


def test_empty_cases(tmp_path):
    first = random_bank(tmp_path / "bank", 4)
    bank = FeatureBank.open(tmp_path / "bank")
    rows = bank.window_rows([], [], np.random.default_rng(0), window_seconds=5, max_feats_per_second=2)
    assert rows.shape == (0, 10) and bank.gather(rows).shape == (0, 10, bank.feature_dim)
    far = bank.window_rows(["vid0"], [first["vid0"] + 10_000], np.random.default_rng(0), window_seconds=5,
                           max_feats_per_second=2)
    assert (far == -1).all() and torch.equal(bank.gather(far), torch.zeros(1, 10, bank.feature_dim))


def test_merged_banks_and_several_record_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_module, "_ROWS_PER_BATCH", 37)
    first = random_bank(tmp_path / "a", 5)
    random_bank(tmp_path / "b", 6, videos=3)  # vid0..vid2 shadow bank a's
    bank = FeatureBank.open([tmp_path / "a", tmp_path / "b"])
    assert len(bank._chunks) > 2 and bank.num_rows > bank.num_features
    vids, secs = queries(first, 7, rois=31)
    ref = old_sample(bank, vids, secs, np.random.default_rng(8), window_seconds=13, max_feats_per_second=4)
    rows = bank.window_rows(vids, secs, np.random.default_rng(8), window_seconds=13, max_feats_per_second=4)
    assert torch.equal(bank.gather(rows), ref)
    dev = DeviceFeatures(bank, "cpu")
    assert torch.equal(dev.gather(torch.from_numpy(rows)), ref)


def test_device_gather_equals_the_host_path_on_cpu(tmp_path):
    first = random_bank(tmp_path / "bank", 9, dim=16)
    bank = FeatureBank.open(tmp_path / "bank", missing_videos="zeros")
    vids, secs = queries(first, 9, rois=40, extra_videos=("absent",))
    rows = bank.window_rows(vids, secs, np.random.default_rng(1), window_seconds=20, max_feats_per_second=5)
    dev = DeviceFeatures(bank, "cpu")
    assert dev.features.dtype == torch.float16 and dev.features.shape == (bank.num_rows + 1, 16)
    assert dev.nbytes == (bank.num_rows + 1) * 16 * 2
    got = dev.gather(torch.from_numpy(rows))
    assert got.dtype == torch.float32 and torch.equal(got, bank.gather(rows))
    assert torch.equal(dev.gather(torch.from_numpy(rows.astype(np.int64))), got)


def test_window_sampler_on_cpu_reuses_one_buffer_and_equals_sample(tmp_path):
    first = random_bank(tmp_path / "bank", 10)
    bank = FeatureBank.open(tmp_path / "bank")
    assert place_features(bank, "cpu", "auto") is None and place_features(bank, "cpu", "cpu") is None
    with pytest.raises(BankError, match="bank.device=cuda"):
        place_features(bank, "cpu", "cuda")
    with pytest.raises(BankError, match="bank.device must be"):
        place_features(bank, "cpu", "gpu")
    sampler = WindowSampler(bank, "cpu", window_seconds=11, max_feats_per_second=3)
    assert sampler.where == "host"
    rng_a, rng_b = np.random.default_rng(2), np.random.default_rng(2)
    ptrs = set()
    for i, rois in enumerate((9, 14, 5)):  # varying RoI counts: views of one buffer
        vids, secs = queries(first, i, rois)
        got = sampler(vids, secs, rng_a)
        ptrs.add(got.untyped_storage().data_ptr())
        assert torch.equal(got, bank.sample(vids, secs, rng_b, window_seconds=11, max_feats_per_second=3))
    assert len(ptrs) <= 2  # one growth (9 -> 14 RoIs) at most


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_path_on_cuda_equals_host_and_never_syncs(tmp_path):
    first = random_bank(tmp_path / "bank", 11, dim=32)
    bank = FeatureBank.open(tmp_path / "bank", missing_videos="zeros")
    sampler = WindowSampler(bank, "cuda", window_seconds=20, max_feats_per_second=5, mode="cuda")
    host = WindowSampler(bank, "cuda", window_seconds=20, max_feats_per_second=5, mode="cpu")
    assert sampler.where == "device" and host.where == "host"
    rng_a, rng_b, rng_c = (np.random.default_rng(3) for _ in range(3))
    for i in range(4):
        vids, secs = queries(first, i, 30, extra_videos=("absent",))
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = sampler(vids, secs, rng_a)
            via_host = host(vids, secs, rng_c)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        ref = bank.sample(vids, secs, rng_b, window_seconds=20, max_feats_per_second=5)
        assert got.is_cuda and torch.equal(got.cpu(), ref) and torch.equal(via_host.cpu(), ref)


def test_bank_device_is_not_part_of_a_run_name():
    from lfb_ray.config import load_config
    from lfb_ray.runs import run_name_for

    names = {run_name_for(load_config("configs/tiny.yaml", [f"bank.device={d}"])) for d in ("auto", "cuda", "cpu")}
    assert len(names) == 1
    assert run_name_for(load_config("configs/tiny.yaml", ["bank.window_seconds=30"])) not in names


# --- the training step: no host sync per iteration, the same losses as before ---------------------------

def _tiny_lfb(dim_seed: int = 0):
    from lfb_ray.config import load_config
    from lfb_ray.models import build_detector

    cfg = load_config("configs/tiny.yaml")
    torch.manual_seed(dim_seed)
    core = build_detector(cfg.model)
    return cfg, core


def _batches(first: dict[str, int], n: int, num_classes: int):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        vids, secs = queries(first, 100 + i, rois=6)
        boxes = torch.rand(6, 4, generator=g) * 50
        boxes[:, 2:] += boxes[:, :2] + 20
        labels = torch.zeros(6, num_classes)
        labels[torch.arange(6), torch.randint(1, num_classes, (6,), generator=g)] = 1
        out.append(TrainBatch(clip=torch.randn(3, 3, 4, 64, 64, generator=g),
                              rois=torch.cat([torch.tensor([0, 0, 1, 1, 2, 2.0])[:, None], boxes], 1),
                              labels=labels, roi_video_ids=vids, roi_seconds=secs, num_clips=3))
    return out


def _run_steps(core, cfg, batches, step_fn) -> list[torch.Tensor]:
    from lfb_ray.train.schedule import build_optimizer

    optimizer = build_optimizer(core.parameters(), cfg.train, 0.01)
    core.train()
    torch.manual_seed(1)  # dropout
    return [step_fn(optimizer, b) for b in batches]


def test_train_step_reads_no_tensor_on_the_host_and_gives_the_old_losses(tmp_path, monkeypatch):
    """The new step (rows + gather, loss kept on the device) against the old loop body (sample, copy,
    `float(loss)`), same seeds, fp32 CPU: identical losses (tolerance 0), and no `.item()`,
    `float(tensor)`, `bool(tensor)`, `int(tensor)` or `.tolist()` in the new step (the loss too:
    `detector_loss` uses masked means, no `bool(mask.any())`)."""
    from lfb_ray.models.device import autocast_for
    from lfb_ray.train.recipe import EpochLoss, train_step

    cfg, core = _tiny_lfb()
    W, K = cfg.bank.window_seconds, cfg.bank.max_feats_per_second
    first = random_bank(tmp_path / "bank", 12, dim=core.feature_channels, seconds=60)
    bank = FeatureBank.open(tmp_path / "bank")
    batches = _batches(first, 3, cfg.model.num_classes)
    init = {k: v.clone() for k, v in core.state_dict().items()}
    device = torch.device("cpu")

    old_rng = np.random.default_rng(4)
    old_loss = EpochLoss()

    def old_step(optimizer, batch):  # the loop body of commit 52751df
        lt = bank.sample(batch.roi_video_ids, batch.roi_seconds, old_rng, window_seconds=W,
                         max_feats_per_second=K).to(device)
        with autocast_for(device, "off"):
            logits = core(batch.clip.to(device), batch.rois.to(device), lt)
        loss = core.loss(logits.float(), batch.labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(core.parameters(), cfg.train.grad_clip)
        optimizer.step()
        old_loss.add(float(loss.detach()))
        return float(loss.detach())

    before = _run_steps(core, cfg, batches, old_step)

    core.load_state_dict(init)
    sampler = WindowSampler(bank, device, window_seconds=W, max_feats_per_second=K)
    new_rng = np.random.default_rng(4)
    new_loss = EpochLoss()
    reads = []
    for name in ("item", "__float__", "__bool__", "__int__", "tolist"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _o=original, _n=name, **kw: (reads.append(_n), _o(self, *a, **kw))[1])

    def new_step(optimizer, batch):
        loss = train_step(core, core, optimizer, batch, device, amp="off", grad_clip=cfg.train.grad_clip,
                          windows=sampler, rng=new_rng)
        new_loss.add(loss)
        return loss

    after = _run_steps(core, cfg, batches, new_step)
    assert reads == [], f"the training step read tensors on the host: {reads}"
    monkeypatch.undo()
    assert [float(x) for x in after] == before
    assert new_loss.count == old_loss.count == 3 and new_loss.sum == old_loss.sum and new_loss.mean == old_loss.mean
    assert new_rng.random() == old_rng.random()


def test_epoch_loss_device_sum_keeps_resume_semantics():
    from lfb_ray.train.recipe import EpochLoss

    losses = [0.7321, 0.1234567, 1e-3, 2.5, 0.333]
    run = EpochLoss.restore({"epoch": 2, "sum": 1.25, "count": 4}, 2)
    direct = EpochLoss.restore({"epoch": 2, "sum": 1.25, "count": 4}, 2)
    for i, x in enumerate(losses):
        run.add(torch.tensor(x))  # device-side, read only when asked
        direct.add(float(torch.tensor(x)))
        if i == 2:
            assert run.state(2) == direct.state(2)  # a checkpoint mid-epoch reads it
    assert run.sum == direct.sum and run.count == direct.count == 9 and run.mean == direct.mean
    assert EpochLoss.restore(run.state(2), 2).sum == run.sum


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_train_step_on_cuda_never_syncs(tmp_path):
    from lfb_ray.models.device import to_model_layout
    from lfb_ray.train.recipe import EpochLoss, train_step
    from lfb_ray.train.schedule import build_optimizer

    cfg, core = _tiny_lfb()
    device = torch.device("cuda")
    core = to_model_layout(core.to(device)).train()
    first = random_bank(tmp_path / "bank", 13, dim=core.feature_channels, seconds=60)
    bank = FeatureBank.open(tmp_path / "bank")
    sampler = WindowSampler(bank, device, window_seconds=cfg.bank.window_seconds,
                            max_feats_per_second=cfg.bank.max_feats_per_second, mode="cuda")
    optimizer = build_optimizer(core.parameters(), cfg.train, 0.01)
    batches = _batches(first, 4, cfg.model.num_classes)
    for b in batches:
        for k in ("clip", "rois", "labels"):
            b[k] = b[k].pin_memory()
    rng, total = np.random.default_rng(0), EpochLoss()
    train_step(core, core, optimizer, batches[0], device, amp="auto", grad_clip=40.0, windows=sampler, rng=rng)
    torch.cuda.synchronize()  # warm-up (cuDNN autotune, allocator) out of the check
    torch.cuda.set_sync_debug_mode("error")
    try:
        for b in batches[1:]:
            total.add(train_step(core, core, optimizer, b, device, amp="auto", grad_clip=40.0, windows=sampler,
                                 rng=rng))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert total.count == 3 and np.isfinite(total.mean)


# --- evaluation and the head warm-up: the same windows through the sampler --------------------------

def test_predict_batch_with_the_sampler_scores_as_with_sample(tmp_path):
    """`predict_batch(windows=WindowSampler)` (val metric, inference job, detect) gives the scores of the
    model fed `FeatureBank.sample`'s window for the same rng, bitwise (fp32 CPU), over several batches
    that reuse the sampler's buffer."""
    from lfb_ray.inference import predict_batch

    cfg, core = _tiny_lfb()
    core.eval()
    first = random_bank(tmp_path / "bank", 13, dim=core.feature_channels, seconds=60)
    bank = FeatureBank.open(tmp_path / "bank")
    windows = WindowSampler.for_config(bank, "cpu", cfg.bank)
    assert (windows.window_seconds, windows.max_feats_per_second) == (cfg.bank.window_seconds,
                                                                     cfg.bank.max_feats_per_second)
    rng_a, rng_b = np.random.default_rng(4), np.random.default_rng(4)
    for b in _batches(first, 3, cfg.model.num_classes):
        b = TestBatch(clip=b.clip, sizes=np.array([[64, 64]] * 3), rois=b.rois, boxes=b.rois[:, 1:].numpy() / 64,
                      roi_batch=b.rois[:, 0].long().numpy(), roi_video_ids=b.roi_video_ids, roi_seconds=b.roi_seconds)
        got = predict_batch(core, b, windows=windows, rng=rng_a, device=torch.device("cpu"), amp="off").scores
        lt = bank.sample(b.roi_video_ids, b.roi_seconds, rng_b, window_seconds=cfg.bank.window_seconds,
                         max_feats_per_second=cfg.bank.max_feats_per_second)
        with torch.no_grad():
            want = core.scores(core(b.clip, b.rois, lt)).numpy()
        np.testing.assert_array_equal(got, want)


def test_head_warm_up_on_the_sampler_keeps_its_losses(tmp_path, monkeypatch):
    """The warm-up draws its windows through `WindowSampler` (host path here): the losses of the old
    per-step `bank.sample(...).to(device)` loop, bitwise."""
    from lfb_ray.train import head_warmup

    cfg, core = _tiny_lfb()
    random_bank(tmp_path / "bank", 14, dim=core.feature_channels, seconds=30, videos=2)
    rows = []
    bank = FeatureBank.open(tmp_path / "bank")
    vids, secs, boxes, _ = bank.entries()
    for v, s in zip(vids, secs.tolist(), strict=True):
        rows.append(f"{v},{s},0.1,0.1,0.5,0.5,{1 + s % 3},0")
    csv = tmp_path / "train.csv"
    csv.write_text("\n".join(rows) + "\n")
    monkeypatch.setattr(head_warmup, "gt_targets",
                        lambda csv, v, s, b, k: (np.arange(len(v)), np.eye(k, dtype=np.float32)[1 + s % 3]))
    kw = dict(steps=6, lr=1e-2, batch=8, seed=0, window_seconds=cfg.bank.window_seconds,
              max_feats_per_second=cfg.bank.max_feats_per_second)
    new = head_warmup.warm_up_head(core, str(tmp_path / "bank"), str(csv), log=lambda m: None, **kw)

    _, again = _tiny_lfb()
    old_sample_calls = []

    class OldSampler:  # the loop before: bank.sample per step, then .to(device)
        def __init__(self, bank, device, *, window_seconds, max_feats_per_second, mode, log):
            self.bank, self.kw = bank, dict(window_seconds=window_seconds, max_feats_per_second=max_feats_per_second)

        def __call__(self, video_ids, seconds, rng):
            old_sample_calls.append(len(video_ids))
            return self.bank.sample(video_ids, seconds, rng, **self.kw)

    monkeypatch.setattr("lfb_ray.bank.window.WindowSampler", OldSampler)
    old = head_warmup.warm_up_head(again, str(tmp_path / "bank"), str(csv), log=lambda m: None, **kw)
    assert len(old_sample_calls) == 6
    assert (new.loss_first, new.loss_last) == (old.loss_first, old.loss_last)
    for p, q in zip(core.parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q)
