"""Tests of anogan.py: the equations on hand-computed tensors (`pytest -k eq5` selects one), the
mapping's properties (loss decreases, only z moves, BatchNorm frozen, batched == one at a time)
and a subprocess smoke run checked against the contract."""
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import anogan as A
import common as C

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO.parent / "shared"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is faster, and two threads on a busy 2-core machine spin (40x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- Eq. (1)-(6) on hand-computed values ---------------------------------------------------------

def test_eq1_discriminator_loss_value():
    # D(x) = sigmoid(0) = 0.5 for real and fake: -[log 0.5 + log 0.5] = 2 log 2
    z = torch.zeros(3)
    assert A.d_loss(z, z).item() == pytest.approx(2 * math.log(2), abs=1e-6)
    # D(x) = 0.75 (logit ln 3), D(G(z)) = 0.25 (logit -ln 3): -[log 0.75 + log 0.75]
    l3 = torch.full((2,), math.log(3))
    assert A.d_loss(l3, -l3).item() == pytest.approx(-2 * math.log(0.75), abs=1e-6)
    # a perfect discriminator has (almost) zero loss; a fooled one a large loss
    assert A.d_loss(torch.full((2,), 20.), torch.full((2,), -20.)).item() < 1e-6
    assert A.d_loss(torch.full((2,), -5.), torch.full((2,), 5.)).item() > 9


def test_eq2_generator_loss_value():
    # -log D(G(z)) with D(G(z)) = 0.25 (logit -ln 3) -> log 4; mean over the batch
    l = torch.tensor([-math.log(3), 0.0])
    assert A.g_loss(l).item() == pytest.approx((math.log(4) + math.log(2)) / 2, abs=1e-6)


def test_eq3_residual_loss_is_per_sample_sum_of_abs():
    x = torch.tensor([[[[1.0, -1.0], [0.5, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])      # (2, 1, 2, 2)
    g = torch.tensor([[[[0.0, 1.0], [0.5, -0.25]]], [[[1.0, 1.0], [-1.0, 0.5]]]])
    # sample 0: 1 + 2 + 0 + 0.25 = 3.25; sample 1: 1 + 1 + 1 + 0.5 = 3.5
    assert torch.allclose(A.residual_loss(x, g), torch.tensor([3.25, 3.5]))


def test_eq4_discrimination_loss_is_per_sample_sum_of_abs():
    fx = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])                  # (1, 2, 1, 2) feature map
    fg = torch.tensor([[[[0.0, 2.5]], [[3.0, 1.0]]]])
    fx, fg = torch.cat([fx, fx]), torch.cat([fg, fx])                  # sample 1 matches exactly
    # sample 0: 1 + 0.5 + 0 + 3 = 4.5; sample 1: 0
    assert torch.allclose(A.discrimination_loss(fx, fg), torch.tensor([4.5, 0.0]))


def test_eq4_reference_discrimination_loss_of_yeh():
    # L_D̂ = sigmoid cross-entropy with targets 1 = -log sigmoid(logit), per sample
    l = torch.tensor([0.0, math.log(3), -math.log(3)])
    want = torch.tensor([math.log(2), -math.log(0.75), -math.log(0.25)])
    assert torch.allclose(A.reference_discrimination_loss(l), want, atol=1e-6)


def test_eq5_mapping_loss_puts_lambda_on_the_discrimination_term():
    L_R, L_D = torch.tensor([10.0, 0.0]), torch.tensor([100.0, 4.0])
    # (1 - 0.1)·10 + 0.1·100 = 19 (swapped weights would give 91); (0.9)·0 + 0.1·4 = 0.4
    assert torch.allclose(A.mapping_loss(L_R, L_D, 0.1), torch.tensor([19.0, 0.4]))
    assert torch.allclose(A.mapping_loss(L_R, L_D, 0.0), L_R)
    assert torch.allclose(A.mapping_loss(L_R, L_D, 1.0), L_D)


def test_eq6_anomaly_score_puts_lambda_on_the_discrimination_score():
    R, D = np.array([200.0, 50.0]), np.array([1000.0, 3000.0])
    # 0.9·200 + 0.1·1000 = 280; 0.9·50 + 0.1·3000 = 345
    assert np.allclose(A.anomaly_score(R, D, 0.1), [280.0, 345.0])


def test_patch_label_rule_of_section_3():
    m = np.zeros((3, 4, 4), np.uint8)
    m[1, 3, 3] = 1                                                      # one anomalous pixel is enough
    m[2] = 1
    assert A.patch_labels(m).tolist() == [0, 1, 1]


def test_patch_rows_follow_the_rows_contract():
    """group = the group of the patch's SCAN, label = the patch's own label, case = the scan: a lesion-free
    patch of a tumour scan is {group: tumor, label: 0}, never counted as a patch of a normal scan."""
    cases = [types.SimpleNamespace(id="normal/n0", group="normal", label=0),
             types.SimpleNamespace(id="tumor/t0", group="tumor", label=1)]
    S = types.SimpleNamespace(cases=cases, case=np.array([0, 1]), z=np.array([7, 9]))   # one slice per scan
    mask = np.zeros((3, 4, 4), bool)
    mask[2, 1:3, 1:3] = True                                            # 4 anomalous pixels
    P = dict(mask=mask, row=np.array([0, 1, 1]), top=np.array([0, 0, 4]), left=np.array([0, 4, 4]))
    sc = {k: np.array([1.0, 2.0, 3.0]) for k in ("A", "R", "D", "D_hat", "P_D")}
    rows = C.patch_rows(S, P, A.patch_labels(P["mask"]), sc, A.SCORES)
    assert [(r["group"], r["label"], r["case"]) for r in rows] == [
        ("normal", 0, "normal/n0"), ("tumor", 0, "tumor/t0"), ("tumor", 1, "tumor/t0")]
    assert [r["id"] for r in rows] == ["normal/n0/z7/y0x0", "tumor/t0/z9/y0x4", "tumor/t0/z9/y4x4"]
    assert rows[2]["anomalous_px"] == 4 and rows[2]["score"] == 3.0 and "A_hat" not in rows[2]
    assert C.clean_mask(rows).tolist() == [True, False, True]           # negatives: normal scans only


def test_counterfactual_pastes_only_the_lesion_pixels():
    x = np.zeros((2, 3, 3), np.float32)
    lesion = np.full((2, 3, 3), 0.9, np.float32)
    mask = np.zeros((2, 3, 3), bool)
    mask[0, 1, 2] = True                                                # one lesion pixel; none in patch 1
    out = C.paste_lesions(x, lesion, mask)
    assert out[0, 1, 2] == pytest.approx(0.9) and out.sum() == pytest.approx(0.9)
    assert (out[1] == 0).all() and (x == 0).all()                      # the normal patches stay as they were


# ---- networks ----------------------------------------------------------------------------------

@pytest.mark.parametrize("c", [16, 32, 64])
def test_dcgan_shapes_and_channels(c):
    G, D = A.Generator(z_dim=8, ch=4, size=c), A.Discriminator(ch=4, size=c)
    x = G(torch.rand(3, 8) * 2 - 1)
    assert x.shape == (3, 1, c, c) and x.abs().max() <= 1
    logit, feats = D(x)
    assert logit.shape == (3,)
    assert [f.shape[1] for f in feats] == [4, 8, 16, 32]                # ch-2ch-4ch-8ch
    assert feats[-1].shape[-1] == c // 16
    convT = [m for m in G.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert len(convT) == 4 and all(m.kernel_size == (5, 5) for m in convT)  # four 5×5 fractionally-strided convs
    assert [m.out_channels for m in convT] == [16, 8, 4, 1]               # 512-256-128-64 at ch=64


# ---- the mapping (§2.2) ------------------------------------------------------------------------

def _models(seed=0, dtype=torch.float32, c=16, z_dim=8, ch=4):
    torch.manual_seed(seed)
    G, D = A.Generator(z_dim=z_dim, ch=ch, size=c).to(dtype), A.Discriminator(ch=ch, size=c).to(dtype)
    # give BatchNorm non-trivial running statistics, as after training
    with torch.no_grad():
        for _ in range(3):
            D(G(torch.rand(16, z_dim, dtype=dtype) * 2 - 1))
    return G, D


def test_mapping_decreases_the_loss_and_moves_only_z():
    G, D = _models()
    G.eval()
    with torch.no_grad():
        x = G(torch.rand(6, 8) * 2 - 1)                                    # reachable targets
    before = {k: v.clone() for k, v in {**G.state_dict(), **{"D." + k: v for k, v in D.state_dict().items()}}.items()}
    z1 = torch.rand(6, 8) * 2 - 1
    z1_copy = z1.clone()
    m = A.map_to_latent(x, G, D, z1, steps=60, lr=0.05, lam=0.1)
    h = m["history"]
    assert h.shape == (6, 60)
    assert (h[:, -1] < 0.7 * h[:, 0]).all(), h[:, [0, -1]]
    after = {**G.state_dict(), **{"D." + k: v for k, v in D.state_dict().items()}}
    assert all(torch.equal(before[k], after[k]) for k in before)          # weights and BN stats untouched
    assert all(p.grad is None for p in list(G.parameters()) + list(D.parameters()))
    assert torch.equal(z1, z1_copy)                                       # the caller's z_1 is not modified
    assert m["z"].abs().max() <= 1                                         # clipped to the support of p_z
    # R, D at z_Γ are the losses of the last step (Eq. (6) = Eq. (5) at z_Γ)
    assert torch.allclose(A.mapping_loss(m["R"], m["D"], 0.1), h[:, -1])


def test_mapping_with_one_step_scores_z1_without_update():
    G, D = _models()
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    z1 = torch.rand(2, 8) * 2 - 1
    m = A.map_to_latent(x, G, D, z1, steps=1, lr=0.1, lam=0.1)
    assert torch.equal(m["z"], z1)
    G.eval()
    with torch.no_grad():
        assert torch.allclose(m["R"], A.residual_loss(x, G(z1)))


def test_mapping_restores_train_mode_and_requires_grad():
    G, D = _models()
    G.train()
    D.eval()
    A.map_to_latent(torch.zeros(2, 1, 16, 16), G, D, torch.zeros(2, 8), steps=3, lr=0.1, lam=0.1)
    assert G.training and not D.training
    assert all(p.requires_grad for p in G.parameters())


def test_batched_mapping_equals_one_at_a_time_trajectories():
    """Each z_b follows the trajectory it would follow alone: same loss at every step γ and same z_Γ.
    Would fail with BatchNorm in training mode, a mean instead of a sum over the batch, or a shared z."""
    G, D = _models(dtype=torch.float64)
    G.train()
    D.train()                                                             # map_to_latent must switch to eval
    x = torch.rand(5, 1, 16, 16, dtype=torch.float64) * 2 - 1
    z1 = torch.rand(5, 8, dtype=torch.float64) * 2 - 1
    for disc in ("feature", "reference"):
        kw = dict(steps=25, lr=0.05, lam=0.1, disc=disc)
        mb = A.map_to_latent(x, G, D, z1, **kw)
        for i in range(5):
            ms = A.map_to_latent(x[i:i + 1], G, D, z1[i:i + 1], **kw)
            assert torch.allclose(mb["history"][i], ms["history"][0], rtol=1e-9, atol=1e-9)
            assert torch.allclose(mb["z"][i], ms["z"][0], rtol=1e-9, atol=1e-9)
            assert torch.allclose(mb["R"][i], ms["R"][0], rtol=1e-9, atol=1e-9)
            assert torch.allclose(mb["D"][i], ms["D"][0], rtol=1e-9, atol=1e-9)


def test_scores_do_not_depend_on_batch_composition():
    """BatchNorm in eval mode during mapping: a patch scores the same alone and among others."""
    G, D = _models(dtype=torch.float64)
    x0 = torch.rand(1, 1, 16, 16, dtype=torch.float64) * 2 - 1
    others = torch.rand(7, 1, 16, 16, dtype=torch.float64) * 4 - 2           # very different patches
    z1 = torch.rand(8, 8, dtype=torch.float64) * 2 - 1
    alone = A.map_to_latent(x0, G, D, z1[:1], steps=10, lr=0.05, lam=0.1)
    mixed = A.map_to_latent(torch.cat([others[:3], x0, others[3:]]), G, D, torch.cat([z1[1:4], z1[:1], z1[4:]]),
                            steps=10, lr=0.05, lam=0.1)
    a = A.anomaly_score(alone["R"], alone["D"], 0.1)[0]
    b = A.anomaly_score(mixed["R"], mixed["D"], 0.1)[3]
    assert torch.allclose(a, b, rtol=1e-9)
    with A.frozen(G, D):
        p = A.discriminator_score(D, torch.cat([x0, others]))
        p0 = A.discriminator_score(D, x0)
    assert torch.allclose(p[0], p0[0]) and ((p >= 0) & (p <= 1)).all()


def test_nearest_patch_residual_is_eq3_for_the_closest_training_patch():
    """R_nn (beyond the paper): Σ|x - t| for the L1-nearest reference patch t; 0 for a patch in the set."""
    rng = np.random.default_rng(0)
    ref = rng.uniform(-1, 1, (50, 8, 8)).astype(np.float32)
    x = np.concatenate([ref[[3, 17]], rng.uniform(-1, 1, (5, 8, 8)).astype(np.float32)])
    expected = np.abs(x[:, None] - ref[None]).sum((2, 3)).min(1)              # brute force, (7,)
    got = C.nearest_residual(x, ref, torch.device("cpu"), chunk=2)        # chunks of 2 and a rest
    assert got.shape == (7,) and np.allclose(got, expected, rtol=1e-5)
    assert np.allclose(got[:2], 0.0) and (got[2:] > 1.0).all()


# ---- the script end to end ---------------------------------------------------------------------

def _run(args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}                        # tiny smoke tensors: see one_thread
    return subprocess.run([sys.executable, str(REPO / "anogan.py"), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run as a user types it; the tests below read it, re-score it and resume it."""
    out = tmp_path_factory.mktemp("anogan") / "run"
    p = _run(["--preset", "smoke", "--out", str(out)])
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def _main(*argv):
    """An in-process run (saves the imports of a subprocess)."""
    return A.main(["--preset", "smoke", *argv])


def test_smoke_run_writes_the_contract_files(smoke):
    from check_contract import check
    problems = check(str(smoke))
    problems = problems if isinstance(problems, list) else problems[0]
    assert not problems, problems
    r = json.loads((smoke / "results.json").read_text())
    assert r["method"] == "anogan" and r["unit"] == "patch"
    for k in ("map_s_per_patch_batched", "map_s_per_patch_single", "train_s", "score_s"):
        assert r["timing"][k] > 0
    assert r["batched_vs_single_max_abs_diff_A"] < 1e-2 * max(1.0, abs(r["groups"]["normal"]["score_mean"]))
    assert {"A", "R", "D", "D_hat", "P_D", "A_hat", "R_nn", "x_max"} <= set(r["comparison_auroc"])
    assert {"AnoGAN A", "P_D", "GAN_R Â"} <= set(r["oracle_youden_table1"])
    assert r["threshold_from"] == "val" and r["operating_point"]["rule"].startswith("95th percentile")
    for f in ("fig3.png", "fig4.png", "mapping.png", "counterfactual.png"):
        assert (smoke / f).stat().st_size > 0
    cf = r["counterfactual_lesion"]                                     # every normal-scan patch (<= 256)
    assert cf["normal_patches"] == r["n_patches"]["test_normal_scans"] and {"ms_lesion", "tumor"} <= set(cf)
    assert cf["tumor"]["pasted_abs_sum"]["mean"] > cf["ms_lesion"]["pasted_abs_sum"]["mean"] > 0


def test_groups_are_scored_against_normal_scans_and_the_same_scans(smoke):
    """Per group: its anomalous patches against the patches of NORMAL scans only (groups), and against
    the lesion-free patches of its own scans (groups_same_scan, §3's negatives); A - R is paired."""
    import csv
    from sklearn.metrics import roc_auc_score
    rows = list(csv.DictReader(open(smoke / "scores.csv")))
    r = json.loads((smoke / "results.json").read_text())
    assert not [x for x in rows if x["group"].endswith("_0")]
    assert all(x["case"].startswith(x["group"] + "/") and x["id"].startswith(x["case"] + "/") for x in rows)
    y, s, g = (np.array([x[k] for x in rows]) for k in ("label", "score", "group"))
    y, s = y.astype(int), s.astype(float)
    for name in ("ms_lesion", "tumor"):
        assert {0, 1} <= set(y[g == name])                               # lesion scans hold both
        clean = (g == "normal") | ((g == name) & (y == 1))
        assert r["groups"][name]["auroc"] == pytest.approx(roc_auc_score(y[clean], s[clean]))
        assert r["groups_same_scan"][name]["auroc"] == pytest.approx(roc_auc_score(y[g == name], s[g == name]))
    d = r["paired_differences"]["A - R"]["all"]
    cmp = r["comparison_auroc"]
    assert d["diff"] == pytest.approx(cmp["A"]["auroc"] - cmp["R"]["auroc"])
    assert d["ci"][0] <= d["diff"] <= d["ci"][1]


def test_resume_equals_the_uninterrupted_run(smoke, tmp_path):
    """--max-steps 2 (of the smoke run's 4 updates), then --resume its last.pt: the same scores.csv, byte
    for byte (weights, optimisers, data order and every random stream continue exactly)."""
    r = _main("--out", str(tmp_path / "part"), "--max-steps", "2")
    assert json.loads((tmp_path / "part" / "results.json").read_text())["unit"] == "patch" and r
    _main("--out", str(tmp_path / "rest"), "--resume", str(tmp_path / "part" / "last.pt"))
    assert (tmp_path / "rest" / "scores.csv").read_bytes() == (smoke / "scores.csv").read_bytes()
    assert (tmp_path / "part" / "scores.csv").read_bytes() != (smoke / "scores.csv").read_bytes()


def _folder_copy(root, val_brain=None):
    """The smoke phantom as a `--data folder` tree of links; val_brain: a brain mask for its val scans."""
    import nibabel as nib
    src = REPO / "data" / "synthetic" / "flair_tiny"
    for f in src.rglob("*.nii.gz"):
        dst = root / f.relative_to(src)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if val_brain is not None and dst.parts[-2] == "val" and f.name.endswith("_brainmask.nii.gz"):
            img = nib.load(f)
            nib.save(nib.Nifti1Image(val_brain(np.asarray(img.dataobj).shape), img.affine), dst)
        else:
            dst.symlink_to(f)
    return root


def test_checkpoint_scores_again_and_without_healthy_validation_patches(smoke, tmp_path):
    """--checkpoint maps and scores with the same models -> the same scores. The validation scans here
    have a brain too thin for any patch (as BraTS alone has none at the test level): the operating
    point then comes from the training patches, and results.json says so."""
    def thin(shape):                                                    # a one-voxel line through the head
        m = np.zeros(shape, np.uint8)
        k = np.arange(min(shape))
        m[k, k, :] = 1
        return m
    root = _folder_copy(tmp_path / "folder", val_brain=thin)
    r = _main("--out", str(tmp_path / "again"), "--checkpoint", str(smoke / "last.pt"), "--no-ganr",
              "--time-single", "0", "--data", "folder", "--data-root", str(root),
              "--cache-dir", str(tmp_path / "cache"))
    assert r["timing"]["train_s"] == 0 and r["n_patches"]["val"] == 0
    assert r["threshold_from"].startswith("train") and "threshold" in r["operating_point"]
    a = [row.split(",")[:4] for row in (smoke / "scores.csv").read_text().splitlines()]
    b = [row.split(",")[:4] for row in (tmp_path / "again" / "scores.csv").read_text().splitlines()]
    assert a == b


def test_checkpoint_of_another_script_or_network_is_one_error(smoke, tmp_path):
    from common import UserError
    ck = torch.load(smoke / "last.pt", map_location="cpu", weights_only=False)
    ck["method"] = "madgan"
    torch.save(ck, tmp_path / "other.pt")
    with pytest.raises(UserError, match=r"not a last.pt of anogan.py \(it is one of madgan.py\)"):
        _main("--out", str(tmp_path / "a"), "--checkpoint", str(tmp_path / "other.pt"))
    with pytest.raises(UserError, match="other network settings"):
        _main("--out", str(tmp_path / "b"), "--checkpoint", str(smoke / "last.pt"), "--ch", "8")


def test_a_broken_test_volume_stops_the_run_before_training(smoke, tmp_path):
    """The test and validation slices are read before training: a NaN test volume is one error line,
    and the run leaves nothing (no last.pt: no training step was taken)."""
    import nibabel as nib
    src = REPO / "data" / "synthetic" / "flair_tiny"
    root = tmp_path / "folder"
    for sub in ("train", "val", "test/normal", "test/tumor"):
        (root / sub).mkdir(parents=True)
        for f in sorted((src / sub).glob("*.nii.gz"))[:8]:
            (root / sub / f.name).symlink_to(f)
    img = nib.load(src / "test" / "tumor" / "tumor_000.nii.gz")
    x = np.asarray(img.dataobj, np.float32)
    x[x.shape[0] // 2] = np.nan
    nib.save(nib.Nifti1Image(x, img.affine), root / "test" / "tumor" / "broken.nii.gz")
    out = tmp_path / "run"
    p = _run(["--preset", "smoke", "--data", "folder", "--data-root", str(root), "--out", str(out),
              "--cache-dir", str(tmp_path / "cache")], timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "broken.nii.gz" in lines[0] and "NaN" in lines[0], p.stderr
    assert "epoch" not in p.stdout and not out.exists()


@pytest.mark.parametrize("flags,needle", [(["--lam", "2"], "--lam"), (["--patch-size", "24"], "--patch-size"),
                                          (["--checkpoint", "nope.pt"], "nope.pt")])
def test_bad_input_is_one_error_line(flags, needle, tmp_path):
    p = _run(["--preset", "smoke", "--out", str(tmp_path / "bad"), *flags], timeout=60)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], p.stderr


def test_smoke_reports_baselines_slabs_and_training(smoke):
    """Issue 15.5 (baselines per scored unit), 17.4 (a slab per scored scan, slabs.png), the Loop."""
    from tests.fixtures import check_report_extras
    check_report_extras(smoke)
