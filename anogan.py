"""AnoGAN: unsupervised anomaly detection with generative adversarial networks.

    Schlegl T., Seeböck P., Waldstein S.M., Schmidt-Erfurth U., Langs G. "Unsupervised Anomaly
    Detection with Generative Adversarial Networks to Guide Marker Discovery." IPMI 2017,
    LNCS 10265, pp. 146-157. https://doi.org/10.1007/978-3-319-59050-9_12 (arXiv:1703.05921)

A DCGAN learns the manifold of healthy patches (§2.1). A new patch x is mapped to the latent space
by gradient descent on z alone, G and D frozen (§2.2); how far G(z_Γ), and D's features of it, stay
from x is the anomaly score, and the residual |x - G(z_Γ)| shows where (§2.3).

Equations: Eq. (1) d_loss and Eq. (2) g_loss, in train_step; Eq. (3) residual_loss; Eq. (4)
    discrimination_loss (Yeh et al.'s L_D̂: reference_discrimination_loss); Eq. (5) mapping_loss,
    minimised over z by map_to_latent; Eq. (6) anomaly_score. §3: GAN_R (--ganr), P_D
    (discriminator_score), the patch label (patch_labels), Table 1 (table1), Fig. 3, 4 (appendix).
    Beyond the paper: a batch of patches mapped at once (map_to_latent), slice and scan scores, two
    references that are not AnoGAN: R_nn, Eq. (3) against the nearest healthy training patch (a
    memorising generator, --nn-ref), and x_max, the patch's brightest pixel; and a counterfactual:
    real lesions pasted into normal patches (counterfactual.png).

Deviations from the paper:
  1. Data: retinal OCT B-scans -> axial brain MRI slices (FLAIR; --modality for real data), cropped
     to the brain, resized to --slice-size. Patches "inside the retina" -> patches with at least
     --min-brain brain pixels, from the --train-slices central slices of each healthy scan.
  2. Test patches lie on a --test-stride grid over the --test-slices central slices of each test
     scan (the paper does not say how its 8192 were placed). Negatives are the patches of normal
     scans; the paper's, lesion-free patches of the same scans, are reported as groups_same_scan.
  3. The mapping optimiser is not given: Adam on z (--map-lr, --map-beta1) as in the code the paper
     adapted (bamos/dcgan-completion.tensorflow), z clipped to [-1, 1], the support of p_z.
  4. "Γ steps": z_1 is drawn, Γ-1 updates give z_Γ, and R(x), D(x) are the losses at z_Γ.
  5. Eq. (2) is minimised as the non-saturating -log D(G(z)), the form of DCGAN code. Adam lr 2e-4,
     β1 0.5, batch 64 and the z dimension 100 are DCGAN's (the paper: "Adam", "widely the same
     DCGAN"); each epoch drops its last partial batch, as that code does.
  6. Table 1's cut-off, the Youden index of the test ROC, is chosen with test labels: reported as
     oracle_youden_table1. The operating point is the --threshold-pct percentile of the scores of
     healthy validation patches (of training patches where a data set has none, e.g. BraTS alone).
  7. The aCAE comparison of Fig. 4(a) is not implemented.
  8. --preset quick (a 2-core CPU, minutes): 96×96 slices, 32×32 patches, channels 128-64-32-16,
     4 epochs over 20,000 patches, Γ = 40 at Adam lr 0.05, 16 scans per test group, no GAN_R.
     --preset paper: 128×128 slices, 64×64 patches, 100,000 training patches (paper: 1,000,000).

On the quick preset A(x) detects the tumour and the atrophy stages, where a patch changes as a
whole, but not the small hyperintense lesions: a lesion pasted into a normal patch raises A by far
less than A varies with normal anatomy (counterfactual.png), while x_max sees the lesions at once.
Measured tables: README.md, results/fidelity.md (A against R and D, 3 seeds).

Commands:
    python anogan.py                                   # quick: the FLAIR phantom on a CPU
    python anogan.py --ganr                            # with GAN_R (Fig. 4a, Table 1)
    python anogan.py --preset paper --amp              # the paper's settings (GPU)
    python anogan.py --data brats --train-data ixi --modality flair --preset paper
    python anogan.py --checkpoint runs/.../last.pt     # map and score only
"""
from __future__ import annotations

import shutil
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C
from data import datasets

METHOD = "anogan"


# =================================================================================================
# Hyperparameters (§3 "Implementation details"; each default is the paper's value)
# =================================================================================================

HYPER = dict(
    # data and patches (§2.1, §3)
    slice_size=C.hp(128, "axial slices, cropped to the brain, are resized to S×S (deviation 1; the "
                         "OCT B-scans had ~256 columns)", lo=16, hi=4096),
    patch_size=C.hp(64, "patch side c, a multiple of 16 (§3: 64×64 patches)", lo=16, hi=4096),
    min_brain=C.hp(0.9, "a patch needs this fraction of brain pixels (deviation 1)", lo=0., hi=1.),
    train_slices=C.hp(32, "central axial slices per training scan (deviation 1; the paper: all 49 "
                          "B-scans)", lo=1, hi=10_000),
    slice_step=C.hp(1, "distance between the chosen slices, in voxels", lo=1, hi=100),
    train_patches=C.hp(100_000, "random training patches (§3: 1,000,000 OCT patches)",
                       lo=1, hi=10 ** 8),
    test_slices=C.hp(8, "central slices per test scan scored with grid patches (deviation 2)",
                     lo=1, hi=10_000),
    test_stride=C.hp(16, "stride of the test patch grid (deviation 2)", lo=1, hi=4096),
    test_cases=C.hp(0, "score only the first N scans of every test group (0 = all)",
                    lo=0, hi=10 ** 6),
    # networks (§2.1, §3)
    z_dim=C.hp(100, "dimension of z ~ U(-1, 1) (DCGAN's 100; the paper: 'widely the same DCGAN')",
               lo=1, hi=10_000),
    ch=C.hp(64, "base channels: G 8ch-4ch-2ch-ch, D ch-2ch-4ch-8ch (§3: 512-256-128-64)",
            lo=1, hi=4096),
    kernel=C.hp(5, "filter size, odd (§3: 5×5)", lo=3, hi=15),
    # adversarial training, Eq. (1)-(2)
    epochs=C.hp(20, "DCGAN training epochs (§3: 20)", lo=0, hi=10_000),
    batch_size=C.hp(64, "mini-batch size (DCGAN's 64; the paper does not say)", lo=2, hi=10 ** 6),
    lr=C.hp(2e-4, "Adam learning rate (DCGAN's; §3 says only 'Adam')", lo=1e-8, hi=1.0),
    beta1=C.hp(0.5, "Adam β1 (DCGAN's)", lo=0.0, hi=0.999),
    g_steps=C.hp(1, "G updates per D update (DCGAN 1; the code the paper adapted used 2)",
                 lo=1, hi=100),
    # mapping to the latent space, §2.2, Eq. (3)-(5)
    steps=C.hp(500, "Γ backpropagation steps of the mapping (§3: 500)", lo=1, hi=10 ** 6),
    map_lr=C.hp(0.01, "Adam learning rate on z (deviation 3: the adapted code's 0.01)",
                lo=1e-8, hi=100.0),
    map_beta1=C.hp(0.9, "Adam β1 on z (the adapted code's 0.9)", lo=0.0, hi=0.999),
    map_batch=C.hp(1024, "patches mapped at once, each with its own z (beyond the paper; the same "
                         "trajectories)", lo=1, hi=10 ** 7),
    lam=C.hp(0.1, "λ in Eq. (5) and (6) (§3: 0.1)", lo=0.0, hi=1.0),
    feature_layer=C.hp(3, "f(·) of Eq. (4): the output of D's conv layer 0..3 (the last, Fig. 2a)",
                       lo=0, hi=3),
    z_clip=C.hp(True, "clip z to [-1, 1], the support of p_z, after every step (deviation 3)"),
    ganr=C.hp(True, "also map with Yeh et al.'s L_D̂ and score Â(x): GAN_R (§3, Fig. 4a, Table 1)"),
    # evaluation (§2.3, §3)
    val_patches=C.hp(1024, "healthy validation patches mapped for the operating point (0 = all)",
                     lo=0, hi=10 ** 8),
    train_eval_patches=C.hp(1024, "training patches mapped for Fig. 4(c, d)'s 'normal (train)'",
                            lo=0, hi=10 ** 8),
    time_single=C.hp(16, "patches mapped again one at a time, to time the paper's unbatched "
                         "mapping", lo=0, hi=10_000),
    threshold_pct=C.hp(95.0, "operating point: this percentile of the healthy validation scores "
                             "(deviation 6)", lo=0.0, hi=100.0),
    agg=C.hp("max", "patch scores -> slice and scan score (beyond the paper)",
             choices=["max", "mean", "p99"]),
    nn_ref=C.hp(0, "beyond the paper: R_nn, the residual to the nearest of this many training "
                   "patches (a memorising generator; 0 = off, an N×M search)", lo=0, hi=10 ** 8),
    counterfactual=C.hp(256, "beyond the paper: normal test patches mapped again with a real "
                             "lesion pasted in (counterfactual.png; 0 = off)", lo=0, hi=10 ** 6),
)
# quick (deviation 8): a 2-core CPU in minutes: 96×96 slices, 32×32 patches, channels 128-64-32-16,
# 4 epochs over 20,000 patches, Γ = 40 at a larger step, 16 of the 40 scans per test group, no GAN_R
QUICK = dict(slice_size=96, patch_size=32, train_slices=16, slice_step=2, train_patches=20_000,
             test_slices=4, test_cases=16, ch=16, epochs=4, steps=40, map_lr=0.05, map_batch=512,
             ganr=False, val_patches=96, train_eval_patches=96, time_single=4, nn_ref=20_000)
# smoke: seconds, for the tests
SMOKE = dict(slice_size=32, patch_size=16, min_brain=0.5, train_slices=4, slice_step=2,
             train_patches=256, test_slices=2, test_cases=3, z_dim=16, ch=4, epochs=1, steps=5,
             map_lr=0.05, map_batch=256, val_patches=32, train_eval_patches=32, time_single=2,
             nn_ref=256)


def check_args(args):
    if args.patch_size % 16:
        C.fail(f"--patch-size must be a multiple of 16 (four stride-2 layers), got "
               f"{args.patch_size}")
    if args.patch_size > args.slice_size:
        C.fail(f"--patch-size {args.patch_size} is larger than --slice-size {args.slice_size}")
    if args.kernel % 2 == 0:
        C.fail(f"--kernel must be odd ('same' padding of the stride-2 layers), got {args.kernel}")


def parse_args(argv=None):
    return C.parse_args(argv, HYPER, {"quick": QUICK, "smoke": SMOKE}, method=METHOD, doc=__doc__,
                        check=check_args)


# =================================================================================================
# Networks (§2.1, §3, Fig. 2a: the DCGAN of Radford et al. with 5×5 filters)
# =================================================================================================

def init_dcgan(m):
    """DCGAN initialisation: conv/linear weights ~ N(0, 0.02), BatchNorm scales ~ N(1, 0.02), biases
    0."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """G: z (B, z_dim) in [-1, 1] -> patch (B, 1, c, c) in [-1, 1].

    A linear projection to 8ch feature maps of side c/16, then four fractionally-strided
    convolutions 8ch -> 4ch -> 2ch -> ch -> 1 that each double the side (§3: "four
    fractionally-strided convolution layers", 512-256-128-64 channels for ch=64), BatchNorm + ReLU
    after each but the last, tanh output."""

    def __init__(self, *, z_dim=100, ch=64, size=64, kernel=5):
        super().__init__()
        self.s0, self.ch = size // 16, ch
        pad = (kernel - 1) // 2
        out_pad = 2 + 2 * pad - kernel          # makes every layer exactly double the side ("SAME")
        self.project = nn.Linear(z_dim, 8 * ch * self.s0 * self.s0)
        self.bn0 = nn.BatchNorm2d(8 * ch)
        layers = []
        for c_in, c_out in ((8 * ch, 4 * ch), (4 * ch, 2 * ch), (2 * ch, ch)):
            layers += [nn.ConvTranspose2d(c_in, c_out, kernel, 2, pad, out_pad),
                       nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        layers += [nn.ConvTranspose2d(ch, 1, kernel, 2, pad, out_pad), nn.Tanh()]
        self.up = nn.Sequential(*layers)
        self.apply(init_dcgan)

    def forward(self, z):
        h = self.project(z).view(-1, 8 * self.ch, self.s0, self.s0)   # (B, 8ch, c/16, c/16)
        return self.up(F.relu(self.bn0(h)))                             # (B, 1, c, c)


class Discriminator(nn.Module):
    """D: patch (B, 1, c, c) -> logit (B,) and the four conv feature maps.

    Four 5×5 stride-2 convolutions 1 -> ch -> 2ch -> 4ch -> 8ch with LeakyReLU(0.2) (BatchNorm on
    all but the first, DCGAN), then a linear layer to one logit; D(x) = sigmoid(logit). f(x) of
    Eq. (4) is the output of conv layer `feature_layer` (3 = the last one, orange in Fig. 2a)."""

    def __init__(self, *, ch=64, size=64, kernel=5):
        super().__init__()
        pad = (kernel - 1) // 2
        chans = (1, ch, 2 * ch, 4 * ch, 8 * ch)
        self.convs = nn.ModuleList()
        for i in range(4):
            block = [nn.Conv2d(chans[i], chans[i + 1], kernel, 2, pad)]
            if i > 0:
                block.append(nn.BatchNorm2d(chans[i + 1]))
            block.append(nn.LeakyReLU(0.2, inplace=True))
            self.convs.append(nn.Sequential(*block))
        self.linear = nn.Linear(8 * ch * (size // 16) ** 2, 1)
        self.apply(init_dcgan)

    def forward(self, x):
        feats = []
        h = x                                                       # (B, 1, c, c)
        for conv in self.convs:
            h = conv(h)                                             # (B, 2^i ch, c/2^(i+1), ...)
            feats.append(h)
        logit = self.linear(h.flatten(1)).squeeze(1)                # (B,)
        return logit, feats


# =================================================================================================
# Losses (Eq. 1-5; every mapping loss is PER SAMPLE, shape (B,))
# =================================================================================================

def d_loss(logit_real, logit_fake):
    """Eq. (1), D's side: max_D E[log D(x)] + E[log(1 - D(G(z)))], i.e. minimise the cross-entropy
    of 'real' for training patches and 'fake' for generated ones (means over the batch)."""
    # Eq. (1): -[log D(x) + log(1 - D(G(z)))]
    return (F.binary_cross_entropy_with_logits(logit_real, torch.ones_like(logit_real))
            + F.binary_cross_entropy_with_logits(logit_fake, torch.zeros_like(logit_fake)))


def g_loss(logit_fake):
    """Eq. (2): G maximises D(G(z)); non-saturating form -log D(G(z)) (deviation 5)."""
    # Eq. (2): V(G) = D(G(z)) -> minimise -log D(G(z))
    return F.binary_cross_entropy_with_logits(logit_fake, torch.ones_like(logit_fake))


def residual_loss(x, G_z):
    """Eq. (3): L_R(z_γ) = Σ |x - G(z_γ)|, summed over the pixels of each sample -> (B,).
    Zero for a perfect generator and mapping on a normal patch (§2.2)."""
    # Eq. (3): L_R = Σ |x − G(z_γ)|
    return (x - G_z).abs().flatten(1).sum(1)


def discrimination_loss(f_x, f_G_z):
    """Eq. (4): L_D(z_γ) = Σ |f(x) - f(G(z_γ))| over the features of each sample -> (B,): feature
    matching (Salimans et al.) moves G(z_γ) towards x in D's features, instead of fooling D."""
    # Eq. (4): L_D = Σ |f(x) − f(G(z_γ))|
    return (f_x - f_G_z).abs().flatten(1).sum(1)


def reference_discrimination_loss(logit_G_z):
    """Yeh et al.'s L_D̂(z_γ) = σ(D(G(z_γ)), α): sigmoid cross-entropy with logits D(G(z_γ)) and
    targets α = 1 (§2.2), per sample -> (B,). Used by GAN_R."""
    # L_D̂ = −log sigmoid(D(G(z_γ)))  (targets α = 1)
    return F.binary_cross_entropy_with_logits(logit_G_z, torch.ones_like(logit_G_z),
                                              reduction="none")


def mapping_loss(L_R, L_D, lam):
    """Eq. (5): L(z_γ) = (1 - λ)·L_R(z_γ) + λ·L_D(z_γ), per sample -> (B,)."""
    # Eq. (5): L(z_γ) = (1 − λ)·L_R(z_γ) + λ·L_D(z_γ)
    return (1 - lam) * L_R + lam * L_D


# =================================================================================================
# Anomaly score (§2.2 the mapping to the latent space, §2.3 Eq. 6)
# =================================================================================================

def anomaly_score(R, D, lam):
    """Eq. (6): A(x) = (1 - λ)·R(x) + λ·D(x), R = L_R(z_Γ), D = L_D(z_Γ). With D = D̂ it is the
    reference score Â(x) of GAN_R."""
    # Eq. (6): A(x) = (1 − λ)·R(x) + λ·D(x)
    return (1 - lam) * R + lam * D


def discriminator_score(D, x):
    """P_D (§3, Table 1): 1 - D(x), the discriminator's probability that the query patch is not a
    real training-like patch; no mapping."""
    with torch.no_grad():
        return 1 - torch.sigmoid(D(x)[0])                      # (B,)


class frozen:
    """Context: G and D in eval mode (BatchNorm running statistics, so samples do not interact) and
    their parameters excluded from autograd; the previous state is restored afterwards."""

    def __init__(self, *models):
        self.models = models

    def __enter__(self):
        self.state = [(m.training, [p.requires_grad for p in m.parameters()]) for m in self.models]
        for m in self.models:
            m.eval()
            m.requires_grad_(False)

    def __exit__(self, *exc):
        for m, (training, req) in zip(self.models, self.state):
            m.train(training)
            for p, r in zip(m.parameters(), req):
                p.requires_grad_(r)


def z_start(n, z_dim, seed, stream):
    """z_1 ~ U(-1, 1)^z_dim, one per patch (§2.2), a seeded stream per patch set -> (n, z_dim)."""
    seed = int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])
    return torch.rand(n, z_dim, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def map_to_latent(x, G, D, z1, *, steps, lr, lam, beta1=0.9, disc="feature", feature_layer=3,
                  clip=True, device=None, amp=False):
    """§2.2: find z_Γ with G(z_Γ) ≈ x by Γ-1 Adam updates of z only, from z_1.

    x: (B, 1, c, c) query patches; z1: (B, z_dim) starting points (each patch its own z).
    disc = "feature": Eq. (4) L_D (AnoGAN); "reference": Yeh et al.'s L_D̂ (GAN_R).
    Returns z_Γ, G(z_Γ) and the per-sample R = L_R(z_Γ), D = L_D(z_Γ), D̂ = L_D̂(z_Γ), and the
    per-sample mapping loss L(z_γ) of every step γ = 1..Γ (B, Γ).

    Beyond the paper, which maps one image at a time: the whole batch at once. Every loss is per
    sample and their sum is back-propagated, so ∂(Σ_b L_b)/∂z_b = ∂L_b/∂z_b; with G and D in
    eval mode (no batch coupling through BatchNorm) and an element-wise optimiser (Adam), each z_b
    follows the trajectory it would follow alone (tested in float64). In float32 a batch and a
    single patch round differently and drift apart a little (batched_vs_single_max_abs_diff_A)."""
    with frozen(G, D):
        with torch.no_grad(), C.autocast(device or x.device, amp):
            f_x = D(x)[1][feature_layer].float()                           # (B, C_f, h, w), fixed
        z = z1.detach().clone().requires_grad_(True)                        # (B, z_dim), fresh
        opt = torch.optim.Adam([z], lr=lr, betas=(beta1, 0.999))           # a fresh optimiser
        history = []
        for gamma in range(1, steps + 1):
            opt.zero_grad(set_to_none=True)
            with C.autocast(device or x.device, amp):
                G_z = G(z)                                                  # (B, 1, c, c)
                logit, feats = D(G_z)
            G_z, logit, f_G_z = G_z.float(), logit.float(), feats[feature_layer].float()
            L_R = residual_loss(x, G_z)                                     # Eq. (3), (B,)
            L_Dfm = discrimination_loss(f_x, f_G_z)                         # Eq. (4), (B,)
            L_Dref = reference_discrimination_loss(logit)                   # (B,)
            L = mapping_loss(L_R, L_Dfm if disc == "feature" else L_Dref, lam)   # Eq. (5), (B,)
            history.append(L.detach())
            if gamma == steps:                                              # R, D at z_Γ (§2.3)
                break
            L.sum().backward()                                              # Σ_b L_b (see above)
            opt.step()
            if clip:
                with torch.no_grad():
                    z.clamp_(-1.0, 1.0)
        return dict(z=z.detach(), G_z=G_z.detach(), R=L_R.detach(), D=L_Dfm.detach(),
                    D_hat=L_Dref.detach(), history=torch.stack(history, 1))  # history (B, Γ)


def mapping_args(args, device):
    """The mapping's hyperparameters (§2.2, §3; deviation 3) as keywords of map_to_latent."""
    return dict(steps=args.steps, lr=args.map_lr, lam=args.lam, beta1=args.map_beta1,
                feature_layer=args.feature_layer, clip=bool(args.z_clip), device=device,
                amp=args.amp)


def score(x, G, D, args, device, z1, desc="map"):
    """The trained AnoGAN applied to patches x (N, c, c), `map_batch` at a time from z1 (N, z_dim)
    -> per patch R, D, D̂ at z_Γ, A (Eq. 6), P_D, G(z_Γ) (N, c, c) and L(z_γ) of every step (N, Γ);
    with --ganr also GAN_R's Â(x) = (1 - λ)·R(x) + λ·D̂(x), mapped with L_D̂ (§3)."""
    kw = mapping_args(args, device)
    out = {k: [] for k in ("R", "D", "D_hat", "A", "G_z", "history", "P_D", "A_hat")}
    for s in C.progress(range(0, len(x), args.map_batch), desc=desc, every=10):
        xb = torch.from_numpy(np.ascontiguousarray(x[s:s + args.map_batch])).unsqueeze(1).to(device)
        zb = z1[s:s + args.map_batch].to(device)                            # (B, z_dim)
        m = map_to_latent(xb, G, D, zb, disc="feature", **kw)
        for k in ("R", "D", "D_hat", "history"):                            # D_hat at AnoGAN's z_Γ
            out[k].append(m[k])
        out["A"].append(anomaly_score(m["R"], m["D"], args.lam))            # Eq. (6)
        out["G_z"].append(m["G_z"][:, 0])                                   # (B, c, c)
        with frozen(G, D):
            out["P_D"].append(discriminator_score(D, xb))
        if args.ganr:                                                       # GAN_R: map with L_D̂
            r = map_to_latent(xb, G, D, zb, disc="reference", **kw)
            out["A_hat"].append(anomaly_score(r["R"], r["D_hat"], args.lam))
    return {k: torch.cat(v).float().cpu().numpy() for k, v in out.items() if v}


def map_one_at_a_time(x, G, D, args, device, z1):
    """The paper's way, for the timing: patches mapped one after the other -> (s per patch, A)."""
    A = []
    t0 = time.perf_counter()
    for i in range(len(x)):
        xb = torch.from_numpy(np.ascontiguousarray(x[i:i + 1])).unsqueeze(1).to(device)  # (1,1,c,c)
        m = map_to_latent(xb, G, D, z1[i:i + 1].to(device), **mapping_args(args, device))
        A.append(float(anomaly_score(m["R"], m["D"], args.lam)[0]))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / max(len(x), 1), np.array(A)


def score_sets(G, D, P, x_val, x_tr, args, run):
    """The trained AnoGAN applied to the test, validation and training patches, each set from its
    own z_1 stream, and the batched mapping timed against the paper's one patch at a time
    -> test, validation and training scores, timing, the batched-vs-single difference of A."""
    dev = run.device
    run.log(f"mapping {len(P['x'])} test, {0 if x_val is None else len(x_val)} validation and "
            f"{len(x_tr)} training patches; Γ={args.steps}, batch {args.map_batch}")
    z1 = z_start(len(P["x"]), args.z_dim, args.seed, 0)
    with C.Timer() as t_map:
        sc = score(P["x"], G, D, args, dev, z1, desc="map test")
        if dev.type == "cuda":
            torch.cuda.synchronize()
    st = score(x_tr, G, D, args, dev, z_start(len(x_tr), args.z_dim, args.seed, 2), "map train")
    sv = st if x_val is None else score(x_val, G, D, args, dev,
                                        z_start(len(x_val), args.z_dim, args.seed, 1), "map val")
    n1 = min(args.time_single, len(P["x"]))
    s_single, A_single = map_one_at_a_time(P["x"][:n1], G, D, args, dev, z1[:n1])
    diff = float(np.abs(A_single - sc["A"][:n1]).max()) if n1 else None
    per = t_map.seconds / len(P["x"]) / (2 if args.ganr else 1)       # per patch and mapping
    run.log(f"mapping: {per * 1e3:.1f} ms/patch batched vs {s_single * 1e3:.1f} ms/patch one at a "
            f"time ({n1} patches), max |ΔA| {diff}")
    timing = {"score_s": t_map.seconds, "score_s_per_sample": t_map.seconds / len(P["x"]),
              "map_s_per_patch_batched": per, "map_s_per_patch_single": s_single,
              "map_speedup_batched": s_single / max(per, 1e-12), "n_single_timed": n1,
              "map_batch": args.map_batch, "mapping_steps": args.steps}
    return sc, sv, st, timing, {"batched_vs_single_max_abs_diff_A": diff}


# =================================================================================================
# Training (§2.1: the minimax game of Eq. 1-2 on healthy patches only)
# =================================================================================================

def training_patches(data, args, run):
    """§2.1: K patches of c×c pixels at random positions of each healthy image (here: positions with
    >= --min-brain brain pixels, deviation 1) -> X (N, 1, c, c), a CPU tensor."""
    size, c = (args.slice_size, args.slice_size), args.patch_size
    S = datasets.slice_stack(data.train, size=size, norm="mri", n_slices=args.train_slices,
                             step=args.slice_step, cache_dir=args.cache_dir, desc="train")
    rng = np.random.default_rng(args.seed)
    idx, top, left = C.random_patches(S.x, S.brain, size=c, n=args.train_patches, rng=rng,
                                      min_brain=args.min_brain)
    X = torch.from_numpy(C.extract_patches(S.x, idx, top, left, c)).unsqueeze(1)   # (N, 1, c, c)
    run.log(f"{len(X)} training patches {c}x{c} from {len(data.train)} healthy scans "
            f"({len(S)} slices {size[0]}x{size[1]})")
    if len(X) < 2:
        C.fail(f"only {len(X)} training patch: BatchNorm needs 2; lower --min-brain or "
               f"--patch-size")
    return X


def train_step(G, D, opt_G, opt_D, x, args, device):
    """One update of the minimax game, Eq. (1)-(2), on healthy patches x (B, 1, c, c)."""
    z = torch.rand(len(x), args.z_dim, device=device) * 2 - 1           # z ~ U(-1, 1), (B, z_dim)
    # D step, Eq. (1): training patches -> 'real', G(z) -> 'fake' (separate batches, as DCGAN)
    with C.autocast(device, args.amp):
        fake = G(z)                                                      # (B, 1, c, c)
        logit_real, _ = D(x)
        logit_fake, _ = D(fake.detach())
        loss_D = d_loss(logit_real.float(), logit_fake.float())
    opt_D.zero_grad(set_to_none=True)
    loss_D.backward()
    opt_D.step()
    # G step(s), Eq. (2); the first reuses G(z) (G is unchanged so far), as in DCGAN code
    for k in range(args.g_steps):
        with C.autocast(device, args.amp):
            loss_G = g_loss(D(fake if k == 0 else G(z))[0].float())
        opt_G.zero_grad(set_to_none=True)
        loss_G.backward()
        opt_G.step()
    return {"loss_D (Eq. 1)": loss_D.detach(), "loss_G (Eq. 2)": loss_G.detach(),
            "D(x)": torch.sigmoid(logit_real.detach()).mean(),
            "D(G(z))": torch.sigmoid(logit_fake.detach()).mean()}


def train(G, D, X, args, run):
    """DCGAN training on the patches X (N, 1, c, c), a CPU tensor, for `--epochs` epochs.
    -> (training seconds, loss history, checkpoint I/O, the C.Loop)."""
    opt_G = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(args.beta1, 0.999))
    opt_D = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(args.beta1, 0.999))
    # a new permutation of the patches every epoch; its last partial batch is dropped, as in the
    # DCGAN code the paper adapted (len(data) // batch_size batches per epoch)
    batches = C.Batches(len(X), args.batch_size, args.seed)
    loop = C.Loop(run, args, {"G": G, "D": D}, {"G": opt_G, "D": opt_D}, batches={"train": batches})
    for _ in loop.phase("train", args.epochs * batches.steps_per_epoch, desc="DCGAN"):
        x = X[torch.from_numpy(next(batches))].to(run.device)               # (B, 1, c, c)
        loop.log(train_step(G, D, opt_G, opt_D, x, args, run.device))
        if batches.epoch_done:
            last = {k: np.mean([v for _, v in loop.history[k][-batches.steps_per_epoch:]])
                    for k in ("loss_D (Eq. 1)", "loss_G (Eq. 2)")}
            run.log(f"epoch {batches.epoch + 1}/{args.epochs}: loss_D "
                    f"{last['loss_D (Eq. 1)']:.3f}  loss_G {last['loss_G (Eq. 2)']:.3f}")
    return loop.close(), loop.history, loop.io_report(), loop


# =================================================================================================
# Scoring and evaluation (§3)
# =================================================================================================

SCORES = ("A", "R", "D", "D_hat", "P_D", "A_hat", "R_nn", "x_max")   # scores.csv columns
PAIRS = (("A", "R"), ("A", "D"), ("D", "D_hat"), ("A", "P_D"), ("A", "A_hat"), ("R", "R_nn"),
         ("A", "x_max"))                                              # paired differences a - b


def col(key):
    """The scores.csv column of a score: A(x) is the contract's `score`."""
    return "score" if key == "A" else key


def patch_labels(mask):
    """§3: a patch is anomalous (1) if it holds at least one anomalous pixel. (N, c, c) -> (N,)"""
    return np.asarray(mask).reshape(len(mask), -1).any(1).astype(int)


def add_references(sc, P, X, args, device):
    """Two references that are not AnoGAN, so that a poor AUROC can be read: R_nn (a memorising
    generator) and x_max, the patch's brightest pixel (a baseline for hyperintense lesions)."""
    if min(args.nn_ref, len(X)):
        sc["R_nn"] = C.nearest_residual(P["x"], X[:args.nn_ref, 0], device)
    sc["x_max"] = P["x"].reshape(len(P["x"]), -1).max(1)


def evaluation(rows, S, P, args, n_patches, run):
    """results.json beyond the contract: §3's comparison of the scores (Fig. 4) and "A beats R" as
    paired differences with 95% intervals over scans, lesion-size bins, Table 1, slices, scans."""
    keys, (y, _) = [k for k in SCORES if col(k) in rows[0]], C.labels_groups(rows)
    groups = sorted({r["group"] for r in rows if r["label"]})
    comparison = C.score_table(rows, {k: col(k) for k in keys})
    for key in ("R", "R_nn", "x_max"):
        run.log(f"AUROC of {key}: " + ", ".join(f"{g} {comparison[key][g]:.3f}" for g in groups
                                                if g in comparison.get(key, {})))
    slices, scans = C.level_rows(S, P, np.array([r["score"] for r in rows]), args.agg)
    return {
        "patch_label_rule": "§3: a patch is anomalous if it holds >= 1 anomalous pixel; group = "
                            "its scan's",
        "n_patches": {"test": len(y), "test_anomalous": int(y.sum()),
                      "test_normal_scans": int((C.clean_mask(rows) & (y == 0)).sum()), **n_patches},
        "threshold_from": "val" if n_patches["val"] else
                          "train (no healthy validation patch at the test slices)",
        "comparison_auroc": comparison,
        "paired_differences": {f"{a} - {b}": {g or "all": C.compare_scores(rows, rows, g, col(a),
                                                                           col(b))
                                              for g in [None, *groups]}
                               for a, b in PAIRS if a in keys and b in keys},
        "auroc_A_by_anomalous_pixels": C.auroc_by_size(rows, groups, args.patch_size ** 2,
                                                       {"auroc": "score", "auroc_R_nn": "R_nn"}),
        "oracle_youden_table1": table1(rows),
        "slice_level": {"how": f"{args.agg} of A over the slice's patches; anomalous if >= 1 "
                               "anomalous pixel", **C.evaluate(slices)},
        "scan_level": {"how": f"{args.agg} of A over the scan's patches; label = the scan's",
                       **C.evaluate(scans)},
    }


def table1(rows):
    """Table 1: precision, recall, sensitivity, specificity at the Youden index and the AUC,
    anomalous patches against those of normal scans; the Youden cut-off uses the test labels."""
    cl = [r for r, k in zip(rows, C.clean_mask(rows)) if k]
    y, out = np.array([r["label"] for r in cl]), {}
    for name, key in (("AnoGAN A", "A"), ("P_D", "P_D"), ("GAN_R Â", "A_hat")):
        if col(key) in cl[0]:
            s = np.array([r[col(key)] for r in cl])
            yd = C.youden(y, s)
            out[name] = {k: yd[k] for k in ("precision", "recall", "sensitivity", "specificity",
                                            "threshold")}
            out[name]["auc"] = C.auroc(y, s)
    return out


# =================================================================================================
# main: load, train (or load a checkpoint), score, report
# =================================================================================================

def main(argv=None):
    args = parse_args(argv)
    run = C.start_run(args, METHOD)
    data = datasets.load_dataset(args, contrast="flair")
    X = training_patches(data, args, run)                            # §2.1
    S, P, x_val, x_tr = datasets.grid_test_patches(data, X, args, run.log)   # before training

    # the DCGAN of §2.1, trained on healthy patches (or loaded: --checkpoint only scores)
    c = args.patch_size
    G = Generator(z_dim=args.z_dim, ch=args.ch, size=c, kernel=args.kernel).to(run.device)
    D = Discriminator(ch=args.ch, size=c, kernel=args.kernel).to(run.device)
    if args.checkpoint:
        ck = C.load_models(args.checkpoint, {"G": G, "D": D}, METHOD)
        train_s, history, io, loop = 0.0, ck.get("history", {}), None, None
        if not (run.out / "last.pt").exists():                      # every run folder has one
            shutil.copyfile(args.checkpoint, run.out / "last.pt")
        run.log(f"loaded {args.checkpoint}; scoring only")
    else:
        train_s, history, io, loop = train(G, D, X, args, run)

    # every patch mapped to the latent space (§2.2) and scored (§2.3), one row per test patch
    sc, sv, st, timing, single = score_sets(G, D, P, x_val, x_tr, args, run)
    add_references(sc, P, X, args, run.device)
    rows = C.patch_rows(S, P, patch_labels(P["mask"]), sc, SCORES)
    n = {"val": 0 if x_val is None else len(x_val), "train_eval": len(x_tr), "train": len(X)}
    extra = {**evaluation(rows, S, P, args, n, run), **single,
             "counterfactual_lesion": counterfactual(G, D, P, sc, rows, args, run)}
    examples = figures(run.out, args, S, P, sc, sv, st, x_tr, rows)
    S_tr = datasets.slice_stack(data.train, size=(args.slice_size,) * 2, norm="mri", desc="train",
                                n_slices=args.train_slices, step=args.slice_step,
                                cache_dir=args.cache_dir)
    C.add_baselines(rows, C.patch_baselines(S_tr, S, P, c))                 # issue 15.5
    titles = {"roc": f"AnoGAN A(x): patch-level ROC against normal scans, Γ={args.steps}",
              "losses": "DCGAN training (healthy patches)", "losses_ylabel": "cross-entropy / D",
              "examples_cols": ("input slice", "G(z_Γ) per patch", "residual |x − G(z_Γ)|",
                                "ground truth")}
    return C.report(run, args, "patch", rows, {"train_s": train_s, **timing, "checkpoint_io": io},
                    extra=extra, data_info=data.info, val_scores=sv["A"], history=history,
                    threshold_pct=args.threshold_pct, examples=examples, titles=titles,
                    loop=loop, slabs=S.slabs, slab_cases=S.cases, skipped=S.skipped,
                    baselines_how="sum over the patch's pixels, as the residual of Eq. (3)")


# =================================================================================================
# Appendix: the paper's figures (Fig. 3, Fig. 4), the examples, the mapping, a counterfactual
# =================================================================================================

def figures(out, args, S, P, sc, sv, st, x_tr, rows):
    """fig3.png, fig4.png and mapping.png -> the rows of examples.png (C.report draws it)."""
    y, g = C.labels_groups(rows)
    normal = C.clean_mask(rows) & (y == 0)                          # patches of normal scans
    clean = (y == 1) | normal
    dist = {"normal (train)": st, "normal (test)": {k: sc[k][normal] for k in ("R", "D")},
            "anomalous (test)": {k: sc[k][y == 1] for k in ("R", "D")}}
    plot_fig4(y[clean], {k: sc[k][clean] for k in SCORES if k in sc}, dist, out / "fig4.png",
              f"Fig. 4 equivalent: {int(y.sum())} anomalous test patches (all groups) against the "
              f"{int(normal.sum())} patches of normal scans, Γ={args.steps}")
    thr = {k: C.threshold_from_healthy(sv[k], percentile=args.threshold_pct) for k in ("R", "D")}
    anom = list(dict.fromkeys(g[y == 1]))
    plot_fig3(fig3_blocks(P, sc, st, x_tr, y, g, normal, anom, args.seed), thr["R"], thr["D"],
              out / "fig3.png")
    h = sc["history"]                                                      # L(z_γ), (N, Γ)
    C.plot_curves({name: list(enumerate(h[sel].mean(0).tolist(), 1)) if sel.any() else []
                   for name, sel in (("patches of normal scans", normal), ("anomalous", y == 1))},
                  out / "mapping.png", title="Mapping to the latent space, Eq. (5): mean L(z_γ)",
                  ylabel="L(z_γ)", xlabel="γ")
    return C.patch_example_rows(S, P, sc["G_z"], ["normal"] + anom)


def fig3_blocks(P, sc, st, x_tr, y, g, normal, anom, seed):
    """Fig. 3's blocks of patch columns: normal training patches, normal test patches, and per
    anomalous group the test patches with the most anomalous pixels."""
    rng = np.random.default_rng([seed, 2])

    def pick(sel, n):
        i = np.nonzero(sel)[0]
        return list(rng.choice(i, min(n, len(i)), replace=False)) if len(i) else []

    def column(s, x, mask, i):                                     # s: the scores of the set x
        return dict(x=x[i], g=s["G_z"][i], res=np.abs(x[i] - s["G_z"][i]), mask=mask[i],
                    R=s["R"][i], D=s["D"][i], A=s["A"][i])
    cols = []
    for gn in anom:
        sel = np.nonzero((g == gn) & (y == 1))[0]
        most = sel[np.argsort(-P["mask"][sel].reshape(len(sel), -1).sum(1), kind="stable")]
        cols += [column(sc, P["x"], P["mask"], i) for i in most[:2 if len(anom) < 4 else 1]]
    no_mask = np.zeros(x_tr.shape, bool)
    train = pick(np.ones(len(x_tr), bool), 3)
    return [("normal (train)", [column(st, x_tr, no_mask, i) for i in train]),
            ("normal (test)", [column(sc, P["x"], P["mask"], i) for i in pick(normal, 3)]),
            ("anomalous (test): " + ", ".join(anom), cols)]


def counterfactual(G, D, P, sc, rows, args, run):
    """Beyond the paper: why the patch sum misses small lesions (C.lesion_counterfactual). Up to
    --counterfactual patches of normal scans get a real lesion's pixels pasted in, and both
    versions are mapped (§2.2) from the same z_1 -> counterfactual.png and results.json."""
    def mapped(x, desc):
        return score(x, G, D, args, run.device, z_start(len(x), args.z_dim, args.seed, 3), desc)
    return C.lesion_counterfactual(mapped, P, sc["A"], rows, args.counterfactual,
                                   run.out / "counterfactual.png", how="mapped from the same z_1")


def plot_fig3(blocks, thr_R, thr_D, path):
    """Fig. 3: columns of patches grouped in blocks; rows: query | generated | residual overlay |
    annotation. A red (yellow) bar above a column: flagged by R (D) at the healthy threshold."""
    plt = C._plt()
    cols = [e for _, es in blocks for e in es]
    fig, axes = plt.subplots(4, len(cols), figsize=(1.25 * len(cols) + 0.9, 5.9), squeeze=False)
    rmax = max(float(np.percentile(np.concatenate([e["res"].ravel() for e in cols]), 99.5)), 1e-6)
    for j, e in enumerate(cols):
        for i, img in enumerate((e["x"], e["g"], e["x"], e["x"])):
            axes[i, j].imshow(img, cmap="gray", vmin=-1, vmax=1)
            axes[i, j].set(xticks=[], yticks=[])
        axes[2, j].imshow(np.ma.masked_less(e["res"], 0.1 * rmax), cmap="jet", alpha=0.6, vmin=0,
                          vmax=rmax)
        if e["mask"].any():
            axes[3, j].contour(e["mask"], levels=[0.5], colors="lime", linewidths=0.9)
        for k, (flag, color) in enumerate(((e["R"] >= thr_R, "red"), (e["D"] >= thr_D, "gold"))):
            axes[0, j].add_patch(plt.Rectangle((0, 1.12 - 0.09 * k), 1, 0.07, clip_on=False,
                                               transform=axes[0, j].transAxes, lw=0.6,
                                               ec=color, fc=color if flag else "none"))
        axes[3, j].set_xlabel(f"A={e['A']:.0f}", fontsize=7)
    for i, name in enumerate(("query x", "generated G(z_Γ)", "residual |x−G(z_Γ)|", "annotation")):
        axes[i, 0].set_ylabel(name, fontsize=8)
    j = 0
    for b, es in blocks:
        axes[0, j].set_title(b, fontsize=8, loc="left", pad=16)
        j += len(es)
    fig.suptitle("Fig. 3 equivalent. Bars above a patch: red = flagged by the residual score R(x), "
                 "yellow = by the discrimination score D(x) (filled = above the healthy-validation "
                 "threshold)", fontsize=9)
    C._save(fig, path)


def plot_fig4(y, sc, dist, path, title):
    """Fig. 4: (a) ROC of A (AnoGAN), Â (GAN_R), P_D; (b) ROC of R, D, D̂; (c, d) distributions of R
    and D over training-normal, test-normal and anomalous patches."""
    plt = C._plt()
    fig, ax = plt.subplots(1, 4, figsize=(18, 4.2), gridspec_kw=dict(wspace=0.32))
    d_hat = "D̂(x)" if "A_hat" in sc else "D̂(x) at AnoGAN's z_Γ"
    panels = (("(a) model comparison", (("AnoGAN A(x)", "A", "k"), ("GAN_R Â(x)", "A_hat",
                                                                     "tab:red"),
                                        ("P_D", "P_D", "tab:green"),
                                        ("brightest pixel (baseline)", "x_max", "tab:grey"))),
              ("(b) anomaly score components", (("R(x)", "R", "tab:green"), ("D(x)", "D", "k"),
                                                (d_hat, "D_hat", "tab:red"),
                                                ("R_nn(x): nearest training patch", "R_nn",
                                                 "tab:purple"))))
    for k, (ttl, lines) in enumerate(panels):
        for name, key, color in (line for line in lines if line[1] in sc):
            fpr, tpr, _ = C.roc_points(y, sc[key])
            ax[k].plot(fpr, tpr, color=color, lw=1.8, label=f"{name} ({C.auroc(y, sc[key]):.2f})")
        ax[k].plot([0, 1], [0, 1], "--", color="grey", lw=0.8)
        ax[k].set(xlabel="false positive rate", ylabel="true positive rate", title=ttl, xlim=(0, 1),
                  ylim=(0, 1.01))
        ax[k].legend(loc="lower right", fontsize=8)
        ax[k].grid(alpha=0.3)
    for k, key, ttl in ((2, "R", "(c) residual score R(x)"), (3, "D", "(d) discrimination score")):
        allv = np.concatenate([v[key] for v in dist.values()])
        bins = np.linspace(allv.min(), np.percentile(allv, 99.5), 40)
        for (name, v), color in zip(dist.items(), ("tab:blue", "tab:green", "tab:red")):
            ax[k].hist(np.clip(v[key], None, bins[-1]), bins=bins, density=True, alpha=0.45,
                       color=color, label=f"{name} (n={len(v[key])})")
        ax[k].set(xlabel=key + "(x)", ylabel="density", title=ttl)
        ax[k].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    C._save(fig, path)


if __name__ == "__main__":
    C.main_guard(main)
