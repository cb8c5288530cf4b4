"""3D f-AnoGAN: unsupervised anomaly detection in whole head-CT volumes.

Paper
    J. Simarro Viana, E. de la Rosa, T. Vande Vyvere, D. Robben, D. M. Sima and CENTER-TBI
    participants and investigators. "Unsupervised 3D Brain Anomaly Detection." Brainlesion:
    Glioma, Multiple Sclerosis, Stroke and Traumatic Brain Injuries (BrainLes 2020, MICCAI
    workshop), LNCS 12658, Springer 2021. arXiv:2010.04717. No public code; this is the first.
Builds on
    f-AnoGAN: T. Schlegl et al., Medical Image Analysis 54 (2019) [paper ref 20];
    WGAN-GP: I. Gulrajani et al., NeurIPS 2017 [ref 9];
    3D brain GAN: G. Kwon, C. Han, D. Kim, MICCAI 2019, arXiv:1908.02498 [ref 15].

What this file implements (paper §2 "Training strategy", "Anomaly score", "Model architecture")
    Step 1  3D WGAN-GP on healthy volumes:
            Eq. (2)  L_D = E[D(x~)] - E[D(x)] + λ E[(||∇_x^ D(x^)||_2 - 1)^2]
            Eq. (3)  L_G = -E[D(x~)]
    Step 2  encoder training, "izif": G and D frozen, only E learns x -> z:
            Eq. (4)  L_img  = (1/n) ||x - G(E(x))||^2            n = number of voxels
            Eq. (5)  L_feat = (1/m) ||f(x) - f(G(E(x)))||^2      f = an intermediate critic layer
            Eq. (6)  L_E    = L_img + κ L_feat
    Step 3  fine-tuning of E and G together on L_E (§2 "Techniques for improving the performance";
            switch off with --no-finetune for the paper's ablation, supplementary Table S2).
    Score   anomaly score of a volume = L_E (Eq. 6); voxel-wise |x - x~| localises (Fig. 6).
    Eval    §3: ROC/AUC (Fig. 4), accuracy/recall/specificity at the Youden index, precision-recall
            and AP per haemorrhage type (Fig. 5), three-plane examples (Fig. 6), log-scale score
            distributions (Fig. 7), and the 2D f-AnoGAN baseline on middle axial slices (--dims 2).

Deviations from the paper
    1. Architecture. Fig. 3 (layer table) is an image we cannot read, so the networks follow the
       3D brain WGAN it builds on (Kwon et al. [15]): G = FC -> 512x4^3 -> 4 x (nearest upsample x2,
       3^3 conv, BatchNorm, ReLU) -> tanh; critic D = 4 strided 4^3 convs (64..512 channels,
       LeakyReLU 0.2) -> 4^3 conv to one value, *without* BatchNorm (the gradient penalty needs
       per-sample gradients; Gulrajani §4); E = the critic's layout with BatchNorm and a 2500-d
       output with tanh (§2 "Model architecture"). f(x) = the critic's last hidden layer (512x4^3);
       which layer the paper's asterisk marks is not recoverable from the text.
    2. Training hyperparameters are not in the paper: we take WGAN-GP's (Adam lr 1e-4, betas
       (0, 0.9), n_critic 5, λ 10 [9]), batch 4 (Kwon [15]), κ = 1 (f-AnoGAN [20]), fine-tuning at
       lr 1e-5; the numbers of iterations are our choice. All are flags.
    3. Preprocessing (§2 steps 1-7): no affine registration to MNI and no icobrain quality control
       (commercial). Skull stripping uses the dataset's brain mask (the phantom's, or common.py's HU
       fallback for CT-ICH). Volumes are padded to a cube before the linear resize to 64^3, keeping
       the aspect ratio. Gaussian smoothing σ = 1 voxel (σ is not given). The window [-20, 100] HU
       is mapped to [-1, 1], which *is* the global min-max normalisation of step 7.
    4. G's BatchNorm stays in eval mode in steps 2 and 3 (running statistics from step 1); in step 3
       G's weights are trained, its statistics are not updated. The paper does not say.
    5. 2D baseline (§3): the paper does not describe its 2D network; ours is the same architecture
       with 2D layers, trained on --n-slices middle axial slices per volume. As in §3, test slices of
       anomalous scans that contain no lesion are discarded; we add a volume-level score (mean over
       the slices) for a like-for-like comparison with the 3D model.
    6. The Youden operating point is chosen with the test labels (as in §3), so it is reported as
       `oracle_youden`. We add a deployable threshold: the --val-percentile of healthy validation scores.
    7. Data: on the synthetic phantom, CT hemorrhage subtypes (intraparenchymal, subdural, epidural)
       stand in for CENTER-TBI/PhysioNet TBI lesions; Fig. 7's post-surgical and low-quality groups
       do not exist there, so Fig. 7 shows the haemorrhage types.

Presets
    paper  64^3, widths 64..512, z of size 2500, batch 4, 20k/10k/2k iterations (steps 1/2/3). A GPU job:
           peak GPU memory 3.5 GB at batch 1 and 3.6 GB at batch 4 (fp32, measured on an H100 with
           --max-steps 10; G and E hold 87M and 93M parameters, mostly the 2500-d latent's layers).
    quick  scaled down for a 2-core CPU (about 4 minutes): 32^3 volumes, widths 8..32, z of size 128,
           batch 16, 250 / 300 / 100 iterations, lr 5e-4 (steps 1-2) so that few steps suffice.
    smoke  16^3, tiny widths, two iterations per step: seconds, for the tests.

What you should see (quick preset, seed 0, one thread, a second job on the other core: 530 s of training)
    3D, volume AUROC for hemorrhage: 0.62 after fine-tuning (step 3), 0.77 before it (step 2, the
    `ablation_no_finetune` key); per type after / before: epidural 0.73 / 0.84, intraparenchymal
    0.46 / 0.74, subdural 0.69 / 0.75. 2D baseline (--dims 2, 36 s of training): slice AUROC 0.60,
    volume AUROC 0.58. So 3D beats 2D, as in §3, but here step 3 hurts, where the paper found it the
    better strategy (§2, suppl. Table S2). One reading, not tested: a G tuned together with E on
    healthy volumes also reconstructs the small bleeds better. The z-score baseline of benchmark.py
    reaches 0.67 on the same volumes.

Commands
    python fanogan3d.py                                # quick preset, 3D, synthetic CT phantom
    python fanogan3d.py --dims 2                       # the 2D f-AnoGAN baseline (§3)
    python fanogan3d.py --preset paper --data ctich    # the paper's settings, on a GPU
    python fanogan3d.py --preset paper --max-steps 5 --batch-size 4   # short run: peak GPU memory
    torchrun --nproc_per_node=4 fanogan3d.py --preset paper --data ctich --batch-size 1   # 4 GPUs, batch 4
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C
from data import datasets

METHOD = "fanogan3d"

# =================================================================================================
# Arguments
# =================================================================================================

PRESETS = {
    "smoke": dict(dims=3, size=16, width=4, latent_dim=16, batch_size=4, n_critic=2, lam=10.0, kappa=1.0,
                  lr_gan=5e-4, lr_enc=5e-4, lr_ft=1e-4, beta1=0.0, beta2=0.9, gan_steps=2, enc_steps=2,
                  ft_steps=2, finetune=True, smooth_sigma=1.0, window=[-20.0, 100.0], n_slices=4,
                  val_percentile=95.0, ckpt_every=0),
    "quick": dict(dims=3, size=32, width=8, latent_dim=128, batch_size=16, n_critic=5, lam=10.0, kappa=1.0,
                  lr_gan=5e-4, lr_enc=5e-4, lr_ft=1e-4, beta1=0.0, beta2=0.9, gan_steps=250, enc_steps=300,
                  ft_steps=100, finetune=True, smooth_sigma=1.0, window=[-20.0, 100.0], n_slices=8,
                  val_percentile=95.0, ckpt_every=0),
    "paper": dict(dims=3, size=64, width=64, latent_dim=2500, batch_size=4, n_critic=5, lam=10.0, kappa=1.0,
                  lr_gan=1e-4, lr_enc=1e-4, lr_ft=1e-5, beta1=0.0, beta2=0.9, gan_steps=20000, enc_steps=10000,
                  ft_steps=2000, finetune=True, smooth_sigma=1.0, window=[-20.0, 100.0], n_slices=16,
                  val_percentile=95.0, ckpt_every=0),
}


def build_parser():
    p = C.ArgumentParser(description=__doc__)
    C.add_contract_args(p, METHOD)
    g = p.add_argument_group("fanogan3d (paper §2; None = the preset's value)")
    g.add_argument("--dims", type=int, choices=[2, 3], default=None,
                   help="3: the paper's 3D model; 2: the 2D f-AnoGAN baseline on middle axial slices (§3)")
    g.add_argument("--size", type=int, default=None, help="input edge in voxels, a power of 2 >= 8; §2 step 5 (paper 64)")
    g.add_argument("--width", type=int, default=None,
                   help="channels of the widest-resolution layer; deeper layers double it, Fig. 3 / [15] (paper 64)")
    g.add_argument("--latent-dim", type=int, default=None, help="size of z, §2 'Model architecture' (paper 2500)")
    g.add_argument("--batch-size", type=int, default=None, help="batch size (per process under torchrun); not in the paper ([15] uses 4)")
    g.add_argument("--n-critic", type=int, default=None, help="critic iterations per G iteration, WGAN-GP [9] (5)")
    g.add_argument("--lam", type=float, default=None, help="λ in Eq. (2), gradient-penalty weight [9] (paper 10)")
    g.add_argument("--kappa", type=float, default=None, help="κ in Eq. (6), feature-loss weight; not given (f-AnoGAN 1)")
    g.add_argument("--lr-gan", type=float, default=None, help="Adam lr of step 1 (Eq. 2-3); not given ([9] 1e-4)")
    g.add_argument("--lr-enc", type=float, default=None, help="Adam lr of step 2 (Eq. 6, E only); not given (1e-4)")
    g.add_argument("--lr-ft", type=float, default=None, help="Adam lr of step 3 (Eq. 6, E and G); not given (1e-5)")
    g.add_argument("--beta1", type=float, default=None, help="Adam β1 of all steps; not given ([9] 0)")
    g.add_argument("--beta2", type=float, default=None, help="Adam β2 of all steps; not given ([9] 0.9)")
    g.add_argument("--gan-steps", type=int, default=None, help="generator iterations of step 1; not given (20000)")
    g.add_argument("--enc-steps", type=int, default=None, help="encoder iterations of step 2; not given (10000)")
    g.add_argument("--ft-steps", type=int, default=None, help="iterations of step 3 (fine-tuning); not given (2000)")
    g.add_argument("--finetune", action=argparse.BooleanOptionalAction, default=None,
                   help="run step 3, fine-tuning E and G on L_E (§2, suppl. Table S2); --no-finetune for the ablation")
    g.add_argument("--max-steps", type=int, default=None,
                   help="cap every step's iterations at N (short runs, e.g. to measure GPU memory); not a paper setting")
    g.add_argument("--smooth-sigma", type=float, default=None, help="Gaussian smoothing σ in voxels, §2 step 5 (σ not given; 1)")
    g.add_argument("--window", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="CT soft-tissue window in HU, §2 step 6 (paper -20 100)")
    g.add_argument("--n-slices", type=int, default=None,
                   help="--dims 2: middle axial slices per volume (§3 'a middle brain range'; not given)")
    g.add_argument("--val-percentile", type=float, default=None,
                   help="threshold = this percentile of healthy validation scores (ours; the paper uses Youden)")
    g.add_argument("--ckpt-every", type=int, default=None,
                   help="write last.pt every N iterations (0 = once per epoch of training data)")
    return p


def parse(argv=None):
    args = C.parse_args(build_parser(), PRESETS, argv, method=METHOD)
    for name, lo, hi in (("size", 8, 512), ("width", 1, 1024), ("latent_dim", 1, 100000), ("batch_size", 1, 4096),
                         ("n_critic", 1, 100), ("gan_steps", 0, 10**8), ("enc_steps", 0, 10**8),
                         ("ft_steps", 0, 10**8), ("n_slices", 1, 1000), ("ckpt_every", 0, 10**8)):
        C.check_range(args, name, lo=lo, hi=hi, integer=True)
    for name, lo, hi in (("lam", 0, None), ("kappa", 0, None), ("lr_gan", 0, 1), ("lr_enc", 0, 1), ("lr_ft", 0, 1),
                         ("beta1", 0, 0.999999), ("beta2", 0, 0.999999), ("smooth_sigma", 0, 20),
                         ("val_percentile", 0, 100)):
        C.check_range(args, name, lo=lo, hi=hi)
    if args.size & (args.size - 1):
        C.fail(f"--size must be a power of 2 (8, 16, 32, 64, ...), got {args.size}")
    if args.max_steps is not None:
        C.check_range(args, "max_steps", lo=0, hi=10**8, integer=True)
        for k in ("gan_steps", "enc_steps", "ft_steps"):
            setattr(args, k, min(getattr(args, k), args.max_steps))
    if args.window[0] >= args.window[1]:
        C.fail(f"--window LO HI needs LO < HI, got {args.window[0]:g} {args.window[1]:g}")
    return args


# =================================================================================================
# Networks (Fig. 1 and Fig. 3; layout of the 3D brain WGAN of Kwon et al. [15], see deviation 1)
# =================================================================================================

def _layers(dims):
    """The same networks in 3D (the paper) and 2D (the §3 baseline)."""
    return (nn.Conv3d, nn.BatchNorm3d) if dims == 3 else (nn.Conv2d, nn.BatchNorm2d)


def n_levels(size):
    """Resolution levels between 4^d and size^d: 64 -> 4 (64, 32, 16, 8 -> 4)."""
    return int(round(math.log2(size // 4)))


class Generator(nn.Module):
    """G: z (B, latent) -> x~ (B, 1, S, S, S) in [-1, 1]. Channels 8w, 4w, 2w, w at 4^3 .. S/2."""

    def __init__(self, *, latent_dim=2500, size=64, width=64, dims=3):
        super().__init__()
        Conv, BN = _layers(dims)
        L = n_levels(size)
        ch = [width * 2 ** (L - 1 - i) for i in range(L)]            # paper: 512, 256, 128, 64
        self.dims, self.c0 = dims, ch[0]
        self.fc = nn.Linear(latent_dim, ch[0] * 4 ** dims)
        self.bn0 = BN(ch[0])
        blocks = []
        for c_in, c_out in zip(ch[:-1], ch[1:]):
            blocks += [nn.Upsample(scale_factor=2, mode="nearest"), Conv(c_in, c_out, 3, padding=1, bias=False),
                       BN(c_out), nn.ReLU(inplace=True)]
        blocks += [nn.Upsample(scale_factor=2, mode="nearest"), Conv(ch[-1], 1, 3, padding=1, bias=False), nn.Tanh()]
        self.blocks = nn.Sequential(*blocks)

    def forward(self, z):
        h = self.fc(z).view(len(z), self.c0, *[4] * self.dims)         # (B, 8w, 4, 4, 4)
        return self.blocks(F.relu(self.bn0(h)))                        # (B, 1, S, S, S)


class Critic(nn.Module):
    """D: x (B, 1, S, S, S) -> one unbounded value per sample (WGAN critic), and f(x), the last hidden
    layer (B, m), m = 8w * 4^3 (Eq. 5). No BatchNorm: the gradient penalty is per sample."""

    def __init__(self, *, size=64, width=64, dims=3):
        super().__init__()
        Conv, _ = _layers(dims)
        L = n_levels(size)
        ch = [1] + [width * 2 ** i for i in range(L)]                  # paper: 1, 64, 128, 256, 512
        layers = []
        for c_in, c_out in zip(ch[:-1], ch[1:]):
            layers += [Conv(c_in, c_out, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        self.features_net = nn.Sequential(*layers)                     # (B, 8w, 4, 4, 4) = the layer (*) of Fig. 3
        self.out = Conv(ch[-1], 1, 4, stride=1, padding=0)             # (B, 1, 1, 1, 1)

    def features(self, x):
        return self.features_net(x).flatten(1)                         # f(x): (B, m)

    def forward(self, x):
        return self.out(self.features_net(x)).flatten()                # D(x): (B,)


class Encoder(nn.Module):
    """E: x (B, 1, S, S, S) -> z (B, latent) in (-1, 1): the critic's layout with BatchNorm and a tanh
    output (§2 'Model architecture': "We add a hyperbolic tangent activation in the last encoder")."""

    def __init__(self, *, latent_dim=2500, size=64, width=64, dims=3):
        super().__init__()
        Conv, BN = _layers(dims)
        L = n_levels(size)
        ch = [1] + [width * 2 ** i for i in range(L)]
        layers = []
        for i, (c_in, c_out) in enumerate(zip(ch[:-1], ch[1:])):
            layers += [Conv(c_in, c_out, 4, stride=2, padding=1)]
            layers += [BN(c_out)] if i > 0 else []                     # no norm on the first layer, as in [15]
            layers += [nn.LeakyReLU(0.2, inplace=True)]
        layers += [Conv(ch[-1], latent_dim, 4, stride=1, padding=0), nn.Flatten(), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)                                             # (B, latent)


# =================================================================================================
# Losses (one function per equation of §2)
# =================================================================================================

def critic_wasserstein_loss(d_real, d_fake):
    """First two terms of Eq. (2): E_{x~ ~ Pg}[D(x~)] - E_{x ~ Pr}[D(x)]."""
    # Eq. (2): L_D = E[D(x~)] - E[D(x)] + λ·GP
    return d_fake.mean() - d_real.mean()


def gradient_penalty(D, x, x_tilde, eps=None):
    """Third term of Eq. (2) without λ: E_{x^}[(||∇_{x^} D(x^)||_2 - 1)^2], x^ = ε x + (1-ε) x~ with
    ε ~ U[0, 1] per sample; the norm is taken per sample over ALL of its voxels and channels."""
    if eps is None:
        eps = torch.rand(len(x), *[1] * (x.dim() - 1), device=x.device, dtype=x.dtype)
    x_hat = (eps * x + (1 - eps) * x_tilde).detach().requires_grad_(True)  # (B, 1, S, S, S)
    grad, = torch.autograd.grad(D(x_hat).sum(), x_hat, create_graph=True)
    norm = grad.float().flatten(1).norm(2, dim=1)                     # (B,)  ||∇ D(x^)||_2 per sample
    # Eq. (2): λ E_{x^ ~ P_x^}[(||∇_{x^} D(x^)||_2 - 1)^2]   (λ applied by the caller)
    return ((norm - 1) ** 2).mean()


def generator_loss(d_fake):
    # Eq. (3): L_G = -E_{x~ ~ Pg}[D(x~)]
    return -d_fake.mean()


def image_loss(x, x_rec):
    """Eq. (4), one value per sample: (B,)."""
    # Eq. (4): L_img = (1/n) ||x - x~||^2,  n = number of voxels
    return ((x.float() - x_rec.float()) ** 2).flatten(1).mean(1)


def feature_loss(f_x, f_rec):
    """Eq. (5), one value per sample: (B,)."""
    # Eq. (5): L_feat = (1/m) ||f(x) - f(x~)||^2,  m = dimensionality of the critic feature space
    return ((f_x.float() - f_rec.float()) ** 2).flatten(1).mean(1)


def encoder_loss(x, x_rec, f_x, f_rec, kappa):
    """Eq. (6), one value per sample (B,): the training loss of steps 2-3 AND the anomaly score."""
    # Eq. (6): L_E = L_img + κ · L_feat
    return image_loss(x, x_rec) + kappa * feature_loss(f_x, f_rec)


# =================================================================================================
# Anomaly score (§2 "Anomaly score": Eq. 6 per volume; voxel-wise |x - x~| for localisation)
# =================================================================================================

@torch.no_grad()
def anomaly_score(E, G, D, x, kappa):
    """x (B, 1, S, S, S) -> dict(score=L_E (B,), img=L_img (B,), feat=L_feat (B,), x_rec (B, 1, S, S, S))."""
    x_rec = G(E(x))                                                    # x~ = G(E(x))
    f_x, f_rec = D.features(x), D.features(x_rec)
    img, feat = image_loss(x, x_rec), feature_loss(f_x, f_rec)
    return {"score": img + kappa * feat, "img": img, "feat": feat, "x_rec": x_rec}


# =================================================================================================
# Training (step 1: WGAN-GP; step 2: encoder with G, D frozen; step 3: fine-tune E and G)
# =================================================================================================

def batch_indices(n, batch_size, it, seed):
    """Rows of iteration `it`: a fresh permutation every epoch, reproducible from (seed, epoch), so a
    resumed run draws the same batches."""
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(it, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return perm[k * batch_size:(k + 1) * batch_size]


def get_batch(X, idx, device):
    return torch.as_tensor(np.asarray(X[idx.numpy()]), dtype=torch.float32).unsqueeze(1).to(device)  # (B, 1, S..)


def set_trainable(module, flag):
    for p in module.parameters():
        p.requires_grad_(flag)


def rank_batch(n, batch_size, it, seed):
    """This process's rows of iteration `it`. Alone: batch_indices(...). Under torchrun each of the N
    processes takes its disjoint share (C.shard) of the global batch of batch_size x N rows."""
    return C.shard(batch_indices(n, batch_size * C.ddp_world(), it, seed))


def train_wgan_gp(G, D, opt_G, opt_D, X, *, steps, start=0, n_critic=5, lam=10.0, batch_size=4, latent_dim=2500,
                  seed=0, device="cpu", amp=False, curves=None, save=None, ckpt_every=1, ddp=None):
    """Step 1: Eq. (2) for the critic (n_critic iterations), then Eq. (3) for the generator.
    ddp: {"G": G_, "D": D_}, the DistributedDataParallel wrappers under torchrun (else G and D)."""
    curves = curves if curves is not None else {}
    G_, D_ = (ddp or {}).get("G", G), (ddp or {}).get("D", D)
    G.train(), D.train()
    for step in C.progress(range(start, steps), total=steps - start, desc="step 1 WGAN-GP"):
        set_trainable(D, True)
        for k in range(n_critic):
            x = get_batch(X, rank_batch(len(X), batch_size, step * n_critic + k, seed), device)
            z = torch.randn(len(x), latent_dim, device=device)          # z ~ N(0, I)
            with C.autocast(device, amp):
                with torch.no_grad():
                    x_tilde = G_(z)                                    # (B, 1, S, S, S)
                W = critic_wasserstein_loss(D_(x), D_(x_tilde)).float()
                gp = gradient_penalty(D_, x, x_tilde)
                L_D = W + lam * gp                                     # Eq. (2)
            opt_D.zero_grad(set_to_none=True)
            L_D.backward()
            opt_D.step()
        set_trainable(D, False)                                        # G's step does not touch D
        z = torch.randn(batch_size, latent_dim, device=device)
        with C.autocast(device, amp):
            L_G = generator_loss(D(G_(z))).float()                     # Eq. (3); plain D: it is frozen here
        opt_G.zero_grad(set_to_none=True)
        L_G.backward()
        opt_G.step()
        set_trainable(D, True)
        C.check_finite(L_D + L_G, step=step, ckpt=getattr(save, "path", None))
        for name, v in (("L_D (Eq. 2)", L_D), ("L_G (Eq. 3)", L_G), ("W distance -(E[D(x~)]-E[D(x)])", -W),
                        ("gradient penalty", gp)):
            curves.setdefault(name, []).append((step + 1, float(v.detach())))
        if save and ((step + 1) % ckpt_every == 0 or step + 1 == steps):
            save(step + 1)
    return curves


def train_encoder(E, G, D, opt, X, *, steps, start=0, kappa=1.0, finetune=False, batch_size=4, seed=0,
                  device="cpu", amp=False, curves=None, save=None, ckpt_every=1, phase="step 2 encoder", ddp=None):
    """Step 2 (finetune=False): only E minimises Eq. (6); G and D are frozen (no gradients, eval mode).
    Step 3 (finetune=True): E and G minimise Eq. (6) together; D stays frozen (it only provides f).
    ddp: {"E": E_, "G": G_}, the DistributedDataParallel wrappers under torchrun (else E and G)."""
    curves = curves if curves is not None else {}
    E_ = (ddp or {}).get("E", E)
    G_ = (ddp or {}).get("G", G) if finetune else G                    # a frozen G needs no gradient averaging
    D.eval(), G.eval(), E.train()
    set_trainable(D, False)
    set_trainable(G, finetune)
    key = "L_E (Eq. 6), step 3 fine-tune E+G" if finetune else "L_E (Eq. 6), step 2 encoder"
    offset = 10**6 if finetune else 5 * 10**5                          # different batches from step 1
    for step in C.progress(range(start, steps), total=steps - start, desc=phase):
        x = get_batch(X, rank_batch(len(X), batch_size, offset + step, seed), device)
        with C.autocast(device, amp):
            x_rec = G_(E_(x))                                          # x~ = G(E(x))
            with torch.no_grad():
                f_x = D.features(x)
            L_E = encoder_loss(x, x_rec, f_x, D.features(x_rec), kappa).mean()  # Eq. (6)
        opt.zero_grad(set_to_none=True)
        L_E.backward()
        opt.step()
        C.check_finite(L_E, step=step, ckpt=getattr(save, "path", None))
        curves.setdefault(key, []).append((step + 1, float(L_E.detach())))
        if save and ((step + 1) % ckpt_every == 0 or step + 1 == steps):
            save(step + 1)
    set_trainable(G, True)
    set_trainable(D, True)
    return curves


# =================================================================================================
# Scoring and evaluation
# =================================================================================================

def load_arrays(args, cases, desc):
    """§2 preprocessing via common.py: skull strip, crop black borders, smooth, pad to a cube, resize
    (linear), window [-20, 100] HU -> [-1, 1]. --dims 2: middle axial slices instead (§3)."""
    if not cases:
        return None
    if args.dims == 3:
        return datasets.volume_stack(cases, size=(args.size,) * 3, norm="ct", ct_window=tuple(args.window),
                              smooth_sigma=args.smooth_sigma, cache_dir=args.cache_dir, desc=desc)
    return datasets.slice_stack(cases, size=(args.size,) * 2, norm="ct", n_slices=args.n_slices, center=0.5,
                         ct_window=tuple(args.window), cache_dir=args.cache_dir, desc=desc)


def score_set(E, G, D, S, *, kappa, batch_size, device, amp=False, keep=()):
    """Score every row of an ArraySet, in batches (the last partial batch included). Returns numpy
    arrays score/img/feat (N,) and {row: x_rec} for the rows in `keep` (for figures)."""
    E.eval(), G.eval(), D.eval()
    out = {"score": [], "img": [], "feat": []}
    recs, keep = {}, set(int(k) for k in keep)
    for i0 in range(0, len(S.x), batch_size):
        idx = torch.arange(i0, min(i0 + batch_size, len(S.x)))
        x = get_batch(S.x, idx, device)
        with C.autocast(device, amp):
            r = anomaly_score(E, G, D, x, kappa)
        for k in out:
            out[k].append(r[k].float().cpu().numpy())
        for j, row in enumerate(idx.tolist()):
            if row in keep:
                recs[row] = r["x_rec"][j, 0].float().cpu().numpy()
    return {k: np.concatenate(v) for k, v in out.items()}, recs


def lesion_type(case):
    """Haemorrhage subtype from the phantom/CT-ICH metadata, else the test group."""
    return str(case.meta.get("subtype") or case.group)


def make_rows(S, sc, dims, sc_noft=None):
    """Per-unit rows for C.finish_run. 3D: one row per volume. 2D: one row per slice; slices of
    anomalous scans without lesion are discarded (§3, "images with abnormalities that are not located
    in the selected slice are discarded")."""
    rows = []
    for i in range(len(S.x)):
        c = S.cases[int(S.case[i])]
        if dims == 2:
            has_lesion = bool(np.asarray(S.mask[i]).any()) if c.mask else True   # no mask: keep the slice
            if c.label == 1 and not has_lesion:
                continue
            rid, label = f"{c.id}/z{int(S.z[i])}", int(c.label == 1 and has_lesion)
        else:
            rid, label = c.id, int(c.label)
        r = {"id": rid, "group": c.group, "label": label, "score": float(sc["score"][i]),
             "type": lesion_type(c) if c.label else "normal", "L_img": float(sc["img"][i]),
             "L_feat": float(sc["feat"][i]), "row": i}
        if sc_noft is not None:
            r["score_no_finetune"] = float(sc_noft["score"][i])
        rows.append(r)
    return rows


def per_type(rows, key="score"):
    """AUROC and AP of each lesion type against the normal units (Fig. 5)."""
    y = np.array([r["label"] for r in rows])
    s = np.array([r[key] for r in rows])
    t = np.array([r["type"] for r in rows])
    out = {}
    for name in sorted(set(t[y == 1])):
        sel = (y == 0) | (t == name)
        out[name] = {"n": int(((t == name) & (y == 1)).sum()), "auroc": C.auroc(y[sel], s[sel]),
                     "ap": C.auprc(y[sel], s[sel])}
    return out


def volume_level(S, sc):
    """--dims 2: a volume's score = mean of its slices' scores (all middle slices)."""
    vs = C.aggregate(sc["score"], [int(k) for k in S.case], how="mean")
    rows = [{"label": int(c.label), "type": lesion_type(c) if c.label else "normal", "score": vs[i]}
            for i, c in enumerate(S.cases) if i in vs]
    y, s = np.array([r["label"] for r in rows]), np.array([r["score"] for r in rows])
    return {"auroc": C.auroc(y, s), "auprc": C.auprc(y, s), "per_type": per_type(rows)}


def memory_estimate_mb(args, batch_size):
    """Rough peak training memory without a GPU: weights of G, D, E (fp32) + gradients and two Adam
    moments of the networks a step trains (finished steps release theirs, see release()) + every layer's
    output in that step's forward passes, counted on the 'meta' device (shapes only, no compute). A
    critic iteration runs D on x, x~ and x^, and the gradient penalty's double backward keeps about two
    more copies of D(x^)'s activations. cuDNN workspaces and allocator slack are not counted: +-50%."""
    acts = {"n": 0}

    def hook(_m, _i, o):
        acts["n"] += o.numel() if torch.is_tensor(o) else 0

    with torch.device("meta"):
        kw = dict(size=args.size, width=args.width, dims=args.dims)
        G, D, E = Generator(latent_dim=args.latent_dim, **kw), Critic(**kw), Encoder(latent_dim=args.latent_dim, **kw)
        P = {k: sum(p.numel() for p in m.parameters()) for k, m in (("G", G), ("D", D), ("E", E))}
        for m in (G, D, E):
            for mod in m.modules():
                if not list(mod.children()):
                    mod.register_forward_hook(hook)
        shape = (batch_size, 1) + (args.size,) * args.dims

        def count(fn):
            acts["n"] = 0
            fn()
            return acts["n"]
        a_G = count(lambda: G(torch.zeros(batch_size, args.latent_dim)))
        a_D = count(lambda: D(torch.zeros(shape)))
        a_E = count(lambda: E(torch.zeros(shape)))
    W = sum(P.values())
    steps = {"step 1 critic iteration": W + 3 * (P["G"] + P["D"]) + a_G + 5 * a_D,
             "step 1 generator iteration": W + 3 * (P["G"] + P["D"]) + a_G + a_D,
             "step 2 encoder": W + 3 * P["E"] + a_E + a_G + 2 * a_D,
             "step 3 fine-tune": W + 3 * (P["E"] + P["G"]) + a_E + a_G + 2 * a_D}
    mb = 4 / 2 ** 20
    return {"params": P, "weights_mb": round(W * mb, 1), "per_step_mb": {k: round(v * mb, 1) for k, v in steps.items()},
            "peak_mb": round(max(steps.values()) * mb, 1)}


def release(models, *optims):
    """After a step: drop gradients and the finished optimizers' Adam moments (GPU memory)."""
    for m in models:
        m.zero_grad(set_to_none=True)
    for o in optims:
        o.state.clear()


# ---- figures -------------------------------------------------------------------------------------

def _planes(vol, at):
    """(D, H, W) volume = (axial, A->P, L->R) -> axial, coronal, sagittal slices through voxel `at`
    (superior up in coronal and sagittal)."""
    d, h, w = at
    return [vol[d], np.flipud(vol[:, h, :]), np.flipud(vol[:, :, w])]


def plot_three_planes(cases, path, title=""):
    """Fig. 6: rows x | x~ | |x - x~| | ground truth, in axial, coronal and sagittal planes per case."""
    plt = C._plt()
    n = len(cases)
    fig, axes = plt.subplots(4, 3 * n, figsize=(1.9 * 3 * n, 8.2), squeeze=False)
    vmax = max(float(np.percentile(c["err"], 99.8)) for c in cases) or 1.0
    for j, c in enumerate(cases):
        at = c["at"]
        xs, rs, es, gs = (_planes(v, at) for v in (c["x"], c["x_rec"], c["err"], c["gt"]))
        for p in range(3):
            col = 3 * j + p
            axes[0, col].imshow(xs[p], cmap="gray", vmin=-1, vmax=1)
            axes[1, col].imshow(rs[p], cmap="gray", vmin=-1, vmax=1)
            im = axes[2, col].imshow(es[p], cmap="inferno", vmin=0, vmax=vmax)
            axes[3, col].imshow(xs[p], cmap="gray", vmin=-1, vmax=1)
            if gs[p].any():
                axes[3, col].contour(gs[p] > 0, levels=[0.5], colors="red", linewidths=1.0)
            axes[0, col].set_title(("axial", "coronal", "sagittal")[p], fontsize=8)
        axes[0, 3 * j + 1].text(0.5, 1.22, c["title"], transform=axes[0, 3 * j + 1].transAxes, ha="center",
                                fontsize=9, weight="bold")
    for i, name in enumerate(("original x", "reconstruction x~", "voxel error |x - x~|", "ground truth")):
        axes[i, 0].text(-0.08, 0.5, name, transform=axes[i, 0].transAxes, rotation=90, ha="right",
                        va="center", fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([]), ax.set_yticks([])
        for s in ax.spines.values():
            s.set_visible(False)
    fig.colorbar(im, ax=axes[2, :].tolist(), fraction=0.01, pad=0.01)
    fig.suptitle(title, fontsize=10)
    C._save(fig, path)


def write_figures(run, args, S, rows, sc, recs, rows_val, curves, extra):
    out, y = run.out, np.array([r["label"] for r in rows])
    s = np.array([r["score"] for r in rows])
    t = np.array([r["type"] for r in rows])
    types = sorted(set(t[y == 1]))
    unit = "volume" if args.dims == 3 else "slice"
    # Fig. 4: ROC, all anomalous vs normal; with and without step 3 when both exist
    roc = {f"{args.dims}D f-AnoGAN" + (" (fine-tuned)" if args.finetune else ""): (y, s)}
    if "score_no_finetune" in rows[0] and args.finetune:
        roc["without fine-tuning (after step 2)"] = (y, np.array([r["score_no_finetune"] for r in rows]))
    for name in types:
        sel = (y == 0) | (t == name)
        roc[f"{name} only"] = (y[sel], s[sel])
    C.plot_roc(roc, out / "fig4_roc.png", title=f"Fig. 4: {unit}-level ROC, hemorrhage vs normal")
    # Fig. 5: precision-recall per lesion type
    C.plot_pr({name: (y[(y == 0) | (t == name)], s[(y == 0) | (t == name)]) for name in types},
              out / "fig5_pr_per_type.png", title="Fig. 5: precision-recall per lesion type")
    # Fig. 7: log anomaly scores per group
    groups = {"val": [r["score"] for r in rows_val], "normal": s[y == 0]}
    groups.update({name: s[(t == name) & (y == 1)] for name in types})
    C.plot_scores(groups, out / "fig7_scores_log.png", log=True, xlabel="anomaly score L_E (Eq. 6), log axis",
                  threshold=extra["val_threshold"]["threshold"],
                  title="Fig. 7: anomaly scores per group (log scale)")
    # Fig. 6 (3D): normal, least and most anomalous-scoring hemorrhage, in three planes
    # examples.png (contract): axial slices through the lesion
    shown = pick_examples(rows)
    ex, three = [], []
    for title, r in shown:
        i = r["row"]
        x, x_rec = np.asarray(S.x[i], dtype=np.float32), recs[i]
        gt, err = np.asarray(S.mask[i]), np.abs(x - recs[i])
        if args.dims == 3:
            at = tuple(int(round(v)) for v in (np.argwhere(gt).mean(0) if gt.any() else np.array(x.shape) / 2))
            three.append(dict(title=f"{title}\n{r['id']}, L_E={r['score']:.4f}", x=x, x_rec=x_rec, err=err, gt=gt, at=at))
            ex.append(dict(title=f"{title}\nL_E={r['score']:.4f}", input=x[at[0]], reconstruction=x_rec[at[0]],
                           amap=err[at[0]], gt=gt[at[0]]))
        else:
            ex.append(dict(title=f"{title}\nL_E={r['score']:.4f}", input=x, reconstruction=x_rec, amap=err, gt=gt))
    C.plot_examples(ex, out / "examples.png")
    if three:
        plot_three_planes(three[:3], out / "fig6_three_planes.png",
                          title="Fig. 6: original, reconstruction, voxel error and ground truth (three planes)")
    gan = {k: v for k, v in curves.items() if not k.startswith("L_E")}
    C.plot_curves(gan, out / "losses.png", title="step 1: WGAN-GP (Eq. 2-3)", ylabel="loss (symlog)", logy=True,
                  xlabel="generator iteration")
    C.plot_curves({k: v for k, v in curves.items() if k.startswith("L_E")}, out / "losses_encoder.png",
                  title="steps 2-3: encoder loss L_E (Eq. 6)", ylabel="L_E", xlabel="iteration of each step")


def pick_examples(rows):
    """Cases to show: the median normal, the lowest- and highest-scoring anomalous ('undetected' and
    'detected' in Fig. 6), then more normal/anomalous rows for the contract's examples.png."""
    nor = sorted((r for r in rows if r["label"] == 0), key=lambda r: r["score"])
    ano = sorted((r for r in rows if r["label"] == 1), key=lambda r: r["score"])
    out = [("normal (median score)", nor[len(nor) // 2]), (f"{ano[0]['type']} (lowest score)", ano[0]),
           (f"{ano[-1]['type']} (highest score)", ano[-1])]
    if len(nor) > 1:
        out.append(("normal (highest score)", nor[-1]))
    if len(ano) > 2:
        out.append((f"{ano[len(ano) // 2]['type']} (median score)", ano[len(ano) // 2]))
    return out


# =================================================================================================
# main()
# =================================================================================================

def main(argv=None):
    args = parse(argv)
    run = C.start_run(args, METHOD)
    device = run.device
    data = datasets.load_dataset(args, contrast="ct")
    with C.Timer() as t_data:
        S_train = load_arrays(args, data.train, "train")
        S_val = load_arrays(args, data.val, "val")
        S_test = load_arrays(args, data.test, "test")
    run.log(f"{args.dims}D data: train {S_train.x.shape}, val {None if S_val is None else S_val.x.shape}, "
            f"test {S_test.x.shape} ({t_data.seconds:.1f}s)")

    kw = dict(size=args.size, width=args.width, dims=args.dims)
    G = Generator(latent_dim=args.latent_dim, **kw).to(device)
    D = Critic(**kw).to(device)
    E = Encoder(latent_dim=args.latent_dim, **kw).to(device)
    fmt = torch.channels_last_3d if args.dims == 3 else torch.channels_last
    for m in (G, D, E):   # channels-last layout: the same maths, about 2x faster 3D convolutions on CPU
        m.to(memory_format=fmt)
    betas = (args.beta1, args.beta2)
    opt_G = torch.optim.Adam(G.parameters(), lr=args.lr_gan, betas=betas)
    opt_D = torch.optim.Adam(D.parameters(), lr=args.lr_gan, betas=betas)
    opt_E = torch.optim.Adam(E.parameters(), lr=args.lr_enc, betas=betas)
    opt_EG = torch.optim.Adam(list(E.parameters()) + list(G.parameters()), lr=args.lr_ft, betas=betas)
    models, optims = {"G": G, "D": D, "E": E}, {"G": opt_G, "D": opt_D, "E": opt_E, "EG": opt_EG}
    n_par = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    run.log("parameters: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in n_par.items()))

    # ---- training state: phase 1 = WGAN-GP, 2 = encoder, 3 = fine-tuning, 4 = done ----------------
    state = {"phase": 1, "step": 0, "curves": {}, "scores_step2": None, "train_s": 0.0, "phase_s": {},
             "peak_cuda_mb": {}}
    ck_path = run.out / "last.pt"
    ck_src = args.checkpoint or args.resume
    if ck_src:
        ck = C.load_checkpoint(ck_src, device)
        try:
            for k, m in models.items():
                m.load_state_dict(ck["models"][k])
            for k, o in optims.items():
                o.load_state_dict(ck["optims"][k])
        except (KeyError, RuntimeError) as e:
            C.fail(f"checkpoint {ck_src} does not fit this model ({type(e).__name__}); pass the same "
                   f"--preset/--dims/--size/--width/--latent-dim it was trained with")
        state.update({k: ck[k] for k in state if k in ck})
        if args.resume:
            C.set_rng_state(ck["rng"])
        else:
            state["phase"] = 4
        run.log(f"loaded {ck_src} (phase {ck['phase']}, step {ck['step']})")

    # torchrun: DistributedDataParallel wrappers average the gradients over the processes, each of which
    # trains on its own --batch-size share of every global batch (alone, they are the models themselves)
    ddp = {k: C.ddp_wrap(m, device) for k, m in models.items()}
    global_batch = C.global_batch_size(args.batch_size, len(S_train.x))
    if C.ddp_world() > 1:
        run.log(f"{C.ddp_world()} processes x batch {args.batch_size} = effective batch {global_batch}")
    ckpt_every = args.ckpt_every or max(1, len(S_train.x) // global_batch)   # default: once per epoch

    def saver(phase):
        def save(step):
            state.update(phase=phase, step=step, train_s=train_s0 + time.time() - t0)
            C.save_checkpoint(ck_path, {"models": {k: m.state_dict() for k, m in models.items()},
                                        "optims": {k: o.state_dict() for k, o in optims.items()},
                                        **state, "args": vars(args), "rng": C.rng_state()})
        save.path = ck_path
        return save

    def track(name):
        state["phase_s"][name] = round(time.time() - clock["phase"], 2)
        clock["phase"] = time.time()
        if device.type == "cuda":
            state["peak_cuda_mb"][name] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
            torch.cuda.reset_peak_memory_stats()

    common_kw = dict(batch_size=args.batch_size, seed=args.seed, device=device, amp=args.amp,
                     curves=state["curves"], ckpt_every=ckpt_every)
    train_s0, t0 = state["train_s"], time.time()
    clock = {"phase": t0}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if state["phase"] == 1:
        run.log(f"step 1: WGAN-GP, {args.gan_steps} generator iterations x {args.n_critic} critic iterations")
        train_wgan_gp(G, D, opt_G, opt_D, S_train.x, steps=args.gan_steps, start=state["step"], n_critic=args.n_critic,
                      lam=args.lam, latent_dim=args.latent_dim, save=saver(1), ddp=ddp, **common_kw)
        track("step1_wgan_gp")
        release(models.values(), opt_G, opt_D)
        state.update(phase=2, step=0)
    if state["phase"] == 2:
        run.log(f"step 2: encoder (izif), G and D frozen, {args.enc_steps} iterations")
        train_encoder(E, G, D, opt_E, S_train.x, steps=args.enc_steps, start=state["step"], kappa=args.kappa,
                      finetune=False, save=saver(2), ddp=ddp, **common_kw)
        track("step2_encoder")
        release(models.values(), opt_E)
        if args.finetune and C.is_main():   # keep the test scores before step 3 for the ablation (suppl. Table S2)
            state["scores_step2"] = {"test": score_set(E, G, D, S_test, kappa=args.kappa, batch_size=args.batch_size,
                                                       device=device, amp=args.amp)[0]}
        state.update(phase=3, step=0)
    if state["phase"] == 3:
        if args.finetune:
            run.log(f"step 3: fine-tuning E and G on L_E, {args.ft_steps} iterations")
            train_encoder(E, G, D, opt_EG, S_train.x, steps=args.ft_steps, start=state["step"], kappa=args.kappa,
                          finetune=True, save=saver(3), phase="step 3 fine-tune", ddp=ddp, **common_kw)
            track("step3_finetune")
            release(models.values(), opt_EG)
        saver(4)(0)                                                    # the finished model, train_s included
    train_s = state["train_s"]
    if not C.is_main():                                                # torchrun: process 0 scores and writes
        return None

    # ---- scoring ---------------------------------------------------------------------------------
    with C.Timer() as t_score:
        sc_val = score_set(E, G, D, S_val, kappa=args.kappa, batch_size=args.batch_size, device=device,
                           amp=args.amp)[0] if S_val is not None else {"score": np.zeros(0)}
        sc, _ = score_set(E, G, D, S_test, kappa=args.kappa, batch_size=args.batch_size, device=device, amp=args.amp)
    track("scoring")
    state["phase_s"].pop("scoring", None)
    noft = state["scores_step2"]["test"] if (state["scores_step2"] and args.finetune) else None
    rows = make_rows(S_test, sc, args.dims, noft)
    rows_val = [{"score": float(v)} for v in sc_val["score"]]
    recs = score_set(E, G, D, S_test, kappa=args.kappa, batch_size=args.batch_size, device=device,
                     keep=[r["row"] for _, r in pick_examples(rows)])[1]

    # ---- evaluation (§3) -------------------------------------------------------------------------
    y, s = np.array([r["label"] for r in rows]), np.array([r["score"] for r in rows])
    val_from = "val"
    val_scores = sc_val["score"]
    if not len(val_scores):   # no healthy validation set: healthy training volumes (optimistic), never test labels
        val_from = "train (no val set)"
        first64 = argparse.Namespace(x=S_train.x[:64])                 # score_set reads only .x
        val_scores = score_set(E, G, D, first64, kappa=args.kappa, batch_size=args.batch_size, device=device,
                               amp=args.amp)[0]["score"]
    thr = C.threshold_from_healthy(val_scores, percentile=args.val_percentile)
    extra = {
        "dims": args.dims,
        "world_size": C.ddp_world(), "effective_batch_size": global_batch,
        "per_type": per_type(rows),
        "oracle_youden": C.youden(y, s),
        "val_threshold": {"percentile": args.val_percentile, "threshold": thr,
                          "from": val_from,
                          **C.binary_stats(y, s >= thr)},
        "params": n_par,
        "memory": {**C.peak_memory_mb(device), **({"cuda_mb": max(state["peak_cuda_mb"].values()),
                                                   "cuda_mb_per_step": state["peak_cuda_mb"]}
                                                  if state["peak_cuda_mb"] else {})},
        "memory_estimate": {f"batch_{b}": memory_estimate_mb(args, b) for b in sorted({1, 4, args.batch_size})},
        "steps": {"gan": args.gan_steps, "encoder": args.enc_steps, "finetune": args.ft_steps if args.finetune else 0},
        "phase_s": state["phase_s"],
    }
    if noft is not None:
        yn = np.array([r["score_no_finetune"] for r in rows])
        extra["ablation_no_finetune"] = {"auroc": C.auroc(y, yn), "auprc": C.auprc(y, yn),
                                         "per_type": per_type(rows, "score_no_finetune")}
    if args.dims == 2:
        extra["volume_level"] = volume_level(S_test, sc)
    write_figures(run, args, S_test, rows, sc, recs, rows_val, state["curves"], extra)
    for r in rows:
        r.pop("row")
    res = C.finish_run(run, args, METHOD, unit="volume" if args.dims == 3 else "slice", rows=rows,
                       timing={"train_s": train_s, "score_s": t_score.seconds,
                               "score_s_per_sample": t_score.seconds / max(len(S_test.x) + len(sc_val["score"]), 1),
                               "data_s": t_data.seconds},
                       extra=extra, data_info=data.info, log_scores=True)
    run.log("per type: " + ", ".join(f"{k} AUROC {v['auroc']:.3f} AP {v['ap']:.3f}" for k, v in extra["per_type"].items()))
    if "ablation_no_finetune" in extra:
        run.log(f"without fine-tuning (after step 2): AUROC {extra['ablation_no_finetune']['auroc']:.3f}")
    if "volume_level" in extra:
        run.log(f"2D, volume level (mean of slice scores): AUROC {extra['volume_level']['auroc']:.3f}")
    if state["peak_cuda_mb"]:
        run.log(f"peak CUDA memory per step (MB): {state['peak_cuda_mb']}")
    return res


if __name__ == "__main__":
    C.main_guard(main)
