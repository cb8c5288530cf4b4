"""Tests for anovaegan.py (Baur et al. 2018): the losses of Eq. (2)/(3) and the residual of Eq. (4) on
hand-computed tensors, the §3 post-processing on a small volume with a known answer, the healthy-only
threshold, the six Table 1 networks, a training loop per --model, the smoke run as a user types it
(contract files, --checkpoint, --compare with paired intervals) and resume exactness.

Formula tests: python -m pytest tests/test_anovaegan.py -k "eq or postprocess or threshold"
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO.parent / "shared"))
import anovaegan as A  # noqa: E402
import common as C  # noqa: E402
from data import datasets  # noqa: E402


# ---- Eq. (2): L_VAE = λ1·‖x − x̂‖₁ + λ2·D_KL(z‖N(0, I)) − λ3·log Dis(x̂) -----------------------------

def test_eq2_l1_term_hand_computed():
    # sample 1: |1-0| + |-1-1| + |0.5-0.25| + |0-0| = 1 + 2 + 0.25 + 0 = 3.25 ; sample 2: 4 × 0.5 = 2.0
    x = torch.tensor([[[[1.0, -1.0], [0.5, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    x_hat = torch.tensor([[[[0.0, 1.0], [0.25, 0.0]]], [[[0.5, -0.5], [0.5, -0.5]]]])
    assert A.loss_rec(x, x_hat).item() == pytest.approx((3.25 + 2.0) / 2)     # summed per slice, batch mean


def test_eq2_kl_term_hand_computed():
    # KL(N(μ, σ²) ‖ N(0, 1)) = ½(μ² + σ² − log σ² − 1)
    # unit 1: μ=0, σ²=1 -> 0 ; unit 2: μ=1, log σ²=0 -> 0.5 ; unit 3: μ=0, log σ² = log 2 -> ½(2 − log 2 − 1)
    mu = torch.tensor([[0.0, 1.0, 0.0]])
    logvar = torch.tensor([[0.0, 0.0, math.log(2.0)]])
    expect = 0.0 + 0.5 + 0.5 * (2.0 - math.log(2.0) - 1.0)
    assert A.loss_prior(mu, logvar).item() == pytest.approx(expect, rel=1e-6)
    # spatial z (B, c, h, w) is summed over all latent units, averaged over the batch
    mu2 = torch.ones(2, 2, 2, 2) * 2.0                                          # ½·4 per unit, 8 units
    assert A.loss_prior(mu2, torch.zeros_like(mu2)).item() == pytest.approx(16.0)


def test_eq2_kl_is_zero_only_at_the_prior():
    mu = torch.zeros(3, 4)
    assert A.loss_prior(mu, torch.zeros_like(mu)).item() == 0.0
    assert A.loss_prior(mu + 0.1, torch.zeros_like(mu)).item() > 0
    assert A.loss_prior(mu, torch.full_like(mu, -0.5)).item() > 0


def test_eq2_adversarial_term_and_weighting():
    # −log Dis(x̂) with Dis = sigmoid(logit): logit 0 -> log 2 ; logit log 3 -> Dis = 3/4 -> −log 0.75
    d_fake = torch.tensor([0.0, math.log(3.0)])
    assert A.loss_adv(d_fake).item() == pytest.approx((math.log(2) - math.log(0.75)) / 2, rel=1e-6)
    # Eq. (2) weighting: 2·3 + 0.5·4 + 10·0.1 = 9
    assert A.loss_vae(torch.tensor(3.0), torch.tensor(4.0), torch.tensor(0.1),
                      lam_rec=2.0, lam_prior=0.5, lam_adv=10.0).item() == pytest.approx(9.0)


def test_grad_ratio_of_the_decoder_by_hand():
    """‖∇_φ L_rec‖ / ‖∇_φ L_adv‖ over the decoder φ: a decoder x̂ = w·z of one weight, by hand."""
    import types
    w = torch.nn.Linear(1, 1, bias=False)
    w.weight.data.fill_(0.5)
    ae = types.SimpleNamespace(from_z=w, dec=torch.nn.Identity())
    z, x = torch.tensor([[2.0]]), torch.tensor([[3.0]])
    x_hat = ae.dec(ae.from_z(z))                                        # 1.0
    l_rec = (x - x_hat).abs().sum()                                     # dL/dw = −z·sign(x − wz) = −2
    l_adv = (x_hat ** 2).sum()                                          # dL/dw = 2·wz·z = 4
    assert A.grad_ratio(ae, l_rec, l_adv).item() == pytest.approx(2 / 4)
    assert A.grad_ratio(ae, 3 * l_rec, 0.5 * l_adv).item() == pytest.approx(3 * 2 / (0.5 * 4))


def test_grad_ratio_on_a_tiny_anovaegan_equals_separate_backward_passes():
    torch.manual_seed(0)
    ae, dis = A.build_models(_smoke_args("AnoVAEGAN"))
    x = torch.randn(4, 1, 32, 32)
    x_hat, _, _ = ae(x)
    l_rec, l_adv = A.loss_rec(x, x_hat), A.loss_adv(dis(x_hat))
    phi = list(ae.from_z.parameters()) + list(ae.dec.parameters())

    def norm(loss):                                                     # .grad of one term alone
        ae.zero_grad(), dis.zero_grad()
        loss.backward(retain_graph=True)
        return math.sqrt(sum(float((p.grad ** 2).sum()) for p in phi))
    expect = norm(2.0 * l_rec) / norm(0.5 * l_adv)
    assert A.grad_ratio(ae, 2.0 * l_rec, 0.5 * l_adv).item() == pytest.approx(expect, rel=1e-4)
    assert expect == pytest.approx(4 * norm(l_rec) / norm(l_adv), rel=1e-4)   # λ1 / λ3 = 4


def test_measuring_the_gradient_ratio_does_not_change_the_training_step():
    S = _tiny_set()
    x = torch.from_numpy(np.asarray(S.x[:8]))[:, None]
    lam = dict(lam_rec=1.0, lam_prior=1.0, lam_adv=3.0)
    params = []
    for measure in (False, True):
        torch.manual_seed(0)
        ae, dis = A.build_models(_smoke_args("AnoVAEGAN"))
        opt, opt_dis = torch.optim.Adam(ae.parameters(), 1e-3), torch.optim.Adam(dis.parameters(), 1e-4)
        losses = A.train_step(ae, dis, opt, opt_dis, x, lam, measure=measure)
        assert ("grad ratio" in losses) == measure
        params.append(torch.cat([p.detach().ravel() for p in [*ae.parameters(), *dis.parameters()]]))
    assert torch.equal(params[0], params[1])


# ---- Eq. (3): L_Dis = −log Dis(x) − log(1 − Dis(x̂)) --------------------------------------------------

def test_eq3_discriminator_loss_hand_computed():
    # real logit log 3 -> Dis(x) = 0.75 ; fake logit log(1/3) -> Dis(x̂) = 0.25 -> −log 0.75 − log 0.75
    d_real, d_fake = torch.tensor([math.log(3.0)]), torch.tensor([math.log(1 / 3)])
    assert A.loss_dis(d_real, d_fake).item() == pytest.approx(-2 * math.log(0.75), rel=1e-6)
    # a confused discriminator (logits 0) pays 2·log 2
    assert A.loss_dis(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(2 * math.log(2), rel=1e-6)


# ---- Eq. (4): r = |x − x̂| ------------------------------------------------------------------------------

def test_eq4_residual_is_absolute_difference():
    x = np.array([[0.5, -1.0], [0.0, 1.0]], np.float32)
    x_hat = np.array([[0.0, -0.5], [0.25, 1.0]], np.float32)
    np.testing.assert_allclose(A.residual(x, x_hat), [[0.5, 0.5], [0.25, 0.0]])


# ---- §3 post-processing on a volume with a known answer --------------------------------------------

def _cfg(**kw):
    import argparse
    d = dict(median=5, erode=1, min_size=6)
    d.update(kw)
    return argparse.Namespace(**d)


def test_postprocess_median_removes_speckle_keeps_blob_and_mask():
    Z, H, W = 12, 24, 24
    r = np.zeros((Z, H, W), np.float32)
    r[4:9, 8:14, 8:14] = 1.0                                     # a 5×6×6 "lesion": survives a 5×5×5 median
    r[2, 3, 20] = 5.0                                            # a single hot voxel: removed by the median
    r[10, 20, 3] = 5.0
    brain = np.zeros((Z, H, W), np.uint8)
    brain[:, 2:22, 2:22] = 1
    f = A.filter_residual(r, brain, _cfg())
    assert f[2, 3, 20] == 0 and f[10, 20, 3] == 0
    assert f[6, 11, 11] == 1.0
    eroded = A.eroded_brain(brain, 1)
    assert (f[~eroded] == 0).all()                               # multiplied by the eroded brain mask
    assert eroded.sum() < brain.sum()
    # known answer: a voxel's 5×5×5 median is 1 iff its window holds >= 63 of 125 box voxels; the window
    # count of a box is the product over axes of |[v−2, v+2] ∩ box| (the box is far from the borders)
    def overlap(v, lo, hi):
        return max(0, min(v + 2, hi - 1) - max(v - 2, lo) + 1)
    expect = np.zeros_like(r, bool)
    for z in range(Z):
        for y in range(H):
            for x in range(W):
                expect[z, y, x] = overlap(z, 4, 9) * overlap(y, 8, 14) * overlap(x, 8, 14) >= 63
    np.testing.assert_array_equal(f > 0.5, expect & eroded)
    seg = A.segment(f, 0.5, _cfg())
    np.testing.assert_array_equal(seg, expect)                   # one component of expect.sum() >= 6 voxels
    assert expect.sum() == 64


@pytest.mark.parametrize("shape,size", [((7, 9, 11), 5), ((2, 6, 6), 5), ((20, 16, 16), 3)])
def test_postprocess_torch_median_equals_scipy(shape, size):
    # the GPU path of the 5×5×5 median filter gives exactly scipy's answer, borders included
    from scipy import ndimage as ndi
    r = np.random.default_rng(0).random(shape).astype(np.float32)
    np.testing.assert_array_equal(A.median_filter_3d(r, size, torch.device("cpu")), ndi.median_filter(r, size=size))


def test_postprocess_erosion_keeps_first_and_last_slice_of_the_slab():
    # a 20-slice sub-volume ends where the slab ends, not where the brain ends: its first and last slices
    # are eroded in-plane like the others, not dropped
    brain = np.zeros((20, 16, 16), np.uint8)
    brain[:, 3:13, 3:13] = 1
    e = A.eroded_brain(brain, 1)
    assert e[0].sum() == e[10].sum() == e[19].sum() == 8 * 8
    f = A.filter_residual(np.ones((20, 16, 16), np.float32), brain, _cfg(median=1))
    assert (f[0] == e[0]).all() and (f[19] == e[19]).all()


def test_postprocess_removes_components_under_min_size():
    f = np.zeros((6, 16, 16), np.float32)
    f[1, 1:3, 1:3] = 1.0                                         # 4 voxels  -> removed (< 6)
    f[3:5, 8:11, 8:11] = 1.0                                     # 18 voxels -> kept
    f[2, 12:14, 1:4] = 1.0                                       # 6 voxels  -> kept (not < 6)
    seg = A.segment(f, 0.5, _cfg(min_size=6))
    assert not seg[1].any()
    assert seg[3:5, 8:11, 8:11].all() and seg[2, 12:14, 1:4].all()
    assert seg.sum() == 18 + 6


def test_threshold_is_98th_percentile_of_healthy_validation_residuals(tmp_path):
    """healthy_threshold() sees only the validation set: its value is the 98th percentile of the
    filtered validation residuals inside the eroded brain, whatever the test data look like."""
    torch.manual_seed(0)
    args = _smoke_args("sAE")
    ae, _ = A.build_models(args)
    S_val = _tiny_set(n=16)
    t, values, slice_scores = A.healthy_threshold(ae, S_val, args, torch.device("cpu"))
    x_hat = A.reconstruct(ae, S_val.x, device=torch.device("cpu"), batch_size=8)
    expect = []
    for i in range(len(S_val.cases)):
        r = S_val.slices_of(i)
        f = A.filter_residual(np.abs(S_val.x[r] - x_hat[r]), S_val.brain[r], args)
        expect.append(f[A.eroded_brain(S_val.brain[r], args.erode)])
    assert len(slice_scores) == len(S_val) and slice_scores[0] == pytest.approx(
        A.filter_residual(np.abs(S_val.x[:8] - x_hat[:8]), S_val.brain[:8], args)[0].max())
    expect = np.concatenate(expect)
    assert values.size == expect.size
    assert t == pytest.approx(np.percentile(expect, 98), rel=1e-5)
    assert C.threshold_from_healthy(np.arange(1, 101), percentile=98) == pytest.approx(98.02)


# ---- networks: the six Table 1 models share the encoder/decoder ------------------------------------

@pytest.mark.parametrize("model", A.MODELS)
def test_networks_shapes_and_shared_trunk(model):
    import argparse
    args = argparse.Namespace(model=model, image_size=64, z_shape="4x4x16", z_dim=32, width=8)
    ae, dis = A.build_models(args)
    x = torch.randn(3, 1, 64, 64)
    x_hat, mu, logvar = ae(x)
    assert x_hat.shape == x.shape
    assert mu.shape == ((3, 16, 4, 4) if model in A.SPATIAL else (3, 32))
    assert (logvar is not None) == (model in A.VARIATIONAL)
    assert (dis is not None) == (model in A.ADVERSARIAL)
    if dis is not None:
        assert dis(x).shape == (3,)
    ref, _ = A.build_models(argparse.Namespace(model="sAE", image_size=64, z_shape="4x4x16", z_dim=32, width=8))
    n = lambda m: sum(p.numel() for p in m.parameters())           # noqa: E731
    assert n(ae.enc) == n(ref.enc) and n(ae.dec) == n(ref.dec)     # same encoder-decoder complexity


def test_vae_decodes_posterior_mean_at_test_time():
    import argparse
    torch.manual_seed(0)
    ae, _ = A.build_models(argparse.Namespace(model="sVAE", image_size=32, z_shape="4x4x8", z_dim=8, width=4))
    ae.eval()
    x = torch.randn(2, 1, 32, 32)
    a, b = ae(x, sample=False)[0], ae(x, sample=False)[0]
    assert torch.equal(a, b)
    assert not torch.equal(ae(x, sample=True)[0], a)


def test_z_shape_validation():
    with pytest.raises(C.UserError):
        A.parse_z_shape("16x16")
    assert A.parse_z_shape("8x8x64") == (8, 8, 64)


# ---- the copy probe: how much of a painted disc does the reconstruction keep? ----------------------

class _Fixed(torch.nn.Module):
    """A stand-in autoencoder x̂ = a·x + b (forward returns (x̂, μ, log σ²) like A.Autoencoder)."""

    def __init__(self, a, b=0.0):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x, sample=True):
        return self.a * x + self.b, None, None


@pytest.mark.parametrize("a,b,expect", [(1.0, 0.0, 1.0), (0.0, 0.3, 0.0), (0.5, -0.2, 0.5)])
def test_copy_probe_of_an_identity_a_constant_and_a_halving_model(a, b, expect):
    """The identity copies every disc (100%), a constant output keeps none of it (0%), x̂ = x/2 + b
    half of its contrast, whatever the radius."""
    S = _tiny_set(n=16)
    args = _smoke_args("sAE")
    kept, shown = C.copy_probe(lambda x: A.reconstruct(_Fixed(a, b), x, device=torch.device("cpu"),
                                                       batch_size=64, amp=args.amp), S, [1, 3, 5])
    assert list(kept) == [1, 3, 5]
    for r, k in kept.items():
        assert k["n"] == 2 and k["mean"] == pytest.approx(expect, abs=1e-6)
        assert k["ci"][0] <= k["mean"] + 1e-9 and k["mean"] - 1e-9 <= k["ci"][1]
        i, painted, x_hat = shown[r]
        disc = painted != S.x[i]                                        # the painted pixels
        assert (painted[disc] == 1.0).all() and abs(disc.sum() - np.pi * r * r) < 2 * np.pi * r + 2
        assert (S.brain[i][disc] > 0).all()                              # inside the brain


# ---- training smoke for each --model (in-process, tiny arrays) ----------------------------------

def _smoke_args(model, tmp_path=None, **kw):
    argv = ["--preset", "smoke", "--model", model, "--out", str(tmp_path or "/tmp/anovaegan_unused")]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return A.parse_args(argv)


def _tiny_set(n=16, size=32, seed=0):
    """An ArraySet of n slices (2 cases of n/2 slices) with a disc-shaped brain."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    brain = (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size / 2.5) ** 2).astype(np.uint8)
    x = np.where(brain > 0, rng.uniform(-0.5, 0.5, (n, size, size)), -1.0).astype(np.float32)
    k = n // 2
    cases = [datasets.Case(id=f"c{i}", subject=f"c{i}", group="val", label=0, image="") for i in range(2)]
    return datasets.ArraySet(x=x, mask=np.zeros_like(x, np.uint8), brain=np.repeat(brain[None], n, 0),
                             case=np.repeat(np.arange(2), k).astype(np.int32),
                             z=np.tile(np.arange(k), 2).astype(np.int32), cases=cases)


@pytest.mark.parametrize("model", A.MODELS)
def test_smoke_train_each_model(model, tmp_path):
    import time
    torch.manual_seed(0)
    args = _smoke_args(model, tmp_path, epochs=2)
    run = C.Run(out=tmp_path, device=torch.device("cpu"), method="anovaegan", t0=time.time())
    ae, dis = A.build_models(args)
    S = _tiny_set()
    loop = A.train(args, run, ae, dis, S, S)
    hist = loop.history
    assert hist["L_rec"] and all(np.isfinite(v) for _, v in hist["L_rec"])
    assert ("L_prior" in hist) == (model in A.VARIATIONAL)
    assert ("L_adv" in hist) == ("L_Dis" in hist) == (model in A.ADVERSARIAL)
    assert len(hist["val L_rec"]) == 2                                  # once per epoch
    ck = C.load_checkpoint(tmp_path / "last.pt", "anovaegan")
    assert ck["loop"]["total_steps"] == 2 * (16 // args.batch_size)
    assert set(ck["models"]) == ({"ae", "dis"} if model in A.ADVERSARIAL else {"ae"})


# ---- smoke run of the script as a user types it ---------------------------------------------------

def _run(args):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / "anovaegan.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("anovaegan") / "run"
    p = _run(["--preset", "smoke", "--out", str(out)])
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_smoke_run_writes_contract_files(smoke, tmp_path):
    from check_contract import check
    problems = check(str(smoke))
    assert not (problems if isinstance(problems, list) else problems[0])
    for f in ("fig5_segmentations.png", "fig6_residual_histogram.png", "fig5.npz", "copy_probe.png"):
        assert (smoke / f).is_file(), f
    res = json.loads((smoke / "results.json").read_text())
    assert res["method"] == "anovaegan" and res["unit"] == "slice"
    assert {"ms_lesion", "tumor", "normal"} <= set(res["groups"])
    t = res["table1"]
    assert t["model"] == "AnoVAEGAN" and t["z"] == "8x8x4" and t["reco_s_per_sample"] > 0
    assert 0 <= t["dice_mean"] <= 1 and t["dice_groups"] == ["ms_lesion", "tumor"]
    assert 0 <= res["pixel"]["all"]["auroc"] <= 1 and "oracle_dice" in res["pixel"]["tumor"]
    probe = res["copy_probe"]
    assert probe["radius_px"] == [1, 2, 4] and all(0 < probe["kept"][str(r)]["n"] for r in (1, 2, 4))
    # Dice: the mean over patients with its 95% interval over patients
    for g in ("tumor", "all"):
        ds = [p["dice"] for p in res["patients"] if p["dice"] is not None and g in ("all", p["group"])]
        assert res["dice"][g]["mean"] == pytest.approx(np.mean(ds)) and res["dice"][g]["n"] == len(ds)
        assert res["dice"][g]["ci"] == pytest.approx(C.mean_ci(ds)["ci"])
    # slice rows: group = the scan's group, label = the slice's own, case = the scan
    import csv
    rows = list(csv.DictReader(open(smoke / "scores.csv")))
    pat = {p["id"]: p for p in res["patients"]}
    assert all(r["group"] == pat[r["case"]]["group"] for r in rows)
    assert all(int(r["label"]) == int(int(r["gt_voxels"]) > 0 or pat[r["case"]]["gt_voxels"] == 0
                                       and pat[r["case"]]["label"] == 1) for r in rows)
    assert {r["label"] for r in rows if r["group"] == "tumor"} == {"0", "1"}
    # the threshold came from the healthy validation subjects: its pixel count is theirs
    import argparse
    ns = argparse.Namespace(data="synthetic", data_root=None, train_data=None, train_root=None, preset="smoke",
                            seed=0, modality=None)
    data = datasets.load_dataset(ns, contrast="flair")
    S_val = datasets.slice_stack(data.val, size=(32, 32), norm="mri", n_slices=8, center=0.5)
    n_val = sum(int(A.eroded_brain(S_val.brain[S_val.slices_of(i)], 1).sum()) for i in range(len(S_val.cases)))
    assert res["threshold"]["source"] == "healthy validation" and res["threshold"]["n_val_pixels"] == n_val
    # --checkpoint scores without training and reproduces the threshold
    out2 = tmp_path / "ck"
    p = _run(["--preset", "smoke", "--out", str(out2), "--checkpoint", str(smoke / "last.pt"), "--groups", "tumor"])
    assert p.returncode == 0, p.stderr[-3000:]
    res2 = json.loads((out2 / "results.json").read_text())
    assert res2["threshold"]["value"] == pytest.approx(res["threshold"]["value"], rel=1e-4)
    assert set(res2["groups"]) == {"normal", "tumor"} and (out2 / "losses.png").is_file()
    # --compare builds Table 1 over finished runs; a glob such as runs/anovaegan__* also matches earlier
    # --compare folders, which are skipped rather than stopping the table
    cmp1, cmp2 = tmp_path / "cmp1", tmp_path / "cmp2"
    A.main(["--compare", str(smoke), str(out2), "--out", str(cmp1)])
    A.main(["--compare", str(smoke), str(cmp1), str(out2), "--out", str(cmp2)])
    assert (cmp1 / "table1.md").read_text() == (cmp2 / "table1.md").read_text()
    assert (cmp2 / "table1.md").read_text().count("AnoVAEGAN") >= 2


def test_resume_after_max_steps_reproduces_the_uninterrupted_run(smoke, tmp_path):
    """8 training steps in all (64 slices / 8); stop after 3, resume from that last.pt."""
    a, b = tmp_path / "a", tmp_path / "b"
    p = _run(["--preset", "smoke", "--out", str(a), "--max-steps", "3"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert C.load_checkpoint(a / "last.pt", "anovaegan")["loop"]["total_steps"] == 3
    p = _run(["--preset", "smoke", "--out", str(b), "--resume", str(a / "last.pt")])
    assert p.returncode == 0, p.stderr[-3000:]
    assert (b / "scores.csv").read_bytes() == (smoke / "scores.csv").read_bytes()
    assert (a / "scores.csv").read_bytes() != (smoke / "scores.csv").read_bytes()


def test_checkpoint_of_another_script_or_other_flags_is_one_error(smoke, tmp_path):
    ck = C.load_checkpoint(smoke / "last.pt")
    ck["method"] = "madgan"
    torch.save(ck, tmp_path / "other.pt")
    with pytest.raises(C.UserError, match=r"not a last.pt of anovaegan.py \(it is one of madgan.py\)"):
        A.main(["--preset", "smoke", "--checkpoint", str(tmp_path / "other.pt"), "--out", str(tmp_path / "x")])
    with pytest.raises(C.UserError, match="other network settings"):
        A.main(["--preset", "smoke", "--checkpoint", str(smoke / "last.pt"), "--z-shape", "8x8x8",
                "--out", str(tmp_path / "y")])


def test_paired_differences_of_two_runs_on_the_same_patients():
    """--compare's A − B (benchmark.table1_paired): the mean of per-patient Dice differences, and the slice AUROC difference."""
    import sklearn.metrics as skm
    rng = np.random.default_rng(0)
    pats, rows_a, rows_b = {"a": [], "b": []}, [], []
    for i in range(12):
        grp = "tumor" if i < 8 else "normal"
        da, db = (rng.uniform(0.3, 0.9), rng.uniform(0.0, 0.4)) if grp == "tumor" else (None, None)
        pats["a"].append(dict(id=f"p{i}", group=grp, dice=da))
        pats["b"].append(dict(id=f"p{i}", group=grp, dice=db))
        for z in range(4):
            lab = int(grp == "tumor" and z < 2)
            rows_a.append(dict(id=f"p{i}/z{z}", group=grp, label=lab, case=f"p{i}", score=lab + rng.normal()))
            rows_b.append(dict(id=f"p{i}/z{z}", group=grp, label=lab, case=f"p{i}", score=rng.normal()))
    import benchmark
    p = benchmark.table1_paired((Path("a"), {"patients": pats["a"]}, rows_a), (Path("b"), {"patients": pats["b"]}, rows_b),
                 "tumor")
    diffs = [a["dice"] - b["dice"] for a, b in zip(pats["a"], pats["b"]) if a["dice"] is not None]
    assert p["n_cases"] == 8 and p["dice_diff"] == pytest.approx(np.mean(diffs))
    assert p["dice_ci"][0] > 0 and p["dice_resolved"]                 # every difference is positive
    clean = [i for i, r in enumerate(rows_a) if r["label"] == 1 or r["group"] == "normal"]   # normal scans
    y = np.array([rows_a[i]["label"] for i in clean])
    sa, sb = np.array([rows_a[i]["score"] for i in clean]), np.array([rows_b[i]["score"] for i in clean])
    assert p["auroc_diff"] == pytest.approx(skm.roc_auc_score(y, sa) - skm.roc_auc_score(y, sb))
    assert p["auroc_ci"][0] <= p["auroc_diff"] <= p["auroc_ci"][1]


def test_bad_flags_give_one_error_line(tmp_path):
    with pytest.raises(C.UserError, match="--z-shape"):
        A.main(["--preset", "smoke", "--z-shape", "3x3x64", "--out", str(tmp_path / "x")])
    with pytest.raises(C.UserError, match="checkpoint"):
        A.main(["--preset", "smoke", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "y")])
    with pytest.raises(C.UserError, match="--percentile"):
        A.main(["--preset", "smoke", "--percentile", "120", "--out", str(tmp_path / "z")])
    with pytest.raises(C.UserError, match="--median must be odd"):
        A.main(["--preset", "smoke", "--median", "4", "--out", str(tmp_path / "w")])


def test_smoke_reports_baselines_slabs_and_training(smoke):
    """Issue 15.5 (baselines per scored unit), 17.4 (a slab per scored scan, slabs.png), the Loop."""
    from tests.fixtures import check_report_extras
    check_report_extras(smoke)
