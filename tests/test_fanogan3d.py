"""Tests of fanogan3d.py (Simarro Viana et al., BrainLes 2020): the equations on hand-computed tensors,
what each of the three training steps may change, the modality path (CT window or MRI normalisation,
never a constant input), and the script end to end: the contract, resume = an uninterrupted run,
--checkpoint, the 2D baseline paired with the 3D model.

    python -m pytest tests/test_fanogan3d.py            # all (about 90 s on one thread)
    python -m pytest tests/test_fanogan3d.py -k eq      # only the paper's equations (Eq. 2-6)
"""
import csv
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
import torch.nn as nn

import common as C
import fanogan3d as M

REPO = Path(__file__).resolve().parents[1]


class LinearCritic(nn.Module):
    """D(x) = <w, x> per sample: its gradient is w everywhere, so ||∇D|| = ||w|| over ALL voxels."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x):
        return (x * self.w).flatten(1).sum(1)


class QuadraticCritic(nn.Module):
    """D(x) = ½||x||² per sample: ∇D(x^) = x^, a different norm for every sample."""

    def forward(self, x):
        return 0.5 * (x ** 2).flatten(1).sum(1)


# ---- Eq. (2): critic loss and gradient penalty ---------------------------------------------------

def test_eq2_wasserstein_terms():
    d_real, d_fake = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 2.0])
    assert M.critic_wasserstein_loss(d_real, d_fake).item() == pytest.approx(1.0 - 2.0)


def test_eq2_gradient_penalty_linear_critic_value_and_grad():
    D = LinearCritic(torch.full((1, 2, 2, 2), 0.5))          # ||w|| = sqrt(8 * 0.25) = sqrt(2)
    x, x_tilde = torch.randn(3, 1, 2, 2, 2), torch.randn(3, 1, 2, 2, 2)
    gp = M.gradient_penalty(D, x, x_tilde)                   # any ε: the gradient is w everywhere
    assert gp.item() == pytest.approx((math.sqrt(2) - 1) ** 2, rel=1e-6)   # 0.171573
    # a norm over the channel axis only would give (0.5 - 1)^2 = 0.25: the per-sample norm is over all voxels
    gp.backward()                                            # the penalty must train the critic (create_graph)
    expected = 2 * (math.sqrt(2) - 1) * 0.5 / math.sqrt(2)   # d/dw (||w|| - 1)^2 = 2(||w||-1) w/||w||
    assert torch.allclose(D.w.grad, torch.full_like(D.w, expected), atol=1e-6)


def test_eq2_gradient_penalty_is_per_sample():
    x = torch.stack([torch.full((1, 2, 2, 2), 2.0), torch.full((1, 2, 2, 2), 4.0)])   # (2, 1, 2, 2, 2)
    x_tilde = torch.zeros_like(x)
    eps = torch.full((2, 1, 1, 1, 1), 0.5)                   # x^ = 1 and 2 everywhere -> norms sqrt(8), 2 sqrt(8)
    gp = M.gradient_penalty(QuadraticCritic(), x, x_tilde, eps=eps)
    expected = ((math.sqrt(8) - 1) ** 2 + (2 * math.sqrt(8) - 1) ** 2) / 2   # 12.5147
    assert gp.item() == pytest.approx(expected, rel=1e-6)


def test_eq2_interpolates_between_real_and_fake():
    x, x_tilde = torch.full((1, 1, 2, 2, 2), 3.0), torch.full((1, 1, 2, 2, 2), 1.0)
    eps = torch.full((1, 1, 1, 1, 1), 0.25)                  # x^ = 0.25*3 + 0.75*1 = 1.5 -> norm 1.5 sqrt(8)
    gp = M.gradient_penalty(QuadraticCritic(), x, x_tilde, eps=eps)
    assert gp.item() == pytest.approx((1.5 * math.sqrt(8) - 1) ** 2, rel=1e-6)


# ---- Eq. (3)-(6) ---------------------------------------------------------------------------------

def test_eq3_generator_loss():
    assert M.generator_loss(torch.tensor([1.0, -3.0])).item() == pytest.approx(1.0)


def test_eq4_image_loss_mean_over_voxels_per_sample():
    x = torch.zeros(2, 1, 2, 2, 2)
    x_rec = torch.zeros(2, 1, 2, 2, 2)
    x_rec[0, 0, 0] = 1.0                                     # 4 of 8 voxels off by 1 -> 4/8
    x_rec[1] = 2.0                                           # all off by 2 -> 4
    assert torch.allclose(M.image_loss(x, x_rec), torch.tensor([0.5, 4.0]))


def test_eq5_feature_loss_mean_over_features():
    f_x, f_rec = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 4.0]])
    assert torch.allclose(M.feature_loss(f_x, f_rec), torch.tensor([2.0]))   # (0 + 4) / 2


def test_eq6_encoder_loss_weights_feature_term_by_kappa():
    x, x_rec = torch.zeros(1, 1, 2, 2, 2), torch.zeros(1, 1, 2, 2, 2)
    x_rec[0, 0, 0] = 1.0                                     # L_img = 0.5
    f_x, f_rec = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 4.0]])      # L_feat = 2
    assert M.encoder_loss(x, x_rec, f_x, f_rec, kappa=0.5).item() == pytest.approx(0.5 + 0.5 * 2)
    assert M.encoder_loss(x, x_rec, f_x, f_rec, kappa=0.0).item() == pytest.approx(0.5)


def test_eq6_anomaly_score_is_encoder_loss_of_the_reconstruction():
    torch.manual_seed(0)
    G, D, E = tiny_models()
    G.eval(), D.eval(), E.eval()
    x = torch.rand(3, 1, 16, 16, 16) * 2 - 1
    r = M.anomaly_score(E, G, D, x, kappa=0.3)
    with torch.no_grad():
        x_rec = G(E(x))
        want = ((x - x_rec) ** 2).flatten(1).mean(1) + 0.3 * ((D.features(x) - D.features(x_rec)) ** 2).mean(1)
    assert torch.allclose(r["score"], want, atol=1e-6)
    assert torch.allclose(r["x_rec"], x_rec)


# ---- networks --------------------------------------------------------------------------------------

def tiny_models(dims=3, size=16, latent=8):
    kw = dict(size=size, width=4, dims=dims)
    return M.Generator(latent_dim=latent, **kw), M.Critic(**kw), M.Encoder(latent_dim=latent, **kw)


@pytest.mark.parametrize("dims,size", [(3, 16), (3, 32), (2, 16), (2, 64)])
def test_network_shapes(dims, size):
    G, D, E = tiny_models(dims, size)
    z = torch.randn(2, 8)
    x = G(z)
    assert x.shape == (2, 1) + (size,) * dims
    assert x.abs().max() <= 1                                # tanh output, data are in [-1, 1]
    assert D(x).shape == (2,)
    assert D.features(x).shape == (2, 4 * 2 ** (M.n_levels(size) - 1) * 4 ** dims)  # last hidden layer
    zz = E(x)
    assert zz.shape == (2, 8) and zz.abs().max() < 1         # tanh at the encoder output (§2)


def test_encoder_out_sets_the_range_of_z():
    """--encoder-out: tanh (the paper, §2) keeps |z| < 1; 3tanh (f-AnoGAN's code) is 3 tanh of the same
    pre-activation, so it reaches past 1 but stays under 3; linear is the pre-activation itself."""
    torch.manual_seed(0)
    E = {o: M.Encoder(latent_dim=64, size=16, width=4, out=o).eval() for o in ("tanh", "3tanh", "linear")}
    with torch.no_grad():
        E["tanh"].net[-3].weight.mul_(30)                    # the last conv: large pre-activations
    for o in ("3tanh", "linear"):
        E[o].load_state_dict(E["tanh"].state_dict())         # same weights: only the output layer differs
    with torch.no_grad():
        x = torch.rand(4, 1, 16, 16, 16) * 2 - 1
        z = {o: e(x) for o, e in E.items()}
    pre = z["linear"]
    assert pre.abs().max() > 3
    assert torch.allclose(z["tanh"], torch.tanh(pre)) and z["tanh"].abs().max() <= 1
    assert torch.allclose(z["3tanh"], 3 * torch.tanh(pre)) and 1 < z["3tanh"].abs().max() <= 3


def test_paper_architecture_sizes():
    with torch.device("meta"):                               # shapes only: no 86M random weights
        G, D = M.Generator(latent_dim=2500, size=64, width=64), M.Critic(size=64, width=64)
    assert G.fc.out_features == 512 * 4 ** 3                 # z of 2500 -> 512 x 4^3 (Fig. 3 / [15])
    assert [m.out_channels for m in D.modules() if isinstance(m, nn.Conv3d)] == [64, 128, 256, 512, 1]


def test_critic_has_no_batchnorm():
    _, D, _ = tiny_models()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in D.modules())


# ---- the three training steps: what each one may change --------------------------------------------

def snapshot(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def changed(before, m):
    return {k for k, v in m.state_dict().items() if not torch.equal(before[k], v)}


def run_steps(phase, n):
    """n iterations of training step `phase` on random volumes -> (nets, snapshots before, losses)."""
    torch.manual_seed(0)
    G, D, E = tiny_models()
    nets, before = {"G": G, "D": D, "E": E}, {"G": snapshot(G), "D": snapshot(D), "E": snapshot(E)}
    adam = lambda p: torch.optim.Adam(p, lr=1e-3, betas=(0.0, 0.9))           # noqa: E731
    opt = {"G": adam(G.parameters()), "D": adam(D.parameters()), "E": adam(E.parameters()),
           "EG": adam([*E.parameters(), *G.parameters()])}
    args = types.SimpleNamespace(n_critic=2, latent_dim=8, lam=10.0, kappa=1.0, amp=False)
    M.set_phase(phase, G, D, E)
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        losses = M.train_step(phase, nets, opt, lambda: torch.rand(4, 1, 16, 16, 16, generator=g) * 2 - 1,
                              args, torch.device("cpu"))
    return nets, before, losses


def test_step1_trains_generator_and_critic():
    nets, before, losses = run_steps("gan", 2)
    assert "fc.weight" in changed(before["G"], nets["G"]) and "out.weight" in changed(before["D"], nets["D"])
    assert not changed(before["E"], nets["E"])
    assert {"L_D (Eq. 2)", "L_G (Eq. 3)", "gradient penalty"} <= set(losses)


def test_step2_freezes_generator_and_critic():
    nets, before, _ = run_steps("encoder", 3)
    assert not changed(before["G"], nets["G"]), "step 2 must not change G (weights or BatchNorm statistics)"
    assert not changed(before["D"], nets["D"]), "step 2 must not change D"
    assert changed(before["E"], nets["E"]), "step 2 must train E"
    assert all(p.grad is None for p in list(nets["G"].parameters()) + list(nets["D"].parameters()))


def test_step3_finetunes_encoder_and_generator_not_critic():
    nets, before, _ = run_steps("finetune", 3)
    g_changed = changed(before["G"], nets["G"])
    assert "fc.weight" in g_changed and "blocks.1.weight" in g_changed, "step 3 must train G"
    assert not any("running" in k for k in g_changed), "G's BatchNorm statistics stay frozen (deviation 4)"
    assert not changed(before["D"], nets["D"]), "D is never trained after step 1"
    assert changed(before["E"], nets["E"])


def test_memory_estimate_counts_paper_parameters():
    a = types.SimpleNamespace(size=64, width=64, dims=3, latent_dim=2500)
    e1, e4 = M.memory_estimate_mb(a, 1), M.memory_estimate_mb(a, 4)
    with torch.device("meta"):
        G = M.Generator(latent_dim=2500, size=64, width=64)
    assert e1["params"]["G"] == sum(p.numel() for p in G.parameters()) == 2500 * 512 * 64 + 512 * 64 + 4_648_512
    assert e4["peak_mb"] > e1["peak_mb"] > e1["weights_mb"]


# ---- the modality: the CT window for CT, the MRI normalisation for MRI, never a constant input ---------

def folder_tree(root, contrast):
    """--data folder: 4 healthy training heads, 2 normal and 2 lesion test heads of one contrast."""
    from tests.fixtures import head, save
    shape = (24, 28, 20)
    for k, (sub, lesions) in enumerate([("train", ())] * 4 + [("test/normal", ())] * 2
                                       + [("test/lesion", [((0.5, 0.5, 0.5), 3)])] * 2):
        img, _, mask = head(seed=k, contrast=contrast, shape=shape, lesions=lesions)
        save(Path(root) / sub / f"s{k}.nii.gz", img)
        if lesions:
            save(Path(root) / sub / f"s{k}_mask.nii.gz", mask, dtype=np.uint8)
    return str(root)


def load(tmp_path, *flags):
    args = M.parse_args(["--preset", "smoke", "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"),
                    *flags])
    return M.datasets.ct_or_mri_stacks(args, types.SimpleNamespace(log=lambda msg: None))


def test_mri_volumes_get_the_mri_normalisation_and_a_constant_training_set_is_refused(tmp_path):
    mri = folder_tree(tmp_path / "t1", "t1")
    data, S, _, _ = load(tmp_path, "--data", "folder", "--data-root", mri)
    assert data.info["normalisation"]["norm"] == "mri" and "detected" in data.info["normalisation"]["how"]
    brain = S.x[np.asarray(S.brain) > 0]
    assert brain.std() > 0.1 and len(np.unique(np.round(brain, 3))) > 50     # not one clipped value
    # the same MRI volumes through the paper's CT window: every brain voxel clips to +1 -> refused
    with pytest.raises(C.UserError, match=r"do not look like CT .* window \[-20, 100\] HU.*--modality t1"):
        load(tmp_path, "--data", "folder", "--data-root", mri, "--modality", "ct")
    ct = folder_tree(tmp_path / "ct", "ct")
    data, S, _, _ = load(tmp_path, "--data", "folder", "--data-root", ct)
    assert data.info["normalisation"]["norm"] == "ct"
    assert S.x[np.asarray(S.brain) > 0].std() > 0.05


def test_modality_picks_the_phantom_contrast(tmp_path):
    data, S, _, _ = load(tmp_path, "--modality", "T1w")
    assert data.info["phantom"] == "t1_tiny" and data.info["normalisation"]["norm"] == "mri"
    assert {c.group for c in data.test} >= {"normal", "tumor"}
    with pytest.raises(C.UserError, match="--modality pd: the phantom has ct, t1, t2 and flair"):
        M.parse_args(["--modality", "pd", "--out", str(tmp_path / "x")])


# ---- the script end to end ---------------------------------------------------------------------------

def run_script(*args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / "fanogan3d.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run as a user types it: -> its run folder (reused by the tests below)."""
    d = tmp_path_factory.mktemp("smoke")
    p = run_script("--preset", "smoke", "--out", str(d / "full"), "--device", "cpu", "--cache-dir", str(d / "cache"))
    assert p.returncode == 0, p.stderr[-3000:]
    return d


def test_bad_flag_is_one_error_line(tmp_path):
    p = run_script("--size", "24", "--out", str(tmp_path / "bad"))
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("error: --size must be a power of 2")
    assert "Traceback" not in p.stderr


def test_smoke_run_writes_the_contract(smoke):
    out = smoke / "full"
    sys.path.insert(0, str(REPO.parent / "shared"))
    from check_contract import check
    res = check(str(out))
    problems = res if isinstance(res, list) else res[0]
    assert not problems, problems
    r = json.loads((out / "results.json").read_text())
    assert r["method"] == "fanogan3d" and r["unit"] == "volume" and r["dims"] == 3
    assert {"oracle_youden", "operating_point", "per_type", "ablation_no_finetune", "memory_estimate",
            "checkpoint_io"} <= set(r)
    assert r["operating_point_from"] == "val" and r["data_info"]["normalisation"]["norm"] == "ct"
    d = r["ablation_no_finetune"]["finetuned_minus_step2_auroc"]["all"]
    assert d["diff"] == pytest.approx(r["metrics"]["auroc"] - r["ablation_no_finetune"]["auroc"])
    assert d["ci"][0] <= d["diff"] <= d["ci"][1]
    assert set(r["per_type"]) == {"intraparenchymal", "subdural", "epidural"}
    for f in ("fig4_roc.png", "fig5_pr_per_type.png", "fig6_three_planes.png"):
        assert (out / f).stat().st_size > 0, f
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert {"L_img", "L_feat", "type", "score_no_finetune"} <= set(rows[0])
    assert r["checkpoint_io"]["checkpoints"] >= 3                       # at least the end of each step


def test_resume_inside_step_1_equals_the_uninterrupted_run(smoke):
    flags = ["--preset", "smoke", "--device", "cpu", "--cache-dir", str(smoke / "cache")]
    p = run_script(*flags, "--out", str(smoke / "stopped"), "--max-steps", "1")
    assert p.returncode == 0, p.stderr[-3000:]
    ck = C.load_checkpoint(smoke / "stopped" / "last.pt", "fanogan3d")
    assert (ck["loop"]["phase"], ck["loop"]["step"], ck["loop"]["done"]) == ("gan", 1, [])
    p = run_script(*flags, "--out", str(smoke / "resumed"), "--resume", str(smoke / "stopped" / "last.pt"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert (smoke / "resumed" / "scores.csv").read_bytes() == (smoke / "full" / "scores.csv").read_bytes()
    assert C.load_checkpoint(smoke / "resumed" / "last.pt")["loop"]["done"] == ["gan", "encoder", "finetune"]


def test_checkpoint_rescores_the_model_and_refuses_another_scripts(smoke, tmp_path):
    flags = ["--preset", "smoke", "--device", "cpu", "--cache-dir", str(smoke / "cache")]
    r = M.main([*flags, "--out", str(tmp_path / "again"), "--checkpoint", str(smoke / "full" / "last.pt")])
    full = list(csv.DictReader(open(smoke / "full" / "scores.csv")))
    again = list(csv.DictReader(open(tmp_path / "again" / "scores.csv")))
    assert np.allclose([float(x["score"]) for x in full], [float(x["score"]) for x in again], rtol=1e-5)
    assert "ablation_no_finetune" in r                                  # the step-2 scores travel in last.pt
    ck = C.load_checkpoint(smoke / "full" / "last.pt")
    torch.save({**ck, "method": "madgan"}, tmp_path / "madgan.pt")
    with pytest.raises(C.UserError, match=r"not a last.pt of fanogan3d.py \(it is one of madgan.py\)"):
        M.main([*flags, "--out", str(tmp_path / "x"), "--checkpoint", str(tmp_path / "madgan.pt")])
    with pytest.raises(C.UserError, match="other network settings"):
        M.main([*flags, "--out", str(tmp_path / "y"), "--width", "3", "--checkpoint", str(smoke / "full" / "last.pt")])
    with pytest.raises(C.UserError, match="trained with --encoder-out tanh; pass that, not --encoder-out linear"):
        M.main([*flags, "--out", str(tmp_path / "z"), "--encoder-out", "linear", "--checkpoint",
                str(smoke / "full" / "last.pt")])


def test_2d_baseline_is_paired_with_the_3d_model_on_the_same_volumes(smoke, tmp_path):
    r = M.main(["--preset", "smoke", "--device", "cpu", "--cache-dir", str(smoke / "cache"), "--dims", "2",
                "--out", str(tmp_path / "2d"), "--compare-3d", str(smoke / "full")])
    assert r["unit"] == "slice" and {"auroc", "auroc_ci"} <= set(r["volume_level"])
    rows = list(csv.DictReader(open(tmp_path / "2d" / "scores.csv")))
    assert all(row["case"] and row["id"].startswith(row["case"] + "/z") for row in rows)
    d = r["compare_3d_vs_2d"]["3d_minus_2d_volume_auroc"]["all"]
    r3 = json.loads((smoke / "full" / "results.json").read_text())
    assert d["a"] == pytest.approx(r3["metrics"]["auroc"]) and d["b"] == pytest.approx(r["volume_level"]["auroc"])
    assert d["ci"][0] <= d["diff"] <= d["ci"][1] and r["compare_3d_vs_2d"]["n_volumes"] == 8


def test_smoke_reports_baselines_slabs_and_training(smoke):
    """Issue 15.5 (baselines per scored unit), 17.4 (a slab per scored scan, slabs.png), the Loop."""
    from tests.fixtures import check_report_extras
    check_report_extras(smoke / "full", slices=False)
