"""Tests of reversed_ae.py (Bercea et al., MIDL 2023).

Formula tests are named after the paper's equations: `pytest tests/test_reversed_ae.py -k eq3`.
Values are computed by hand in the comments, so a wrong sign or a wrong reduction fails.
"""
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common as C
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


class StandInLPIPS(torch.nn.Module):
    """A small network in place of lpips.LPIPS (no download): one fixed 3x3 conv, features unit-normalised
    over channels, their squared difference summed and upsampled to the image, like LPIPS' spatial map."""
    made = []

    def __init__(self, **kw):
        super().__init__()
        StandInLPIPS.made.append(kw)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        torch.nn.init.normal_(self.conv.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, a, b, normalize=False):
        assert a.shape[1] == 3 and b.shape[1] == 3 and normalize           # RGB in [0, 1], mapped by LPIPS
        fa, fb = (F.normalize(self.conv(2 * t - 1), dim=1) for t in (a, b))
        return F.interpolate((fa - fb).pow(2).sum(1, keepdim=True), size=a.shape[-2:])   # (B, 1, H, W)


def test_eq5_lpips_path_with_a_stand_in_network(monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=StandInLPIPS))
    StandInLPIPS.made.clear()
    d = RA.LPIPSDistance(torch.device("cpu"))
    assert StandInLPIPS.made == [dict(net="squeeze", spatial=True, pretrained=True, verbose=False)]
    assert not d.net.training and not any(p.requires_grad for p in d.net.parameters())    # frozen
    a, b = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    assert d(a, a).shape == (2, 16, 16) and np.abs(d(a, a)).max() < 1e-6 and d(a, b).min() >= 0
    ref = d.net(a.repeat(1, 3, 1, 1), b.repeat(1, 3, 1, 1), normalize=True)[:, 0].detach().numpy()
    np.testing.assert_allclose(d(a, b), ref, rtol=1e-6)
    t = RA.eq5_terms(a, b, d, sigma=0)                                          # both S factors of Eq. (5)
    np.testing.assert_allclose(t["S"], ref, rtol=1e-6)
    assert t["S_eq"].shape == (2, 16, 16) and not np.allclose(t["S_eq"], t["S"])
    np.testing.assert_allclose(RA.anomaly_map(a, b, d, sigma=0), t["res_eq"] * t["S"] * t["S_eq"], rtol=1e-6)


def test_eq5_shared_fixed_network_does_not_depend_on_the_trained_weights():
    """--perceptual fixed: one frozen network for every model (and every --seed); the encoder's S moves
    with the weights that the reversed loss trains, the fixed S does not."""
    torch.manual_seed(0)
    model = RA.SoftIntroVAE(channels=[4, 8], z_dim=8, image_size=16)
    args = types.SimpleNamespace(perceptual="fixed")
    fixed = RA.perceptual_distance(args, model, torch.device("cpu"))
    enc = RA.perceptual_distance(types.SimpleNamespace(perceptual="encoder"), model, torch.device("cpu"))
    a, b = torch.rand(3, 1, 16, 16), torch.rand(3, 1, 16, 16)
    s_fixed, s_enc = fixed(a, b), enc(a, b)
    assert s_fixed.shape == (3, 16, 16) and np.abs(fixed(a, a)).max() < 1e-6 and s_fixed.mean() > 0
    assert s_fixed.min() >= 0 and s_fixed.max() <= 4 + 1e-5
    hp = types.SimpleNamespace(beta_rec=1.0, beta_kl=1.0, beta_neg=256.0, alpha=2.0, gamma_r=1e-8, lam=5e-3)
    opt_e = torch.optim.Adam(model.encoder.parameters(), lr=1e-2)
    opt_d = torch.optim.Adam(model.decoder.parameters(), lr=1e-2)
    for _ in range(3):                                                        # the VAE's weights change
        RA.train_step(model, torch.rand(4, 1, 16, 16), opt_e, opt_d, hp, torch.device("cpu"))
    torch.manual_seed(123)                                                    # another --seed
    other_model = RA.SoftIntroVAE(channels=[4, 8], z_dim=8, image_size=16)
    np.testing.assert_array_equal(fixed(a, b), s_fixed)
    np.testing.assert_array_equal(RA.perceptual_distance(args, other_model, torch.device("cpu"))(a, b), s_fixed)
    assert np.abs(enc(a, b) - s_enc).max() > 1e-3                             # the encoder's S moved
    t1, t2 = RA.eq5_terms(a, b, fixed, sigma=0), RA.eq5_terms(a, b, RA.FixedDistance(torch.device("cpu")), sigma=0)
    np.testing.assert_array_equal(t1["S"], t2["S"])
    np.testing.assert_array_equal(t1["S_eq"], t2["S_eq"])


def test_lpips_missing_or_without_weights_is_one_error_naming_the_fallback(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lpips", None)                            # import lpips -> ImportError
    with pytest.raises(C.UserError, match=r"pip install lpips.*--perceptual fixed.*--perceptual encoder"):
        RA.LPIPSDistance(torch.device("cpu"))
    args = RA.parse_args(["--preset", "paper", "--out", str(tmp_path / "p")])
    assert args.perceptual == "lpips" and RA.parse_args(["--out", str(tmp_path)]).perceptual == "fixed"
    with pytest.raises(C.UserError, match="--perceptual encoder"):            # before any data or training
        RA.main(["--preset", "paper", "--device", "cpu", "--out", str(tmp_path / "p")])

    def no_weights(**kw):
        raise OSError("no internet")
    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=no_weights))
    with pytest.raises(C.UserError, match=r"cannot load the LPIPS weights \(OSError: no internet\).*"
                                          r"--perceptual encoder"):
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


# ---- scoring: the rows contract, paired differences ---------------------------------------------------

def test_slice_labels_follow_the_rows_contract():
    mk = lambda g, lab, mask: types.SimpleNamespace(id=g, group=g, label=lab, mask=mask)   # noqa: E731
    cases = [mk("normal", 0, None), mk("tumor", 1, "m.nii"), mk("atrophy", 1, None), mk("missed", 1, "m.nii")]
    m = np.zeros((8, 4, 4), np.uint8)
    m[3, 1, 1] = 1                                                             # only one tumour slice shows it
    S = types.SimpleNamespace(x=np.zeros((8, 4, 4)), mask=m, case=np.array([0, 0, 1, 1, 2, 2, 3, 3]), cases=cases)
    label, keep, dropped = RA.slice_labels(S)
    # lesion-free tumour slice 2: label 0 of group tumor; atrophy has no mask: every slice anomalous;
    # the scan whose lesion no scored slice shows is left out (its group would look normal)
    assert label[:6].tolist() == [0, 0, 0, 1, 1, 1] and keep == [0, 1, 2, 3, 4, 5] and dropped == ["missed"]


def test_paired_case_mean_averages_slices_within_a_case_first():
    a = [dict(id="1", case="A", f1=1.0), dict(id="2", case="A", f1=0.0), dict(id="3", case="B", f1=0.5),
         dict(id="4", case="B", f1="")]
    b = [dict(id="1", case="A", f1=0.0), dict(id="2", case="A", f1=0.0), dict(id="3", case="B", f1=0.0),
         dict(id="4", case="B", f1=0.2)]
    # case A: mean(1 - 0, 0 - 0) = 0.5; case B: 0.5 - 0 (slice 4 blank: skipped) -> mean over cases 0.5
    r = C.paired_case_mean(a, b, "f1")
    assert r["mean"] == pytest.approx(0.5) and r["n"] == 2 and r["ci"] == [pytest.approx(0.5)] * 2


# ---- early stopping and resume of the training loop --------------------------------------------------

def _train(tmp_path, name, argv, val_curve, monkeypatch, done=0):
    """train() on 16 random slices (2 steps per epoch) with a scripted validation MSE per epoch."""
    calls = [done]

    def fake_val(model, x, device):
        calls[0] += 1
        return val_curve[calls[0] - 1]
    monkeypatch.setattr(RA, "val_mse", fake_val)
    args = RA.parse_args(["--preset", "smoke", "--device", "cpu", "--out", str(tmp_path / name), *argv])
    run = C.start_run(args, RA.METHOD)
    S = types.SimpleNamespace(x=np.random.default_rng(0).uniform(-1, 1, (16, 32, 32)).astype(np.float32))
    model = RA.SoftIntroVAE(channels=args.channel_list, z_dim=args.z_dim, image_size=args.image_size)
    loop, _ = RA.train(model, S, S, args, run)
    return loop, model


def test_early_stopping_keeps_the_best_weights_and_resumes_exactly(tmp_path, monkeypatch):
    flags = ["--epochs", "6", "--patience", "2"]
    curve = [1.0, 0.5, 0.7, 0.9, 0.4, 0.3]          # best after epoch 2; epochs 3, 4 worse -> stop after 4
    loop, model = _train(tmp_path, "full", flags, curve, monkeypatch)
    st = loop.state["early_stopping"]
    assert loop.state["total_steps"] == 8 and (st["epoch"], st["best_epoch"], st["since"]) == (4, 2, 2)
    assert [v for _, v in loop.history["val_mse"]] == pytest.approx(curve[:4])
    last = C.load_checkpoint(tmp_path / "full" / "last.pt", RA.METHOD)["models"]["ra"]
    w = model.state_dict()
    assert all(torch.equal(w[k], st["weights"][k]) for k in w)                # scores use epoch 2's weights
    assert any(not torch.equal(w[k], last[k]) for k in w if w[k].is_floating_point())   # not the last ones
    for stop in (3, 5):       # inside epoch 2 (before its validation) / inside epoch 3, after the best
        _train(tmp_path, f"cut{stop}", [*flags, "--max-steps", str(stop)], curve, monkeypatch)
        loop_r, model_r = _train(tmp_path, f"res{stop}", [*flags, "--resume", str(tmp_path / f"cut{stop}" /
                                 "last.pt")], curve, monkeypatch, done=stop // 2)
        assert loop_r.state["total_steps"] == 8 and loop_r.state["early_stopping"]["best_epoch"] == 2
        assert all(torch.equal(model_r.state_dict()[k], w[k]) for k in w)


def test_load_trained_takes_the_best_weights_also_from_a_checkpoint_before_the_loop(tmp_path):
    model = RA.SoftIntroVAE(channels=[4, 8], z_dim=4, image_size=16)
    last = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    best = {k: torch.ones_like(v) for k, v in model.state_dict().items()}
    run = types.SimpleNamespace(out=tmp_path / "run", log=lambda msg: None)
    run.out.mkdir()
    for name, ck in (("loop", {"method": RA.METHOD, "models": {"ra": last}, "history": {"loss_E": []},
                               "loop": {"early_stopping": {"weights": best, "epoch": 3}}}),
                     ("old", {"models": {"ra": last}, "best_state": best, "history": {}})):  # before C.Loop
        torch.save(ck, tmp_path / f"{name}.pt")
        args = types.SimpleNamespace(checkpoint=str(tmp_path / f"{name}.pt"))
        trained = RA.load_trained(args, model, run)
        assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items()), name
        assert trained["train_s"] == 0.0 and (run.out / "last.pt").is_file()


# ---- the script end to end -------------------------------------------------------------------------------

SMOKE = ["--preset", "smoke", "--device", "cpu"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """`python reversed_ae.py --preset smoke` as a user types it (2 epochs of 2 steps)."""
    root = tmp_path_factory.mktemp("ra")
    r = subprocess.run([sys.executable, "reversed_ae.py", *SMOKE, "--out", str(root / "full"), "--cache-dir",
                        str(root / "cache")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return root


def test_smoke_run_writes_the_contract_files(smoke_run):
    out = smoke_run / "full"
    for f in ("config.json", "results.json", "scores.csv", "last.pt", "roc.png", "scores.png", "examples.png",
              "losses.png", "synthetic.png", "localization.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    res = json.loads((out / "results.json").read_text())
    for k in ("method", "data", "preset", "seed", "unit", "metrics", "groups", "timing", "table1_synthetic",
              "table2b_localization", "table3_ablation", "operating_point"):
        assert k in res, k
    assert res["unit"] == "slice" and 0 <= res["metrics"]["auroc"] <= 1
    assert "normal" in res["groups"] and res["train"]["epochs_run"] == 2
    t3 = res["table3_ablation"]
    assert set(t3) == set(RA.VARIANTS)
    for name in set(RA.VARIANTS) - {"Eq. 5 (eq + PL)"}:                       # paired over cases, vs Eq. (5)
        d = t3[name]["minus_Eq. 5 (eq + PL)"]["auroc"]["all"]
        assert d["ci"][0] <= d["diff"] <= d["ci"][1] and d["b"] == pytest.approx(res["metrics"]["auroc"])
    rows = C.read_scores(out / "scores.csv")
    assert all(r["case"] in r["id"] for r in rows) and {r["label"] for r in rows} == {0, 1}
    for g in {r["group"] for r in rows} - {"normal"}:                        # no anomalous group looks normal
        assert any(r["label"] == 1 for r in rows if r["group"] == g), g
    sys.path.insert(0, str(REPO.parent / "shared"))
    try:
        import check_contract
        problems = check_contract.check(str(out))
        problems = problems if isinstance(problems, list) else problems[0]
        assert not problems, problems
    except ImportError:
        pass


@pytest.mark.parametrize("stop", [1, 3])     # inside epoch 1; after epoch 1's validation, inside epoch 2
def test_resume_gives_byte_identical_scores(smoke_run, stop):
    cut, res = smoke_run / f"cut{stop}", smoke_run / f"res{stop}"
    cache = ["--cache-dir", str(smoke_run / "cache")]
    RA.main([*SMOKE, *cache, "--out", str(cut), "--max-steps", str(stop)])
    assert C.load_checkpoint(cut / "last.pt", RA.METHOD)["loop"]["total_steps"] == stop
    RA.main([*SMOKE, *cache, "--out", str(res), "--resume", str(cut / "last.pt")])
    assert (res / "scores.csv").read_bytes() == (smoke_run / "full" / "scores.csv").read_bytes()
    full, resumed = (json.loads((d / "results.json").read_text()) for d in (smoke_run / "full", res))
    assert resumed["train"] == full["train"]                                   # early-stopping state carried on


def test_checkpoint_scores_the_same_and_rejects_another_script(smoke_run, tmp_path):
    RA.main([*SMOKE, "--cache-dir", str(smoke_run / "cache"), "--out", str(tmp_path / "s"), "--checkpoint",
             str(smoke_run / "full" / "last.pt")])
    assert (tmp_path / "s" / "scores.csv").read_bytes() == (smoke_run / "full" / "scores.csv").read_bytes()
    ck = C.load_checkpoint(smoke_run / "full" / "last.pt")
    ck["method"] = "anogan"
    torch.save(ck, tmp_path / "other.pt")
    with pytest.raises(C.UserError, match=r"not a last.pt of reversed_ae.py \(it is one of anogan.py\)"):
        RA.main([*SMOKE, "--out", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "other.pt")])


def test_compare_run_is_this_model_minus_the_other_paired_over_cases(smoke_run, tmp_path):
    rows = C.read_scores(smoke_run / "full" / "scores.csv")
    other = tmp_path / "sivae"
    other.mkdir()
    cfg = json.loads((smoke_run / "full" / "config.json").read_text())
    cfg["args"]["lam"] = 0.0
    (other / "config.json").write_text(json.dumps(cfg))
    with open(other / "scores.csv", "w") as f:                                  # the other model: noise only
        f.write(",".join(rows[0]) + "\n")
        for k, r in enumerate(rows):
            f.write(",".join(str(k % 7) if c.startswith("s") else str(r[c]) for c in rows[0]) + "\n")
    args = types.SimpleNamespace(compare_run=str(other), perceptual="encoder", lam=5e-3)
    vs = RA.compare_run(rows, args)
    a = vs["Eq. 5 (eq + PL)"]["all"]
    assert (vs["this"], vs["other"], vs["same_S"]) == ("RA", "SI-VAE (--no-reverse)", False)
    assert cfg["args"]["perceptual"] == "fixed"                               # smoke: the shared S
    assert RA.compare_run(rows, types.SimpleNamespace(**{**vars(args), "perceptual": "fixed"}))["same_S"]
    assert a["a"] == pytest.approx(C.evaluate(rows, key="s_eq5")["metrics"]["auroc"])
    assert a["diff"] == pytest.approx(a["a"] - a["b"]) and a["ci"][0] <= a["diff"] <= a["ci"][1]
    with pytest.raises(C.UserError, match="lacks slices of this run"):
        RA.compare_run(rows + [dict(rows[0], id="new")], args)


def test_bad_flag_is_one_error_line(tmp_path):
    r = subprocess.run([sys.executable, "reversed_ae.py", "--preset", "smoke", "--channels", "4,x",
                        "--out", str(tmp_path / "bad")], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error:") and "--channels" in r.stderr and "Traceback" not in r.stderr


def test_smoke_reports_baselines_slabs_and_training(smoke_run):
    """Issue 15.5 (baselines per scored unit), 17.4 (a slab per scored scan, slabs.png), the Loop."""
    from tests.fixtures import check_report_extras
    check_report_extras(smoke_run / "full")
