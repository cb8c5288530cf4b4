"""Tests of reversed_ae.py (Bercea et al., MIDL 2023).

Formula tests are named after the paper's equations: `pytest tests/test_reversed_ae.py -k eq3`.
Values are computed by hand in the comments, so a wrong sign or a wrong reduction fails.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import reversed_ae as RA

REPO = Path(__file__).resolve().parents[1]


# ---- Eq. (1): ELBO ------------------------------------------------------------------------------------

def test_eq1_kl_divergence_by_hand():
    mu = torch.tensor([[1.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)]])
    # KL = -½[(1 + 0 - 1 - 1) + (1 + ln2 - 0 - 2)] = 1 - ½ ln 2
    assert RA.kl_divergence(mu, logvar).item() == pytest.approx(1 - 0.5 * math.log(2), abs=1e-6)
    assert RA.kl_divergence(torch.zeros(3, 4), torch.zeros(3, 4)).abs().max().item() == 0.0   # q = prior


def test_eq1_neg_elbo_by_hand():
    x = torch.tensor([[[[1.0, 0.0]]]])            # (1, 1, 1, 2)
    x_rec = torch.tensor([[[[0.5, 0.5]]]])        # squared error 0.25 + 0.25 = 0.5
    mu, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(2.0)]])
    # scale·(β_rec·0.5 + β_kl·KL) = 0.5·(2·0.5 + (1 - ½ ln 2))
    v = RA.neg_elbo(x, x_rec, mu, logvar, beta_rec=2.0, beta_kl=1.0, scale=0.5)
    assert v.shape == (1,)
    assert v.item() == pytest.approx(0.5 * (1.0 + 1 - 0.5 * math.log(2)), abs=1e-6)


# ---- Eq. (2): expELBO and the decoder objective -----------------------------------------------------

def test_eq2_exp_elbo_by_hand():
    # -ELBO = [0, ln2/2], α = 2: exp(0) = 1, exp(-ln 2) = 0.5 -> mean 0.75 -> ·1/α = 0.375
    v = RA.exp_elbo(torch.tensor([0.0, math.log(2.0) / 2]), alpha=2.0)
    assert v.item() == pytest.approx(0.375, abs=1e-6)


def test_eq2_decoder_loss_by_hand():
    # scale·(β_rec·mean[2,4] + ½β_kl(1 + 3) + ½γβ_rec(10 + 30)) = 0.1·(3 + 2 + 10) = 1.5
    v = RA.decoder_loss(torch.tensor([2.0, 4.0]), torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([10.0]),
                        torch.tensor([30.0]), beta_rec=1.0, beta_kl=1.0, gamma_r=0.5, scale=0.1)
    assert v.item() == pytest.approx(1.5, abs=1e-6)


# ---- Eq. (3): reversed multi-scale embedding loss ------------------------------------------------------

def test_eq3_reversed_loss_zero_for_identical_embeddings():
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(4, 8, 16, 16, generator=g), torch.randn(4, 16, 8, 8, generator=g)]
    v = RA.reversed_embedding_loss(feats, [f.clone() for f in feats])
    assert abs(v.item()) < 1e-6


def test_eq3_reversed_loss_known_pair():
    # level 0: e = [1, 0], e_rec = [0, 1]: 1 - cos = 1, ½·MSE = ½·mean(1, 1) = 0.5    -> 1.5
    # level 1: e = [1, 0], e_rec = [2, 0]: 1 - cos = 0, ½·MSE = ½·mean(1, 0) = 0.25   -> 0.25
    f_x = [torch.tensor([1.0, 0.0]).view(1, 2, 1, 1), torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)]
    f_r = [torch.tensor([0.0, 1.0]).view(1, 2, 1, 1), torch.tensor([2.0, 0.0]).view(1, 2, 1, 1)]
    assert RA.reversed_embedding_loss(f_x, f_r).item() == pytest.approx(1.75, abs=1e-6)


def test_eq3_cosine_is_per_sample_and_averaged_over_batch():
    # sample 1 identical (1 - cos = 0), sample 2 orthogonal (1 - cos = 1): mean 0.5;
    # MSE over all 4 elements: (0 + 0 + 1 + 1) / 4 = 0.5, halved -> 0.25. Total 0.75.
    e = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).view(2, 2, 1, 1)
    r = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(2, 2, 1, 1)
    assert RA.reversed_embedding_loss([e], [r]).item() == pytest.approx(0.75, abs=1e-6)


# ---- Eq. (4): encoder objective ------------------------------------------------------------------------

def test_eq4_encoder_loss_by_hand():
    # mean(-ELBO(x)) = 2; expELBO: rec [0] -> ½·1 = 0.5, fake [ln2/2] -> ½·0.5 = 0.25, averaged -> 0.375;
    # λ·L_rev = 0.1·10 = 1  => 3.375
    v = RA.encoder_loss(torch.tensor([1.0, 3.0]), torch.tensor([0.0]), torch.tensor([math.log(2.0) / 2]),
                        torch.tensor(10.0), alpha=2.0, lam=0.1)
    assert v.item() == pytest.approx(3.375, abs=1e-6)
    v0 = RA.encoder_loss(torch.tensor([1.0, 3.0]), torch.tensor([0.0]), torch.tensor([math.log(2.0) / 2]),
                         torch.tensor(10.0), alpha=2.0, lam=0.0)        # --no-reverse: the SI-VAE objective
    assert v0.item() == pytest.approx(2.375, abs=1e-6)


def test_eq4_train_step_updates_both_networks_and_is_finite():
    torch.manual_seed(0)
    model = RA.SoftIntroVAE(channels=[4, 8], z_dim=8, image_size=16)
    opt_e = torch.optim.Adam(model.encoder.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(model.decoder.parameters(), lr=1e-3)
    e0 = [p.detach().clone() for p in model.encoder.parameters()]
    d0 = [p.detach().clone() for p in model.decoder.parameters()]
    hp = type("HP", (), dict(beta_rec=1.0, beta_kl=1.0, beta_neg=256.0, alpha=2.0, gamma_r=1e-8, lam=5e-3))
    out = RA.train_step(model, torch.rand(4, 1, 16, 16), opt_e, opt_d, hp, torch.device("cpu"))
    assert all(math.isfinite(float(v)) for v in out.values())
    assert float(out["L_reversed"]) > 0
    assert any(not torch.equal(a, b) for a, b in zip(e0, model.encoder.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(d0, model.decoder.parameters()))
    assert all(p.requires_grad for p in model.parameters())


def test_networks_shapes_and_multiscale_embeddings():
    model = RA.SoftIntroVAE(channels=[4, 8, 16], z_dim=6, image_size=32)
    mu, logvar, feats = model.encoder(torch.rand(2, 1, 32, 32))
    assert mu.shape == logvar.shape == (2, 6)
    assert [tuple(f.shape) for f in feats] == [(2, 4, 16, 16), (2, 8, 8, 8), (2, 16, 4, 4)]
    x = model.decoder(torch.randn(2, 6))
    assert x.shape == (2, 1, 32, 32) and 0 <= x.min() and x.max() <= 1           # final sigmoid


# ---- Eq. (5): anomaly map ----------------------------------------------------------------------------

def test_eq5_combination_and_ablations_by_hand():
    t = {"res": np.full((1, 2, 2), 1.0), "res_eq": np.full((1, 2, 2), 2.0), "S": np.full((1, 2, 2), 3.0),
         "S_eq": np.full((1, 2, 2), 5.0)}
    assert np.allclose(RA.combine_eq5(t, eq=True, pl=True), 2 * 3 * 5)        # |eq diff|·S·S_eq
    assert np.allclose(RA.combine_eq5(t, eq=False, pl=True), 1 * 3)           # w/o Hist. Eq.
    assert np.allclose(RA.combine_eq5(t, eq=True, pl=False), 2)               # w/o PL
    assert np.allclose(RA.combine_eq5(t, eq=False, pl=False), 1)              # neither


def test_eq5_anomaly_map_uses_clahe_residual_times_both_perceptual_maps():
    from skimage import exposure
    x = torch.full((1, 1, 32, 32), 0.3)
    x[..., 4:28, 4:28] = 0.6
    ph = x.clone()
    ph[..., 10:16, 10:16] = 0.9
    const = lambda a, b: np.full((a.shape[0], a.shape[2], a.shape[3]), 2.0, np.float32)   # noqa: E731
    s = RA.anomaly_map(x, ph, const, eq=True, sigma=0)
    ref = np.abs(exposure.equalize_adapthist(ph[0, 0].double().numpy()) - exposure.equalize_adapthist(x[0, 0].double().numpy()))
    assert np.allclose(s[0], 4.0 * ref, atol=1e-5)                            # S = 2 twice
    assert np.allclose(RA.anomaly_map(x, ph, None, eq=False)[0], (ph - x).abs()[0, 0].numpy())
    assert np.abs(RA.anomaly_map(x, x.clone(), const)).max() == 0.0          # identical -> no anomaly


def test_eq5_encoder_distance_zero_for_identical_and_bounded():
    torch.manual_seed(0)
    model = RA.SoftIntroVAE(channels=[4, 8], z_dim=4, image_size=16)
    d = RA.EncoderDistance(model.encoder)
    a, b = torch.rand(3, 1, 16, 16), torch.rand(3, 1, 16, 16)
    assert d(a, a).shape == (3, 16, 16) and np.abs(d(a, a)).max() < 1e-6
    dab = d(a, b)
    assert dab.min() >= 0 and dab.max() <= 4 + 1e-5 and dab.mean() > 0
    assert model.encoder.training                                             # restored after eval-mode use


def test_lpips_option_fails_with_one_clear_line_when_missing():
    pytest.importorskip("torch")
    try:
        import lpips  # noqa: F401
        pytest.skip("lpips is installed here")
    except ImportError:
        pass
    with pytest.raises(RA.C.UserError, match="pip install lpips"):
        RA.LPIPSDistance(torch.device("cpu"))


# ---- App. C.1: synthetic anomalies ---------------------------------------------------------------------

def _phantom_slice(n=128, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n]
    brain = (yy - n / 2) ** 2 + (xx - n / 2) ** 2 < (0.45 * n) ** 2
    img = np.where(brain, rng.uniform(0.2, 1.0, (n, n)), 0.0).astype(np.float32)
    return img, brain


def test_synthetic_ellipses_in_percentile_bands_and_mask_matches_painted_pixels():
    img, brain = _phantom_slice()
    p = np.percentile(img[brain], [1, 5, 30, 70, 95, 99])
    bands = [(p[0], p[1]), (p[2], p[3]), (p[4], p[5])]
    n_three = 0
    for seed in range(6):
        out, mask = RA.synthetic_intensity_anomaly(img, brain, np.random.default_rng(seed))
        assert np.array_equal(mask, out != img)                              # mask = painted pixels
        values = np.unique(out[mask])
        assert 1 <= len(values) <= 3
        for v in values:                                                      # each ellipse in its band
            assert any(lo - 1e-6 <= v <= hi + 1e-6 for lo, hi in bands), v
        n_three += len(values) == 3
        rows, cols = np.nonzero(mask)                                         # centres 32..96, semi-axes <= 12
        assert rows.min() >= 32 - 12 - 1 and rows.max() <= 96 + 12 + 1
        assert cols.min() >= 32 - 12 - 1 and cols.max() <= 96 + 12 + 1
    assert n_three >= 3


def test_synthetic_ellipse_sizes_scale_with_the_image():
    img, brain = _phantom_slice(64)
    out, mask = RA.synthetic_intensity_anomaly(img, brain, np.random.default_rng(1))
    rows, cols = np.nonzero(mask)
    assert rows.min() >= 16 - 6 - 1 and rows.max() <= 48 + 6 + 1


def test_synthetic_texture_copy_paste_rectangle():
    img, brain = _phantom_slice()
    for seed in range(5):
        out, mask = RA.synthetic_texture_anomaly(img, brain, np.random.default_rng(seed))
        assert np.array_equal(mask, np.abs(out - img) > 1e-6)                # mask = changed pixels
        changed = np.nonzero(out != img)
        h = changed[0].max() - changed[0].min() + 1
        w = changed[1].max() - changed[1].min() + 1
        assert h <= 50 and w <= 50 and changed[0].min() >= 25 and changed[1].min() >= 25
        # the pasted values are a copy of another rectangle of the same image
        assert np.isin(out[mask], img).all()


# ---- §4.2: threshold and localisation -------------------------------------------------------------------

def test_threshold_flags_at_most_5_percent_of_healthy_brain_pixels():
    maps = np.zeros((1, 20, 10))
    brain = np.zeros((1, 20, 10), bool)
    brain[0, :10] = True
    maps[0, :10] = np.arange(1, 101).reshape(10, 10)                          # 100 brain pixels: 1..100
    maps[0, 10:] = 1000.0                                                     # background never counts
    thr = RA.threshold_at_fpr(maps, brain, fpr=0.05)
    assert (maps[brain] > thr).mean() == pytest.approx(0.05)                  # 96..100
    rng = np.random.default_rng(0)
    healthy = rng.gamma(2.0, size=(5, 32, 32))
    b = rng.random((5, 32, 32)) > 0.3
    assert (healthy[b] > RA.threshold_at_fpr(healthy, b, 0.05)).mean() <= 0.05


def test_localization_tp_fp_f1_by_hand():
    s = np.zeros((10, 10))
    box = np.zeros((10, 10), bool)
    box[0:2, 0:5] = True                                                      # 10 box pixels
    s[0, 0] = s[0, 1] = 1.0                                                   # 2/10 = 20% > 10% -> TP
    s[5, 5] = 4.5                                                             # healthy sum 4.5
    healthy = ~box
    m = RA.localization_metrics(s, box, healthy, threshold=0.5, detect_frac=0.1)
    # FP = floor(4.5 / 2) = 2, P = 1/3, F1 = 2·(1/3)·1 / (1/3 + 1) = 0.5
    assert (m["tp"], m["fp"]) == (1, 2)
    assert m["precision"] == pytest.approx(1 / 3) and m["f1"] == pytest.approx(0.5)
    s[0, 1] = 0.0                                                             # 1/10 = 10%, not > 10% -> missed
    m = RA.localization_metrics(s, box, healthy, threshold=0.5, detect_frac=0.1)
    assert m["tp"] == 0 and m["f1"] == 0.0
    s[5, 5] = 0.0                                                             # values under the threshold do not count
    s[0, 0] = s[0, 1] = 1.0
    s[7, 7] = 0.4
    m = RA.localization_metrics(s, box, healthy, threshold=0.5, detect_frac=0.1)
    assert (m["tp"], m["fp"], m["f1"]) == (1, 0, 1.0)


def test_lesion_boxes_are_bounding_boxes_of_components():
    m = np.zeros((12, 12), bool)
    m[1, 1] = m[3, 4] = m[2, 2] = m[2, 3] = True                              # one diagonal component 1..3 x 1..4
    m[9, 9] = True
    box = RA.lesion_boxes(m)
    expected = np.zeros((12, 12), bool)
    expected[1:4, 1:5] = True
    expected[9, 9] = True
    assert np.array_equal(box, expected)


# ---- the script end to end -------------------------------------------------------------------------------

def test_smoke_run_writes_the_contract_files(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "reversed_ae.py", "--preset", "smoke", "--out", str(out), "--device", "cpu"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    for f in ("config.json", "results.json", "scores.csv", "last.pt", "roc.png", "scores.png", "examples.png",
              "losses.png", "synthetic.png", "localization.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    res = json.loads((out / "results.json").read_text())
    for k in ("method", "data", "preset", "seed", "unit", "metrics", "groups", "timing", "table1_synthetic",
              "table2b_localization", "table3_ablation"):
        assert k in res, k
    assert res["unit"] == "slice" and 0 <= res["metrics"]["auroc"] <= 1
    assert "normal" in res["groups"]
    assert set(res["table3_ablation"]) == set(RA.VARIANTS)
    sys.path.insert(0, str(REPO.parent / "shared"))
    try:
        import check_contract
        problems = check_contract.check(str(out))
        problems = problems if isinstance(problems, list) else problems[0]
        assert not problems, problems
    except ImportError:
        pass


def test_bad_flag_is_one_error_line(tmp_path):
    r = subprocess.run([sys.executable, "reversed_ae.py", "--preset", "smoke", "--channels", "4,x",
                        "--out", str(tmp_path / "bad")], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error:") and "--channels" in r.stderr and "Traceback" not in r.stderr
