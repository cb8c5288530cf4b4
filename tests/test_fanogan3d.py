"""Tests of fanogan3d.py (Simarro Viana et al., BrainLes 2020): the equations on hand-computed tensors,
the properties of the three training steps, and a smoke run of the script against the contract.

    python -m pytest tests/test_fanogan3d.py            # all (about 30 s on 2 cores)
    python -m pytest tests/test_fanogan3d.py -k eq      # only the paper's equations (Eq. 2-6)
"""
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

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


def test_paper_architecture_sizes():
    with torch.device("meta"):                               # shapes only: no 86M random weights
        G, D = M.Generator(latent_dim=2500, size=64, width=64), M.Critic(size=64, width=64)
    assert G.fc.out_features == 512 * 4 ** 3                 # z of 2500 -> 512 x 4^3 (Fig. 3 / [15])
    assert [m.out_channels for m in D.modules() if isinstance(m, nn.Conv3d)] == [64, 128, 256, 512, 1]


def test_critic_has_no_batchnorm():
    _, D, _ = tiny_models()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in D.modules())


# ---- the three training steps --------------------------------------------------------------------

def snapshot(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def changed(before, m):
    return {k for k, v in m.state_dict().items() if not torch.equal(before[k], v)}


def tiny_data(n=8, size=16):
    g = torch.Generator().manual_seed(0)
    return (torch.rand(n, size, size, size, generator=g) * 2 - 1).numpy()


def test_step1_trains_generator_and_critic():
    torch.manual_seed(0)
    G, D, E = tiny_models()
    g0, d0, e0 = snapshot(G), snapshot(D), snapshot(E)
    opt_G = torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.0, 0.9))
    opt_D = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.0, 0.9))
    curves = M.train_wgan_gp(G, D, opt_G, opt_D, tiny_data(), steps=2, n_critic=2, batch_size=4, latent_dim=8)
    assert "fc.weight" in changed(g0, G) and "out.weight" in changed(d0, D)
    assert not changed(e0, E)
    assert len(curves["L_D (Eq. 2)"]) == 2


def test_step2_freezes_generator_and_critic():
    torch.manual_seed(0)
    G, D, E = tiny_models()
    g0, d0, e0 = snapshot(G), snapshot(D), snapshot(E)
    opt = torch.optim.Adam(E.parameters(), lr=1e-3)
    M.train_encoder(E, G, D, opt, tiny_data(), steps=3, kappa=1.0, finetune=False, batch_size=4)
    assert not changed(g0, G), "step 2 must not change G (weights or BatchNorm statistics)"
    assert not changed(d0, D), "step 2 must not change D"
    assert changed(e0, E), "step 2 must train E"
    assert all(p.grad is None for p in list(G.parameters()) + list(D.parameters()))


def test_step3_finetunes_encoder_and_generator_not_critic():
    torch.manual_seed(0)
    G, D, E = tiny_models()
    g0, d0, e0 = snapshot(G), snapshot(D), snapshot(E)
    opt = torch.optim.Adam(list(E.parameters()) + list(G.parameters()), lr=1e-3)
    M.train_encoder(E, G, D, opt, tiny_data(), steps=3, kappa=1.0, finetune=True, batch_size=4)
    g_changed = changed(g0, G)
    assert "fc.weight" in g_changed and "blocks.1.weight" in g_changed, "step 3 must train G"
    assert not any("running" in k for k in g_changed), "G's BatchNorm statistics stay frozen (deviation 4)"
    assert not changed(d0, D), "D is never trained after step 1"
    assert changed(e0, E)


def test_batches_cover_each_epoch_and_are_reproducible():
    rows = torch.cat([M.batch_indices(10, 5, it, seed=1) for it in range(2)])
    assert sorted(rows.tolist()) == list(range(10))
    assert torch.equal(M.batch_indices(10, 5, 7, seed=1), M.batch_indices(10, 5, 7, seed=1))


def test_memory_estimate_counts_paper_parameters():
    import argparse
    a = argparse.Namespace(size=64, width=64, dims=3, latent_dim=2500)
    e1, e4 = M.memory_estimate_mb(a, 1), M.memory_estimate_mb(a, 4)
    with torch.device("meta"):
        G = M.Generator(latent_dim=2500, size=64, width=64)
    assert e1["params"]["G"] == sum(p.numel() for p in G.parameters()) == 2500 * 512 * 64 + 512 * 64 + 4_648_512
    assert e4["peak_mb"] > e1["peak_mb"] > e1["weights_mb"]


# ---- the script end to end -------------------------------------------------------------------------

def run_script(*args, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / "fanogan3d.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_bad_flag_is_one_error_line(tmp_path):
    p = run_script("--size", "24", "--out", str(tmp_path / "bad"))
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("error: --size must be a power of 2")
    assert "Traceback" not in p.stderr


def test_smoke_run_writes_the_contract(tmp_path):
    out = tmp_path / "run"
    p = run_script("--preset", "smoke", "--out", str(out), "--device", "cpu")
    assert p.returncode == 0, p.stderr[-3000:]
    sys.path.insert(0, str(REPO.parent / "shared"))
    from check_contract import check
    res = check(str(out))
    problems = res if isinstance(res, list) else res[0]
    assert not problems, problems
    r = json.loads((out / "results.json").read_text())
    assert r["method"] == "fanogan3d" and r["unit"] == "volume" and r["dims"] == 3
    assert {"oracle_youden", "val_threshold", "per_type", "ablation_no_finetune", "memory_estimate"} <= set(r)
    for f in ("fig4_roc.png", "fig5_pr_per_type.png", "fig6_three_planes.png", "fig7_scores_log.png"):
        assert (out / f).stat().st_size > 0, f
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert {"L_img", "L_feat", "type", "score_no_finetune"} <= set(rows[0])
    # --checkpoint skips training and scores the same model to the same numbers
    p2 = run_script("--preset", "smoke", "--out", str(tmp_path / "again"), "--device", "cpu",
                    "--checkpoint", str(out / "last.pt"))
    assert p2.returncode == 0, p2.stderr[-3000:]
    rows2 = list(csv.DictReader(open(tmp_path / "again" / "scores.csv")))
    assert np.allclose([float(r["score"]) for r in rows], [float(r["score"]) for r in rows2], rtol=1e-5)
