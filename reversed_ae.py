"""Reversed Autoencoders (RA): pseudo-healthy reconstructions for unbiased pathology screening.

    Cosmin I. Bercea, Benedikt Wiestler, Daniel Rueckert, Julia A. Schnabel.
    "Generalizing Unsupervised Anomaly Detection: Towards Unbiased Pathology Screening."
    Medical Imaging with Deep Learning (MIDL), PMLR 227, 2023. https://openreview.net/forum?id=8ojx-Ld3yjR
    Reference code: https://github.com/ci-ber/RA (model_zoo/ra.py, projects/23_ra_midl/).

What this file implements (paper section -> code):
  Eq. (1)  ELBO(x) = E_q[log p(x|z)] - KL[q(z|x) || p(z)]                 -> neg_elbo, kl_divergence
  Eq. (2)  Soft-Intro VAE (Daniel & Tamar, 2021), to be maximised:
             L_E(x, z) = ELBO(x) - 1/α · exp(α · ELBO(D(z)))               -> exp_elbo, encoder_loss
             L_D(x, z) = ELBO(x) + γ · ELBO(D(z))                          -> decoder_loss
  Eq. (3)  L_Reversed(x) = Σ_l [1 - cos(E^l(x), E^l(x_rec))] + ½·MSE(E^l(x), E^l(x_rec))
                                                                          -> reversed_embedding_loss
  Eq. (4)  L_E(x, z) = ELBO(x) - 1/α·exp(α·ELBO(D(z))) - λ·L_Reversed(x), λ = 5e-3  -> encoder_loss
  Eq. (5)  s(x) = |eq(x_ph) - eq(x)| · S(x_ph, x) · S(eq(x_ph), eq(x)), eq = CLAHE  -> anomaly_map
  App. A   encoder/decoder of 5 levels (64,128,256,512,512), Adam 5e-5, batch 8, β_KL=1, β_Rec=1, β_Neg=256
  App. B   middle axial T1w slices, 128×128, affine augmentation (rotation 10°, translation 0.1,
           scaling 0.9-1.1, horizontal flip p=0.5), training only
  §4.1, App. C.1  synthetic intensity (3 ellipses) and copy-paste texture anomalies on held-out
           normal slices: Table 1 = MSE and perceptual distance inside the anomaly between the
           pseudo-healthy reconstruction and the true normal image, AUPRC of the anomaly maps
  §4.2, App. C.2  global detection: AUROC of the image score per group (Table 2a)
  §4.2, App. C.3  localisation: threshold at <= 5% false-positive pixels on healthy validation
           slices; a lesion is detected (TP) when > 10% of its bounding box is flagged;
           FP = Σ_healthy s / Σ_box s; F1 = 2·P·TP / (P + TP), P = TP / (TP + FP) (Table 2b)
  App. D   ablations (Table 3): w/o reverse loss (--no-reverse = the SI-VAE baseline), w/o histogram
           equalisation (--no-eq), w/o perceptual similarity (--perceptual none); the eq/PL variants
           are also computed from the same model at scoring time and reported under "table3".

Deviations from the paper
  1. Perceptual similarity S: the paper uses LPIPS (SqueezeNet, ImageNet weights), which cannot be
     downloaded here. `--perceptual encoder` (default) is an LPIPS-style distance computed with the
     run's own trained RA encoder: at every encoder level l, features are unit-normalised along the
     channels and their squared difference is summed over channels, upsampled to the image and
     averaged over levels (LPIPS Eq. 1 of Zhang et al. 2018 without the learned channel weights).
     Why: it needs no download, it is in-domain (the paper itself warns that ImageNet features
     "may not translate well to the medical imaging domain", §4.2), and it is the network the
     reversed loss of Eq. (3) trains to compare images at several scales. `--perceptual lpips` uses
     the `lpips` package when it and its weights are installed; `--perceptual none` is "w/o PL".
  2. Data: the built-in T1 phantom replaces FastMRI+/IXI. Slices come from common.slice_stack
     (brain-percentile 1..99 normalisation to [-1, 1], mapped to [0, 1] for the sigmoid decoder)
     instead of dividing by the 98th percentile of the tissue intensities (App. B). Training uses
     `--train-slices` axial slices around the middle of each training volume (paper: the middle one).
  3. Test units: the `--test-slices` slices around the middle of every test volume; for groups with
     anomaly masks (lesions, tumour) only slices that contain the anomaly are scored (an abnormal
     subject's lesion-free slice is neither normal nor abnormal); groups without masks (atrophy)
     keep all their slices. The image score for detection is the mean of the anomaly map, as in
     the reference code (the paper does not state it).
  4. Localisation: the 5% FPR threshold counts pixels inside the brain of healthy validation slices
     (the reference code counts all 128×128 pixels, background included, which is more lenient).
     The box of a lesion is the bounding box of each connected component of its mask (the paper has
     expert boxes). "Healthy tissue" for FP is brain outside the boxes. FP is floored to an integer
     as in Fig. 7 (13.95 / 3.16 -> 4); the reference code divides by max(Σ_box s, 1), we divide by
     Σ_box s as the paper writes.
  5. The pseudo-healthy reconstruction uses z = μ(x) (the reference evaluator samples z).
  6. Soft-Intro details from the reference implementation that the paper does not state: α = 2,
     γ_r = 1e-8 on the reconstruction part of ELBO(D(z)) in L_D, the expELBO averaged over the two
     kinds of generated images (reconstructions D(E(x)) and samples D(z), z ~ N(0, I)), all terms
     scaled by 1/(C·H·W); Gaussian smoothing (σ = 2 px at 128²) of the perceptual maps; latent size
     128 (App. A mentions "a bottleneck of 256 filters"; the released config uses zdim = 128). The
     reference trainer uses β_Rec = 0.5, β_Neg = 128 where App. A says 1 and 256; we follow App. A.
  7. The `quick` preset (64×64 slices, channels 8-16-32-64-64, latent 64, batch 16, lr 5e-4, 12
     epochs over 5 slices per training volume) is scaled down to train in ~3 minutes on 2 CPU cores;
     the paper trains up to 1500 epochs with early stopping after 500 (`paper` preset; we keep the
     weights with the lowest validation MSE, as the reference trainer does).

Run it
  python reversed_ae.py                                   # quick preset, phantom, ~5 min on 2 CPU cores
  python reversed_ae.py --no-reverse                      # the SI-VAE baseline (Table 3 "w/o Reverse Loss")
  python reversed_ae.py --preset paper --device cuda      # the paper's settings (a GPU job)
  python reversed_ae.py --data folder --data-root DIR --train-data ixi --train-root IXI_DIR --preset paper

What you should see (quick preset, seed 0, phantom; one CPU thread on a shared machine: 314 s training,
19 s scoring; results.json has the tables): reconstructions are still blurry after 372 steps, so the
maps light up the ventricles and sulci. Slice AUROC (RA | SI-VAE --no-reverse): atrophy_1 0.70 | 0.75,
atrophy_2 0.85 | 0.86, atrophy_3 0.98 | 0.96, tumor 0.56 | 0.57, lesion_hyper 0.45 | 0.50, lesion_hypo
0.51 | 0.51. Table 3 on the RA model, mean AUROC: Eq. 5 0.67, w/o Hist. Eq. 0.68, w/o PL 0.55, neither
0.61: the perceptual factor matters most, as in App. D; the reverse loss does not help at this budget.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C
from data import datasets

METHOD = "reversed_ae"

# =================================================================================================
# Arguments
# =================================================================================================

PRESETS = {
    # seconds, for the tests: tiny phantom, tiny network
    "smoke": dict(image_size=32, channels="4,8,16", z_dim=16, batch_size=8, lr=5e-4, epochs=1, patience=500,
                  beta_rec=1.0, beta_kl=1.0, beta_neg=256.0, alpha=2.0, gamma_r=1e-8, lam=5e-3,
                  perceptual="encoder", saliency_sigma=0.5, clahe_clip=0.01, train_slices=2, test_slices=1,
                  fpr=0.05, detect_frac=0.1, max_steps=3),
    # a real run on 2 CPU cores in ~5 minutes (see deviation 7)
    "quick": dict(image_size=64, channels="8,16,32,64,64", z_dim=64, batch_size=16, lr=5e-4, epochs=12,
                  patience=500, beta_rec=1.0, beta_kl=1.0, beta_neg=256.0, alpha=2.0, gamma_r=1e-8, lam=5e-3,
                  perceptual="encoder", saliency_sigma=1.0, clahe_clip=0.01, train_slices=5, test_slices=5,
                  fpr=0.05, detect_frac=0.1, max_steps=0),
    # the paper's settings (App. A, App. B, §4.2)
    "paper": dict(image_size=128, channels="64,128,256,512,512", z_dim=128, batch_size=8, lr=5e-5, epochs=1500,
                  patience=500, beta_rec=1.0, beta_kl=1.0, beta_neg=256.0, alpha=2.0, gamma_r=1e-8, lam=5e-3,
                  perceptual="encoder", saliency_sigma=2.0, clahe_clip=0.01, train_slices=1, test_slices=1,
                  fpr=0.05, detect_frac=0.1, max_steps=0),
}


def build_parser():
    p = C.ArgumentParser(description=__doc__)
    C.add_contract_args(p, METHOD)
    g = p.add_argument_group("RA / Soft-Intro VAE (flags default to the preset)")
    g.add_argument("--image-size", type=int, default=None, help="slice size H=W, App. B (paper 128)")
    g.add_argument("--channels", default=None,
                   help="encoder channels per level, comma-separated, App. A (paper 64,128,256,512,512)")
    g.add_argument("--z-dim", type=int, default=None, help="latent size, reference config zdim (paper 128)")
    g.add_argument("--batch-size", type=int, default=None, help="batch size, App. A (paper 8)")
    g.add_argument("--lr", type=float, default=None, help="Adam learning rate of encoder and decoder, App. A (paper 5e-5)")
    g.add_argument("--epochs", type=int, default=None, help="training epochs, App. A (paper up to 1500)")
    g.add_argument("--patience", type=int, default=None,
                   help="early stopping: epochs without a lower validation MSE, App. A (paper 500)")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many steps, 0 = no limit (smoke tests)")
    g.add_argument("--beta-rec", type=float, default=None, help="β_Rec, weight of the reconstruction term, App. A (paper 1)")
    g.add_argument("--beta-kl", type=float, default=None, help="β_KL, weight of the KL of real images, App. A (paper 1)")
    g.add_argument("--beta-neg", type=float, default=None,
                   help="β_Neg, weight of the KL of generated images in expELBO, App. A (paper 256)")
    g.add_argument("--alpha", type=float, default=None, help="α in Eq. (2) (Soft-Intro VAE reference code 2)")
    g.add_argument("--gamma-r", type=float, default=None,
                   help="γ in Eq. (2) on the reconstruction of generated images (Soft-Intro VAE reference code 1e-8)")
    g.add_argument("--lam", type=float, default=None, help="λ, weight of L_Reversed in Eq. (4), §3 (paper 5e-3)")
    g.add_argument("--no-reverse", action="store_true",
                   help="λ = 0: the SI-VAE baseline, Table 3 'w/o Reverse Loss'")
    g.add_argument("--perceptual", default=None, choices=["encoder", "lpips", "none"],
                   help="S in Eq. (5): encoder = LPIPS-style distance on the trained encoder's features "
                        "(default, see deviation 1); lpips = the paper's LPIPS (needs the `lpips` package); "
                        "none = Table 3 'w/o PL'")
    g.add_argument("--no-eq", action="store_true", help="no histogram equalisation in Eq. (5), Table 3 'w/o Hist. Eq.'")
    g.add_argument("--clahe-clip", type=float, default=None,
                   help="clip limit of CLAHE (eq in Eq. 5; skimage default 0.01, as the reference code)")
    g.add_argument("--saliency-sigma", type=float, default=None,
                   help="Gaussian σ (px) smoothing the perceptual maps (reference code 2 at 128 px)")
    g.add_argument("--no-augment", action="store_true", help="switch off the App. B training augmentation")
    g.add_argument("--train-slices", type=int, default=None,
                   help="axial slices per training volume around the middle (paper 1: the middle slice, App. B)")
    g.add_argument("--test-slices", type=int, default=None,
                   help="axial slices per validation/test volume around the middle (paper 1, §4)")
    g.add_argument("--fpr", type=float, default=None,
                   help="pixel false-positive rate on healthy validation slices that sets the threshold, §4.2 (paper 0.05)")
    g.add_argument("--detect-frac", type=float, default=None,
                   help="a lesion is detected when more than this fraction of its box is flagged, §4.2 (paper 0.1)")
    return p


def parse(argv=None):
    args = C.parse_args(build_parser(), PRESETS, argv, method=METHOD)
    try:
        args.channel_list = [int(c) for c in str(args.channels).split(",")]
    except ValueError:
        C.fail(f"--channels must be comma-separated integers, got {args.channels!r}")
    if not args.channel_list or min(args.channel_list) < 1:
        C.fail(f"--channels must be positive integers, got {args.channels!r}")
    C.check_range(args, "image_size", lo=8, integer=True)
    if args.image_size % (2 ** len(args.channel_list)):
        C.fail(f"--image-size {args.image_size} must be divisible by 2^{len(args.channel_list)} "
               f"(one halving per level of --channels {args.channels})")
    for name, lo, hi in (("z_dim", 1, None), ("batch_size", 2, None), ("epochs", 1, None), ("patience", 1, None),
                         ("train_slices", 1, None), ("test_slices", 1, None), ("max_steps", 0, None)):
        C.check_range(args, name, lo=lo, hi=hi, integer=True)
    for name, lo, hi in (("lr", 1e-9, 1.0), ("beta_rec", 0, None), ("beta_kl", 0, None), ("beta_neg", 0, None),
                         ("alpha", 1e-6, None), ("gamma_r", 0, None), ("lam", 0, None), ("clahe_clip", 1e-6, 1.0),
                         ("saliency_sigma", 0, None), ("fpr", 1e-6, 1.0), ("detect_frac", 0, 1.0)):
        C.check_range(args, name, lo=lo, hi=hi)
    if args.no_reverse:
        args.lam = 0.0
    return args


# =================================================================================================
# Networks: the Soft-Intro VAE of App. A (reference: model_zoo/ra.py)
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
    """q_φ(z|x): one level per entry of `channels`, each ending in a 2x average pooling; the pooled
    outputs are the multi-scale embeddings E^l(x) of Eq. (3). Returns μ, log σ², [E^0(x), ..., E^L(x)]."""

    def __init__(self, *, channels, z_dim: int, image_size: int):
        super().__init__()
        c0 = channels[0]
        self.stem = nn.Sequential(nn.Conv2d(1, c0, 5, 1, 2, bias=False), nn.BatchNorm2d(c0), nn.LeakyReLU(0.2),
                                  nn.AvgPool2d(2))
        self.levels = nn.ModuleList(nn.Sequential(ResidualBlock(c_in=a, c_out=b), nn.AvgPool2d(2))
                                    for a, b in zip(channels[:-1], channels[1:]))
        self.out_block = ResidualBlock(c_in=channels[-1], c_out=channels[-1])
        self.s = image_size // 2 ** len(channels)                     # spatial size of the last level
        self.fc = nn.Linear(channels[-1] * self.s * self.s, 2 * z_dim)

    def forward(self, x):                                             # x: (B, 1, H, W) in [0, 1]
        h = self.stem(x)                                              # (B, c0, H/2, W/2)
        feats = [h]
        for level in self.levels:
            h = level(h)                                              # (B, c_l, H/2^(l+1), W/2^(l+1))
            feats.append(h)
        h = self.out_block(h).flatten(1)                              # (B, c_L·s·s)
        mu, logvar = self.fc(h).chunk(2, dim=1)                       # (B, z_dim) each
        return mu, logvar, feats


class Decoder(nn.Module):
    """p_θ(x|z): fc -> (c_L, s, s), then one residual block + 2x nearest upsampling per level, a last
    residual block, a 5x5 conv to one channel and a sigmoid (App. A: "final sigmoid activation")."""

    def __init__(self, *, channels, z_dim: int, image_size: int):
        super().__init__()
        self.c, self.s = channels[-1], image_size // 2 ** len(channels)
        self.fc = nn.Sequential(nn.Linear(z_dim, self.c * self.s * self.s), nn.ReLU())
        layers, cc = [], channels[-1]
        for ch in channels[::-1]:
            layers += [ResidualBlock(c_in=cc, c_out=ch), nn.Upsample(scale_factor=2, mode="nearest")]
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
# Losses (the paper writes objectives to be MAXIMISED; these functions return what we MINIMISE)
# =================================================================================================

def kl_divergence(mu, logvar):
    """Per-sample KL[q(z|x) || N(0, I)], the KL term of Eq. (1). mu, logvar: (B, Z) -> (B,)."""
    # KL = -½ Σ_j (1 + log σ_j² - μ_j² - σ_j²)
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)


def reconstruction_error(x, x_rec):
    """Per-sample Σ_pixels (x - x_rec)²: -log p(x|z) of a Gaussian decoder up to constants. -> (B,)."""
    return (x - x_rec).pow(2).flatten(1).sum(dim=1)


def neg_elbo(x, x_rec, mu, logvar, *, beta_rec, beta_kl, scale):
    """-ELBO per sample, Eq. (1) with weights: scale·(β_rec·||x - x_rec||² + β_kl·KL). -> (B,).
    scale = 1/(C·H·W) normalises by the image size, as in the Soft-Intro VAE code."""
    # Eq. (1): ELBO(x) = E_q[log p(x|z)] - KL[q(z|x) || p(z)]
    return scale * (beta_rec * reconstruction_error(x, x_rec) + beta_kl * kl_divergence(mu, logvar))


def exp_elbo(nelbo, *, alpha):
    """1/α · exp(α · ELBO(D(z))), averaged over the batch, with ELBO = -nelbo (Eq. 2)."""
    # Eq. (2): the encoder pushes generated images away: it minimises 1/α · exp(α · ELBO(D(z)))
    return (1.0 / alpha) * torch.exp(-alpha * nelbo).mean()


def reversed_embedding_loss(feats_x, feats_rec):
    """Eq. (3), summed over encoder levels l: mean over the batch of 1 - cos(E^l(x), E^l(x_rec)) on the
    flattened embeddings, plus ½ · MSE(E^l(x), E^l(x_rec)) (mean over all elements)."""
    total = 0.0
    for e_x, e_rec in zip(feats_x, feats_rec):
        cos = F.cosine_similarity(e_x.flatten(1), e_rec.flatten(1), dim=1)       # (B,)
        # Eq. (3): L_Reversed(x) = Σ_l (1 - L_Sim(E^l(x), E^l(x_rec))) + ½ MSE(E^l(x), E^l(x_rec))
        total = total + (1 - cos).mean() + 0.5 * F.mse_loss(e_x, e_rec)
    return total


def encoder_loss(nelbo_real, nelbo_rec, nelbo_fake, l_reversed, *, alpha, lam):
    """-L_E of Eq. (4): -ELBO(x) + 1/α·exp(α·ELBO(D(z))) + λ·L_Reversed(x). The expELBO term is
    averaged over the two kinds of generated images: reconstructions D(E(x)) and samples D(z)."""
    # Eq. (4): L_E(x, z) = ELBO(x) - 1/α (exp(α ELBO(D_θ(z))) + λ L_Reversed(x))   (maximised)
    exp_term = 0.5 * (exp_elbo(nelbo_rec, alpha=alpha) + exp_elbo(nelbo_fake, alpha=alpha))
    return nelbo_real.mean() + exp_term + lam * l_reversed


def decoder_loss(rec_real, kl_rec, kl_fake, rec_rec, rec_fake, *, beta_rec, beta_kl, gamma_r, scale):
    """-L_D of Eq. (2): -ELBO(x) - γ·ELBO(D(z)). Per the reference code, the decoder's -ELBO(x) keeps
    only the reconstruction term (the KL of x does not depend on θ) and -ELBO(D(z)) is averaged over
    reconstructions and samples with β_KL on its KL and γ_r·β_Rec on its reconstruction term. All (B,)."""
    # Eq. (2): L_D(x, z) = ELBO(x) + γ ELBO(D_θ(z))   (maximised)
    fake_kl = 0.5 * beta_kl * (kl_rec.mean() + kl_fake.mean())
    fake_rec = 0.5 * gamma_r * beta_rec * (rec_rec.mean() + rec_fake.mean())
    return scale * (beta_rec * rec_real.mean() + fake_kl + fake_rec)


# =================================================================================================
# Anomaly score: Eq. (5)
# =================================================================================================

def clahe(x, clip_limit=0.01):
    """eq(.) of Eq. (5): contrast-limited adaptive histogram equalisation (skimage, as the reference
    code) of each image. x: (B, H, W) numpy in [0, 1] -> (B, H, W) float32."""
    from skimage import exposure
    return np.stack([exposure.equalize_adapthist(np.clip(im, 0, 1).astype(np.float64), clip_limit=clip_limit)
                     for im in x]).astype(np.float32)


class EncoderDistance:
    """LPIPS-style perceptual distance on the trained RA encoder (deviation 1): for every level l,
    d_l = Σ_c (ê^l_c(a) - ê^l_c(b))² with ê unit-normalised over channels, upsampled (bilinear) to the
    image size; S(a, b) = mean_l d_l. Needs no download and is computed by the run's own network."""

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
        d = torch.zeros_like(a)
        for ea, eb in zip(fa, fb):
            ea = ea / (ea.norm(dim=1, keepdim=True) + 1e-10)          # (B, c_l, h_l, w_l)
            eb = eb / (eb.norm(dim=1, keepdim=True) + 1e-10)
            dl = (ea - eb).pow(2).sum(dim=1, keepdim=True)            # (B, 1, h_l, w_l) in [0, 4]
            d += F.interpolate(dl, size=a.shape[-2:], mode="bilinear", align_corners=False)
        return (d / len(fa))[:, 0].float().cpu().numpy()              # (B, H, W)


class LPIPSDistance:
    """The paper's S: LPIPS (Zhang et al., 2018) with a SqueezeNet backbone, spatial map, as in the
    reference evaluator. Needs `pip install lpips` and its (torchvision) pretrained weights."""

    name = "lpips"

    def __init__(self, device):
        try:
            import lpips
        except ImportError:
            C.fail("--perceptual lpips needs the optional package `lpips` (pip install lpips; its SqueezeNet "
                   "weights are downloaded on first use); or use --perceptual encoder (default) or none")
        try:
            self.net = lpips.LPIPS(net="squeeze", spatial=True, pretrained=True, verbose=False).to(device).eval()
        except Exception as e:  # noqa: BLE001 -- no network / no cached weights
            C.fail(f"--perceptual lpips: cannot load the LPIPS weights ({type(e).__name__}: {e}); "
                   f"download them once with internet access, or use --perceptual encoder")

    @torch.no_grad()
    def __call__(self, a, b):
        d = self.net(a.repeat(1, 3, 1, 1), b.repeat(1, 3, 1, 1), normalize=True)   # (B, 1, H, W)
        return d[:, 0].float().cpu().numpy()


def smooth_maps(m, sigma):
    """Gaussian smoothing of each (H, W) map of m (B, H, W), as the reference code does for S."""
    from scipy.ndimage import gaussian_filter
    return gaussian_filter(m, sigma=(0, sigma, sigma)) if sigma and sigma > 0 else m


def eq5_terms(x, x_ph, perceptual=None, *, clip_limit=0.01, sigma=2.0):
    """The factors of Eq. (5) for x, x_ph (B, 1, H, W) in [0, 1]: residuals with and without eq, and
    S(x_ph, x), S(eq(x_ph), eq(x)) (None without a perceptual network). -> dict of (B, H, W) numpy."""
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
         eq & PL : |eq(x_ph) - eq(x)| · S(x_ph, x) · S(eq(x_ph), eq(x))      (RA)
         PL only : |x_ph - x| · S(x_ph, x)                                   (w/o Hist. Eq.)
         eq only : |eq(x_ph) - eq(x)|                                        (w/o PL)
         neither : |x_ph - x|                                                (w/o Hist. Eq. & w/o PL)"""
    if pl and t["S"] is not None:
        # Eq. (5): s(x) = |eq(x_ph) - eq(x)| · S_lpips(x_ph, x) · S_lpips(eq(x_ph), eq(x))
        return t["res_eq"] * t["S"] * t["S_eq"] if eq else t["res"] * t["S"]
    return t["res_eq"] if eq else t["res"]


def anomaly_map(x, x_ph, perceptual=None, *, eq=True, clip_limit=0.01, sigma=2.0):
    """Eq. (5) for a batch: x, x_ph (B, 1, H, W) in [0, 1] -> s (B, H, W) numpy."""
    t = eq5_terms(x, x_ph, perceptual, clip_limit=clip_limit, sigma=sigma)
    return combine_eq5(t, eq=eq, pl=perceptual is not None)


def image_score(s):
    """Global (image-level) anomaly score: the mean of the anomaly map (reference evaluator). (B,H,W)->(B,)."""
    return s.reshape(len(s), -1).mean(axis=1)


# =================================================================================================
# Training (Soft-Intro VAE updates of the reference trainer + the reversed loss of Eq. 3/4)
# =================================================================================================

def to01(x):
    """[-1, 1] slices (common.slice_stack) -> [0, 1] for the sigmoid decoder."""
    return (x + 1) * 0.5


def set_requires_grad(module, flag):
    for p in module.parameters():
        p.requires_grad_(flag)


def train_step(model, x, opt_e, opt_d, hp, device, amp=False):
    """One encoder update (Eq. 4) then one decoder update (Eq. 2) on a batch x (B, 1, H, W) in [0, 1]."""
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
    f32 = lambda *ts: [t.float() for t in ts]                          # noqa: E731  losses in float32
    x_rec, rec_rec, fake_rec, mu, logvar, mu_r, logvar_r, mu_f, logvar_f = f32(
        x_rec, rec_rec, fake_rec, mu, logvar, mu_r, logvar_r, mu_f, logvar_f)
    nelbo_real = neg_elbo(x, x_rec, mu, logvar, beta_kl=hp.beta_kl, **nel)
    nelbo_rec = neg_elbo(x_rec, rec_rec, mu_r, logvar_r, beta_kl=hp.beta_neg, **nel)
    nelbo_fake = neg_elbo(fake.float(), fake_rec, mu_f, logvar_f, beta_kl=hp.beta_neg, **nel)
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
                          kl_divergence(mu_f, logvar_f), reconstruction_error(x_rec.detach(), rec_rec),
                          reconstruction_error(fake.detach(), fake_rec), beta_rec=hp.beta_rec, beta_kl=hp.beta_kl,
                          gamma_r=hp.gamma_r, scale=scale)
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()
    set_requires_grad(enc, True)
    return {"loss_E": loss_e.detach(), "loss_D": loss_d.detach(), "L_reversed": l_rev.detach(),
            "mse": (x - x_rec.detach()).pow(2).mean(), "kl_real": kl_divergence(mu, logvar).mean().detach(),
            "kl_fake": kl_divergence(mu_f, logvar_f).mean().detach()}


@torch.no_grad()
def val_mse(model, x_val, device):
    """Mean squared error of the pseudo-healthy reconstructions of healthy validation slices (model selection)."""
    model.eval()
    err = [(model.pseudo_healthy(xb) - xb).pow(2).mean(dim=(1, 2, 3)).cpu() for xb in
           (to01(torch.from_numpy(np.array(x_val[i:i + 64], dtype=np.float32))[:, None].to(device))
            for i in range(0, len(x_val), 64))]
    model.train()
    return float(torch.cat(err).mean())


def train(model, S_train, S_val, args, run):
    """Train with Adam on encoder and decoder (App. A); keep the weights with the lowest validation MSE
    (reference trainer); checkpoint last.pt every epoch; early stopping after --patience epochs."""
    device = run.device
    opt_e = torch.optim.Adam(model.encoder.parameters(), lr=args.lr)
    opt_d = torch.optim.Adam(model.decoder.parameters(), lr=args.lr)
    hist = {"loss_E": [], "loss_D": [], "L_reversed": [], "mse": [], "kl_real": [], "kl_fake": [], "val_mse": []}
    start_epoch, step, best, best_state, since_best = 0, 0, math.inf, None, 0
    if args.resume:
        ck = C.load_checkpoint(args.resume, device)
        try:
            model.load_state_dict(ck["models"]["ra"])
        except (RuntimeError, KeyError) as e:
            C.fail(f"--resume {args.resume} does not fit this network ({type(e).__name__}); pass the "
                   f"--preset / --image-size / --channels / --z-dim it was trained with")
        opt_e.load_state_dict(ck["optims"]["E"])
        opt_d.load_state_dict(ck["optims"]["D"])
        start_epoch, step, hist = ck["epoch"] + 1, ck["step"], ck["history"]
        best, best_state, since_best = ck["best_val_mse"], ck["best_state"], ck["since_best"]
        C.set_rng_state(ck["rng"])
        run.log(f"resumed from {args.resume} at epoch {start_epoch}, step {step}")
    gen = torch.Generator().manual_seed(args.seed)
    N = len(S_train.x)
    n_batches = N // args.batch_size if N >= args.batch_size else 1     # drop the last partial batch in training
    ckpt = run.out / "last.pt"
    model.train()
    t0 = time.perf_counter()
    every = max(1, n_batches // 10)                                    # ~10 curve points per epoch
    for epoch in range(start_epoch, args.epochs):
        perm = torch.randperm(N, generator=gen).numpy()
        sums = {}
        for b in C.progress(range(n_batches), total=n_batches, desc=f"epoch {epoch + 1}/{args.epochs}"):
            idx = np.sort(perm[b * args.batch_size:(b + 1) * args.batch_size])
            xb = torch.from_numpy(np.array(S_train.x[idx], dtype=np.float32))[:, None]     # (B, 1, H, W) in [-1, 1]
            if not args.no_augment:                                   # App. B, training only
                xb = C.augment_2d(xb, rot_deg=10, translate=0.1, scale=(0.9, 1.1), hflip=0.5, generator=gen)
            xb = to01(xb).clamp(0, 1).to(device)
            out = train_step(model, xb, opt_e, opt_d, args, device, amp=args.amp)
            C.check_finite(out["loss_E"] + out["loss_D"], step=step, ckpt=ckpt)
            step += 1
            out = {k: float(v) for k, v in out.items()}
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v
                if step % every == 0 or step == 1:
                    hist[k].append((step, v))
            if args.max_steps and step >= args.max_steps:
                break
        nb = max(b + 1, 1)
        mean = {k: v / nb for k, v in sums.items()}
        v = val_mse(model, S_val.x, device)
        hist["val_mse"].append((step, v))
        if v < best:
            best, since_best = v, 0
            best_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
        else:
            since_best += 1
        run.log(f"epoch {epoch + 1}: -L_E {mean['loss_E']:.4f}  -L_D {mean['loss_D']:.4f}  L_rev {mean['L_reversed']:.4f}  "
                f"KL real {mean['kl_real']:.1f} fake {mean['kl_fake']:.1f}  train mse {mean['mse']:.4f}  val mse {v:.4f}"
                f"{'  (best)' if since_best == 0 else ''}")
        C.save_checkpoint(ckpt, {"models": {"ra": model.state_dict()}, "optims": {"E": opt_e.state_dict(),
                                 "D": opt_d.state_dict()}, "epoch": epoch, "step": step, "args": vars(args),
                                 "rng": C.rng_state(), "history": hist, "best_val_mse": best,
                                 "best_state": best_state, "since_best": since_best})
        if since_best >= args.patience:
            run.log(f"early stopping: no lower validation MSE for {args.patience} epochs")
            break
        if args.max_steps and step >= args.max_steps:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return hist, time.perf_counter() - t0


# =================================================================================================
# Scoring and evaluation
# =================================================================================================

# ---- App. C.1: synthetic anomalies on held-out normal slices -------------------------------------

def synthetic_intensity_anomaly(img, brain, rng):
    """Three ellipses per image (App. C.1): intensities drawn uniformly between the 1st-5th (hypo),
    30th-70th (mean-ranged) and 95th-99th (hyper) percentiles of the tissue (brain) intensities; semi-
    axes ~ N(10, 1) clipped to [8, 12] px, centres uniform in [32, 96] px, angle uniform in [0, 360)
    degrees -- all lengths given for 128 px and scaled to the image size. img, brain: (H, W).
    Returns (image with anomalies, boolean mask of the painted pixels)."""
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
    """'Copy-paste' texture anomaly (App. C.1): a rectangle of width/height uniform in [25, 50] px is
    copied from a random source to a random destination, x in [25, 128 - w], y in [25, 128 - h] (sizes
    for 128 px, scaled). The mask is the pasted pixels whose value changed."""
    H, W = img.shape
    k = H / 128.0
    h, w = (int(round(rng.uniform(25, 50) * k)) for _ in range(2))
    lo = int(round(25 * k))
    (sy, dy), (sx, dx) = (rng.integers(lo, max(H - h, lo) + 1, size=2), rng.integers(lo, max(W - w, lo) + 1, size=2))
    out = img.astype(np.float32).copy()
    out[dy:dy + h, dx:dx + w] = img[sy:sy + h, sx:sx + w]
    mask = np.zeros((H, W), bool)
    mask[dy:dy + h, dx:dx + w] = True
    return out, mask & (np.abs(out - img) > 1e-6)


# ---- §4.2: threshold, boxes, detections ------------------------------------------------------------

def threshold_at_fpr(maps, brain, fpr=0.05):
    """Threshold flagging at most a fraction `fpr` of the brain pixels of HEALTHY validation slices (§4.2):
    the (n - k)-th smallest value, k = floor(fpr·n), so that at most k pixels lie strictly above it
    (an interpolated 95th percentile can flag slightly more than 5%)."""
    v = np.sort(np.asarray(maps, dtype=np.float64)[np.asarray(brain) > 0])
    if not len(v):
        C.fail("no brain pixels in the healthy validation slices: cannot set the 5% FPR threshold")
    k = int(math.floor(fpr * len(v) + 1e-9))
    return float(v[len(v) - k - 1]) if k < len(v) else float(v[0] - 1.0)


def lesion_boxes(mask):
    """Union of the bounding boxes of the connected components of a 2D mask (stands in for the expert
    bounding boxes of FastMRI+). (H, W) -> bool (H, W)."""
    from scipy import ndimage as ndi
    lab, _ = ndi.label(mask > 0, structure=np.ones((3, 3)))            # 8-connected components
    box = np.zeros(mask.shape, bool)
    for sl in ndi.find_objects(lab):
        box[sl] = True
    return box


def localization_metrics(s, box, healthy, threshold, detect_frac=0.1):
    """§4.2 for one image: s (H, W) anomaly map, box / healthy boolean masks.
    TP = 1 if more than detect_frac of the box pixels exceed the threshold;
    FP = floor(Σ_healthy s_thr / Σ_box s_thr) (Fig. 7: 13.95 / 3.16 -> 4), s_thr = s where s > threshold;
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
    return {"tp": tp, "fp": fp, "precision": precision, "f1": f1, "sum_box": sum_box, "sum_healthy": sum_healthy}


# ---- scoring a stack of slices -------------------------------------------------------------------------

VARIANTS = {  # Table 3 rows: name -> (histogram equalisation, perceptual similarity); the first is Eq. (5) itself
    "Eq. 5 (eq + PL)": (True, True), "w/o Hist. Eq.": (False, True), "w/o PL": (True, False),
    "w/o Hist. Eq. & w/o PL": (False, False)}


@torch.no_grad()
def score_images(model, perceptual, x01, args, device, bs=32):
    """x01 (N, H, W) in [0, 1] -> pseudo-healthy x_ph (N, H, W) and the Eq. (5) factors (N, H, W) each."""
    model.eval()
    phs, terms = [], []
    for i in range(0, len(x01), bs):
        xb = torch.from_numpy(np.array(x01[i:i + bs], dtype=np.float32))[:, None].to(device)   # (B, 1, H, W)
        with C.autocast(device, args.amp):
            ph = model.pseudo_healthy(xb).float().clamp(0, 1)
        phs.append(ph[:, 0].cpu().numpy())
        terms.append(eq5_terms(xb, ph, perceptual, clip_limit=args.clahe_clip, sigma=args.saliency_sigma))
    cat = {k: (np.concatenate([t[k] for t in terms]) if terms[0][k] is not None else None) for k in terms[0]}
    return np.concatenate(phs), cat


def evaluate_variant(name, t_val, brain_val, t_test, S_test, keep, args):
    """Threshold on healthy validation slices, image scores and localisation for one Eq. (5) variant."""
    eq, pl = VARIANTS[name]
    s_val, s_test = combine_eq5(t_val, eq=eq, pl=pl), combine_eq5(t_test, eq=eq, pl=pl)
    thr = threshold_at_fpr(s_val, brain_val, args.fpr)
    scores = image_score(s_test)
    loc = {}
    for i in keep:
        m = np.asarray(S_test.mask[i]) > 0
        if m.any():
            box = lesion_boxes(m)
            healthy = (np.asarray(S_test.brain[i]) > 0) & ~box
            loc[int(i)] = localization_metrics(s_test[i], box, healthy, thr, args.detect_frac)
    return s_test, scores, thr, loc


def summarize_localization(loc, groups):
    """Table 2b per group: detected / n, mean F1 (%), mean FP ratio."""
    out = {}
    for g in sorted({groups[i] for i in loc}):
        v = [loc[i] for i in loc if groups[i] == g]
        out[g] = {"n": len(v), "detected": int(sum(r["tp"] for r in v)),
                  "f1_mean": float(np.mean([r["f1"] for r in v])), "fp_mean": float(np.mean([r["fp"] for r in v]))}
    if loc:
        v = list(loc.values())
        out["all"] = {"n": len(v), "detected": int(sum(r["tp"] for r in v)),
                      "f1_mean": float(np.mean([r["f1"] for r in v])), "fp_mean": float(np.mean([r["fp"] for r in v]))}
    return out


def synthetic_experiment(model, perceptual, x01, brain, args, device):
    """§4.1 / Table 1 on held-out normal slices x01 (N, H, W): for each anomaly type, MSE and perceptual
    distance inside the anomaly between the pseudo-healthy reconstruction and the true normal image
    (and, for reference, between the anomalous input and the normal image = what copying the input
    scores), and the pixel AUPRC of the anomaly maps of every Eq. (5) variant."""
    dist = perceptual if perceptual is not None else EncoderDistance(model.encoder)
    res, figs = {}, {}
    for kind, fn in (("intensity", synthetic_intensity_anomaly), ("texture", synthetic_texture_anomaly)):
        rng = np.random.default_rng(args.seed + (0 if kind == "intensity" else 1))
        pairs = [fn(x01[i], brain[i], rng) for i in range(len(x01))]
        xa = np.stack([p[0] for p in pairs])                                   # (N, H, W)
        ma = np.stack([p[1] for p in pairs])                                   # (N, H, W) bool
        ph, t = score_images(model, perceptual, xa, args, device)
        to_t = lambda a: torch.from_numpy(np.asarray(a, np.float32))[:, None].to(device)   # noqa: E731
        d_ph = dist(to_t(ph), to_t(x01))                                       # S(x_ph, x_normal) (N, H, W)
        d_in = dist(to_t(xa), to_t(x01))                                       # S(x_anomalous, x_normal)
        keep = [i for i in range(len(xa)) if ma[i].any()]
        mse = [float(((ph[i] - x01[i]) ** 2)[ma[i]].mean()) for i in keep]
        per = [float(d_ph[i][ma[i]].mean()) for i in keep]
        mse_in = [float(((xa[i] - x01[i]) ** 2)[ma[i]].mean()) for i in keep]
        per_in = [float(d_in[i][ma[i]].mean()) for i in keep]
        auprc = {}
        for name, (eq, pl) in VARIANTS.items():
            if pl and t["S"] is None:
                continue
            auprc[name] = C.auprc(ma[keep].ravel(), combine_eq5(t, eq=eq, pl=pl)[keep].ravel())
        res[kind] = {"n": len(keep), "mse_mean": float(np.mean(mse)), "mse_std": float(np.std(mse)),
                     f"{dist.name}_dist_mean": float(np.mean(per)), f"{dist.name}_dist_std": float(np.std(per)),
                     "input_mse_mean": float(np.mean(mse_in)), f"input_{dist.name}_dist_mean": float(np.mean(per_in)),
                     "auprc": auprc}
        figs[kind] = (xa, ph, ma, t)
    return res, figs


# ---- figures ----------------------------------------------------------------------------------------

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_fig3(x01, figs, main_variant, path, n=3):
    """Fig. 3: input with synthetic anomalies | pseudo-healthy | ground truth (normal) | anomaly map."""
    plt = _plt()
    rows = [(k, i) for k in figs for i in range(min(n, len(x01)))]
    fig, axes = plt.subplots(len(rows), 4, figsize=(9.2, 2.35 * len(rows)), squeeze=False)
    eq, pl = main_variant
    for r, (kind, i) in enumerate(rows):
        xa, ph, ma, t = figs[kind]
        s = combine_eq5({k: (v[i:i + 1] if v is not None else None) for k, v in t.items()}, eq=eq, pl=pl)[0]
        for c, (img, title) in enumerate(((xa[i], "input (synthetic anomaly)"), (ph[i], "pseudo-healthy x_ph"),
                                          (x01[i], "ground truth (normal)"), (s, "anomaly map, Eq. (5)"))):
            ax = axes[r, c]
            ax.axis("off")
            ax.imshow(img, cmap="gray" if c < 3 else "inferno", vmin=0, vmax=1 if c < 3 else max(float(s.max()), 1e-6))
            if c in (0, 3):
                ax.contour(ma[i], levels=[0.5], colors="cyan", linewidths=0.7)
            if r == 0:
                ax.set_title(title, fontsize=9)
        axes[r, 0].text(-0.06, 0.5, kind, transform=axes[r, 0].transAxes, rotation=90, ha="right", va="center")
    h = fig.get_figheight()
    fig.subplots_adjust(top=1 - 0.7 / h, wspace=0.04, hspace=0.12)
    fig.suptitle("Fig. 3 style: synthetic anomalies and pseudo-healthy reconstructions (contour = anomaly)", fontsize=9,
                 y=1 - 0.1 / h, va="top")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_fig7(items, path):
    """Fig. 7: input | pseudo-healthy | anomaly map | thresholded map | annotation (mask + box)."""
    plt = _plt()
    if not items:
        return
    fig, axes = plt.subplots(len(items), 5, figsize=(11.5, 2.35 * len(items)), squeeze=False)
    vmax = max(float(np.percentile(np.concatenate([it["s"].ravel() for it in items]), 99.5)), 1e-6)
    for r, it in enumerate(items):
        thr_map = np.where(it["s"] > it["thr"], it["s"], 0)
        panels = [(it["x"], "input", "gray", 1), (it["ph"], "pseudo-healthy", "gray", 1),
                  (it["s"], "anomaly map", "inferno", vmax), (thr_map, "thresholded (5% FPR)", "inferno", vmax),
                  (it["x"], "annotation", "gray", 1)]
        for c, (img, title, cmap, vm) in enumerate(panels):
            ax = axes[r, c]
            ax.axis("off")
            ax.imshow(img, cmap=cmap, vmin=0, vmax=vm)
            if c == 4:
                ax.contour(it["mask"], levels=[0.5], colors="red", linewidths=0.8)
                ax.contour(it["box"], levels=[0.5], colors="lime", linewidths=0.8)
            if c == 3:
                ax.contour(it["box"], levels=[0.5], colors="lime", linewidths=0.6)
            if r == 0:
                ax.set_title(title, fontsize=9)
        m = it["m"]
        axes[r, 4].text(1.04, 0.5, f"TP {m['tp']}\nFP {m['fp']}\nF1 {m['f1']:.2f}", transform=axes[r, 4].transAxes,
                        va="center", fontsize=8)
        axes[r, 0].text(-0.06, 0.5, it["title"], transform=axes[r, 0].transAxes, rotation=90, ha="right",
                        va="center", fontsize=8)
    h = fig.get_figheight()
    fig.subplots_adjust(top=1 - 0.7 / h, wspace=0.04, hspace=0.12)
    fig.suptitle("Fig. 7 style: localisation at the 5% healthy-pixel FPR threshold (red: anomaly mask, green: its "
                 "boxes); per group the first detected slice, else the first slice", fontsize=9, y=1 - 0.1 / h, va="top")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_losses(hist, lam, path):
    """losses.png: the objectives of Eq. (2)/(4) and the MSEs (log scale) | L_Reversed of Eq. (3)."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10.5, 3.6))
    for key, label in (("loss_E", "-L_E, encoder (Eq. 4)"), ("loss_D", "-L_D, decoder (Eq. 2)"),
                       ("mse", "train MSE"), ("val_mse", "validation MSE (per epoch)")):
        pts = np.asarray(hist.get(key, []), dtype=np.float64)
        if len(pts):
            a.plot(pts[:, 0], np.maximum(pts[:, 1], 1e-8), lw=1.4, marker="o" if key == "val_mse" else None, ms=3,
                   label=label)
    a.set(yscale="log", xlabel="step", ylabel="loss", title="Soft-Intro VAE objectives")
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
    pts = np.asarray(hist.get("L_reversed", []), dtype=np.float64)
    if len(pts) and lam > 0:
        b.plot(pts[:, 0], pts[:, 1], lw=1.4, color="tab:green")
        b.set(title=f"L_Reversed, Eq. (3) (weight λ = {lam:g})")
    else:
        b.text(0.5, 0.5, "λ = 0: no reversed loss\n(the SI-VAE baseline)", ha="center", va="center",
               transform=b.transAxes)
        b.set(title="L_Reversed, Eq. (3)", xticks=[], yticks=[])
    b.set(xlabel="step")
    b.grid(alpha=0.3)
    fig.suptitle(("RA" if lam > 0 else "SI-VAE (--no-reverse)") + " training", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_tables(table1, groups, table2b, table3):
    """Human-readable Table 1 / 2 / 3 summaries on stdout."""
    print("\nTable 1 (synthetic anomalies on held-out normal slices; MSE and distance inside the anomaly)")
    for kind, r in table1.items():
        dn = [k for k in r if k.endswith("_dist_mean") and not k.startswith("input")][0]
        print(f"  {kind:9s}  MSE {r['mse_mean']:.4f} ± {r['mse_std']:.4f}   {dn[:-5]} {r[dn]:.4f}   "
              f"(input as is: MSE {r['input_mse_mean']:.4f})   AUPRC "
              + ", ".join(f"{k} {v:.3f}" for k, v in r["auprc"].items()))
    print("Table 2a (detection AUROC per group)")
    print("  " + ", ".join(f"{g} {v['auroc']:.3f}" for g, v in groups.items() if "auroc" in v))
    print("Table 2b (localisation at <= 5% healthy-pixel FPR: detected / n, mean F1)")
    print("  " + ", ".join(f"{g} {v['detected']}/{v['n']} F1 {100 * v['f1_mean']:.1f}" for g, v in table2b.items()))
    print("Table 3 (ablations of Eq. 5 on the same model)")
    for name, v in table3.items():
        loc = v["localization"].get("all", {})
        print(f"  {name:24s} mean AUROC {v['auroc_mean']:.3f}   detected {loc.get('detected', 0)}/{loc.get('n', 0)}"
              f"   F1 {100 * loc.get('f1_mean', 0):.1f}")


# =================================================================================================
# main
# =================================================================================================

def main(argv=None):
    args = parse(argv)
    run = C.start_run(args, METHOD)
    device = run.device
    lpips_net = LPIPSDistance(device) if args.perceptual == "lpips" else None   # fail early, before training
    data = datasets.load_dataset(args, contrast="t1")
    if not data.val:
        C.fail(f"--data {args.data}: no healthy validation volumes (needed for the 5% FPR threshold)")
    size = (args.image_size, args.image_size)
    common_kw = dict(size=size, norm="mri", center=0.5, cache_dir=args.cache_dir)
    S_train = datasets.slice_stack(data.train, n_slices=args.train_slices, desc="train", **common_kw)
    S_val = datasets.slice_stack(data.val, n_slices=args.test_slices, desc="val", **common_kw)
    S_test = datasets.slice_stack(data.test, n_slices=args.test_slices, desc="test", **common_kw)
    run.log(f"slices: train {len(S_train.x)}, val {len(S_val.x)}, test {len(S_test.x)} at {size[0]}x{size[1]}")

    model = SoftIntroVAE(channels=args.channel_list, z_dim=args.z_dim, image_size=args.image_size).to(device)
    run.log(f"Soft-Intro VAE: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
            f"λ = {args.lam} ({'SI-VAE baseline' if args.lam == 0 else 'RA'})")

    # ---- training (or a given checkpoint) ----
    if args.checkpoint:
        ck = C.load_checkpoint(args.checkpoint, device)
        try:
            model.load_state_dict(ck.get("best_state") or ck["models"]["ra"])
        except (RuntimeError, KeyError) as e:
            C.fail(f"--checkpoint {args.checkpoint} does not fit this network ({type(e).__name__}); pass the "
                   f"--preset / --image-size / --channels / --z-dim it was trained with")
        hist, train_s = ck.get("history", {}), 0.0
        if str(run.out / "last.pt") != str(args.checkpoint):
            C.save_checkpoint(run.out / "last.pt", ck)
        run.log(f"scoring with {args.checkpoint}")
    else:
        hist, train_s = train(model, S_train, S_val, args, run)
        run.log(f"training took {train_s:.1f} s")
    model.eval()
    if hist:
        plot_losses(hist, args.lam, run.out / "losses.png")

    # ---- scoring ----
    t_score = time.perf_counter()
    perceptual = {"encoder": EncoderDistance(model.encoder), "lpips": lpips_net, "none": None}[args.perceptual]
    main_variant = (not args.no_eq, perceptual is not None)
    main_name = [k for k, v in VARIANTS.items() if v == main_variant][0]
    x_val, x_test = to01(np.asarray(S_val.x)), to01(np.asarray(S_test.x))
    _, t_val = score_images(model, perceptual, x_val, args, device)
    ph_test, t_test = score_images(model, perceptual, x_test, args, device)

    # test units: every slice of a normal case or of an anomalous case without a mask; for anomalous cases
    # with a mask only the slices that contain the anomaly (deviation 3)
    groups = [S_test.cases[c].group for c in S_test.case]
    has_mask = np.asarray(S_test.mask).reshape(len(S_test.x), -1).any(axis=1)
    keep = [i for i in range(len(S_test.x)) if S_test.cases[S_test.case[i]].label == 0
            or S_test.cases[S_test.case[i]].mask is None or has_mask[i]]
    dropped = sorted({S_test.cases[S_test.case[i]].id for i in range(len(S_test.x))}
                     - {S_test.cases[S_test.case[i]].id for i in keep})
    if dropped:
        run.log(f"{len(dropped)} anomalous test volumes have no anomaly in their {args.test_slices} middle slice(s) "
                f"and are not scored (see data_info.not_scored)")

    table3, per_variant = {}, {}
    for name, (eq, pl) in VARIANTS.items():
        if pl and perceptual is None:
            continue
        s_test, scores, thr, loc = evaluate_variant(name, t_val, S_val.brain, t_test, S_test, keep, args)
        per_variant[name] = (s_test, scores, thr, loc)
        y = np.array([S_test.cases[S_test.case[i]].label for i in keep])
        g = np.array([groups[i] for i in keep])
        sc = scores[keep]
        aurocs = {grp: C.auroc(y[(g == grp) | (y == 0)], sc[(g == grp) | (y == 0)]) for grp in sorted(set(g[y == 1]))}
        table3[name] = {"eq": eq, "perceptual": args.perceptual if pl else "none", "threshold": thr,
                        "auroc": aurocs, "auroc_mean": float(np.mean(list(aurocs.values()))),
                        "localization": summarize_localization(loc, groups)}

    s_test, scores, thr, loc = per_variant[main_name]
    rows = []
    for i in keep:
        case = S_test.cases[S_test.case[i]]
        r = {"id": f"{case.id}/z{int(S_test.z[i])}", "group": case.group, "label": case.label, "score": float(scores[i])}
        if i in loc:
            r.update(detected=loc[i]["tp"], fp=loc[i]["fp"], f1=round(loc[i]["f1"], 4))
        rows.append(r)

    # §4.1 / Table 1: synthetic anomalies painted on the held-out normal test slices
    normal_rows = [i for i in keep if S_test.cases[S_test.case[i]].label == 0]
    x_syn, brain_syn, syn_on = x_test[normal_rows], np.asarray(S_test.brain)[normal_rows], "normal test slices"
    if not normal_rows:   # e.g. BraTS tested alone: no normal test slice at these levels; use held-out healthy ones
        x_syn, brain_syn, syn_on = x_val, np.asarray(S_val.brain), "healthy validation slices (no normal test slice)"
    table1, figs = synthetic_experiment(model, perceptual, x_syn, brain_syn, args, device)
    table1 = {k: {**v, "painted_on": syn_on} for k, v in table1.items()}
    score_s = time.perf_counter() - t_score

    # ---- figures ----
    ex_rows, seen = [], {}
    for i in keep:
        grp = groups[i]
        if seen.get(grp, 0) < (2 if grp == "normal" else 1):
            seen[grp] = seen.get(grp, 0) + 1
            ex_rows.append({"title": f"{grp} ({scores[i]:.3g})", "input": x_test[i] * 2 - 1,
                            "reconstruction": ph_test[i] * 2 - 1, "amap": s_test[i],
                            "gt": np.asarray(S_test.mask[i]) if has_mask[i] else None})
    ex_rows.sort(key=lambda r: (not r["title"].startswith("normal"), r["title"]))
    C.plot_examples(ex_rows, run.out / "examples.png")
    plot_fig3(x_syn, figs, main_variant, run.out / "synthetic.png")
    fig7 = []
    for grp in sorted({groups[i] for i in loc}):
        cand = [i for i in sorted(loc) if groups[i] == grp]
        i = next((j for j in cand if loc[j]["tp"]), cand[0])
        m = np.asarray(S_test.mask[i]) > 0
        fig7.append({"x": x_test[i], "ph": ph_test[i], "s": s_test[i], "thr": thr, "mask": m,
                     "box": lesion_boxes(m), "m": loc[i], "title": grp})
    plot_fig7(fig7, run.out / "localization.png")

    table2b = summarize_localization(loc, groups)
    extra = {
        "method_variant": "SI-VAE (no reverse loss)" if args.lam == 0 else "RA",
        "anomaly_map": main_name, "perceptual": args.perceptual,
        "threshold_5pct_fpr": thr, "table1_synthetic": table1, "table2b_localization": table2b,
        "table3_ablation": table3,
        "train": {"n_slices": len(S_train.x), "epochs_run": len(hist.get("val_mse", [])) if hist else 0,
                  "best_val_mse": min((v for _, v in hist.get("val_mse", [])), default=None) if hist else None},
        "figures": ["examples.png", "losses.png", "synthetic.png (Fig. 3)", "localization.png (Fig. 7)"],
    }
    info = {**data.info, "test_slices_per_volume": args.test_slices, "not_scored": dropped}
    res = C.finish_run(run, args, METHOD, unit="slice", rows=rows,
                       timing={"train_s": train_s, "score_s": score_s, "score_s_per_sample": score_s / max(len(rows), 1)},
                       extra=extra, data_info=info, roc_title=f"{extra['method_variant']}: slice-level ROC")
    print_tables(table1, res["groups"], table2b, table3)
    return res


if __name__ == "__main__":
    C.main_guard(main)
