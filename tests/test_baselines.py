"""Like-for-like baselines (issue 15.5), slabs (issue 17.4) and the training record in report():
the baseline of a unit is the hand-computed aggregate of C.baseline_maps over that unit's pixels,
in each script's own way (anogan: sum over a patch, madgan: per window then per scan, the others
through C.baseline_units)."""
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import common as C
from data import datasets


def tiny_set(n_cases=3, n_slices=8, hw=16, seed=0, group="normal", label=0):
    rng = np.random.default_rng(seed)
    n = n_cases * n_slices
    x = rng.uniform(-1, 1, (n, hw, hw)).astype(np.float32)
    brain = np.zeros((n, hw, hw), np.uint8)
    brain[:, 2:-2, 2:-2] = 1
    cases = [types.SimpleNamespace(id=f"{group}/{i}", group=group, label=label, meta={})
             for i in range(n_cases)]
    return datasets.ArraySet(x=x, mask=np.zeros_like(brain), brain=brain,
                             case=np.repeat(np.arange(n_cases), n_slices).astype(np.int32),
                             z=np.tile(np.arange(n_slices), n_cases).astype(np.int32), cases=cases)


def test_baseline_units_is_the_aggregate_of_the_maps():
    S_tr, S = tiny_set(seed=0), tiny_set(seed=1)
    v = C.baseline_units(S_tr, S, [5, 7], "mean")
    x, b = S.x[5], S.brain[5]
    assert v["intensity"][0] == pytest.approx(((x + 1) / 2 * b).mean(), rel=1e-6)
    w = C.baseline_units(S_tr, S, [lambda m: m[7, :4, :4]], "sum")
    assert w["intensity"][0] == pytest.approx(((S.x[7, :4, :4] + 1) / 2 * S.brain[7, :4, :4]).sum(),
                                              rel=1e-5)
    assert set(C.baseline_units(S_tr, S, [0], "max")) == {"intensity", "zscore"}


def test_madgan_baseline_is_per_window_then_per_scan():
    import madgan as M
    S_tr, S = tiny_set(seed=0), tiny_set(seed=2)
    args = types.SimpleNamespace(k_in=3, k_out=3, score_windows=0)
    rows = [{"id": c.id} for c in S.cases]
    v = M.baseline_scores(S_tr, S, rows, args)
    r = S.slices_of(1)                         # scan 1: windows s = 0, 1 (8 slices, 3 + 3)
    inten = (S.x[r] + 1) / 2 * S.brain[r]
    hand = np.mean([inten[s + 3:s + 6].mean() for s in range(8 - 6 + 1)])
    assert v["intensity"][1] == pytest.approx(hand, rel=1e-6)


def test_anogan_baseline_is_the_sum_over_the_patch():
    S_tr, S = tiny_set(seed=0), tiny_set(seed=3)
    P = {"row": np.array([4, 9]), "top": np.array([0, 3]), "left": np.array([2, 5])}
    v = C.patch_baselines(S_tr, S, P, 6)         # anogan.py's: summed as the residual of Eq. (3)
    x, b = S.x[9, 3:9, 5:11], S.brain[9, 3:9, 5:11]
    assert v["intensity"][1] == pytest.approx(((x + 1) / 2 * b).sum(), rel=1e-5)


def test_report_adds_baselines_slabs_and_training(tmp_path):
    args = types.SimpleNamespace(data="synthetic", preset="smoke", seed=0)
    run = C.Run(out=tmp_path / "run", device=torch.device("cpu"), method="m", t0=0)
    run.out.mkdir()
    rows = [{"id": f"n{i}", "group": "normal", "label": 0, "score": i / 10,
             "baseline_intensity": 1.0 - i / 10, "baseline_zscore": i / 10} for i in range(5)]
    rows += [{"id": f"a{i}", "group": "lesion", "label": 1, "score": 1 + i,
              "baseline_intensity": i / 10, "baseline_zscore": 1 + i} for i in range(5)]
    loop = types.SimpleNamespace(state={"phases": {"train": {"steps": 3, "seconds": 1.0}}},
                                 io_report=lambda: {"checkpoints": 1})
    slabs = {"n0": {"first": 3, "last": 5, "z_mm": [1.0, 3.0], "rule": "brain"}, "x": {"skip": 1}}
    res = C.report(run, args, "scan", rows, {"train_s": 1.0}, loop=loop, slabs=slabs,
                   skipped={"a9": "2 axial slices"})
    saved = json.loads((run.out / "results.json").read_text())
    assert saved["baselines"]["zscore"]["auroc"] == 1.0
    assert saved["baselines"]["intensity"]["auroc"] == 0.0
    d = saved["baselines"]["intensity"]["method_minus_baseline_auroc"]
    assert d["diff"] == pytest.approx(1.0) and d["resolved"]
    assert saved["slabs"] == {"n0": {"first": 3, "last": 5, "z_mm": [1.0, 3.0], "rule": "brain"}}
    assert saved["training"] == {"phases": {"train": {"steps": 3, "seconds": 1.0}},
                                 "io": {"checkpoints": 1}}
    assert saved["data_info"]["slices_skipped"] == {"a9": "2 axial slices"}
    assert res["baselines"].keys() == {"intensity", "zscore"}
