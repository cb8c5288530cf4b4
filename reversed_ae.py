"""Reversed Autoencoders (RA): pseudo-healthy reconstructions for unbiased pathology screening.

    Cosmin I. Bercea, Benedikt Wiestler, Daniel Rueckert, Julia A. Schnabel. "Generalizing
    Unsupervised Anomaly Detection: Towards Unbiased Pathology Screening." MIDL 2023, PMLR 227.
    https://openreview.net/forum?id=8ojx-Ld3yjR; reference code https://github.com/ci-ber/RA

A Soft-Intro VAE (encoder and decoder trained adversarially, no discriminator) whose encoder also
matches the multi-scale embeddings of an input and of its reconstruction (the "reversed" loss) is
trained on healthy T1w slices; its reconstruction of a scan is pseudo-healthy, and the anomaly map
is the histogram-equalised residual times two perceptual distances.

  Eq. (1)  ELBO(x) = E_q[log p(x|z)] - KL[q(z|x) || p(z)]                 neg_elbo, kl_divergence
  Eq. (2)  L_E = ELBO - 1/α exp(α ELBO(D(z))), L_D = ELBO + γ ELBO(D(z))   exp_elbo, decoder_loss
  Eq. (3)  L_Reversed = Σ_l 1 - cos(E^l(x), E^l(x_rec)) + ½ MSE(..)      reversed_embedding_loss
  Eq. (4)  L_E = ELBO(x) - 1/α exp(α ELBO(D(z))) - λ L_Reversed(x), λ = 5e-3   encoder_loss
  Eq. (5)  s(x) = |eq(x_ph) - eq(x)| · S(x_ph, x) · S(eq(x_ph), eq(x)), eq = CLAHE   anomaly_map
  §4.1, App. C.1  synthetic ellipses / copy-paste textures on normal slices (Table 1, Fig. 3)
  §4.2, App. C.2-3  slice AUROC (Table 2a); 5% healthy-pixel FPR threshold, TP when > 10% of a
           box is flagged, FP = Σ_healthy s / Σ_box s, F1 = 2·P·TP / (P + TP) (Table 2b, Fig. 7)
  App. D   Table 3: w/o reverse loss (--no-reverse, the SI-VAE backbone), w/o eq, w/o PL

Deviations from the paper
  1. S in Eq. (5) is LPIPS (SqueezeNet, ImageNet) under --preset paper; without the `lpips`
     package or its weights the run stops and names the fallbacks. quick/smoke use --perceptual
     fixed: LPIPS' distance (without its learned channel weights) on a frozen, untrained 3-level
     conv net seeded by a constant. Why: it keeps what the comparisons need from LPIPS, an S that
     does not depend on the trained weights (RA, SI-VAE and "w/o PL" are compared with one S), with
     no download and no training of its own; its values are not LPIPS's (Table 1). --perceptual
     encoder (the former default) is in-domain, but gives every model its own S.
  2. Data: the built-in T1 phantom stands in for FastMRI+/IXI; each scan is scaled by its tissue
     median (-> 1/3 of [0, 1], datasets.normalize_mri), not App. B's 98th percentile, which a bright
     lesion moves; --train-slices
     and --test-slices slices around the middle (paper: the middle one).
  3. Test units are slices: anomalous when they hold anomaly voxels (all of a scan without a mask);
     scans whose scored slices show none are left out. Image score = mean of the map (reference).
  4. The 5% FPR counts brain pixels of healthy validation slices (the reference code: all pixels);
     boxes bound the mask's components (no expert boxes); FP is floored as in Fig. 7 and divided by
     Σ_box s as written (the code: max(Σ_box s, 1)).
  5. x_ph = D(μ(x)) (the reference evaluator samples z).
  6. From the reference code, not the paper: α = 2, γ_r = 1e-8 on the reconstruction part of
     ELBO(D(z)) in L_D, expELBO averaged over D(E(x)) and D(z), terms scaled by 1/(C·H·W), S
     smoothed (σ = 2 px at 128²), latent size 128. App. A's β_Rec = 1, β_Neg = 256 (code: 0.5, 128).
  7. Early stopping keeps the weights of the lowest validation MSE (reference trainer); quick is
     scaled down (see QUICK). AUROCs have 95% intervals over scans; Table 3's ablations and RA vs
     SI-VAE (--compare-run) are differences paired over scans.

Run it
  python reversed_ae.py --out runs/ra                      # quick preset, phantom, a CPU
  python reversed_ae.py --no-reverse --out runs/sivae --compare-run runs/ra    # SI-VAE backbone
  python reversed_ae.py --preset paper --device cuda       # the paper's settings (a GPU job)
  python reversed_ae.py --data brats --modality t1 --train-data ixi --train-root IXI --preset paper

The quick preset's reconstructions are still blurry after 12 epochs, so its maps light up ventricles
and sulci; the measured tables (with the SI-VAE backbone) are in README.md and results/fidelity.md.
"""
from __future__ import annotations

import json
import math
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C
from data import datasets

METHOD = "reversed_ae"


# =================================================================================================
# Hyperparameters
# =================================================================================================

HYPER = dict(
    image_size=C.hp(128, "slice size H = W, App. B", lo=8),
    channels=C.hp("64,128,256,512,512", "encoder channels per level, comma-separated, App. A",
                  type=str),
    z_dim=C.hp(128, "latent size (reference config zdim; deviation 6)", lo=1),
    batch_size=C.hp(8, "batch size, App. A", lo=2),
    lr=C.hp(5e-5, "Adam learning rate of encoder and decoder, App. A", lo=1e-9, hi=1.0),
    epochs=C.hp(1500, "training epochs at most, App. A", lo=1),
    patience=C.hp(500, "early stopping: epochs without a lower validation MSE, App. A", lo=1),
    beta_rec=C.hp(1.0, "β_Rec, weight of the reconstruction term, App. A", lo=0),
    beta_kl=C.hp(1.0, "β_KL, weight of the KL of real images, App. A", lo=0),
    beta_neg=C.hp(256.0, "β_Neg, weight of the KL of generated images in expELBO, App. A", lo=0),
    alpha=C.hp(2.0, "α in Eq. (2) (Soft-Intro VAE reference code)", lo=1e-6),
    gamma_r=C.hp(1e-8, "γ in Eq. (2), on the reconstruction of generated images (reference code)",
                 lo=0),
    lam=C.hp(5e-3, "λ, weight of L_Reversed in Eq. (4), §3", lo=0),
    reverse=C.hp(True, "the reversed embedding loss; --no-reverse (λ = 0) is the SI-VAE backbone, "
                       "Table 3 'w/o Reverse Loss'"),
    perceptual=C.hp("lpips", "S in Eq. (5): lpips = the paper's LPIPS (needs the `lpips` package "
                             "and its weights); fixed = an LPIPS-style distance on a frozen "
                             "untrained net, the same for every model; encoder = on the trained "
                             "encoder (deviation 1); none = Table 3 'w/o PL'",
                    choices=["lpips", "fixed", "encoder", "none"]),
    eq=C.hp(True, "histogram equalisation in Eq. (5); --no-eq is Table 3 'w/o Hist. Eq.'"),
    clahe_clip=C.hp(0.01, "clip limit of CLAHE, eq in Eq. (5) (skimage default, reference code)",
                    lo=1e-6, hi=1.0),
    saliency_sigma=C.hp(2.0, "Gaussian σ (px) smoothing the perceptual maps (reference code, at "
                             "128 px)", lo=0),
    augment=C.hp(True, "the App. B affine training augmentation"),
    train_slices=C.hp(1, "axial slices per training volume around the middle, App. B (the middle "
                         "one)", lo=1),
    test_slices=C.hp(1, "axial slices per validation/test volume around the middle, §4", lo=1),
    fpr=C.hp(0.05, "pixel false-positive rate on healthy validation slices that sets the "
                   "threshold, §4.2", lo=1e-6, hi=1.0),
    detect_frac=C.hp(0.1, "a lesion is detected when more than this fraction of its box is "
                          "flagged, §4.2", lo=0, hi=1.0),
    compare_run=C.hp(None, "not a hyperparameter: a run directory of this script on the same data "
                           "(e.g. the --no-reverse SI-VAE run) to compare with, paired over cases",
                     type=str, metavar="RUN_DIR"),
)
# quick: 64×64 slices, a 5-level network of 1/8 the width, 12 epochs over 5 slices per volume,
# lr 10x (so that it learns something in minutes on 2 CPU cores); S is the fixed net (no download)
QUICK = dict(image_size=64, channels="8,16,32,64,64", z_dim=64, batch_size=16, lr=5e-4, epochs=12,
             perceptual="fixed", saliency_sigma=1.0, train_slices=5, test_slices=5)
SMOKE = dict(image_size=32, channels="4,8,16", z_dim=16, batch_size=8, lr=5e-4, epochs=2,
             perceptual="fixed", saliency_sigma=0.5, train_slices=2, test_slices=1)


def check_args(args):
    try:
        args.channel_list = [int(c) for c in str(args.channels).split(",")]
    except ValueError:
        C.fail(f"--channels must be comma-separated integers, got {args.channels!r}")
    if not args.channel_list or min(args.channel_list) < 1:
        C.fail(f"--channels must be positive integers, got {args.channels!r}")
    if args.image_size % (2 ** len(args.channel_list)):
        C.fail(f"--image-size {args.image_size} must be divisible by 2^{len(args.channel_list)} "
               f"(one halving per level of --channels {args.channels})")
    if args.compare_run and not all((Path(args.compare_run) / f).is_file()
                                    for f in ("scores.csv", "config.json")):
        C.fail(f"--compare-run {args.compare_run}: no scores.csv and config.json there; pass the "
               f"--out of a finished run of this script")
    if not args.reverse:
        args.lam = 0.0


def model_name(a):
    return "RA" if float(a.get("lam", 1)) > 0 else "SI-VAE (--no-reverse)"


def parse_args(argv=None):
    return C.parse_args(argv, HYPER, {"quick": QUICK, "smoke": SMOKE}, method=METHOD, doc=__doc__,
                        check=check_args)


# =================================================================================================
# Networks (Fig. 2; App. A: the Soft-Intro VAE of the reference code, model_zoo/ra.py)
# =================================================================================================

class ResidualBlock(nn.Module):
    """conv3x3-BN-LReLU-conv3x3-BN + (1x1 projection of) the input, then LReLU (IntroVAE block)."""

    def __init__(self, *, c_in: int, c_out: int):
        super().__init__()
        self.skip = nn.Conv2d(c_in, c_out, 1, bias=False) if c_in != c_out else nn.Identity()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out))
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x):
        return self.act(self.body(x) + self.skip(x))


class Encoder(nn.Module):
    """q_φ(z|x): one level per entry of `channels`, each ending in a 2x average pooling; the
    pooled outputs are the multi-scale embeddings E^l(x) of Eq. (3).
    -> μ, log σ², [E^0(x), ..., E^L(x)]."""

    def __init__(self, *, channels, z_dim: int, image_size: int):
        super().__init__()
        c0 = channels[0]
        self.stem = nn.Sequential(nn.Conv2d(1, c0, 5, 1, 2, bias=False), nn.BatchNorm2d(c0),
                                  nn.LeakyReLU(0.2), nn.AvgPool2d(2))
        self.levels = nn.ModuleList(nn.Sequential(ResidualBlock(c_in=a, c_out=b), nn.AvgPool2d(2))
                                    for a, b in zip(channels[:-1], channels[1:]))
        self.out_block = ResidualBlock(c_in=channels[-1], c_out=channels[-1])
        self.s = image_size // 2 ** len(channels)                     # side of the last level
        self.fc = nn.Linear(channels[-1] * self.s * self.s, 2 * z_dim)

    def forward(self, x):                                             # x: (B, 1, H, W) in [0, 1]
        h = self.stem(x)                                              # (B, c0, H/2, W/2)
        feats = [h]
        for level in self.levels:
            h = level(h)                                              # (B, c_l, H/2^(l+1), ..)
            feats.append(h)
        h = self.out_block(h).flatten(1)                              # (B, c_L·s·s)
        mu, logvar = self.fc(h).chunk(2, dim=1)                       # (B, z_dim) each
        return mu, logvar, feats


class Decoder(nn.Module):
    """p_θ(x|z): fc -> (c_L, s, s), then one residual block + 2x nearest upsampling per level, a
    last residual block, a 5x5 conv to one channel and a sigmoid (App. A: "final sigmoid
    activation")."""

    def __init__(self, *, channels, z_dim: int, image_size: int):
        super().__init__()
        self.c, self.s = channels[-1], image_size // 2 ** len(channels)
        self.fc = nn.Sequential(nn.Linear(z_dim, self.c * self.s * self.s), nn.ReLU())
        layers, cc = [], channels[-1]
        for ch in channels[::-1]:
            layers += [ResidualBlock(c_in=cc, c_out=ch),
                       nn.Upsample(scale_factor=2, mode="nearest")]
            cc = ch
        layers += [ResidualBlock(c_in=cc, c_out=cc), nn.Conv2d(cc, 1, 5, 1, 2), nn.Sigmoid()]
        self.main = nn.Sequential(*layers)

    def forward(self, z):                                             # z: (B, z_dim)
        h = self.fc(z).view(-1, self.c, self.s, self.s)               # (B, c_L, s, s)
        return self.main(h)                                           # (B, 1, H, W) in (0, 1)


class SoftIntroVAE(nn.Module):
    """Encoder E_φ and decoder D_θ trained adversarially by Eq. (2)/(4); RA adds Eq. (3)."""

    def __init__(self, *, channels, z_dim: int, image_size: int):
        super().__init__()
        self.z_dim = z_dim
        self.encoder = Encoder(channels=channels, z_dim=z_dim, image_size=image_size)
        self.decoder = Decoder(channels=channels, z_dim=z_dim, image_size=image_size)

    @torch.no_grad()
    def pseudo_healthy(self, x):
        """x_ph = D(μ(x)): the deterministic reconstruction used for scoring (deviation 5)."""
        mu, _, _ = self.encoder(x)
        return self.decoder(mu)


def reparameterize(mu, logvar):
    """z = μ + σ·ε, ε ~ N(0, I) (Kingma & Welling, 2013)."""
    return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)


# =================================================================================================
# Losses (Eq. 1-4): the paper maximises its objectives; these functions return what we minimise
# =================================================================================================

def kl_divergence(mu, logvar):
    """Per-sample KL[q(z|x) || N(0, I)], the KL term of Eq. (1). mu, logvar: (B, Z) -> (B,)."""
    # KL = -½ Σ_j (1 + log σ_j² - μ_j² - σ_j²)
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)


def reconstruction_error(x, x_rec):
    """Per-sample Σ_pixels (x - x_rec)²: -log p(x|z) of a Gaussian decoder, up to constants.
    -> (B,)"""
    return (x - x_rec).pow(2).flatten(1).sum(dim=1)


def neg_elbo(x, x_rec, mu, logvar, *, beta_rec, beta_kl, scale):
    """-ELBO per sample, Eq. (1) weighted: scale·(β_rec·||x - x_rec||² + β_kl·KL) -> (B,).
    scale = 1/(C·H·W) normalises by the image size, as in the Soft-Intro VAE code."""
    # Eq. (1): ELBO(x) = E_q[log p(x|z)] - KL[q(z|x) || p(z)]
    return scale * (beta_rec * reconstruction_error(x, x_rec) + beta_kl * kl_divergence(mu, logvar))


def exp_elbo(nelbo, *, alpha):
    """1/α · exp(α · ELBO(D(z))), averaged over the batch, with ELBO = -nelbo (Eq. 2)."""
    # Eq. (2): the encoder pushes generated images away: it minimises 1/α · exp(α · ELBO(D(z)))
    return (1.0 / alpha) * torch.exp(-alpha * nelbo).mean()


def reversed_embedding_loss(feats_x, feats_rec):
    """Eq. (3), summed over encoder levels l: the batch mean of 1 - cos(E^l(x), E^l(x_rec)) on the
    flattened embeddings, plus ½ · MSE(E^l(x), E^l(x_rec)) (mean over all elements)."""
    total = 0.0
    for e_x, e_rec in zip(feats_x, feats_rec):
        cos = F.cosine_similarity(e_x.flatten(1), e_rec.flatten(1), dim=1)       # (B,)
        # Eq. (3): L_Reversed(x) = Σ_l (1 - L_Sim(E^l(x), E^l(x_rec))) + ½ MSE(E^l(x), E^l(x_rec))
        total = total + (1 - cos).mean() + 0.5 * F.mse_loss(e_x, e_rec)
    return total


def encoder_loss(nelbo_real, nelbo_rec, nelbo_fake, l_reversed, *, alpha, lam):
    """-L_E of Eq. (4): -ELBO(x) + 1/α·exp(α·ELBO(D(z))) + λ·L_Reversed(x). The expELBO term
    is averaged over the two kinds of generated images: reconstructions D(E(x)) and samples D(z)."""
    # Eq. (4): L_E(x, z) = ELBO(x) - 1/α (exp(α ELBO(D_θ(z))) + λ L_Reversed(x))   (maximised)
    exp_term = 0.5 * (exp_elbo(nelbo_rec, alpha=alpha) + exp_elbo(nelbo_fake, alpha=alpha))
    return nelbo_real.mean() + exp_term + lam * l_reversed


def decoder_loss(rec_real, kl_rec, kl_fake, rec_rec, rec_fake, *, beta_rec, beta_kl, gamma_r,
                 scale):
    """-L_D of Eq. (2): -ELBO(x) - γ·ELBO(D(z)). As in the reference code, the decoder's
    -ELBO(x) keeps only the reconstruction term (the KL of x does not depend on θ) and -ELBO(D(z))
    is averaged over reconstructions and samples, with β_KL on its KL and γ_r·β_Rec on its
    reconstruction term. All inputs (B,)."""
    # Eq. (2): L_D(x, z) = ELBO(x) + γ ELBO(D_θ(z))   (maximised)
    fake_kl = 0.5 * beta_kl * (kl_rec.mean() + kl_fake.mean())
    fake_rec = 0.5 * gamma_r * beta_rec * (rec_rec.mean() + rec_fake.mean())
    return scale * (beta_rec * rec_real.mean() + fake_kl + fake_rec)


# =================================================================================================
# Anomaly score (Eq. 5), score() on a set, and the localisation rule of §4.2
# =================================================================================================

def clahe(x, clip_limit=0.01):
    """eq(.) of Eq. (5): contrast-limited adaptive histogram equalisation (skimage, as the reference
    code) of each image, all at once. x: (B, H, W) numpy in [0, 1] -> (B, H, W) float32."""
    return C.equalize_adapthist(np.clip(x, 0, 1), clip_limit=clip_limit).astype(np.float32)


def feature_distance(fa, fb, size):
    """An LPIPS-style map from two lists of feature maps (LPIPS' Eq. 1 without learned channel
    weights): per level l, d_l = Σ_c (ê^l_c(a) - ê^l_c(b))² with ê unit-normalised over channels,
    upsampled (bilinear) to `size`; S(a, b) = mean_l d_l. -> (B, H, W) numpy"""
    d = 0
    for ea, eb in zip(fa, fb):
        ea = ea / (ea.norm(dim=1, keepdim=True) + 1e-10)              # (B, c_l, h_l, w_l)
        eb = eb / (eb.norm(dim=1, keepdim=True) + 1e-10)
        dl = (ea - eb).pow(2).sum(dim=1, keepdim=True)                # (B, 1, h_l, w_l) in [0, 4]
        d = d + F.interpolate(dl, size=size, mode="bilinear", align_corners=False)
    return (d / len(fa))[:, 0].float().cpu().numpy()


class EncoderDistance:
    """S on the trained encoder's levels E^l (--perceptual encoder, deviation 1): no download, but
    it changes with the trained weights, so two models are scored with two different S."""

    name = "encoder"

    def __init__(self, encoder):
        self.encoder = encoder

    @torch.no_grad()
    def __call__(self, a, b):                                         # a, b: (B, 1, H, W) in [0, 1]
        was_training = self.encoder.training
        self.encoder.eval()
        _, _, fa = self.encoder(a)
        _, _, fb = self.encoder(b)
        self.encoder.train(was_training)
        return feature_distance(fa, fb, a.shape[-2:])


class FixedDistance:
    """S on one frozen, untrained conv net, the same for every model and run (--perceptual fixed,
    deviation 1): 3 levels of 3x3 conv (16, 32, 64 channels, He-normal weights from seed 0 whatever
    --seed) + ReLU + 2x average pooling, on the image mapped to [-1, 1] as for LPIPS."""

    name = "fixed"

    def __init__(self, device, channels=(16, 32, 64), seed=0):
        g, c, self.weights = torch.Generator().manual_seed(seed), 1, []   # not the global stream
        for ch in channels:
            self.weights.append((torch.randn(ch, c, 3, 3, generator=g) * math.sqrt(2 / (9 * c)))
                                .to(device))
            c = ch

    def features(self, x):
        h, out = 2 * x - 1, []
        for w in self.weights:
            h = F.avg_pool2d(F.relu(F.conv2d(h, w, padding=1)), 2)   # (B, c_l, H/2^(l+1), ..)
            out.append(h)
        return out

    @torch.no_grad()
    def __call__(self, a, b):                                         # a, b: (B, 1, H, W) in [0, 1]
        return feature_distance(self.features(a), self.features(b), a.shape[-2:])


class LPIPSDistance:
    """The paper's S: LPIPS (Zhang et al., 2018) with a SqueezeNet backbone as a spatial map, as in
    the reference evaluator; trained on natural images, frozen, the same for every model."""

    name = "lpips"

    def __init__(self, device):
        self.net = load_lpips(device)

    @torch.no_grad()
    def __call__(self, a, b):                                         # a, b: (B, 1, H, W) in [0, 1]
        # LPIPS takes RGB; normalize=True maps [0, 1] to the [-1, 1] it was trained on
        d = self.net(a.repeat(1, 3, 1, 1), b.repeat(1, 3, 1, 1), normalize=True)   # (B, 1, H, W)
        return d[:, 0].float().cpu().numpy()


def load_lpips(device):
    """lpips.LPIPS(net="squeeze", spatial=True), frozen; without the package or its weights one
    error line that names the fallback. The `lpips` package is optional, never a requirement."""
    fallback = ("or run without it: --perceptual fixed (a frozen untrained net, the same S for "
                "every model) or --perceptual encoder (deviation 1)")
    try:
        import lpips
    except ImportError:
        C.fail(f"--perceptual lpips (S in Eq. 5, the default of --preset paper) needs the optional "
               f"package `lpips` (pip install lpips; its SqueezeNet weights download on first "
               f"use); {fallback}")
    try:
        net = lpips.LPIPS(net="squeeze", spatial=True, pretrained=True, verbose=False)
    except Exception as e:  # noqa: BLE001 -- no network, no cached weights
        C.fail(f"--perceptual lpips: cannot load the LPIPS weights ({type(e).__name__}: "
               f"{str(e).splitlines()[0][:120] if str(e) else ''}); download them once with "
               f"internet access, {fallback}")
    return net.to(device).eval().requires_grad_(False)


SHARED_S = ("lpips", "fixed")   # perceptual networks that do not depend on the trained weights


def perceptual_distance(args, model, device, lpips=None):
    """S of Eq. (5) per --perceptual (None for "none"): lpips and fixed are one frozen network for
    every model; encoder is the model's own."""
    if args.perceptual == "fixed":
        return FixedDistance(device)
    if args.perceptual == "encoder":
        return EncoderDistance(model.encoder)
    return lpips                           # the LPIPSDistance built before training, or None


def smooth_maps(m, sigma):
    """Gaussian smoothing of each (H, W) map of m (B, H, W), as the reference code does for S."""
    from scipy.ndimage import gaussian_filter
    return gaussian_filter(m, sigma=(0, sigma, sigma)) if sigma and sigma > 0 else m


def eq5_terms(x, x_ph, perceptual=None, *, clip_limit=0.01, sigma=2.0):
    """The factors of Eq. (5) for x, x_ph (B, 1, H, W) in [0, 1]: residuals with and without eq, and
    S(x_ph, x), S(eq(x_ph), eq(x)) (None without S) -> dict of (B, H, W) numpy."""
    xn, pn = x[:, 0].float().cpu().numpy(), x_ph[:, 0].float().cpu().numpy()
    ex, ep = clahe(xn, clip_limit), clahe(pn, clip_limit)
    t = {"res": np.abs(pn - xn), "res_eq": np.abs(ep - ex), "S": None, "S_eq": None}
    if perceptual is not None:
        as_t = lambda a: torch.from_numpy(a)[:, None].to(x.device)     # noqa: E731  (B, 1, H, W)
        t["S"] = smooth_maps(perceptual(x_ph, x), sigma)
        t["S_eq"] = smooth_maps(perceptual(as_t(ep), as_t(ex)), sigma)
    return t


def combine_eq5(t, *, eq=True, pl=True):
    """Eq. (5) and its Table 3 ablations from the factors of eq5_terms:
         eq & PL : |eq(x_ph) - eq(x)| · S(x_ph, x) · S(eq(x_ph), eq(x))  (RA)
         PL only : |x_ph - x| · S(x_ph, x)                               (w/o Hist. Eq.)
         eq only : |eq(x_ph) - eq(x)|                                    (w/o PL)
         neither : |x_ph - x|                                            (w/o Hist. Eq. & w/o PL)"""
    if pl and t["S"] is not None:
        # Eq. (5): s(x) = |eq(x_ph) - eq(x)| · S_lpips(x_ph, x) · S_lpips(eq(x_ph), eq(x))
        return t["res_eq"] * t["S"] * t["S_eq"] if eq else t["res"] * t["S"]
    return t["res_eq"] if eq else t["res"]


VARIANTS = {  # Table 3 rows: name -> (histogram equalisation, perceptual term, scores.csv column)
    "Eq. 5 (eq + PL)": (True, True, "s_eq5"), "w/o Hist. Eq.": (False, True, "s_wo_eq"),
    "w/o PL": (True, False, "s_wo_pl"), "w/o Hist. Eq. & w/o PL": (False, False, "s_neither")}


def anomaly_map(x, x_ph, perceptual=None, *, eq=True, clip_limit=0.01, sigma=2.0):
    """Eq. (5) for a batch: x, x_ph (B, 1, H, W) in [0, 1] -> s (B, H, W) numpy."""
    t = eq5_terms(x, x_ph, perceptual, clip_limit=clip_limit, sigma=sigma)
    return combine_eq5(t, eq=eq, pl=perceptual is not None)


def image_score(s):
    """Image-level anomaly score: the mean of the map (reference evaluator). (B, H, W) -> (B,)."""
    return s.reshape(len(s), -1).mean(axis=1)


@torch.no_grad()
def score(model, perceptual, x01, args, device, bs=32):
    """The trained model applied to a set: x01 (N, H, W) in [0, 1] -> the pseudo-healthy x_ph
    (N, H, W) and the factors of Eq. (5) {res, res_eq, S, S_eq}, (N, H, W) each (S, S_eq None
    without S)."""
    model.eval()
    phs, terms = [], []
    for i in range(0, len(x01), bs):
        xb = torch.from_numpy(np.array(x01[i:i + bs], dtype=np.float32))[:, None].to(device)
        # xb: (B, 1, H, W)
        with C.autocast(device, args.amp):
            ph = model.pseudo_healthy(xb).float().clamp(0, 1)
        phs.append(ph[:, 0].cpu().numpy())
        terms.append(eq5_terms(xb, ph, perceptual, clip_limit=args.clahe_clip,
                               sigma=args.saliency_sigma))
    cat = {k: (np.concatenate([t[k] for t in terms]) if terms[0][k] is not None else None)
           for k in terms[0]}
    return np.concatenate(phs), cat


def threshold_at_fpr(maps, brain, fpr=0.05):
    """Threshold flagging at most a fraction `fpr` of the brain pixels of HEALTHY validation
    slices (§4.2): the (n - k)-th smallest value, k = floor(fpr·n), so that at most k pixels lie
    strictly above it (an interpolated 95th percentile can flag slightly more than 5%)."""
    v = np.sort(np.asarray(maps, dtype=np.float64)[np.asarray(brain) > 0])
    if not len(v):
        C.fail("no brain pixels in the healthy validation slices: cannot set the 5% FPR threshold")
    k = int(math.floor(fpr * len(v) + 1e-9))
    return float(v[len(v) - k - 1]) if k < len(v) else float(v[0] - 1.0)


def lesion_boxes(mask):
    """Union of the bounding boxes of the connected components of a 2D mask (stands in for the
    expert bounding boxes of FastMRI+). (H, W) -> bool (H, W)."""
    from scipy import ndimage as ndi
    lab, _ = ndi.label(mask > 0, structure=np.ones((3, 3)))            # 8-connected components
    box = np.zeros(mask.shape, bool)
    for sl in ndi.find_objects(lab):
        box[sl] = True
    return box


def localization_metrics(s, box, healthy, threshold, detect_frac=0.1):
    """§4.2 for one image: s (H, W) anomaly map, box / healthy boolean masks.
    TP = 1 if more than detect_frac of the box pixels exceed the threshold;
    FP = floor(Σ_healthy s_thr / Σ_box s_thr) (Fig. 7: 13.95 / 3.16 -> 4), s_thr = s where
    s > threshold;
    P = TP / (TP + FP); F1 = 2·P·TP / (P + TP)."""
    s_thr = np.where(s > threshold, s, 0.0)
    flagged_in_box = int((s_thr[box] > 0).sum())
    tp = int(flagged_in_box > detect_frac * box.sum())
    sum_box, sum_healthy = float(s_thr[box].sum()), float(s_thr[healthy].sum())
    # §4.2: FP = Σ_{h=0}^{H} s_h / Σ_{a=0}^{A} s_a
    fp = int(math.floor(sum_healthy / sum_box)) if sum_box > 0 else int(sum_healthy > 0)
    precision = tp / (tp + fp) if tp + fp > 0 else 0.0
    # §4.2: F1 = (2 × P × TP) / (P + TP)
    f1 = 2 * precision * tp / (precision + tp) if precision + tp > 0 else 0.0
    return {"tp": tp, "fp": fp, "precision": precision, "f1": f1, "sum_box": sum_box,
            "sum_healthy": sum_healthy}


def localize(s_val, brain_val, maps, boxes, brains, args):
    """§4.2 on a set: the threshold that flags --fpr of the healthy validation brain pixels, then
    localization_metrics of every map with lesion boxes. -> (threshold, {index: metrics})"""
    thr = threshold_at_fpr(s_val, brain_val, args.fpr)
    return thr, {i: localization_metrics(maps[i], b, (np.asarray(brains[i]) > 0) & ~b, thr,
                                         args.detect_frac) for i, b in boxes.items()}


def summarize_localization(loc, groups):
    """Table 2b per group and in all: detected / n, the mean FP ratio and (§4.2) the mean F1,
    F̄1 = 1/N Σ_i 2·P_i·TP_i / (P_i + TP_i), over the N annotated slices."""
    out = {}
    for g in sorted({groups[i] for i in loc}) + (["all"] if loc else []):
        v = [loc[i] for i in loc if g in ("all", groups[i])]
        out[g] = {"n": len(v), "detected": int(sum(r["tp"] for r in v)),
                  "f1_mean": float(np.mean([r["f1"] for r in v])),
                  "fp_mean": float(np.mean([r["fp"] for r in v]))}
    return out


# =================================================================================================
# Training (the Soft-Intro VAE updates of the reference trainer + the reversed loss of Eq. 3/4)
# =================================================================================================

def to01(x):
    """[-1, 1] slices (common.slice_stack) -> [0, 1] for the sigmoid decoder."""
    return (x + 1) * 0.5


def set_requires_grad(module, flag):
    for p in module.parameters():
        p.requires_grad_(flag)


def train_step(model, x, opt_e, opt_d, hp, device, amp=False):
    """One encoder update (Eq. 4), then one decoder update (Eq. 2), on x (B, 1, H, W) in [0, 1]."""
    B = x.shape[0]
    scale = 1.0 / x[0].numel()                                        # 1 / (C·H·W)
    enc, dec = model.encoder, model.decoder
    noise = torch.randn(B, model.z_dim, device=device)                # z ~ p(z) = N(0, I)
    nel = dict(beta_rec=hp.beta_rec, scale=scale)

    # ---- encoder E_φ: maximise Eq. (4) -------------------------------------------------------
    set_requires_grad(enc, True)
    set_requires_grad(dec, False)
    with C.autocast(device, amp):
        with torch.no_grad():
            fake = dec(noise)                                         # D(z): (B, 1, H, W)
        mu, logvar, feats_x = enc(x)                                  # E^l(x)
        z = reparameterize(mu, logvar)
        x_rec = dec(z)                                                # x_rec = D(E(x))
        mu_r, logvar_r, feats_rec = enc(x_rec.detach())               # E^l(x_rec)
        rec_rec = dec(reparameterize(mu_r, logvar_r))
        mu_f, logvar_f, _ = enc(fake)
        fake_rec = dec(reparameterize(mu_f, logvar_f))
    f32 = lambda *ts: [t.float() for t in ts]          # noqa: E731  (losses in float32 under --amp)
    x_rec, rec_rec, fake_rec, mu, logvar, mu_r, logvar_r, mu_f, logvar_f = f32(
        x_rec, rec_rec, fake_rec, mu, logvar, mu_r, logvar_r, mu_f, logvar_f)
    nelbo_real = neg_elbo(x, x_rec, mu, logvar, beta_kl=hp.beta_kl, **nel)
    nelbo_rec = neg_elbo(x_rec, rec_rec, mu_r, logvar_r, beta_kl=hp.beta_neg, **nel)
    nelbo_fake = neg_elbo(fake.float(), fake_rec, mu_f, logvar_f, beta_kl=hp.beta_neg, **nel)
    # Eq. (3) on the embeddings of x and of its reconstruction (λ = 0: the SI-VAE backbone)
    l_rev = reversed_embedding_loss([f.float() for f in feats_x], [f.float() for f in feats_rec]) \
        if hp.lam > 0 else torch.zeros((), device=device)
    loss_e = encoder_loss(nelbo_real, nelbo_rec, nelbo_fake, l_rev, alpha=hp.alpha, lam=hp.lam)
    opt_e.zero_grad(set_to_none=True)
    loss_e.backward()
    opt_e.step()

    # ---- decoder D_θ: maximise Eq. (2) -------------------------------------------------------
    set_requires_grad(enc, False)
    set_requires_grad(dec, True)
    with C.autocast(device, amp):
        fake = dec(noise)
        x_rec = dec(z.detach())
        mu_r, logvar_r, _ = enc(x_rec)
        mu_f, logvar_f, _ = enc(fake)
        rec_rec = dec(reparameterize(mu_r, logvar_r).detach())
        fake_rec = dec(reparameterize(mu_f, logvar_f).detach())
    fake, x_rec, rec_rec, fake_rec, mu_r, logvar_r, mu_f, logvar_f = f32(
        fake, x_rec, rec_rec, fake_rec, mu_r, logvar_r, mu_f, logvar_f)
    loss_d = decoder_loss(reconstruction_error(x, x_rec), kl_divergence(mu_r, logvar_r),
                          kl_divergence(mu_f, logvar_f),
                          reconstruction_error(x_rec.detach(), rec_rec),
                          reconstruction_error(fake.detach(), fake_rec), beta_rec=hp.beta_rec,
                          beta_kl=hp.beta_kl, gamma_r=hp.gamma_r, scale=scale)
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()
    set_requires_grad(enc, True)
    return {"loss_E": loss_e.detach(), "loss_D": loss_d.detach(), "L_reversed": l_rev.detach(),
            "mse": (x - x_rec.detach()).pow(2).mean(),
            "kl_real": kl_divergence(mu, logvar).mean().detach(),
            "kl_fake": kl_divergence(mu_f, logvar_f).mean().detach()}


@torch.no_grad()
def val_mse(model, x_val, device):
    """MSE of the pseudo-healthy reconstructions of healthy validation slices (model selection)."""
    model.eval()
    err = [(model.pseudo_healthy(xb) - xb).pow(2).mean(dim=(1, 2, 3)).cpu() for xb in
           (to01(torch.from_numpy(np.array(x_val[i:i + 64], dtype=np.float32))[:, None].to(device))
            for i in range(0, len(x_val), 64))]
    model.train()
    return float(torch.cat(err).mean())


def train_batch(S_train, idx, args, augment, device):
    """The healthy training slices `idx`, augmented (App. B, training only). -> (B, 1, H, W)"""
    x = torch.from_numpy(np.array(S_train.x[np.sort(idx)], dtype=np.float32))[:, None]   # [-1, 1]
    if args.augment:
        # App. B: rotation up to 10°, translation up to 0.1, scaling 0.9-1.1, horizontal flips p=0.5
        x = C.augment_2d(x, rot_deg=10, translate=0.1, scale=(0.9, 1.1), hflip=0.5,
                         generator=augment)
    return to01(x).clamp(0, 1).to(device)


def early_stopping(model, S_val, best, loop, run):
    """After each epoch (App. A): keep the weights with the lowest validation MSE (reference
    trainer) and count the epochs since; `best` lives in loop.state, so a resumed run continues
    it exactly."""
    v = val_mse(model, S_val.x, run.device)
    loop.log({"val_mse": v}, every=1)
    best["epoch"] += 1
    if best["val_mse"] is None or v < best["val_mse"]:
        best.update(val_mse=v, since=0, best_epoch=best["epoch"],
                    weights={k: t.detach().clone() for k, t in model.state_dict().items()})
    else:
        best["since"] += 1
    run.log(f"epoch {best['epoch']}: validation MSE {v:.4f}"
            f"{'  (best)' if best['since'] == 0 else ''}")


def train(model, S_train, S_val, args, run):
    """Adam on encoder and decoder (App. A) over shuffled minibatches of healthy slices; after every
    epoch the validation MSE keeps the best weights; early stopping after --patience epochs without
    a new best. -> (loop, training seconds); the model holds the best weights."""
    opt_e = torch.optim.Adam(model.encoder.parameters(), lr=args.lr)
    opt_d = torch.optim.Adam(model.decoder.parameters(), lr=args.lr)
    batches = C.Batches(len(S_train.x), args.batch_size, args.seed)
    augment = torch.Generator().manual_seed(args.seed)              # App. B augmentation draws
    loop = C.Loop(run, args, {"ra": model}, {"E": opt_e, "D": opt_d}, batches={"train": batches},
                  generators={"augment": augment}, log_every=max(1, batches.steps_per_epoch // 10))
    best = loop.state.setdefault("early_stopping", dict(val_mse=None, weights=None, since=0,
                                                        epoch=0, best_epoch=0))
    model.train()
    for _ in loop.phase("train", args.epochs * batches.steps_per_epoch):
        if best["since"] >= args.patience:
            run.log(f"early stopping: no lower validation MSE for {args.patience} epochs")
            break
        x = train_batch(S_train, next(batches), args, augment, run.device)
        loop.log(train_step(model, x, opt_e, opt_d, args, run.device, amp=args.amp))
        if batches.epoch_done:
            early_stopping(model, S_val, best, loop, run)
    train_s = loop.close()
    if best["weights"] is not None:
        model.load_state_dict(best["weights"])
    return loop, train_s


def load_trained(args, model, run):
    """--checkpoint: the best weights of a finished run into `model` (C.load_models: the last.pt of
    another script or of other network flags is one error line) -> what main reports of training."""
    ck = C.load_models(args.checkpoint, {"ra": model}, METHOD)
    state = ck.get("loop") or {}                  # (a last.pt from before C.Loop has best_state)
    best = state.get("early_stopping") or {"weights": ck.get("best_state")}
    if best.get("weights") is not None:
        model.load_state_dict(best["weights"])
    if Path(args.checkpoint).resolve() != (run.out / "last.pt").resolve():
        C.save_checkpoint(run.out / "last.pt", ck)
    run.log(f"scoring with {args.checkpoint}")
    return dict(history=ck.get("history", {}), state=state, io=None, train_s=0.0, n_slices=None)


# =================================================================================================
# Scoring and evaluation
# =================================================================================================

# ---- §4.1 / App. C.1: synthetic anomalies on held-out normal slices (Table 1) -------------------

def synthetic_intensity_anomaly(img, brain, rng):
    """Three ellipses per image (App. C.1): intensities uniform between the 1st-5th (hypo),
    30th-70th (mean-ranged) and 95th-99th (hyper) percentiles of the tissue (brain) intensities;
    semi-axes ~ N(10, 1) clipped to [8, 12] px, centres uniform in [32, 96] px, angle uniform in
    [0, 360) degrees (lengths for 128 px, scaled). img, brain: (H, W) -> (image, painted mask)."""
    from skimage.draw import ellipse
    H, W = img.shape
    k = H / 128.0
    tissue = img[brain > 0] if brain.any() else img.ravel()
    out, mask = img.astype(np.float32).copy(), np.zeros((H, W), bool)
    for lo, hi in ((1, 5), (30, 70), (95, 99)):
        p_lo, p_hi = np.percentile(tissue, [lo, hi])
        value = rng.uniform(p_lo, p_hi)
        r_ax, c_ax = np.clip(rng.normal(10, 1, size=2), 8, 12) * k
        r_c, c_c = rng.uniform(32, 96, size=2) * k
        rr, cc = ellipse(r_c, c_c, r_ax, c_ax, shape=(H, W), rotation=rng.uniform(0, 2 * np.pi))
        out[rr, cc] = value
        mask[rr, cc] = True
    return out, mask


def synthetic_texture_anomaly(img, brain, rng):
    """'Copy-paste' texture anomaly (App. C.1): a rectangle of width and height uniform in [25, 50]
    px copied from a random source to a random destination, x in [25, 128 - w], y in [25, 128 - h]
    (sizes for 128 px, scaled). The mask is the pasted pixels whose value changed."""
    H, W = img.shape
    k = H / 128.0
    h, w = (int(round(rng.uniform(25, 50) * k)) for _ in range(2))
    lo = int(round(25 * k))
    sy, dy = rng.integers(lo, max(H - h, lo) + 1, size=2)
    sx, dx = rng.integers(lo, max(W - w, lo) + 1, size=2)
    out = img.astype(np.float32).copy()
    out[dy:dy + h, dx:dx + w] = img[sy:sy + h, sx:sx + w]
    mask = np.zeros((H, W), bool)
    mask[dy:dy + h, dx:dx + w] = True
    return out, mask & (np.abs(out - img) > 1e-6)


def synthetic_experiment(model, perceptual, T, S_val, S_test, args, device):
    """§4.1 / Table 1 on held-out normal test slices (healthy validation ones if none: BraTS alone):
    per anomaly type, MSE and S inside the anomaly between x_ph (and, for reference, the input) and
    the true normal image, and each Eq. (5) variant's pixel AUPRC -> (table, slices, Fig. 3 data)"""
    normal = [i for i in T.keep if T.scans[i].label == 0]
    x01, brain, on = T.x_test[normal], np.asarray(S_test.brain)[normal], "normal test slices"
    if not normal:
        x01, brain, on = T.x_val, np.asarray(S_val.brain), "healthy validation slices (none normal)"
    dist = perceptual if args.perceptual in SHARED_S else FixedDistance(device)   # one yardstick
    to_t = lambda a: torch.from_numpy(np.asarray(a, np.float32))[:, None].to(device)   # noqa: E731
    res, figs = {}, {}
    for k, (kind, fn) in enumerate((("intensity", synthetic_intensity_anomaly),
                                    ("texture", synthetic_texture_anomaly))):
        rng = np.random.default_rng(args.seed + k)
        xa, ma = map(np.stack, zip(*[fn(x01[i], brain[i], rng) for i in range(len(x01))]))
        # xa, ma: (N, H, W) anomalous images and their masks
        ph, t = score(model, perceptual, xa, args, device)
        keep = [i for i in range(len(xa)) if ma[i].any()]
        inside = lambda v: [float(v[i][ma[i]].mean()) for i in keep]                  # noqa: E731
        mse, per = inside((ph - x01) ** 2), inside(dist(to_t(ph), to_t(x01)))        # S(x_ph, x)
        mse_in, per_in = inside((xa - x01) ** 2), inside(dist(to_t(xa), to_t(x01)))
        auprc = {name: C.auprc(ma[keep].ravel(), combine_eq5(t, eq=eq, pl=pl)[keep].ravel())
                 for name, (eq, pl, _) in VARIANTS.items() if not (pl and t["S"] is None)}
        res[kind] = {"n": len(keep), "mse_mean": float(np.mean(mse)), "mse_std": float(np.std(mse)),
                     f"{dist.name}_dist_mean": float(np.mean(per)),
                     f"{dist.name}_dist_std": float(np.std(per)),
                     "input_mse_mean": float(np.mean(mse_in)),
                     f"input_{dist.name}_dist_mean": float(np.mean(per_in)), "auprc": auprc,
                     "painted_on": on}
        figs[kind] = (xa, ph, ma, t)
    return res, x01, figs


# ---- the test slices: rows, localisation (Table 2b), the Eq. (5) variants (Table 3) --------------

def slice_labels(S):
    """Rows contract: a slice of an anomalous scan is anomalous when it holds anomaly voxels (all,
    without a mask), else label 0 of its scan's group. -> labels (N,), the rows scored, anomalous
    scans left out as none of their slices shows the anomaly (their group would look normal)."""
    has = np.asarray(S.mask).reshape(len(S.x), -1).any(axis=1)
    scans = [S.cases[c] for c in S.case]
    label = np.array([int(c.label == 1 and (c.mask is None or h)) for c, h in zip(scans, has)])
    shown = {int(S.case[i]) for i in np.nonzero(label)[0]}
    keep = [i for i, c in enumerate(scans) if c.label == 0 or int(S.case[i]) in shown]
    dropped = {c.id for i, c in enumerate(scans) if c.label == 1 and int(S.case[i]) not in shown}
    return label, keep, sorted(dropped)


def table3(rows, per, main_name, ids, cases, groups, args):
    """Table 3 on this model: every Eq. (5) variant's slice AUROC per group (95% intervals over
    scans) and localisation, and its difference to Eq. (5), paired over scans."""
    ref = "Eq. 5 (eq + PL)" if "Eq. 5 (eq + PL)" in per else main_name
    loc_rows = {n: [dict(id=ids[i], case=cases[i], detected=m["tp"], f1=m["f1"])
                    for i, m in p[3].items()] for n, p in per.items()}
    out = {}
    for name, (_, _, thr, loc) in per.items():
        eq, pl, col = VARIANTS[name]
        ev = C.evaluate(rows, key=col)["groups"]
        anom = [g for g, v in ev.items() if "auroc" in v]
        out[name] = {"eq": eq, "perceptual": args.perceptual if pl else "none", "threshold": thr,
                     "auroc": {g: ev[g]["auroc"] for g in anom},
                     "auroc_ci": {g: ev[g]["auroc_ci"] for g in anom},
                     "auroc_mean": float(np.mean([ev[g]["auroc"] for g in anom])),
                     "localization": summarize_localization(loc, groups)}
        if name != ref:
            out[name]["minus_" + ref] = {
                "auroc": {g or "all": C.compare_scores(rows, rows, g, key_a=col,
                                                       key_b=VARIANTS[ref][2])
                          for g in [None, *anom]},
                **{k: C.paired_case_mean(loc_rows[name], loc_rows[ref], k)
                   for k in ("detected", "f1")}}
    return out


def evaluate_test(model, perceptual, S_val, S_test, args, run):
    """Every Eq. (5) variant on the healthy validation and test slices: slice scores (a column of
    scores.csv; this run's map is `score`), threshold, localisation -> rows, Tables 2b, 3, figs."""
    main_name = next(k for k, v in VARIANTS.items() if v[:2] == (args.eq, perceptual is not None))
    x_val, x_test = to01(np.asarray(S_val.x)), to01(np.asarray(S_test.x))
    _, t_val = score(model, perceptual, x_val, args, run.device)
    ph_test, t_test = score(model, perceptual, x_test, args, run.device)
    label, keep, dropped = slice_labels(S_test)
    if dropped:
        run.log(f"{len(dropped)} anomalous test volumes show no anomaly in their "
                f"{args.test_slices} middle slice(s) and are not scored (data_info.not_scored)")
    scans = [S_test.cases[c] for c in S_test.case]
    ids = {i: f"{scans[i].id}/z{int(S_test.z[i])}" for i in keep}
    cases, groups = {i: scans[i].id for i in keep}, [c.group for c in scans]
    rows = [{"id": ids[i], "group": groups[i], "label": int(label[i]), "score": None,
             "case": cases[i]} for i in keep]
    masks = {i: np.asarray(S_test.mask[i]) > 0 for i in keep}
    boxes = {i: lesion_boxes(m) for i, m in masks.items() if m.any()}
    per = {}
    for name, (eq, pl, col) in VARIANTS.items():
        if pl and perceptual is None:
            continue
        s_val, s_test = combine_eq5(t_val, eq=eq, pl=pl), combine_eq5(t_test, eq=eq, pl=pl)
        thr, loc = localize(s_val, S_val.brain, s_test, boxes, S_test.brain, args)
        scores = image_score(s_test)
        for r, i in zip(rows, keep):
            r[col] = float(scores[i])
        per[name] = (s_test, image_score(s_val), thr, loc)
    maps, val_scores, thr, loc = per[main_name]
    for r, i in zip(rows, keep):
        m = loc.get(i)
        r.update(score=r[VARIANTS[main_name][2]], detected=m and m["tp"], fp=m and m["fp"],
                 f1=m and round(m["f1"], 4))
    return types.SimpleNamespace(
        rows=rows, main_name=main_name, x_val=x_val, x_test=x_test, ph_test=ph_test, maps=maps,
        label=label, keep=keep, dropped=dropped, scans=scans, val_scores=val_scores, thr=thr,
        loc=loc, groups=groups, table2b=summarize_localization(loc, groups),
        t3=table3(rows, per, main_name, ids, cases, groups, args))


# ---- RA vs its SI-VAE backbone (Table 3, w/o Reverse Loss): two runs on the same slices ---------

def compare_run(rows, args):
    """This run minus --compare-run's (e.g. RA minus its SI-VAE backbone) on the same slices, per
    Eq. (5) variant, paired over scans; only one S for both (lpips) compares the models alone."""
    d = Path(args.compare_run)
    other = C.read_scores(d / "scores.csv")
    cfg = json.loads((d / "config.json").read_text())["args"]
    if not {r["id"] for r in rows} <= {r["id"] for r in other}:
        C.fail(f"--compare-run {d}: its scores.csv lacks slices of this run (another --data, "
               f"--seed, --test-slices or --image-size?); compare runs on the same test slices")
    anom = sorted({r["group"] for r in rows if r["label"] == 1})
    out = {"run": str(d), "this": model_name(vars(args)), "other": model_name(cfg),
           "perceptual": {"this": args.perceptual, "other": cfg.get("perceptual")},
           "same_S": args.perceptual == cfg.get("perceptual") and args.perceptual in SHARED_S}
    for name, (_, _, col) in VARIANTS.items():
        if col in rows[0] and other[0].get(col, "") != "":
            out[name] = {g or "all": C.compare_scores(rows, other, g, key_a=col, key_b=col)
                         for g in [None, *anom]}
    return {**out, **{k: C.paired_case_mean(rows, other, k) for k in ("detected", "f1")}}


def print_tables(table1, table2b, t3, vs):
    """Tables 1, 2b, 3 (and minus --compare-run); Δ [95% interval over scans], ~: not resolved."""
    ci = lambda d, f=1: (f"{f * d['diff']:+.3f} [{f * d['ci'][0]:+.2f}, "  # noqa: E731
                         f"{f * d['ci'][1]:+.2f}]" + ("" if d.get("resolved", True) else " ~"))
    print("\nTable 1 (synthetic anomalies on normal slices: MSE, distance inside them; AUPRC)")
    for kind, r in table1.items():
        dn = next(k for k in r if k.endswith("_dist_mean") and not k.startswith("input"))
        print(f"  {kind:9s}  MSE {r['mse_mean']:.4f}  {dn[:-5]} {r[dn]:.4f}  (input: MSE "
              f"{r['input_mse_mean']:.4f})  "
              + ", ".join(f"{k} {v:.3f}" for k, v in r["auprc"].items()))
    print("Table 2b (localisation at <= 5% healthy-pixel FPR: detected / n, mean F1)\n  "
          + ", ".join(f"{g} {v['detected']}/{v['n']} F1 {100 * v['f1_mean']:.1f}"
                      for g, v in table2b.items()))
    print("Table 3 (Eq. 5 variants of this model; Δ to Eq. 5 paired over scans: AUROC, F1)")
    for name, v in t3.items():
        loc = v["localization"].get("all", {})
        d = next((x for k, x in v.items() if k.startswith("minus_")), None)
        print(f"  {name:24s} mean AUROC {v['auroc_mean']:.3f}  detected {loc.get('detected', 0)}/"
              f"{loc.get('n', 0)}  F1 {100 * loc.get('f1_mean', 0):.1f}" + (d and (
                  f"  ΔAUROC {ci(d['auroc']['all'])}  "
                  f"ΔF1 {ci(dict(d['f1'], diff=d['f1']['mean']), 100)}") or ""))
    for name, v in (vs or {}).items():
        if isinstance(v, dict) and "all" in v:
            print(f"  {vs['this']} minus {vs['other']} (same S: {vs['same_S']}), {name}: ΔAUROC "
                  f"{ci(v['all'])}")


# =================================================================================================
# main
# =================================================================================================

def main(argv=None):
    args = parse_args(argv)
    run = C.start_run(args, METHOD)
    lpips = LPIPSDistance(run.device) if args.perceptual == "lpips" else None  # fails early
    model = SoftIntroVAE(channels=args.channel_list, z_dim=args.z_dim, image_size=args.image_size)
    model = model.to(run.device)
    run.log(f"Soft-Intro VAE: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
            f"λ = {args.lam} ({model_name(vars(args))})")
    trained = load_trained(args, model, run) if args.checkpoint else None
    data = datasets.load_dataset(args, contrast="t1")
    if not data.val:
        C.fail(f"--data {args.data}: no healthy validation volumes (for the 5% FPR threshold)")
    kw = dict(size=(args.image_size,) * 2, norm="mri", center=0.5, cache_dir=args.cache_dir)
    S_val = datasets.slice_stack(data.val, n_slices=args.test_slices, desc="val", **kw)
    S_test = datasets.slice_stack(data.test, n_slices=args.test_slices, desc="test", **kw)
    S_train = datasets.slice_stack(data.train, n_slices=args.train_slices, desc="train", **kw)
    loop = None
    if trained is None:
        run.log(f"slices: train {len(S_train.x)}, val {len(S_val.x)}, test {len(S_test.x)}")
        loop, train_s = train(model, S_train, S_val, args, run)
        trained = dict(history=loop.history, state=loop.state, io=loop.io_report(), train_s=train_s,
                       n_slices=len(S_train.x))

    t_score = time.perf_counter()
    perceptual = perceptual_distance(args, model, run.device, lpips)
    T = evaluate_test(model, perceptual, S_val, S_test, args, run)
    table1, x_syn, figs = synthetic_experiment(model, perceptual, T, S_val, S_test, args,
                                               run.device)
    vs = compare_run(T.rows, args) if args.compare_run else None
    C.add_baselines(T.rows, C.baseline_units(S_train, S_test, T.keep, "mean"))   # issue 15.5
    score_s = time.perf_counter() - t_score
    examples = plot_figures(T, S_test, x_syn, figs, run.out)

    best, name = trained["state"].get("early_stopping") or {}, model_name(vars(args))
    extra = {"method_variant": name, "anomaly_map": T.main_name, "perceptual": args.perceptual,
             "threshold_5pct_fpr": T.thr, "table1_synthetic": table1,
             "table2b_localization": T.table2b, "table3_ablation": T.t3,
             **({"vs_run": vs} if vs else {}),
             "train": {"n_slices": trained["n_slices"], "epochs_run": best.get("epoch", 0),
                       "best_epoch": best.get("best_epoch"), "best_val_mse": best.get("val_mse")},
             "checkpoint_io": trained["io"],
             "figures": ["examples.png", "losses.png", "synthetic.png (Fig. 3)",
                         "localization.png (Fig. 7)"]}
    timing = {"train_s": trained["train_s"], "score_s": score_s,
              "score_s_per_sample": score_s / len(T.rows)}
    res = C.report(run, args, "slice", T.rows, timing, extra=extra, data_info={
        **data.info, "test_slices_per_volume": args.test_slices, "not_scored": T.dropped},
        val_scores=T.val_scores, threshold_pct=100 * (1 - args.fpr), history=trained["history"],
        loop=loop, slabs=S_test.slabs, slab_cases=S_test.cases, skipped=S_test.skipped,
        baselines_how="mean over the slice, as the slice score (image_score)",
        examples=examples, titles={"roc": f"{name}: slice-level ROC, normal scans vs each group",
                                   "losses": f"{name} training: -L_E (Eq. 4), -L_D (Eq. 2), "
                                             f"L_Reversed (Eq. 3), MSE", "losses_logy": True})
    print_tables(table1, T.table2b, T.t3, vs)
    return res


# =================================================================================================
# Appendix: the paper's figures (Fig. 3, Fig. 7)
# =================================================================================================

def plot_figures(T, S_test, x_syn, figs, out):
    """Fig. 3 (synthetic.png) and Fig. 7 (localization.png); -> the rows of examples.png (C.report):
    two normal slices and one anomalous slice of every group."""
    ex, seen = [], {}
    for r, i in zip(T.rows, T.keep):
        g = r["group"]
        if (r["label"] or T.scans[i].label == 0) and seen.get(g, 0) < (2 if g == "normal" else 1):
            seen[g] = seen.get(g, 0) + 1
            ex.append({"title": f"{g} ({r['score']:.3g})", "input": T.x_test[i] * 2 - 1,
                       "reconstruction": T.ph_test[i] * 2 - 1, "amap": T.maps[i],
                       "gt": np.asarray(S_test.mask[i]) if r["label"] else None})
    eq, pl = VARIANTS[T.main_name][:2]
    rows3 = []                                   # Fig. 3: input | x_ph | true normal image | map
    for kind, (xa, ph, ma, t) in figs.items():
        for i in range(min(3, len(x_syn))):
            t_i = {k: v if v is None else v[i:i + 1] for k, v in t.items()}
            s = combine_eq5(t_i, eq=eq, pl=pl)[0]
            rows3.append((kind, [(xa[i], "input (synthetic anomaly)", None, [(ma[i], "cyan")]),
                                 (ph[i], "pseudo-healthy x_ph", None, []),
                                 (x_syn[i], "ground truth (normal)", None, []),
                                 (s, "anomaly map, Eq. (5)", float(s.max()), [(ma[i], "cyan")])],
                          ""))
    plot_grid(rows3, out / "synthetic.png", "Fig. 3 style: synthetic anomalies and pseudo-healthy "
              "reconstructions (cyan: the anomaly)")
    shown = []                                   # Fig. 7: per group its first detected slice
    for g in sorted({T.groups[i] for i in T.loc}):
        cand = [i for i in sorted(T.loc) if T.groups[i] == g]
        shown.append(next((i for i in cand if T.loc[i]["tp"]), cand[0]))
    vmax = float(np.percentile(T.maps[shown], 99.5)) if shown else 1.0
    rows7 = []
    for i in shown:
        m, s, r = np.asarray(S_test.mask[i]) > 0, T.maps[i], T.loc[i]
        box = lesion_boxes(m)
        rows7.append((T.groups[i], [
            (T.x_test[i], "input", None, []), (T.ph_test[i], "pseudo-healthy", None, []),
            (s, "anomaly map", vmax, []), (np.where(s > T.thr, s, 0), "thresholded (5% FPR)", vmax,
                                           [(box, "lime")]),
            (T.x_test[i], "annotation", None, [(m, "red"), (box, "lime")])],
            f"TP {r['tp']}\nFP {r['fp']}\nF1 {r['f1']:.2f}"))
    plot_grid(rows7, out / "localization.png", "Fig. 7 style: localisation at the 5% healthy-pixel "
              "FPR threshold (red: anomaly mask, green: its boxes)")
    return ex


def plot_grid(rows, path, title):
    """rows: [(row label, [(image, column title, vmax, [(contour mask, colour)]), ...], note)]: an
    image in grey on [0, 1] (vmax None) or a map in inferno on [0, vmax]; the note at the right."""
    if not rows:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(rows[0][1])
    fig, axes = plt.subplots(len(rows), n, figsize=(2.3 * n, 2.35 * len(rows)), squeeze=False)
    for r, (label, panels, note) in enumerate(rows):
        for c, (img, col, vmax, contours) in enumerate(panels):
            ax = axes[r, c]
            ax.axis("off")
            ax.imshow(img, cmap="gray" if vmax is None else "inferno", vmin=0,
                      vmax=1 if vmax is None else max(vmax, 1e-6))
            for mask, colour in contours:
                ax.contour(mask, levels=[0.5], colors=colour, linewidths=0.7)
            if r == 0:
                ax.set_title(col, fontsize=9)
        axes[r, 0].text(-0.06, 0.5, label, transform=axes[r, 0].transAxes, rotation=90, ha="right",
                        va="center", fontsize=8)
        axes[r, -1].text(1.04, 0.5, note, transform=axes[r, -1].transAxes, va="center", fontsize=8)
    h = fig.get_figheight()
    fig.subplots_adjust(top=1 - 0.7 / h, wspace=0.04, hspace=0.12)
    fig.suptitle(title, fontsize=9, y=1 - 0.1 / h, va="top")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    C.main_guard(main)
