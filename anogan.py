"""AnoGAN: unsupervised anomaly detection with generative adversarial networks.

    Schlegl T., Seeböck P., Waldstein S.M., Schmidt-Erfurth U., Langs G. "Unsupervised Anomaly
    Detection with Generative Adversarial Networks to Guide Marker Discovery." Information
    Processing in Medical Imaging (IPMI 2017), LNCS 10265, pp. 146-157.
    https://doi.org/10.1007/978-3-319-59050-9_12   (arXiv:1703.05921)

What this file implements (section / equation of the paper):
  * §2.1, §3 "Implementation details": a DCGAN (Radford et al. 2016) on c×c grey patches drawn at
    random positions inside the brain of healthy images. Generator: z ~ U(-1, 1)^100 -> linear ->
    four fractionally-strided 5×5 convolutions (512-256-128-64 channels, BatchNorm, ReLU, tanh).
    Discriminator: four 5×5 stride-2 convolutions (64-128-256-512, BatchNorm, LeakyReLU) -> linear.
    Minimax training, Eq. (1) for D and Eq. (2) for G, with Adam, 20 epochs.
  * §2.2 mapping of a new image x to the latent space: z_1 ~ U(-1, 1), then Γ = 500 backpropagation
    steps on z only (G and D frozen, in eval mode) of the loss of Eq. (5),
        L(z_γ) = (1 - λ)·L_R(z_γ) + λ·L_D(z_γ),  λ = 0.1,
    residual loss Eq. (3) L_R = Σ|x - G(z_γ)| and feature-matching discrimination loss Eq. (4)
    L_D = Σ|f(x) - f(G(z_γ))|, f = the last convolution layer of D (Fig. 2a).
  * §2.3 anomaly score Eq. (6) A(x) = (1 - λ)·R(x) + λ·D(x) with R, D = L_R, L_D at z_Γ; the
    residual image x_R = |x - G(z_Γ)| localises the anomaly.
  * §3 comparisons: GAN_R (`--ganr 1`): the reference discrimination loss of Yeh et al.,
    L_D̂ = sigmoid cross-entropy(D(G(z)), 1), used both for the mapping and the score
    Â(x) = (1 - λ)·R(x) + λ·D̂(x); P_D: the discriminator's output on the query patch alone.
    Fig. 4(a) ROC of A, Â, P_D; Fig. 4(b) ROC of R, D, D̂; Fig. 4(c, d) R and D distributions of
    training-normal, test-normal and anomalous patches (fig4.png); Fig. 3 query | generated |
    residual overlay | annotation with the paper's red/yellow detection bars (fig3.png); Table 1
    (precision, recall, sensitivity, specificity at the Youden index, AUC) in results.json.
  * §3 labels: a test patch is anomalous if it contains at least one anomalous pixel.

Beyond the paper (see README and results.json):
  * Batched mapping. The paper maps one image at a time. Here every patch has its own z, the loss
    is a per-sample vector and we back-propagate its sum, so ∂(Σ_b L_b)/∂z_b = ∂L_b/∂z_b: with G and
    D in eval mode (BatchNorm uses its running statistics, no batch coupling) and an element-wise
    optimiser (Adam), each z follows exactly the trajectory it would follow alone. The test suite
    checks this in float64; every run also re-maps a few patches one at a time and reports both speeds
    (`timing.map_s_per_patch_batched` / `_single`) and their largest score difference. In float32 a
    batch and a single patch round differently, and the trajectories drift apart: 0.03 on scores near
    200 in the quick run, 0.7 (0.35 %) for a generator trained 9x longer, 2.0 (1.3 %) after Γ = 200.
  * Slice and scan scores: the maximum patch score A over a slice's (a scan's) grid patches
    (`--agg`), for anomalies that a patch label cannot see (e.g. global atrophy).
  * Two references that are not AnoGAN, so that a poor AUROC can be read: R_nn(x), the residual to
    the nearest healthy training patch (`--nn-ref`), and x_max, the patch's brightest pixel (below).

Deviations from the paper:
  1. Data: retinal OCT B-scans -> axial brain MRI slices (FLAIR on the phantom, `--modality` for real
     data), cropped to the brain's bounding box and resized to `--slice-size`; "patches inside the
     brain" = patches with >= `--min-brain` brain pixels (the paper flattens the retina instead).
     Training patches are drawn from the `--train-slices` central slices of each healthy scan.
  2. Test patches lie on a regular grid (`--test-stride`) over the `--test-slices` central slices of
     each test scan (the ventricle level on the phantom); the paper does not say how its 8192 test
     patches were placed. Patches of an anomalous scan without an anomalous pixel are negatives
     (§3's rule); they keep the group name `<group>_0` in scores.csv.
  3. The paper does not give the mapping optimiser. We use Adam on z (`--map-lr`, β1 `--map-beta1`),
     the optimiser of the completion code the paper adapted (bamos/dcgan-completion.tensorflow,
     lr 0.01, β1 0.9), and clip z to [-1, 1], the support of p_z (`--z-clip`).
  4. "Γ steps": z_1 is drawn, then Γ-1 updates give z_Γ; R and D are the losses at z_Γ (§2.3).
  5. Eq. (2): the generator minimises the non-saturating -log D(G(z)) (Goodfellow et al.; the form
     of DCGAN code), the usual reading of "maximizing D(G(z))". Adam lr 2e-4, β1 0.5, batch 64 and
     z dimension 100 are DCGAN's (the paper says only "Adam", "widely the same DCGAN").
  6. Table 1's cut-off is the Youden index on the test ROC, i.e. chosen with test labels; we report it
     as `oracle_youden_table1` and add an honest operating point from healthy validation patches
     (the `--threshold-pct` percentile of their scores), `at_val_threshold`.
  7. The aCAE comparison (adversarial convolutional autoencoder, Fig. 4a) is not implemented.
  8. `quick` preset (2-core CPU, 4 min 23 s measured with the phantom cached): 96×96 slices and 32×32
     patches with >= 90% brain (paper: 64×64), channels 128-64-32-16 (`--ch 16`; paper 512-256-128-64),
     4 epochs over 20,000 patches (1,252 updates; paper 20 epochs over 1,000,000), Γ = 40 mapping steps
     at Adam lr 0.05 (paper 500), a 16-pixel grid over the 4 central slices of 4 scans per test group.
     It does NOT separate `lesion_hyper` patches, and we found no CPU-sized setting that does (below).
     `smoke`: seconds, for the tests.
  9. `paper` preset on brain slices: 128×128 slices, 64×64 patches with >= 90% brain, 100,000
     training patches (the paper: 1,000,000 OCT patches), a 16-pixel test grid.

What the quick preset shows (seed 0, `python anogan.py` on 2 threads, patch AUROC against all normal
patches; the one-thread benchmark run gives 0.31 / 0.77 for the first two, as float sums differ with
the thread count and GAN training amplifies that):
    A(x): lesion_hyper 0.29, tumor 0.80, atrophy_1/2/3 0.53/0.70/0.85; mapping 19.7 ms/patch batched vs
    366 ms/patch one at a time (18.6x). The small MS-like lesions are missed: a positive patch holds a
    median of 13 lesion pixels out of 1,024, worth about 10 units of Σ|x - G(z)|, while the residual of
    normal patches varies with their anatomy (mean 230, standard deviation 74). R(x) mostly measures how
    much structure (ventricle edges, cortex) a patch has, and lesion patches lie in smooth white matter.
    Two references in results.json tell the cause apart (`references`):
      * R_nn (`--nn-ref`): Eq. (3) against the nearest of the 20,000 training patches, i.e. a generator
        that memorised every healthy patch. It separates lesion_hyper at 0.41 (0.39-0.44 in every
        lesion-size bin; no better with 100,000 patches). A generator as good as that memoriser would
        still miss the lesions: the patch sum cannot see them against anatomical variation. Whether the
        paper's far larger training (1,000,000 patches, GPU) generalises well enough is untested here.
      * x_max, the patch's brightest pixel: 0.92. The lesions are plainly visible.
    Also measured (one thread each, lesion_hyper AUROC): 16 epochs (5,008 updates, 15 min) 0.43;
    36 epochs (11,268 updates, 36 min) 0.39, as D wins the game (loss_D 0.22);
    16 epochs on 128×128 slices 0.49 (where R beats the memoriser, 0.48 vs 0.42: the GAN generalises a
    little beyond its training patches), and with Γ = 200 0.55 (0.53 after 36 epochs: a plateau); two G updates per D update (the reference
    code's habit) 0.44; BatchNorm statistics re-estimated after training 0.48. A memoriser of 16×16
    patches on 96 to 256-pixel slices (against normal patches only): 0.46-0.60. The tumour (median 55
    pixels per patch) and the atrophy stages, where a patch changes as a whole, are what this score
    detects.

Commands:
    python anogan.py                                   # quick: FLAIR phantom, ~4.5 min on 2 CPU cores
    python anogan.py --ganr 1                          # also the GAN_R comparison of Fig. 4a / Table 1
    python anogan.py --preset paper --amp              # the paper's settings (GPU)
    python anogan.py --data brats --train-data ixi --modality flair --preset paper   # real data
    python anogan.py --checkpoint runs/.../last.pt     # skip training, map and score
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
# Hyperparameters (§3 "Implementation details"; the default of each is the paper's value)
# =================================================================================================

HYPER = dict(
    # data and patches (§2.1, §3)
    slice_size=C.hp(128, "axial slices, cropped to the brain, are resized to S×S (deviation 1; the OCT "
                         "B-scans had ~256 columns)", lo=16, hi=4096),
    patch_size=C.hp(64, "patch side c, a multiple of 16 (§3: 64×64 patches)", lo=16, hi=4096),
    min_brain=C.hp(0.9, "a patch needs this fraction of brain pixels (deviation 1)", lo=0.0, hi=1.0),
    train_slices=C.hp(32, "central axial slices per training scan (deviation 1; the paper: all 49 B-scans)",
                      lo=1, hi=10_000),
    slice_step=C.hp(1, "distance between the chosen slices, in voxels", lo=1, hi=100),
    train_patches=C.hp(100_000, "random training patches (§3: 1,000,000 OCT patches)", lo=1, hi=10 ** 8),
    test_slices=C.hp(8, "central slices per test scan scored with grid patches (deviation 2)",
                     lo=1, hi=10_000),
    test_stride=C.hp(16, "stride of the test patch grid (deviation 2)", lo=1, hi=4096),
    test_cases=C.hp(0, "score only the first N scans of every test group (0 = all)", lo=0, hi=10 ** 6),
    # networks (§2.1, §3)
    z_dim=C.hp(100, "dimension of z ~ U(-1, 1) (DCGAN's 100; the paper: 'widely the same DCGAN')",
               lo=1, hi=10_000),
    ch=C.hp(64, "base channels: G 8ch-4ch-2ch-ch, D ch-2ch-4ch-8ch (§3: 512-256-128-64)", lo=1, hi=4096),
    kernel=C.hp(5, "filter size, odd (§3: 5×5)", lo=3, hi=15),
    # adversarial training, Eq. (1)-(2)
    epochs=C.hp(20, "DCGAN training epochs (§3: 20)", lo=0, hi=10_000),
    batch_size=C.hp(64, "mini-batch size (DCGAN's 64; the paper does not say)", lo=2, hi=10 ** 6),
    lr=C.hp(2e-4, "Adam learning rate (DCGAN's; §3 says only 'Adam')", lo=1e-8, hi=1.0),
    beta1=C.hp(0.5, "Adam β1 (DCGAN's)", lo=0.0, hi=0.999),
    g_steps=C.hp(1, "G updates per D update (DCGAN 1; the code the paper adapted used 2)", lo=1, hi=100),
    # mapping to the latent space, §2.2, Eq. (3)-(5)
    steps=C.hp(500, "Γ backpropagation steps of the mapping (§3: 500)", lo=1, hi=10 ** 6),
    map_lr=C.hp(0.01, "Adam learning rate on z (deviation 3: the adapted code's 0.01)", lo=1e-8, hi=100.0),
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
    time_single=C.hp(16, "patches mapped again one at a time, to time the paper's unbatched mapping",
                     lo=0, hi=10_000),
    threshold_pct=C.hp(95.0, "operating point: this percentile of the healthy validation scores "
                             "(deviation 6)", lo=0.0, hi=100.0),
    agg=C.hp("max", "patch scores -> slice and scan score (beyond the paper)",
             choices=["max", "mean", "p99"]),
    nn_ref=C.hp(0, "beyond the paper: R_nn, the residual to the nearest of this many training patches "
                   "(a memorising generator; 0 = off, an N×M search)", lo=0, hi=10 ** 8),
)
# quick (deviation 8): a 2-core CPU in minutes: 96×96 slices, 32×32 patches, channels 128-64-32-16,
# 4 epochs over 20,000 patches, Γ = 40 at a larger step, 4 scans per test group, no GAN_R
QUICK = dict(slice_size=96, patch_size=32, train_slices=16, slice_step=2, train_patches=20_000,
             test_slices=4, test_cases=4, ch=16, epochs=4, steps=40, map_lr=0.05, map_batch=512,
             ganr=False, val_patches=96, train_eval_patches=96, time_single=4, nn_ref=20_000)
# smoke: seconds, for the tests
SMOKE = dict(slice_size=32, patch_size=16, min_brain=0.5, train_slices=4, slice_step=2,
             train_patches=256, test_slices=2, test_cases=3, z_dim=16, ch=4, epochs=1, steps=5,
             map_lr=0.05, map_batch=256, val_patches=32, train_eval_patches=32, time_single=2, nn_ref=256)


def check_args(args):
    if args.patch_size % 16:
        C.fail(f"--patch-size must be a multiple of 16 (four stride-2 layers), got {args.patch_size}")
    if args.patch_size > args.slice_size:
        C.fail(f"--patch-size {args.patch_size} is larger than --slice-size {args.slice_size}")
    if args.kernel % 2 == 0:
        C.fail(f"--kernel must be odd ('same' padding of the stride-2 layers), got {args.kernel}")


def parse_args(argv=None):
    return C.parse_args(argv, HYPER, {"quick": QUICK, "smoke": SMOKE}, method=METHOD, doc=__doc__,
                        check=check_args)


# =================================================================================================
# Networks (§2.1, Fig. 2a; DCGAN of Radford et al. with 512-256-128-64 channels and 5×5 filters, §3)
# =================================================================================================

def init_dcgan(m):
    """DCGAN initialisation: conv/linear weights ~ N(0, 0.02), BatchNorm scale ~ N(1, 0.02), biases 0."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """G: z (B, z_dim) in [-1, 1] -> patch (B, 1, c, c) in [-1, 1].

    A linear projection to 8ch feature maps of side c/16, then four fractionally-strided convolutions
    8ch -> 4ch -> 2ch -> ch -> 1 that each double the side (§3: "four fractionally-strided convolution
    layers", 512-256-128-64 channels for ch=64), BatchNorm + ReLU after each but the last, tanh output."""

    def __init__(self, *, z_dim=100, ch=64, size=64, kernel=5):
        super().__init__()
        self.s0, self.ch = size // 16, ch
        pad = (kernel - 1) // 2
        out_pad = 2 + 2 * pad - kernel          # makes every layer exactly double the side ("SAME")
        self.project = nn.Linear(z_dim, 8 * ch * self.s0 * self.s0)
        self.bn0 = nn.BatchNorm2d(8 * ch)
        layers = []
        for c_in, c_out in ((8 * ch, 4 * ch), (4 * ch, 2 * ch), (2 * ch, ch)):
            layers += [nn.ConvTranspose2d(c_in, c_out, kernel, 2, pad, out_pad), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True)]
        layers += [nn.ConvTranspose2d(ch, 1, kernel, 2, pad, out_pad), nn.Tanh()]
        self.up = nn.Sequential(*layers)
        self.apply(init_dcgan)

    def forward(self, z):
        h = self.project(z).view(-1, 8 * self.ch, self.s0, self.s0)   # (B, 8ch, c/16, c/16)
        return self.up(F.relu(self.bn0(h)))                             # (B, 1, c, c)


class Discriminator(nn.Module):
    """D: patch (B, 1, c, c) -> logit (B,) and the four conv feature maps.

    Four 5×5 stride-2 convolutions 1 -> ch -> 2ch -> 4ch -> 8ch with LeakyReLU(0.2) (BatchNorm on all
    but the first, DCGAN), then a linear layer to one logit; D(x) = sigmoid(logit). f(x) of Eq. (4) is
    the output of conv layer `feature_layer` (3 = the last one, Fig. 2a orange)."""

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
# Losses (one function per equation; every mapping loss is PER SAMPLE, shape (B,))
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
    """Eq. (3): L_R(z_γ) = Σ |x - G(z_γ)|, summed over the pixels of each sample -> (B,)."""
    # Eq. (3): L_R = Σ |x − G(z_γ)|
    return (x - G_z).abs().flatten(1).sum(1)


def discrimination_loss(f_x, f_G_z):
    """Eq. (4): L_D(z_γ) = Σ |f(x) - f(G(z_γ))| over the features of each sample -> (B,)."""
    # Eq. (4): L_D = Σ |f(x) − f(G(z_γ))|
    return (f_x - f_G_z).abs().flatten(1).sum(1)


def reference_discrimination_loss(logit_G_z):
    """Yeh et al.'s L_D̂(z_γ) = σ(D(G(z_γ)), α): sigmoid cross-entropy with logits D(G(z_γ)) and
    targets α = 1 (§2.2), per sample -> (B,). Used by GAN_R."""
    # L_D̂ = −log sigmoid(D(G(z_γ)))  (targets α = 1)
    return F.binary_cross_entropy_with_logits(logit_G_z, torch.ones_like(logit_G_z), reduction="none")


def mapping_loss(L_R, L_D, lam):
    """Eq. (5): L(z_γ) = (1 - λ)·L_R(z_γ) + λ·L_D(z_γ), per sample -> (B,)."""
    # Eq. (5): L(z_γ) = (1 − λ)·L_R(z_γ) + λ·L_D(z_γ)
    return (1 - lam) * L_R + lam * L_D


# =================================================================================================
# Anomaly score (§2.2 mapping, §2.3 Eq. (6))
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
    """z_1 ~ U(-1, 1)^z_dim, one per patch (§2.2), from a seeded stream per patch set -> (n, z_dim)."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, stream]).generate_state(1)[0]))
    return torch.rand(n, z_dim, generator=g) * 2 - 1


def map_to_latent(x, G, D, z1, *, steps, lr, lam, beta1=0.9, disc="feature", feature_layer=3, clip=True,
                  device=None, amp=False):
    """§2.2: find z_Γ with G(z_Γ) ≈ x by Γ-1 Adam updates of z only, from z_1.

    x: (B, 1, c, c) query patches; z1: (B, z_dim) starting points (each patch its own z).
    disc = "feature": Eq. (4) L_D (AnoGAN); "reference": Yeh et al.'s L_D̂ (GAN_R).
    Returns z_Γ, G(z_Γ) and the per-sample R = L_R(z_Γ), D = L_D(z_Γ), D̂ = L_D̂(z_Γ), and the
    per-sample mapping loss L(z_γ) of every step γ = 1..Γ (B, Γ). Every loss is per sample and the
    sum over the batch is back-propagated, so each z_b gets exactly the gradient of its own L_b."""
    with frozen(G, D):
        with torch.no_grad(), C.autocast(device or x.device, amp):
            f_x = D(x)[1][feature_layer].float()                           # (B, C_f, h, w), fixed
        z = z1.detach().clone().requires_grad_(True)                        # (B, z_dim) fresh per patch
        opt = torch.optim.Adam([z], lr=lr, betas=(beta1, 0.999))           # fresh optimiser per call
        history = []
        for gamma in range(1, steps + 1):
            opt.zero_grad(set_to_none=True)
            with C.autocast(device or x.device, amp):
                G_z = G(z)                                                  # (B, 1, c, c)
                logit, feats = D(G_z)
            G_z, logit, f_G_z = G_z.float(), logit.float(), feats[feature_layer].float()
            L_R = residual_loss(x, G_z)                                     # (B,)
            L_Dfm = discrimination_loss(f_x, f_G_z)                         # (B,)
            L_Dref = reference_discrimination_loss(logit)                   # (B,)
            L = mapping_loss(L_R, L_Dfm if disc == "feature" else L_Dref, lam)   # (B,)
            history.append(L.detach())
            if gamma == steps:                                              # losses at z_Γ -> R, D (§2.3)
                break
            L.sum().backward()                                              # Σ_b L_b: per-sample gradients
            opt.step()
            if clip:
                with torch.no_grad():
                    z.clamp_(-1.0, 1.0)
        return dict(z=z.detach(), G_z=G_z.detach(), R=L_R.detach(), D=L_Dfm.detach(), D_hat=L_Dref.detach(),
                    history=torch.stack(history, 1))                        # history (B, Γ)


def score(x, G, D, args, device, z1, desc="map"):
    """The trained AnoGAN applied to patches x (N, c, c), `map_batch` at a time, z1 (N, z_dim) -> per
    patch R, D, D̂ at z_Γ, A (Eq. 6), P_D, G(z_Γ) and L(z_γ) of every step (N, Γ); with --ganr also
    GAN_R's Â(x), mapped with L_D̂ (§3). Batched mapping (beyond the paper): see map_to_latent."""
    kw = dict(steps=args.steps, lr=args.map_lr, lam=args.lam, beta1=args.map_beta1,
              feature_layer=args.feature_layer, clip=bool(args.z_clip), device=device, amp=args.amp)
    out = {k: [] for k in ("R", "D", "D_hat", "A", "G_z", "history", "P_D", "A_hat")}
    for s in C.progress(range(0, len(x), args.map_batch), desc=desc, every=10):
        xb = torch.from_numpy(np.ascontiguousarray(x[s:s + args.map_batch])).unsqueeze(1).to(device)
        m = map_to_latent(xb, G, D, z1[s:s + args.map_batch].to(device), disc="feature", **kw)
        for k in ("R", "D", "D_hat", "history"):                            # D_hat: L_D̂ at AnoGAN's z_Γ
            out[k].append(m[k])
        out["A"].append(anomaly_score(m["R"], m["D"], args.lam))            # Eq. (6)
        out["G_z"].append(m["G_z"][:, 0])                                   # (B, c, c)
        with frozen(G, D):
            out["P_D"].append(discriminator_score(D, xb))
        if args.ganr:                                                       # GAN_R: map with L_D̂
            r = map_to_latent(xb, G, D, z1[s:s + args.map_batch].to(device), disc="reference", **kw)
            out["A_hat"].append(anomaly_score(r["R"], r["D_hat"], args.lam))
    return {k: torch.cat(v).float().cpu().numpy() for k, v in out.items() if v}


def map_one_at_a_time(x, G, D, args, device, z1):
    """The paper's way, for the timing: patches mapped one after the other -> (s per patch, A)."""
    A = []
    t0 = time.perf_counter()
    for i in range(len(x)):
        xb = torch.from_numpy(np.ascontiguousarray(x[i:i + 1])).unsqueeze(1).to(device)   # (1, 1, c, c)
        m = map_to_latent(xb, G, D, z1[i:i + 1].to(device), steps=args.steps, lr=args.map_lr,
                          lam=args.lam, beta1=args.map_beta1, feature_layer=args.feature_layer,
                          clip=bool(args.z_clip), device=device, amp=args.amp)
        A.append(float(anomaly_score(m["R"], m["D"], args.lam)[0]))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / max(len(x), 1), np.array(A)


# =================================================================================================
# Training (§2.1: minimax game of Eq. (1)-(2) on healthy patches only)
# =================================================================================================

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
    -> (training seconds, loss history, checkpoint I/O)."""
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
            run.log(f"epoch {batches.epoch + 1}/{args.epochs}: loss_D {last['loss_D (Eq. 1)']:.3f}  "
                    f"loss_G {last['loss_G (Eq. 2)']:.3f}")
    return loop.close(), loop.history, loop.io_report()


# =================================================================================================
# Scoring and evaluation
# =================================================================================================

SCORES = ("A", "R", "D", "D_hat", "P_D", "A_hat", "R_nn", "x_max")   # scores.csv columns (A is `score`)


def col(key):
    """The scores.csv column of a score: A(x) is the contract's `score`."""
    return "score" if key == "A" else key


def patch_labels(mask):
    """§3: a patch is anomalous (1) if it contains at least one anomalous pixel. (N, c, c) -> (N,)"""
    return np.asarray(mask).reshape(len(mask), -1).any(1).astype(int)


def grid_patch_set(S, size, stride, min_brain, allow_empty=False):
    """Grid patches (deviation 2) over the slices of an ArraySet -> dict of numpy arrays x, mask
    (N, c, c) and row, top, left (N,); None when there is none and allow_empty."""
    pos = [(i, t, l) for i in range(len(S))
           for t, l in C.grid_patches(np.asarray(S.brain[i]), size, stride, min_brain)]
    if not pos and allow_empty:
        return None
    if not pos:
        C.fail(f"no {size}x{size} test patch with >= {min_brain:.0%} brain; lower --patch-size or "
               f"--min-brain")
    idx, top, left = (np.array(a, dtype=np.int64) for a in zip(*pos))
    return dict(x=C.extract_patches(S.x, idx, top, left, size),
                mask=C.extract_patches(S.mask, idx, top, left, size) > 0, row=idx, top=top, left=left)


def load_patches(data, args, run):
    """Every set read (and so checked) before training -> training patches X (N, 1, c, c) at random
    positions inside the brain (§2.1), test slices S and their grid patches P, healthy validation
    patches (None if there is none) and the training patches mapped for Fig. 4 (c, d)."""
    size, c = (args.slice_size, args.slice_size), args.patch_size
    S_tr = datasets.slice_stack(data.train, size=size, norm="mri", n_slices=args.train_slices,
                                step=args.slice_step, cache_dir=args.cache_dir, desc="train")
    idx, top, left = C.random_patches(S_tr.x, S_tr.brain, size=c, n=args.train_patches,
                                      rng=np.random.default_rng(args.seed), min_brain=args.min_brain)
    X = torch.from_numpy(C.extract_patches(S_tr.x, idx, top, left, c)).unsqueeze(1)   # (N, 1, c, c)
    run.log(f"{len(X)} training patches {c}x{c} from {len(data.train)} healthy scans "
            f"({len(S_tr)} slices {size[0]}x{size[1]})")
    if len(X) < 2:
        C.fail(f"only {len(X)} training patch: BatchNorm needs 2; lower --min-brain or --patch-size")
    test = data.test
    if args.test_cases:
        groups = dict.fromkeys(cs.group for cs in test)
        test = [cs for g in groups for cs in [cs for cs in test if cs.group == g][:args.test_cases]]
    # test/val slices: the central `--test-slices` of the training slab (same centre and step)
    kw = dict(size=size, norm="mri", n_slices=min(args.test_slices, args.train_slices),
              step=args.slice_step, cache_dir=args.cache_dir)
    S = datasets.slice_stack(test, desc="test", **kw)
    P = grid_patch_set(S, c, args.test_stride, args.min_brain)
    # a data set can leave no healthy validation patch at the test level (BraTS without --train-data:
    # its validation subjects' central slices all hold tumour); then the operating point comes from
    # healthy training patches (optimistic, but never the test labels), and results.json says so
    V = grid_patch_set(datasets.slice_stack(data.val, desc="val", **kw), c, args.test_stride,
                       args.min_brain, allow_empty=True)
    rng = np.random.default_rng([args.seed, 1])
    if V is not None and args.val_patches and len(V["x"]) > args.val_patches:
        V = {k: v[np.sort(rng.choice(len(V["x"]), args.val_patches, replace=False))] for k, v in V.items()}
    if V is None:
        run.log("warning: no healthy validation patch; the operating point comes from training patches")
    n_tr = min(args.train_eval_patches or len(X), len(X))
    x_tr = X[rng.choice(len(X), n_tr, replace=False), 0].numpy()                  # (n_tr, c, c)
    return X, S, P, (V["x"] if V is not None else None), x_tr


def nearest_patch_residual(x, X_ref, device, chunk=256):
    """Beyond the paper, a reference for R(x): R_nn(x) = min_t Σ|x - t| over healthy training patches t,
    i.e. Eq. (3) for a 'generator' that reproduces every training patch exactly and nothing in between
    (a memoriser). If R_nn cannot separate an anomaly either, training G longer is unlikely to be enough:
    the anomaly is small against the residual of normal anatomy the score sums over. A reference, not a
    bound: a generator can also produce patches between its training patches.
    x: (N, c, c), X_ref: (M, c, c) numpy or tensors -> (N,) numpy."""
    T = torch.as_tensor(np.asarray(X_ref, dtype=np.float32)).reshape(len(X_ref), -1).to(device)   # (M, c*c)
    out = []
    for s in range(0, len(x), chunk):
        q = torch.as_tensor(np.asarray(x[s:s + chunk], dtype=np.float32)).reshape(-1, T.shape[1]).to(device)
        out.append(torch.cdist(q, T, p=1).min(1).values.cpu())                              # (chunk,)
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def score_sets(G, D, X, P, x_val, x_tr, args, run):
    """Map and score the test, validation and training patches; time the batched mapping against
    the paper's one patch at a time; the two references -> sc, sv, st, timing, single-vs-batched."""
    device = run.device
    run.log(f"mapping {len(P['x'])} test, {0 if x_val is None else len(x_val)} validation and "
            f"{len(x_tr)} training patches; Γ={args.steps}, batch {args.map_batch}")
    z1 = z_start(len(P["x"]), args.z_dim, args.seed, 0)
    with C.Timer() as t_map:
        sc = score(P["x"], G, D, args, device, z1, desc="map test")
        if device.type == "cuda":
            torch.cuda.synchronize()
    st = score(x_tr, G, D, args, device, z_start(len(x_tr), args.z_dim, args.seed, 2), desc="map train")
    sv = st if x_val is None else score(x_val, G, D, args, device,
                                        z_start(len(x_val), args.z_dim, args.seed, 1), desc="map val")
    n1 = min(args.time_single, len(P["x"]))
    s_single, A_single = map_one_at_a_time(P["x"][:n1], G, D, args, device, z1[:n1])
    diff = np.abs(A_single - sc["A"][:n1])
    single = {"batched_vs_single_max_abs_diff_A": float(diff.max()) if n1 else None}
    # two references beyond the paper (not AnoGAN): a memoriser's residual and the brightest pixel
    n_nn = min(args.nn_ref, len(X))
    if n_nn:
        with C.Timer() as t_nn:
            sc["R_nn"] = nearest_patch_residual(P["x"], X[:n_nn, 0], device)
        run.log(f"R_nn: nearest of {n_nn} training patches, {t_nn.seconds:.0f} s")
    sc["x_max"] = P["x"].reshape(len(P["x"]), -1).max(1)
    per = t_map.seconds / len(P["x"])
    n_maps = 2 if args.ganr else 1
    timing = {"score_s": t_map.seconds, "score_s_per_sample": per, "map_s_per_patch_batched": per / n_maps,
              "map_s_per_patch_single": s_single, "map_speedup_batched": s_single / max(per / n_maps, 1e-12),
              "n_single_timed": n1, "map_batch": args.map_batch, "mapping_steps": args.steps}
    run.log(f"mapping: {per / n_maps * 1e3:.1f} ms/patch batched vs {s_single * 1e3:.1f} ms/patch one at "
            f"a time ({n1} patches), max |ΔA| {single['batched_vs_single_max_abs_diff_A']}")
    return sc, sv, st, timing, single


def patch_rows(S, P, sc):
    """One row per test patch (the rows contract): group = the group of the patch's SCAN, label = the
    patch's own label (§3), case = the scan. A lesion-free patch of a tumour scan is {tumor, 0}."""
    y = patch_labels(P["mask"])
    n_px = P["mask"].reshape(len(y), -1).sum(1)
    rows = []
    for k in range(len(y)):
        r = int(P["row"][k])
        cs, z = S.cases[S.case[r]], int(S.z[r])
        rows.append(dict(id=f"{cs.id}/z{z}/y{int(P['top'][k])}x{int(P['left'][k])}", group=cs.group,
                         label=int(y[k]), score=float(sc["A"][k]),
                         **{key: float(sc[key][k]) for key in SCORES[1:] if key in sc},
                         case=cs.id, slice=z, anomalous_px=int(n_px[k])))
    return rows


def level_rows(S, P, A, how):
    """Beyond the paper: slice and scan scores = `how` (max) of the patch scores A of their grid patches;
    a slice is anomalous if it holds >= 1 anomalous pixel, a scan as its group says."""
    slices = []
    for r, s in C.aggregate(A, P["row"].tolist(), how=how).items():
        cs = S.cases[S.case[r]]
        slices.append(dict(id=f"{cs.id}/z{int(S.z[r])}", group=cs.group, label=int(np.asarray(S.mask[r]).any()),
                           score=s, case=cs.id))
    scans = [dict(id=S.cases[i].id, group=S.cases[i].group, label=S.cases[i].label, score=s)
             for i, s in C.aggregate(A, S.case[P["row"]].tolist(), how=how).items()]
    return slices, scans


def clean_mask(rows):
    """The units every AUROC here compares: anomalous ones and those of NORMAL scans -> (N,) bool."""
    y = np.array([r["label"] for r in rows])
    g = np.array([r["group"] for r in rows])
    return (y == 1) | np.isin(g, C.normal_groups(y, g))


def score_comparison(rows, keys):
    """§3, Fig. 4(a, b): AUROC/AUPRC of each score, all anomalous patches and per group against the
    patches of normal scans; `same_scan`: against the lesion-free patches of the same scans."""
    out = {}
    for key in keys:
        e = C.evaluate(rows, key=col(key))
        m = e["metrics"]
        out[key] = {"auroc": m.get("auroc"), "auroc_ci": m.get("auroc_ci"), "auprc": m.get("auprc"),
                    **{g: v["auroc"] for g, v in e["groups"].items() if "auroc" in v},
                    "same_scan": {g: v["auroc"] for g, v in e.get("groups_same_scan", {}).items()}}
    return out


PAIRS = (("A", "R"), ("A", "D"), ("D", "D_hat"), ("A", "P_D"), ("A", "A_hat"), ("R", "R_nn"), ("A", "x_max"))


def paired_differences(rows, keys):
    """"A(x) beats R(x)": AUROC(a) - AUROC(b) on the same patches with a 95% interval from one bootstrap
    over scans (C.compare_scores; `resolved` = the interval excludes 0), all anomalous and per group."""
    groups = sorted({r["group"] for r in rows if r["label"] == 1})
    return {f"{a} - {b}": {g or "all": C.compare_scores(rows, rows, g, col(a), col(b)) for g in [None, *groups]}
            for a, b in PAIRS if a in keys and b in keys}


def auroc_by_lesion_size(rows, c, keys=("A", "R_nn")):
    """AUROC against normal scans of each group's anomalous patches with 1-3, 4-15, >= 16 anomalous
    pixels (§3's rule counts a single pixel), with 95% intervals over scans."""
    normal = set(C.normal_groups(np.array([r["label"] for r in rows]), np.array([r["group"] for r in rows])))
    out = {}
    for g in sorted({r["group"] for r in rows if r["label"] == 1}):
        out[g] = {}
        for lo, hi in ((1, 3), (4, 15), (16, c * c)):
            sub = [r for r in rows if r["group"] in normal
                   or (r["group"] == g and r["label"] == 1 and lo <= r["anomalous_px"] <= hi)]
            n = sum(r["label"] for r in sub)
            if not n or not normal:
                continue
            e = {"n": n}
            for key in keys:
                if col(key) in rows[0]:
                    m = C.evaluate(sub, key=col(key))["metrics"]
                    name = "auroc" if key == "A" else f"auroc_{key}"
                    e[name], e[name + "_ci"] = m["auroc"], m["auroc_ci"]
            out[g][f"{lo}-{hi}px"] = e
    return out


def table1(rows):
    """Table 1: precision, recall, sensitivity, specificity at the Youden index and the AUC, anomalous
    patches against those of normal scans. The Youden cut-off is chosen with the test labels (oracle)."""
    cl = [r for r, k in zip(rows, clean_mask(rows)) if k]
    y = np.array([r["label"] for r in cl])
    out = {}
    for name, key in (("AnoGAN A", "A"), ("P_D", "P_D"), ("GAN_R Â", "A_hat")):
        if col(key) in cl[0]:
            s = np.array([r[col(key)] for r in cl])
            yd = C.youden(y, s)
            out[name] = {**{k: yd[k] for k in ("precision", "recall", "sensitivity", "specificity", "threshold")},
                         "auc": C.auroc(y, s)}
    return out


def evaluation(rows, S, P, sc, sv, args, n_patches, run):
    """results.json beyond the contract: the comparisons of §3 (Fig. 4, Table 1) with paired intervals,
    the references, lesion-size bins, operating points of R and D, slice and scan aggregates."""
    keys = [k for k in SCORES if k in sc]
    comparison = score_comparison(rows, keys)
    for key in ("R", "R_nn", "x_max"):
        if key in comparison:
            run.log(f"AUROC of {key}: " + ", ".join(f"{g} {v:.3f}" for g, v in comparison[key].items()
                                                    if isinstance(v, float) and g not in ("auroc", "auprc")))
    rows_slice, rows_scan = level_rows(S, P, sc["A"], args.agg)
    y = np.array([r["label"] for r in rows])
    return {
        "patch_label_rule": "§3: a patch is anomalous if it holds >= 1 anomalous pixel; group = its scan's",
        "n_patches": {"test": len(y), "test_anomalous": int(y.sum()),
                      "test_normal_scans": int((clean_mask(rows) & (y == 0)).sum()), **n_patches},
        "threshold_from": "val" if n_patches["val"] else "train (no healthy validation patch at the test slices)",
        "comparison_auroc": comparison,
        "paired_differences": paired_differences(rows, keys),
        "auroc_A_by_anomalous_pixels": auroc_by_lesion_size(rows, args.patch_size),
        "oracle_youden_table1": table1(rows),
        "slice_level": {"how": f"{args.agg} of A over the slice's patches; anomalous if >= 1 anomalous pixel",
                        **C.evaluate(rows_slice)},
        "scan_level": {"how": f"{args.agg} of A over the scan's patches; label = the scan's",
                       **C.evaluate(rows_scan)},
    }


# =================================================================================================
# main: load, train (or load a checkpoint), score, report
# =================================================================================================

def main(argv=None):
    args = parse_args(argv)
    run = C.start_run(args, METHOD)
    data = datasets.load_dataset(args, contrast="flair")
    X, S, P, x_val, x_tr = load_patches(data, args, run)             # every set read before training

    # the DCGAN of §2.1, trained on healthy patches (or loaded: --checkpoint only scores)
    G = Generator(z_dim=args.z_dim, ch=args.ch, size=args.patch_size, kernel=args.kernel).to(run.device)
    D = Discriminator(ch=args.ch, size=args.patch_size, kernel=args.kernel).to(run.device)
    if args.checkpoint:
        ck = C.load_models(args.checkpoint, {"G": G, "D": D}, METHOD)
        train_s, history, io = 0.0, ck.get("history", {}), None
        if not (run.out / "last.pt").exists():                       # every run folder has a last.pt
            shutil.copyfile(args.checkpoint, run.out / "last.pt")
        run.log(f"loaded {args.checkpoint}; scoring only")
    else:
        train_s, history, io = train(G, D, X, args, run)

    # every patch mapped to the latent space (§2.2) and scored (§2.3), one row per test patch
    sc, sv, st, timing, single = score_sets(G, D, X, P, x_val, x_tr, args, run)
    rows = patch_rows(S, P, sc)
    n = {"val": 0 if x_val is None else len(x_val), "train_eval": len(x_tr), "train": len(X)}
    extra = {**evaluation(rows, S, P, sc, sv, args, n, run), **single}
    examples = figures(run.out, args, S, P, sc, sv, st, x_tr, rows)
    titles = {"roc": f"AnoGAN A(x): patch-level ROC against normal scans, Γ={args.steps}",
              "losses": "DCGAN training (healthy patches)", "losses_ylabel": "cross-entropy / D",
              "examples_cols": ("input slice", "G(z_Γ) per patch", "residual |x − G(z_Γ)|", "ground truth")}
    return C.report(run, args, "patch", rows, {"train_s": train_s, **timing, "checkpoint_io": io},
                    extra=extra, data_info=data.info, val_scores=sv["A"], threshold_pct=args.threshold_pct,
                    history=history, examples=examples, titles=titles)


# =================================================================================================
# Appendix: the paper's figures (Fig. 3, Fig. 4), the examples and the mapping curve
# =================================================================================================

def figures(out, args, S, P, sc, sv, st, x_tr, rows):
    """fig3.png, fig4.png and mapping.png -> the rows of examples.png (C.report draws it)."""
    y, g = np.array([r["label"] for r in rows]), np.array([r["group"] for r in rows])
    normal = clean_mask(rows) & (y == 0)                                   # patches of normal scans
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
    h = sc["history"]                                                      # (N, Γ)
    C.plot_curves({"test patches of normal scans": list(enumerate(h[normal].mean(0).tolist(), 1))
                   if normal.any() else [],
                   "anomalous test patches": list(enumerate(h[y == 1].mean(0).tolist(), 1))
                   if (y == 1).any() else []},
                  out / "mapping.png", title="Mapping to the latent space, Eq. (5): mean L(z_γ)",
                  ylabel="L(z_γ)", xlabel="γ")
    return example_rows(S, P, sc, ["normal"] + anom)


def fig3_blocks(P, sc, st, x_tr, y, g, normal, anom, seed):
    """Fig. 3's blocks of patch columns: normal training patches, normal test patches, and per
    anomalous group the test patches with the most anomalous pixels."""
    rng = np.random.default_rng([seed, 2])

    def pick(sel, n):
        return list(rng.choice(np.nonzero(sel)[0], min(n, int(sel.sum())), replace=False)) if sel.any() else []

    def column(s, x, mask, i):                                            # s: the scores of set x
        return dict(x=x[i], g=s["G_z"][i], res=np.abs(x[i] - s["G_z"][i]), mask=mask[i], R=s["R"][i],
                    D=s["D"][i], A=s["A"][i])
    no_mask = np.zeros(x_tr.shape, bool)
    blocks = [("normal (train)", [column(st, x_tr, no_mask, i) for i in pick(np.ones(len(x_tr), bool), 3)]),
              ("normal (test)", [column(sc, P["x"], P["mask"], i) for i in pick(normal, 3)])]
    cols = []
    for gn in anom:
        sel = np.nonzero((g == gn) & (y == 1))[0]
        most = sel[np.argsort(-P["mask"][sel].reshape(len(sel), -1).sum(1), kind="stable")]
        cols += [column(sc, P["x"], P["mask"], i) for i in most[:2 if len(anom) < 4 else 1]]
    return blocks + [("anomalous (test): " + ", ".join(anom), cols)]


def example_rows(S, P, sc, groups):
    """examples.png: per group its first scan's slice with the most anomalous pixels, the patches'
    G(z_Γ) and residuals stitched together."""
    res = np.abs(P["x"] - sc["G_z"])                                      # residual images x_R (§2.3)
    out = []
    for want in groups:
        cand = [i for i, cs in enumerate(S.cases) if cs.group == want]
        if not cand:
            continue
        sl = S.slices_of(cand[0])
        best = max(sl, key=lambda r: (int(np.asarray(S.mask[r]).sum()), -abs(int(r) - int(sl[len(sl) // 2]))))
        rec, amap = assemble_slice(S, best, np.nonzero(P["row"] == best)[0], P, sc["G_z"], res)
        out.append(dict(title=f"{want}\n{S.cases[cand[0]].id.split('/')[-1]}", input=np.asarray(S.x[best]),
                        reconstruction=rec, amap=amap, gt=np.asarray(S.mask[best])))
    return out


def plot_fig3(blocks, thr_R, thr_D, path):
    """Fig. 3: columns of patches grouped in blocks; rows: query | generated | residual overlay |
    annotation; a red (yellow) bar above a column = flagged by R (D) at the healthy-validation threshold."""
    plt = C._plt()
    cols = [(b, e) for b, es in blocks for e in es]
    n = len(cols)
    fig, axes = plt.subplots(4, n, figsize=(1.25 * n + 0.9, 5.9), squeeze=False)
    rmax = max(float(np.percentile(np.concatenate([e["res"].ravel() for _, e in cols]), 99.5)), 1e-6)
    for j, (b, e) in enumerate(cols):
        panels = (e["x"], e["g"], e["res"], e["mask"])
        for i in range(4):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.imshow(e["x"] if i >= 2 else panels[i], cmap="gray", vmin=-1, vmax=1)
            if i == 2:
                ax.imshow(np.ma.masked_less(e["res"], 0.1 * rmax), cmap="jet", alpha=0.6, vmin=0, vmax=rmax)
            if i == 3 and e["mask"].any():
                ax.contour(e["mask"], levels=[0.5], colors="lime", linewidths=0.9)
        for k, (flag, col) in enumerate(((e["R"] >= thr_R, "red"), (e["D"] >= thr_D, "gold"))):
            axes[0, j].add_patch(plt.Rectangle((0, 1.03 + 0.09 * (1 - k)), 1, 0.07, transform=axes[0, j].transAxes,
                                               clip_on=False, facecolor=col if flag else "none",
                                               edgecolor=col, lw=0.6))
        axes[3, j].set_xlabel(f"A={e['A']:.0f}", fontsize=7)
    for i, name in enumerate(("query x", "generated G(z_Γ)", "residual |x−G(z_Γ)|", "annotation")):
        axes[i, 0].set_ylabel(name, fontsize=8)
    j = 0
    for b, es in blocks:
        axes[0, j].set_title(b, fontsize=8, loc="left", pad=16)
        j += len(es)
    fig.suptitle("Fig. 3 equivalent. Bars above a patch: red = flagged by the residual score R(x), yellow = by "
                 "the discrimination score D(x) (filled = above the healthy-validation threshold)", fontsize=9)
    C._save(fig, path)


def plot_fig4(y, sc, dist, path, title):
    """Fig. 4: (a) ROC of A (AnoGAN), Â (GAN_R), P_D; (b) ROC of R, D, D̂; (c, d) distributions of R
    and D over training-normal, test-normal and anomalous patches."""
    plt = C._plt()
    fig, ax = plt.subplots(1, 4, figsize=(18, 4.2), gridspec_kw=dict(wspace=0.32))
    panels = ((0, "(a) model comparison", (("AnoGAN A(x)", "A", "k"), ("GAN_R Â(x)", "A_hat", "tab:red"),
                                          ("P_D", "P_D", "tab:green"),
                                          ("brightest pixel (baseline)", "x_max", "tab:grey"))),
              (1, "(b) anomaly score components", (("R(x)", "R", "tab:green"), ("D(x)", "D", "k"),
                                                   ("D̂(x)" if "A_hat" in sc else "D̂(x) at AnoGAN's z_Γ", "D_hat", "tab:red"),
                                                   ("R_nn(x): nearest training patch", "R_nn", "tab:purple"))))
    for k, ttl, lines in panels:
        for name, key, col in lines:
            if key in sc:
                fpr, tpr, _ = C.roc_points(y, sc[key])
                ax[k].plot(fpr, tpr, color=col, lw=1.8, label=f"{name} ({C.auroc(y, sc[key]):.2f})")
        ax[k].plot([0, 1], [0, 1], "--", color="grey", lw=0.8)
        ax[k].set(xlabel="false positive rate", ylabel="true positive rate", title=ttl, xlim=(0, 1), ylim=(0, 1.01))
        ax[k].legend(loc="lower right", fontsize=8)
        ax[k].grid(alpha=0.3)
    for k, key, ttl in ((2, "R", "(c) residual score R(x)"), (3, "D", "(d) discrimination score D(x)")):
        allv = np.concatenate([v[key] for v in dist.values()])
        bins = np.linspace(allv.min(), np.percentile(allv, 99.5), 40)
        for (name, v), col in zip(dist.items(), ("tab:blue", "tab:green", "tab:red")):
            ax[k].hist(np.clip(v[key], None, bins[-1]), bins=bins, density=True, alpha=0.45, color=col,
                       label=f"{name} (n={len(v[key])})")
        ax[k].set(xlabel=key + "(x)", ylabel="density", title=ttl)
        ax[k].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    C._save(fig, path)


def assemble_slice(S, row, sel, P, G_z, res):
    """Stitch the patches of one slice back together (overlaps averaged) -> recon, residual maps."""
    H, W = S.x.shape[1:]
    c = G_z.shape[-1]
    rec, amap, cnt = np.zeros((H, W)), np.zeros((H, W)), np.zeros((H, W))
    for k in sel:
        t, l = P["top"][k], P["left"][k]
        rec[t:t + c, l:l + c] += G_z[k]
        amap[t:t + c, l:l + c] += res[k]
        cnt[t:t + c, l:l + c] += 1
    cov = cnt > 0
    rec = np.where(cov, rec / np.maximum(cnt, 1), -1.0)
    amap = np.where(cov, amap / np.maximum(cnt, 1), 0.0)
    return rec, amap


if __name__ == "__main__":
    C.main_guard(main)
