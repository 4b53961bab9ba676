"""The cue / no-cue role accuracy report on a generated dataset and hand-made result CSVs."""

import csv

from lfb_ray.synthetic import LABEL_FAMILIES, load_actors
from lfb_ray.synthetic.report import find_result_csvs, role_accuracy


def _write_results(root, path, *, right_when_cue: bool, right_without_cue: bool):
    """One detection per GT box (the GT box itself) scoring one role high."""
    actors = load_actors(root / "dataset.json")
    roles = LABEL_FAMILIES["long_term"]
    expect = {True: 0, False: 0}
    with open(root / "annotations" / "val.csv") as f, open(path, "w", newline="") as out:
        w = csv.writer(out)
        for vid, ts, x1, y1, x2, y2, action, pid in csv.reader(f):
            if int(action) not in roles:
                continue
            cue = any(abs(c - int(ts)) <= 1 for c in actors[vid][int(pid)].cue_seconds)
            right = right_when_cue if cue else right_without_cue
            guess = int(action) if right else roles[(roles.index(int(action)) + 1) % len(roles)]
            expect[cue] += 1
            for r in roles:
                w.writerow([vid, ts, x1, y1, x2, y2, r, 0.9 if r == guess else 0.1])
    return expect


def test_role_accuracy_splits_cue_and_no_cue_keyframes(synthetic_root, tmp_path):
    run = tmp_path / "w" / "results" / "nl-abc"
    run.mkdir(parents=True)
    expect = _write_results(synthetic_root, run / "val_results_epoch001.csv", right_when_cue=True,
                            right_without_cue=False)
    assert expect[True] > 0 and expect[False] > 0
    assert find_result_csvs(tmp_path / "w") == {"nl-abc": run / "val_results_epoch001.csv"}
    acc = role_accuracy(synthetic_root, run / "val_results_epoch001.csv")
    assert (acc.cue_total, acc.nocue_total) == (expect[True], expect[False])
    assert (acc.cue, acc.nocue) == (1.0, 0.0)
    _write_results(synthetic_root, run / "val_results_epoch002.csv", right_when_cue=False, right_without_cue=True)
    acc = role_accuracy(synthetic_root, find_result_csvs(tmp_path / "w")["nl-abc"])
    assert (acc.cue, acc.nocue) == (0.0, 1.0)


def test_report_job_errors_without_results(synthetic_root, tmp_path, capsys):
    import jobs.synthetic_report as job

    assert job.main(["--data", str(synthetic_root), "--workdir", str(tmp_path)]) == 1
    assert "no val result CSVs" in capsys.readouterr().err


def test_bank_probe_reads_roles_and_looks_of_a_bank_that_holds_them(synthetic_root, tmp_path):
    import numpy as np
    import torch

    from lfb_ray.bank import write_bank
    from lfb_ray.models import save_checkpoint
    from lfb_ray.models.checkpoint import read_classifier
    from lfb_ray.synthetic.report import bank_probe

    roles, looks = LABEL_FAMILIES["long_term"], LABEL_FAMILIES["appearance"]
    actors = load_actors(synthetic_root / "dataset.json")
    dim = len(roles) + len(looks)
    for split in ("train", "val"):
        rows = [r for r in csv.reader(open(synthetic_root / "annotations" / f"{split}.csv")) if int(r[6]) in roles]
        feats = np.zeros((len(rows), dim), np.float16)
        for i, r in enumerate(rows):  # feature = one-hot role + one-hot look of the GT actor
            feats[i, roles.index(int(r[6]))] = 1
            feats[i, len(roles) + actors[r[0]][int(r[7])].look] = 1
        write_bank(tmp_path / "bank" / split, video_ids=[r[0] for r in rows], seconds=[int(r[1]) for r in rows],
                   person_index=[int(r[7]) for r in rows], boxes=np.array([r[2:6] for r in rows], float),
                   scores=np.ones(len(rows)), features=feats)
    weight = torch.zeros(81, dim)
    for k, a in enumerate(roles):
        weight[a, k] = 1
    for k, a in enumerate(looks):
        weight[a, len(roles) + k] = 1
    save_checkpoint({"fc_cls.weight": weight, "fc_cls.bias": torch.zeros(81)}, tmp_path / "model.pt")
    probe = bank_probe(synthetic_root, tmp_path / "bank", read_classifier(tmp_path / "model.pt"))
    for split in ("train", "val"):
        assert probe.role_cue[split][0] == probe.role_nocue[split][0] == 1.0
        assert probe.role_cue[split][1] > 0 and probe.role_nocue[split][1] > 0
    assert probe.look_val[0] == 1.0
    assert probe.oracle_val["same actor, all seconds"][0] == 1.0
    # Mixing the actors of a video (distinct roles) cannot name each actor's role.
    assert probe.oracle_val["all actors of the video"][0] < 1.0
