"""AnoVAEGAN and the deep (spatial) autoencoders for unsupervised anomaly segmentation in brain MRI.

Christoph Baur, Benedikt Wiestler, Shadi Albarqouni, Nassir Navab. "Deep Autoencoding Models for
Unsupervised Anomaly Segmentation in Brain MR Images." BrainLes 2018 (MICCAI workshop), LNCS 11383,
pp. 161-169, 2019. arXiv:1804.04488. Text: ../shared/papers/anovaegan--baur2018-brainles.txt

Idea (Fig. 1): an autoencoder trained on entire axial slices of healthy brains cannot reconstruct an
anomaly (an MS lesion, a tumour), so the residual |x − x̂| delineates it. The six rows of Table 1
(`--model`) share one encoder and decoder; they differ in the bottleneck (dense z, or spatial z of
h×w×c), the prior on z (VAE) and an adversarial discriminator (GAN):
    dAE, sAE     dense / spatial AE           Eq. (2) with λ2 = λ3 = 0
    dVAE, sVAE   dense / spatial VAE          Eq. (2) with λ3 = 0
    sAE-GAN      spatial AE + discriminator   Eq. (2) with λ2 = 0, and Eq. (3)  ("Context Encoder")
    AnoVAEGAN    spatial VAE + discriminator  Eq. (2) and Eq. (3)    (the paper's method, Fig. 2)

Equations (unnumbered in the paper; numbered here in the order of §2 "Methodology"):
  Eq. (1)  z ~ Enc(x; θ),  x̂ = Dec(z; φ),  z ~ N(0, I)
  Eq. (2)  L_VAE = λ1·‖x − x̂‖₁ + λ2·D_KL(z ‖ N(0, I)) − λ3·log Dis(Dec(Enc(x)))
  Eq. (3)  L_Dis = −log Dis(x) − log(1 − Dis(Dec(Enc(x))))
  Eq. (4)  r = |x − x̂|, thresholded to a segmentation (§2 "Anomaly Detection")
  §3 "Postprocessing": per patient a 5×5×5 median filter over the residual sub-volume, times a
  slightly eroded brain mask, a threshold at the 98th percentile of healthy residuals, 3D connected
  components under 6 voxels removed. §3 "Evaluation Metrics": Dice over test patients, reco time.

Deviations from the paper (and choices it leaves open):
 1. Data: the in-house FLAIR data (83 healthy, 49 MS patients) is private. `--data synthetic` is the
    FLAIR phantom (`ms_lesion` ≈ MS lesions, `tumor`); real data `--data mslub|isbi2015|brats`:
    per-patient slabs, lesion-free slices the normal group; tissue median -> -1/3 (unstated).
 2. The threshold comes from healthy VALIDATION subjects (training residuals are optimistically
    small), taken on the filtered values it thresholds.
 3. Architecture (the paper builds on Pawlowski et al. without details): the encoder/decoder of the
    authors' later code (Baur et al. 2020): 5×5 stride-2 convolutions, 32-64-128-128 filters,
    BatchNorm, LeakyReLU(0.2); a mirrored decoder with a linear 1×1 output; spatial z a 1×1
    convolution, dense z a fully connected layer; Dis = the encoder trunk + a linear layer.
 4. Loss scale: ‖·‖₁ and D_KL are summed over pixels / latent units and averaged over the batch;
    λ1 = λ2 = 1 (not reported). Adam (not named) with the paper's learning rates: one Enc/Dec
    step on Eq. (2), then one Dis step on Eq. (3), per minibatch.
 5. At test time the VAEs decode the posterior mean z = μ (the paper does not say).
 6. Beyond the paper: slice- and pixel-level AUROC/AUPRC (a slice scores its largest filtered
    residual), intervals over patients, `oracle_dice` (a threshold chosen with the test labels: an
    upper bound only), --compare's paired intervals for the paper's ranking, and a copy probe
    (copy_probe.png: the share of a disc painted into healthy slices the reconstruction keeps).
 7. `quick`: 64×64 slices, filters halved, 5 epochs. The compression is kept with 3 stride-2 stages
    (z 8×8×16 is 1/4 of the pixels like 16×16×64 at 256²; dense 32 = 1/128 like 512; the 8×8×64 row
    becomes 8×8×4); a 3×3×3 median (the paper's ≈5 mm at ≈3 mm pixels) and no size filter (6 voxels
    of 0.94 mm are less than one quick voxel). `smoke`: 32×32 on the tiny phantom, seconds.
 8. λ3 (not reported) is S·S/100, not 1: L_adv is one number per slice against ‖x − x̂‖₁ summed
    over S·S pixels, so at λ3 = 1 L_rec's gradient on the decoder is hundreds of times L_adv's,
    the discriminator wins and the GAN rows equal their non-GAN rows. At S·S/100 L_rec still pulls
    about ten times harder (the image stays tied to its input) while the discriminator is held at
    chance: the realism the term is for (§1). The ratio: losses.png. Literal: `--lam-adv 1`.

At quick size a spatial bottleneck copies anomalies into its reconstruction (copy_probe.png); the
spatial-vs-dense rows with paired intervals: `python benchmark.py --fidelity --row baur_spatial`.

Commands:
  python anovaegan.py                                 # quick: AnoVAEGAN on the phantom, CPU minutes
  python anovaegan.py --model sAE --z-shape 8x8x4     # any Table 1 row (the quick 8×8×64 row)
  python anovaegan.py --preset paper --data mslub     # paper: 256×256, z 16×16×64, 150 epochs
  python anovaegan.py --compare runs/anovaegan__*     # Table 1, paired differences, Fig. 5
"""
from __future__ import annotations

import math
import re

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C
from data import datasets


# =================================================================================================
# Hyperparameters (Table 1, §3 'Implementation')
# =================================================================================================

METHOD = "anovaegan"
MODELS = ("dAE", "sAE", "dVAE", "sVAE", "sAE-GAN", "AnoVAEGAN")             # the rows of Table 1
SPATIAL = {"sAE", "sVAE", "sAE-GAN", "AnoVAEGAN"}                           # z of shape h×w×c
VARIATIONAL = {"dVAE", "sVAE", "AnoVAEGAN"}                                 # L_prior (λ2 > 0)
ADVERSARIAL = {"sAE-GAN", "AnoVAEGAN"}                                      # Dis, L_adv (λ3 > 0)

# One declaration per hyperparameter: the paper's value (the default of --preset paper), its source.
HYPER = dict(
    model=C.hp("AnoVAEGAN", "Table 1 row: dense/spatial AE or VAE, spatial AE-GAN, AnoVAEGAN",
               choices=MODELS),
    image_size=C.hp(256, "slices resized to S×S, §3 'Datasets'", lo=8),
    n_slices=C.hp(20, "consecutive axial slices around the middle per subject, §3 'Datasets'",
                  lo=1),
    z_shape=C.hp("16x16x64", "spatial bottleneck h x w x c, Table 1 (8x8x64 for sAE1); sets the "
                 "depth of the shared encoder: log2(image-size / h) stride-2 stages",
                 metavar="HxWxC"),
    z_dim=C.hp(512, "dense bottleneck size, Table 1", lo=1),
    width=C.hp(32, "filters of the first convolution, doubled per stage up to 4x (not in the "
               "paper; the authors' later code)", lo=1),
    epochs=C.hp(150, "training epochs, §3 'Implementation'", lo=1),
    batch_size=C.hp(8, "minibatch size, §3 'Implementation'", lo=1),
    lr=C.hp(1e-3, "Adam learning rate of Enc/Dec on Eq. (2) ('reconstruction objective'), §3",
            lo=1e-12, hi=1.0),
    lr_adv=C.hp(1e-4, "Adam learning rate of Dis on Eq. (3) ('adversarial training'), §3",
                lo=1e-12, hi=1.0),
    lam_rec=C.hp(1.0, "λ1 in Eq. (2) (not reported in the paper)", lo=0),
    lam_prior=C.hp(1.0, "λ2 in Eq. (2), VAEs only (not reported)", lo=0),
    lam_adv=C.hp("S*S/100", "λ3 in Eq. (2), GAN models only (not reported): S*S/100 weighs L_adv "
                 "like the ℓ1 error of 1% of the slice's pixels (deviation 8); 1 = Eq. (2)'s unit "
                 "weight as printed, the paper's literal weighting", lo=0, type=float,
                 metavar="LAMBDA3"),
    median=C.hp(5, "median filter size (voxels) over each patient's residual sub-volume, "
                "§3 'Postprocessing' (0 or 1: none)", lo=0),
    erode=C.hp(1, "brain-mask erosion (iterations), §3 'Postprocessing' ('slightly eroded')", lo=0),
    percentile=C.hp(98.0, "threshold = this percentile of healthy residuals, §3 'Postprocessing'",
                    lo=0, hi=100),
    min_size=C.hp(6, "remove 3D connected components smaller than this (voxels), "
                  "§3 'Postprocessing'", lo=1),
    max_pixels=C.hp(4_000_000, "pixels sampled for pixel-level AUROC/AUPRC/oracle Dice (ours)",
                    lo=1),
    probe_radii=C.hp([8, 16, 28], "disc radii (pixels) of the copy probe (ours, copy_probe)", lo=1,
                     metavar="R"),
)
# quick (2-core CPU, minutes): 64×64 slices, filters halved, 5 epochs, the paper's compression kept
# (deviation 7); smoke: 32×32 slices of the tiny phantom, 1 epoch, seconds
QUICK = dict(image_size=64, z_shape="8x8x16", z_dim=32, width=16, epochs=5, median=3, min_size=1,
             max_pixels=1_000_000, probe_radii=[2, 4, 7])
SMOKE = dict(image_size=32, n_slices=8, z_shape="8x8x4", z_dim=16, width=8, epochs=1,
             max_pixels=50_000, probe_radii=[1, 2, 4])
LIST_FLAGS = """
list flags of this script:
  --groups GROUP [GROUP ...]  keep only these anomalous test groups (default: all)
  --compare RUN_DIR [...]     no training: Table 1, paired intervals and Fig. 5 across finished runs
"""


def parse_args(argv=None):
    """The command line: the contract's flags, one per HYPER entry, and --groups / --compare."""
    ns, rest = C.list_flags(argv, {"groups": "GROUP", "compare": "RUN_DIR"})
    args = C.parse_args(rest, HYPER, {"quick": QUICK, "smoke": SMOKE}, method=METHOD,
                        doc=__doc__ + LIST_FLAGS, check=check_args)
    vars(args).update(vars(ns))
    return args


def parse_z_shape(s):
    m = re.fullmatch(r"\s*(\d+)\s*[x×,]\s*(\d+)\s*[x×,]\s*(\d+)\s*", str(s))
    if not m:
        C.fail(f"--z-shape {s!r}: expected h x w x c, e.g. 16x16x64")
    return tuple(int(v) for v in m.groups())


def check_args(args):
    """Cross-checks the table's ranges cannot express."""
    h, w, c = parse_z_shape(args.z_shape)
    f, s = (args.image_size // h if h else 0), args.image_size
    if h != w or h < 1 or s % h or f < 2 or f & (f - 1):
        C.fail(f"--z-shape {args.z_shape} does not fit --image-size {s}: need a square h×h with "
               f"image-size / h a power of two >= 2 (e.g. {s // 16}x{s // 16}x64)")
    if c < 1:
        C.fail(f"--z-shape {args.z_shape}: the channel count must be >= 1")
    if args.median > 1 and args.median % 2 == 0:
        C.fail(f"--median must be odd (a centred window) or 0/1 for none, got {args.median}")
    if args.lam_adv == "S*S/100":       # deviation 8: L_adv weighs like 1% of the pixels' ℓ1 error
        args.lam_adv = args.image_size ** 2 / 100


def z_label(args):
    """The bottleneck as Table 1 writes it: '512' (dense) or '16x16x64' (spatial)."""
    return args.z_shape.replace(" ", "") if args.model in SPATIAL else str(args.z_dim)


def z_paper_equivalent(args):
    """The Table 1 bottleneck with the same compression (latent units per pixel) at 256×256:
    quick 8x8x16 (1024 units / 64²) -> 16x16x64, 8x8x4 -> 8x8x64, dense 32 -> 512."""
    h, w, c = parse_z_shape(args.z_shape)
    units = (h * w * c if args.model in SPATIAL else args.z_dim) * (256 / args.image_size) ** 2
    names = {16384: "16x16x64", 4096: "8x8x64"} if args.model in SPATIAL else {512: "512"}
    return names.get(round(units), f"{round(units)} units")


# =================================================================================================
# Networks (Fig. 2, Fig. 3)
# =================================================================================================

def down_stage(c_in, c_out):
    """5×5 stride-2 convolution, BatchNorm, LeakyReLU: (B, c_in, H, W) -> (B, c_out, H/2, W/2)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 5, stride=2, padding=2), nn.BatchNorm2d(c_out),
                         nn.LeakyReLU(0.2))


def up_stage(c_in, c_out):
    """5×5 stride-2 transposed convolution, BatchNorm, LeakyReLU: (B, c_in, H, W) ->
    (B, c_out, 2H, 2W)."""
    return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 5, stride=2, padding=2, output_padding=1),
                         nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2))


def trunk_channels(n_stages, width):
    """Encoder filters per stage: width, 2·width, 4·width, 4·width, ... (32-64-128-128 for 32)."""
    return [min(4 * width, width * 2 ** i) for i in range(n_stages)]


class Encoder(nn.Module):
    """The shared convolutional encoder trunk: (B, 1, S, S) -> (B, 4·width, h, h)."""

    def __init__(self, *, n_stages, width):
        super().__init__()
        ch = [1] + trunk_channels(n_stages, width)
        self.stages = nn.Sequential(*[down_stage(ch[i], ch[i + 1]) for i in range(n_stages)])
        self.out_channels = ch[-1]

    def forward(self, x):
        return self.stages(x)


class Decoder(nn.Module):
    """The shared decoder trunk, the encoder's mirror: (B, 4·width, h, h) -> x̂ (B, 1, S, S)."""

    def __init__(self, *, n_stages, width):
        super().__init__()
        top = trunk_channels(n_stages, width)[-1]
        ch = [top] + [max(width, top // 2 ** i) for i in range(n_stages)]       # 128-128-64-32-32
        self.stages = nn.Sequential(*[up_stage(ch[i], ch[i + 1]) for i in range(n_stages)])
        self.to_image = nn.Conv2d(ch[-1], 1, 1)

    def forward(self, f):
        return self.to_image(self.stages(f))


class Autoencoder(nn.Module):
    """Eq. (1): z ~ Enc(x; θ), x̂ = Dec(z; φ), for the five bottlenecks of Table 1 / Fig. 3.

    spatial:     z = 1×1 conv of the trunk's feature map, (B, c, h, h)
    dense:       z = fully connected layer of the flattened feature map, (B, z_dim)
    variational: the encoder outputs μ and log σ² of q(z|x) = N(μ, σ²), z = μ + σ·ε (training),
                 z = μ (test); otherwise z is deterministic."""

    def __init__(self, *, image_size, z_shape, z_dim, width, spatial, variational):
        super().__init__()
        h, _, c = z_shape
        n_stages = int(round(math.log2(image_size // h)))
        self.spatial, self.variational = spatial, variational
        self.enc = Encoder(n_stages=n_stages, width=width)
        self.dec = Decoder(n_stages=n_stages, width=width)
        top = self.enc.out_channels
        n_out = 2 if variational else 1                                        # μ (and log σ²)
        if spatial:                                     # (B, top, h, h) -> (B, c·n_out, h, h)
            self.to_z = nn.Conv2d(top, n_out * c, 1)
            self.from_z = nn.Sequential(nn.Conv2d(c, top, 1), nn.BatchNorm2d(top), nn.ReLU())
            self.z_shape = (c, h, h)
        else:                                           # (B, top·h·h) -> (B, z_dim·n_out)
            self.to_z = nn.Sequential(nn.Flatten(), nn.Linear(top * h * h, n_out * z_dim))
            self.from_z = nn.Sequential(nn.Linear(z_dim, top * h * h), nn.Unflatten(1, (top, h, h)),
                                        nn.BatchNorm2d(top), nn.ReLU())
            self.z_shape = (z_dim,)

    def encode(self, x):
        """x (B, 1, S, S) -> (μ, log σ²) or (z, None); each (B, c, h, h) or (B, z_dim)."""
        out = self.to_z(self.enc(x))
        if self.variational:
            mu, logvar = out.chunk(2, dim=1)
            return mu, logvar.clamp(-30.0, 20.0)
        return out, None

    def decode(self, z):
        return self.dec(self.from_z(z))                                        # (B, 1, S, S)

    def forward(self, x, sample=True):
        """-> x̂ (B, 1, S, S), μ (or z), log σ² (or None)."""
        mu, logvar = self.encode(x)
        z = mu
        if self.variational and sample:
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)            # reparameterisation
        return self.decode(z), mu, logvar


class Discriminator(nn.Module):
    """Dis(x): real vs reconstructed slice, a logit; the encoder trunk + a linear layer (Fig. 2)."""

    def __init__(self, *, image_size, z_shape, width):
        super().__init__()
        h = z_shape[0]
        self.trunk = Encoder(n_stages=int(round(math.log2(image_size // h))), width=width)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(self.trunk.out_channels * h * h, 1))

    def forward(self, x):
        return self.head(self.trunk(x)).squeeze(1)                             # (B,) logits


def build_models(args, device="cpu"):
    """The Table 1 row's Enc/Dec (Eq. 1) and, for the GAN models, Dis; on `device`."""
    z_shape = parse_z_shape(args.z_shape)
    ae = Autoencoder(image_size=args.image_size, z_shape=z_shape, z_dim=args.z_dim,
                     width=args.width, spatial=args.model in SPATIAL,
                     variational=args.model in VARIATIONAL)
    dis = Discriminator(image_size=args.image_size, z_shape=z_shape, width=args.width) \
        if args.model in ADVERSARIAL else None
    return ae.to(device), (dis.to(device) if dis is not None else None)


# =================================================================================================
# Losses (Eq. 2, Eq. 3)
# =================================================================================================

def loss_rec(x, x_hat):
    """L_rec, Eq. (2): ‖x − x̂‖₁, summed over pixels, averaged over the batch."""
    # Eq. (2): L_rec = ‖x − x̂‖₁
    return (x - x_hat).abs().flatten(1).sum(1).mean()


def loss_prior(mu, logvar):
    """L_prior, Eq. (2): D_KL(N(μ, σ²) ‖ N(0, I)), summed over latent units, batch-averaged."""
    # Eq. (2): L_prior = D_KL(z ‖ N(0, I)) = ½ Σ (μ² + σ² − log σ² − 1)
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0).flatten(1).sum(1).mean()


def loss_adv(d_fake):
    """L_adv, Eq. (2): −log Dis(Dec(Enc(x))), from the discriminator's logits on reconstructions."""
    # Eq. (2): L_adv = −log Dis(x̂),  log Dis = log sigmoid(logit) = −softplus(−logit)
    return F.softplus(-d_fake).mean()


def loss_vae(l_rec, l_prior, l_adv, *, lam_rec, lam_prior, lam_adv):
    """Eq. (2): L_VAE = λ1·L_rec + λ2·L_prior + λ3·L_adv (a term is 0 where the model lacks it)."""
    # Eq. (2): L_VAE = λ1·L_rec + λ2·L_prior + λ3·L_adv
    return lam_rec * l_rec + lam_prior * l_prior + lam_adv * l_adv


def loss_dis(d_real, d_fake):
    """Eq. (3): L_Dis = −log Dis(x) − log(1 − Dis(x̂)), from logits, averaged over the batch."""
    # Eq. (3): L_Dis = −log Dis(x) − log(1 − Dis(Dec(Enc(x))));  −log(1 − sigmoid(l)) = softplus(l)
    return (F.softplus(-d_real) + F.softplus(d_fake)).mean()


# =================================================================================================
# Anomaly score (Eq. 4, §3 'Postprocessing')
# =================================================================================================

def residual(x, x_hat):
    """Eq. (4): the pixel-wise ℓ1 residual r = |x − x̂| (§2 'Anomaly Detection')."""
    # Eq. (4): r = |x − x̂|
    return np.abs(np.asarray(x, np.float32) - np.asarray(x_hat, np.float32))


@torch.no_grad()
def reconstruct(ae, x, *, device, batch_size, amp=False):
    """x̂ = Dec(Enc(x)) of every slice, batched; VAEs decode z = μ. x: (N, S, S) -> (N, S, S)."""
    ae.eval()
    out = np.empty(x.shape, np.float32)
    for i in range(0, len(x), batch_size):
        xb = torch.from_numpy(np.array(x[i:i + batch_size], np.float32)).to(device)[:, None]
        with C.autocast(device, enabled=amp):
            x_hat, _, _ = ae(xb, sample=False)                                  # (B, 1, S, S)
        out[i:i + batch_size] = x_hat[:, 0].float().cpu().numpy()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out


def eroded_brain(brain, erode):
    """The 'slightly eroded brain mask' of §3 'Postprocessing' (as C.postprocess_3d erodes it)."""
    from scipy import ndimage as ndi
    b = np.asarray(brain).astype(bool)
    return ndi.binary_erosion(b, iterations=erode, border_value=1) if erode else b


def median_filter_3d(r, size, device):
    """size×size×size median filter of a (Z, H, W) volume with torch on `device`, equal to
    scipy.ndimage.median_filter(r, size) (its 'reflect' border = numpy's 'symmetric' padding).
    Used on a GPU, where it takes milliseconds; scipy's takes seconds per 20×256×256 patient."""
    k = size // 2
    t = torch.from_numpy(np.ascontiguousarray(r, np.float32)).to(device)
    for dim in range(3):                                                       # pad k on both sides
        idx = np.pad(np.arange(t.shape[dim]), (k, k), mode="symmetric")
        t = t.index_select(dim, torch.from_numpy(idx).to(device))             # (Z+2k, H+2k, W+2k)
    Z, H, W = r.shape
    out = torch.empty((Z, H, W), device=device)
    chunk = max(1, 2 ** 24 // (size ** 3 * H * W))                       # bound the unfolded memory
    for z0 in range(0, Z, chunk):
        z1 = min(Z, z0 + chunk)
        u = t[z0:z1 + 2 * k].unfold(0, size, 1).unfold(1, size, 1).unfold(2, size, 1)
        # u: (z1 - z0, H, W, size, size, size), the window of every voxel
        out[z0:z1] = u.reshape(z1 - z0, H, W, -1).median(-1).values
    return out.cpu().numpy()


def filter_residual(r, brain, args, device=None):
    """§3 'Postprocessing', first half: (Z, H, W) residual of one patient -> median-filtered (5×5×5)
    residual multiplied by the eroded brain mask."""
    if device is not None and device.type == "cuda" and args.median > 1:
        r = median_filter_3d(r, args.median, device)
        return C.postprocess_3d(r, brain, median=0, erode=args.erode, threshold=None)
    return C.postprocess_3d(r, brain, median=args.median, erode=args.erode, threshold=None)


def segment(filtered, threshold, args):
    """§3 'Postprocessing', second half: threshold the filtered residual, then remove 3D connected
    components smaller than --min-size voxels -> boolean segmentation (Z, H, W)."""
    return C.postprocess_3d(filtered, np.ones(filtered.shape, bool), median=0, erode=0,
                            threshold=threshold, min_size=args.min_size)


def score(ae, S, args, device, threshold=None):
    """The trained model applied to a set: reconstruct every slice, post-process each patient's
    residual sub-volume and, given a threshold, segment it. -> dict of x_hat, filtered, brain_e
    (the eroded brain), seg (N, S, S) and the seconds spent."""
    with C.Timer() as t_rec:
        x_hat = reconstruct(ae, S.x, device=device, batch_size=64, amp=args.amp)
    filtered = np.zeros(S.x.shape, np.float32)
    brain_e, seg = np.zeros(S.x.shape, bool), np.zeros(S.x.shape, bool)
    with C.Timer() as t_post:
        for i in range(len(S.cases)):
            rows = S.slices_of(i)                                         # one patient, in order
            r = residual(S.x[rows], x_hat[rows])                               # (Z, S, S)
            filtered[rows] = filter_residual(r, S.brain[rows], args, device)
            brain_e[rows] = eroded_brain(S.brain[rows], args.erode)
            if threshold is not None:
                seg[rows] = segment(filtered[rows], threshold, args)
    return dict(x_hat=x_hat, filtered=filtered, brain_e=brain_e, seg=seg, reco_s=t_rec.seconds,
                post_s=t_post.seconds)


def slice_scores(sc):
    """A slice's anomaly score: the maximum of its post-processed residual (beyond the paper)."""
    return sc["filtered"].reshape(len(sc["filtered"]), -1).max(1)


def healthy_threshold(ae, S_val, args, device):
    """§3 'Postprocessing': the threshold is the --percentile (98th) of the model's post-processed
    residuals on HEALTHY data, here the validation subjects, inside their eroded brain masks.
    -> (threshold, the healthy pixel values it was taken from, the healthy slice scores)."""
    sc = score(ae, S_val, args, device)
    values = sc["filtered"][sc["brain_e"]]
    return C.threshold_from_healthy(values, percentile=args.percentile), values, slice_scores(sc)


# =================================================================================================
# Training (§2 'Training', §3 'Implementation')
# =================================================================================================

def to_batch(S, idx, device):
    """Rows idx of a slice set -> (B, 1, S, S) on device (sorted: memory-mapped reads in order)."""
    return torch.from_numpy(np.array(S.x[np.sort(idx)], np.float32)).to(device)[:, None]


def grad_ratio(ae, l_rec, l_adv):
    """‖∇_φ λ1·L_rec‖ / ‖∇_φ λ3·L_adv‖ over the decoder's parameters φ (Dec of Eq. 1, from z on):
    how much more the reconstruction term steers the decoder than the adversarial one."""
    phi = [p for m in (ae.from_z, ae.dec) for p in m.parameters()]

    def norm(loss):                                                 # ‖∇_φ loss‖ over all of φ
        grads = torch.autograd.grad(loss, phi, retain_graph=True, allow_unused=True)
        return torch.sqrt(sum(g.float().pow(2).sum() for g in grads if g is not None))
    return norm(l_rec) / norm(l_adv).clamp_min(1e-30)


def train_step(ae, dis, opt, opt_dis, x, lam, amp=False, measure=False):
    """One minibatch, the two losses 'in an alternating fashion' (§2 'Training'): one Enc/Dec step
    on Eq. (2), then (GAN models) one Dis step on Eq. (3). x: (B, 1, S, S). -> {loss: tensor};
    with `measure` also the decoder's gradient ratio of the weighted L_rec and L_adv."""
    device = x.device
    # ---- Enc/Dec step on Eq. (2); Dis is held fixed
    if dis is not None:
        dis.requires_grad_(False)
    with C.autocast(device, enabled=amp):
        x_hat, mu, logvar = ae(x)                              # Eq. (1): z ~ Enc(x), x̂ = Dec(z)
        d_fake = dis(x_hat) if dis is not None else None      # (B,) logits of Dis(x̂)
    x_hat = x_hat.float()
    losses = {"L_rec": loss_rec(x, x_hat)}
    if logvar is not None:
        losses["L_prior"] = loss_prior(mu.float(), logvar.float())
    if d_fake is not None:
        losses["L_adv"] = loss_adv(d_fake.float())
    zero = x.new_zeros(())
    l_vae = loss_vae(losses["L_rec"], losses.get("L_prior", zero), losses.get("L_adv", zero), **lam)
    if measure and "L_adv" in losses and lam["lam_adv"] > 0:
        losses["grad ratio"] = grad_ratio(ae, lam["lam_rec"] * losses["L_rec"],
                                          lam["lam_adv"] * losses["L_adv"]).detach()
    opt.zero_grad(set_to_none=True)
    l_vae.backward()
    opt.step()
    if dis is None:
        return losses
    # ---- Dis step on Eq. (3): real slices against the reconstructions just made
    dis.requires_grad_(True)
    with C.autocast(device, enabled=amp):
        d_real, d_fake = dis(x), dis(x_hat.detach())
    losses["L_Dis"] = loss_dis(d_real.float(), d_fake.float())
    opt_dis.zero_grad(set_to_none=True)
    losses["L_Dis"].backward()
    opt_dis.step()
    return losses


def train(args, run, ae, dis, S_train, S_val):
    """--epochs epochs of minibatches of --batch-size healthy slices (§3 'Implementation'), Adam
    with --lr on Eq. (2) and --lr-adv on Eq. (3). -> the finished C.Loop (history, checkpoints)."""
    models, optims = {"ae": ae}, {"ae": torch.optim.Adam(ae.parameters(), lr=args.lr)}
    if dis is not None:
        models["dis"], optims["dis"] = dis, torch.optim.Adam(dis.parameters(), lr=args.lr_adv)
    batches = C.Batches(len(S_train), args.batch_size, args.seed)
    loop = C.Loop(run, args, models, optims, batches={"train": batches}, log_every=5)
    # a term is 0 where the model lacks it (Table 1: AE λ2 = λ3 = 0, VAE λ3 = 0, AE-GAN λ2 = 0)
    lam = dict(lam_rec=args.lam_rec, lam_prior=args.lam_prior if args.model in VARIATIONAL else 0.0,
               lam_adv=args.lam_adv if args.model in ADVERSARIAL else 0.0)
    for step in loop.phase("train", args.epochs * batches.steps_per_epoch):
        ae.train()
        x = to_batch(S_train, next(batches), run.device)                      # (B, 1, S, S)
        losses = train_step(ae, dis, optims["ae"], optims.get("dis"), x, lam, args.amp,
                            measure=step % loop.log_every == 0 or step == 1)   # the logged steps
        loop.log(losses)
        if batches.epoch_done:                  # validation L_rec: monitoring only, selects nothing
            loop.log({"val L_rec": val_rec(ae, S_val, args, run.device)}, every=1)
            run.log(f"epoch {batches.epoch + 1}/{args.epochs}  "
                    + "  ".join(f"{k} {v.item():.3f}" for k, v in losses.items())
                    + f"  val L_rec {loop.history['val L_rec'][-1][1]:.1f}")
    loop.close()
    return loop


def val_rec(ae, S_val, args, device):
    """L_rec (Eq. 2) of the healthy validation slices, summed per slice, averaged."""
    x = np.asarray(S_val.x)
    x_hat = reconstruct(ae, x, device=device, batch_size=64, amp=args.amp)
    return float(np.abs(x_hat - x).reshape(len(x), -1).sum(1).mean())


# =================================================================================================
# Scoring and evaluation (§3 'Evaluation Metrics')
# =================================================================================================

HEADLINE_GROUPS = ("ms_lesion", "tumor")      # the MS-lesion-like groups of Table 1
# Table 1 of the paper (MS lesions, in-house FLAIR): Dice mean, std; reco time (s) where given
PAPER_TABLE1 = {
    ("dAE", "512"): (0.12764, 0.14617, None), ("sAE", "8x8x64"): (0.19739, 0.19061, None),
    ("sAE", "16x16x64"): (0.58558, 0.19845, None), ("dVAE", "512"): (0.16619, 0.17790, None),
    ("sAE-GAN", "16x16x64"): (0.52636, 0.19780, None),
    ("sVAE", "16x16x64"): (0.59227, 0.19585, None),
    ("AnoVAEGAN", "16x16x64"): (0.60508, 0.19277, 0.01541)}


def evaluate_test(S, sc, args, log=None):
    """Per patient: the Dice of its segmentation (Table 1); per slice: a contract row; per group:
    Dice with its 95% interval over patients, pixel-level AUROC/AUPRC and the oracle Dice."""
    gt, scores, seg = np.asarray(S.mask) > 0, slice_scores(sc), sc["seg"]
    rows, patients = [], []
    for i, case in enumerate(S.cases):
        r = S.slices_of(i)
        patients.append(dict(id=case.id, group=case.group, label=int(case.label),
                             gt_voxels=int(gt[r].sum()), seg_voxels=int(seg[r].sum()),
                             dice=C.dice(seg[r], gt[r]) if gt[r].any() else None))
        for j in r:      # a row per slice: its own label; case = the scan (rows contract)
            label, group = datasets.slice_label(case, gt[j])
            rows.append(dict(id=f"{case.id}/z{int(S.z[j]):03d}", group=group, label=label,
                             score=float(scores[j]), case=case.id, z=int(S.z[j]),
                             gt_voxels=int(gt[j].sum()), seg_voxels=int(seg[j].sum())))
    # Table 1: Dice per patient, mean ± std and the mean's 95% interval over patients, per group
    ev = C.segmentation_metrics(patients, np.array([c.group for c in S.cases])[S.case],
                                sc["filtered"], gt, S.brain, args.max_pixels, log=log)
    return rows, patients, ev


def probe_results(run, ae, S_val, history, args):
    """The copy probe on the healthy validation slices (C.copy_probe, copy_probe.png) ->
    results.json entries of the probe and (GAN models) of the decoder's gradient ratio."""
    out = {"copy_probe": C.copy_probe_report(
        run, lambda x: reconstruct(ae, x, device=run.device, batch_size=64, amp=args.amp), S_val,
        args.probe_radii, f"copy probe, {args.model} z {z_label(args)}: a disc of intensity 1 "
        "painted into healthy validation slices")}
    if history.get("grad ratio"):      # the GAN models: how hard L_adv pulls the decoder
        r = [v for _, v in history["grad ratio"]]
        out["grad_ratio"] = {"lam_adv": args.lam_adv, "first": r[0], "last": r[-1],
                             "median": float(np.median(r)), "what": "‖∇_Dec λ1·L_rec‖ / "
                             "‖∇_Dec λ3·L_adv‖ on the logged training steps"}
    return out


def table1_row(args, ev, patients, sc, n_test, n_params):
    """Our Table 1 row: Dice over the patients of the headline (MS-lesion-like) groups, time."""
    head = [g for g in HEADLINE_GROUPS if g in ev["dice"]]
    dice = [p["dice"] for p in patients
            if p["dice"] is not None and (p["group"] in head or not head)]
    ci = C.mean_ci(dice)
    paper = PAPER_TABLE1.get((args.model, z_paper_equivalent(args)))
    return {"model": args.model, "z": z_label(args), "dice_mean": ci["mean"],
            "dice_std": float(np.std(dice)) if dice else float("nan"), "dice_ci": ci["ci"],
            "dice_n": len(dice), "dice_groups": head or ["all"],
            "reco_s_per_sample": (sc["reco_s"] + sc["post_s"]) / max(n_test, 1),
            "paper_row": z_paper_equivalent(args), "paper": list(paper) if paper else None,
            "n_params": n_params, "image_size": args.image_size, "preset": args.preset}


def results_extra(run, args, S_test, sc, ev, patients, threshold, val_px, n_params, train_s, io):
    """results.json beyond the contract (the Table 1 row, Dice, pixel metrics) and the timing; our
    Table 1 row is printed."""
    n, t = len(S_test), table1_row(args, ev, patients, sc, len(S_test), n_params)
    run.log(f"Table 1 row: {args.model} z={t['z']}  Dice {C.fmt_ci(t['dice_mean'], t['dice_ci'])} "
            f"σ {t['dice_std']:.3f} ({'+'.join(t['dice_groups'])}, n={t['dice_n']})  "
            f"reco {t['reco_s_per_sample'] * 1000:.2f} ms/slice")
    extra = {"model": args.model, "z": z_label(args), "table1": t, **ev,
             "oracle_dice": {g: v["oracle_dice"] for g, v in ev["pixel"].items()
                             if "oracle_dice" in v},
             "threshold": {"value": threshold, "percentile": args.percentile,
                           "source": "healthy validation", "n_val_pixels": int(val_px.size)},
             "patients": patients, "slice_label": "slice contains ground-truth anomaly voxels",
             "checkpoints": io}
    timing = {"train_s": train_s, "score_s": sc["reco_s"] + sc["post_s"],
              "score_s_per_sample": (sc["reco_s"] + sc["post_s"]) / max(n, 1),
              "reco_s_per_sample": sc["reco_s"] / max(n, 1),
              "postprocess_s_per_patient": sc["post_s"] / max(len(S_test.cases), 1),
              "n_test_slices": n}
    return extra, timing


# =================================================================================================
# main
# =================================================================================================

def main(argv=None):
    args = parse_args(argv)
    run = C.start_run(args, method=METHOD)
    if args.compare:     # no training: Table 1 across finished runs (built by benchmark.py)
        import benchmark
        return benchmark.anovaegan_table1(args.compare, run, MODELS, HEADLINE_GROUPS, plot_fig5)
    device = run.device
    # ---- data: 20 consecutive axial slices around the middle of every subject (§3 'Datasets')
    data = datasets.load_dataset(args, contrast="flair", groups=args.groups)
    sl = dict(size=(args.image_size, args.image_size), norm="mri", n_slices=args.n_slices,
              center=0.5, cache_dir=args.cache_dir)
    S_train = datasets.slice_stack(data.train, desc="train", **sl)
    S_val = datasets.slice_stack(data.val, desc="val", **sl)
    S_test = datasets.slice_stack(datasets.whole_slabs(data.test), desc="test",
                                  drop_anomalous=False, **sl)
    run.log(f"{args.model}: {len(S_train)} training slices ({len(data.train)} subjects), "
            f"{len(S_val)} validation, {len(S_test)} test slices; z = {z_label(args)}")

    # ---- models: Eq. (1) and the discriminator
    ae, dis = build_models(args, device)
    n_params = sum(p.numel() for p in ae.parameters())
    run.log(f"Enc/Dec {n_params / 1e6:.2f} M parameters" + (
        f", Dis {sum(p.numel() for p in dis.parameters()) / 1e6:.2f} M" if dis is not None else ""))

    # ---- train on Eq. (2) / Eq. (3), or score a --checkpoint
    if args.checkpoint:
        ck = C.load_models(args.checkpoint, {"ae": ae}, METHOD)
        history, train_s, loop = ck.get("history", {}), 0.0, None
        io = {"scored": str(args.checkpoint)}
        run.log(f"scoring with {args.checkpoint} (no training)")
    else:
        loop = train(args, run, ae, dis, S_train, S_val)
        history, train_s, io = loop.history, loop.state["train_s"], loop.io_report()

    # ---- threshold from healthy validation data (§3 'Postprocessing', 98th percentile)
    threshold, val_values, val_scores = healthy_threshold(ae, S_val, args, device)
    run.log(f"threshold = {args.percentile:g}th percentile of healthy validation residuals "
            f"= {threshold:.4f}")

    # ---- test: reconstruct, post-process, segment (Eq. 4, §3), evaluate
    sc = score(ae, S_test, args, device, threshold)
    rows, patients, ev = evaluate_test(S_test, sc, args, log=run.log)
    C.add_baselines(rows, C.baseline_units(S_train, S_test, np.concatenate(   # issue 15.5
        [S_test.slices_of(i) for i in range(len(S_test.cases))]), "max"))
    extra, timing = results_extra(run, args, S_test, sc, ev, patients, threshold, val_values,
                                  n_params, train_s, io)

    # ---- beyond the paper: how much of a painted anomaly does the model copy? (copy_probe.png)
    extra.update(probe_results(run, ae, S_val, history, args))

    # ---- figures (the paper's Fig. 5 and Fig. 6, the losses) and the contract files
    examples = paper_figures(run, args, S_test, sc, patients, threshold, val_values)
    plot_losses(history, run.out / "losses.png", args)
    return C.report(run, args, "slice", rows, timing, extra=extra, data_info=data.info,
                    val_scores=val_scores, threshold_pct=args.percentile, examples=examples,
                    loop=loop, slabs=S_test.slabs, slab_cases=S_test.cases, skipped=S_test.skipped,
                    baselines_how="max over the slice (the maps are 0 outside the brain)",
                    titles={"roc": f"{args.model}: slice-level ROC (lesion in slice)"})


# =================================================================================================
# Appendix: the paper's figures (Fig. 5, Fig. 6)
# =================================================================================================

def paper_figures(run, args, S_test, sc, patients, threshold, val_values):
    """Fig. 5 (fig5_segmentations.png; fig5.npz for --compare), Fig. 6; -> rows for examples.png."""
    gt = np.asarray(S_test.mask) > 0
    present = list(dict.fromkeys(c.group for c in S_test.cases))
    head = [g for g in HEADLINE_GROUPS if g in present]
    normal = ["normal"] if "normal" in present else []
    name = lambda i, j: f"{S_test.cases[i].id.split('/')[-1]} z{int(S_test.z[j])}"     # noqa: E731
    others = [g for g in present if g not in head + normal]
    examples = [dict(title=f"{S_test.cases[i].group}\n{name(i, j)}", input=S_test.x[j],
                     reconstruction=sc["x_hat"][j], amap=sc["filtered"][j],
                     gt=gt[j] if gt[j].any() else None)
                for i, j in C.pick_examples(S_test, head + others + normal)]
    ex5 = (C.pick_examples(S_test, head or present[:1], per_group=2)
           + C.pick_examples(S_test, normal)[:1])
    j5 = [j for _, j in ex5]
    dice = {p["id"]: np.nan if p["dice"] is None else p["dice"] for p in patients}
    z = dict(x=np.stack([S_test.x[j] for j in j5]), gt=gt[j5], filtered=sc["filtered"][j5],
             seg=sc["seg"][j5], label=np.array([name(i, j) for i, j in ex5]),
             dice=np.array([dice[S_test.cases[i].id] for i, _ in ex5]),
             vmax=float(max(np.percentile(sc["filtered"][sc["brain_e"]], 99.9), threshold * 1.5,
                            1e-6)))
    np.savez_compressed(run.out / "fig5.npz", **z)
    plot_fig5([(f"{args.model} {z_label(args)}", z)], run.out / "fig5_segmentations.png",
              f"Fig. 5 ({args.model}): threshold {threshold:.3f} from healthy validation data")
    plot_fig6(sc, gt, np.array([c.group for c in S_test.cases])[S_test.case], threshold, val_values,
              run.out / "fig6_residual_histogram.png", args)
    return examples


def plot_losses(history, path, args):
    """losses.png: the terms of Eq. (2) and Eq. (3); for the GAN models a second panel, the
    decoder's gradient ratio ‖∇ λ1·L_rec‖ / ‖∇ λ3·L_adv‖ (1: both terms pull equally hard)."""
    curves = {k: v for k, v in history.items() if k != "grad ratio"}
    panels = [dict(title=f"{args.model}: Eq. (2) terms and Eq. (3)", yscale="symlog", curves=curves
                   or {"no training in this run": [(0, 0.0)]},
                   ylabel="loss (L_rec, L_prior summed per slice)")]
    if history.get("grad ratio"):
        panels.append(dict(title=f"decoder gradient ratio at λ3 = {args.lam_adv:g}", yscale="log",
                           ylabel="‖∇ λ1·L_rec‖ / ‖∇ λ3·L_adv‖", ref=1.0,
                           curves={"grad ratio": history["grad ratio"]}))
    C.plot_curve_panels(panels, path)


def plot_fig5(items, path, title="Fig. 5"):
    """Fig. 5: first column a slice and its ground truth; then per model (items: [(name, arrays of
    fig5.npz)]) the filtered residual (top) and the segmentation over the input (bottom)."""
    plt = C._plt()
    n_ex = min(len(z["x"]) for _, z in items)
    fig, axes = plt.subplots(2 * n_ex, len(items) + 1, squeeze=False,
                             figsize=(1.9 * len(items) + 2.4, 3.9 * n_ex + 0.5))
    for e in range(n_ex):
        top, bottom = axes[2 * e], axes[2 * e + 1]
        x, gt = items[0][1]["x"][e], items[0][1]["gt"][e].astype(bool)
        top[0].imshow(x, cmap="gray", vmin=-1, vmax=1)
        top[0].set_ylabel(str(items[0][1]["label"][e]), fontsize=8)
        bottom[0].imshow(x, cmap="gray", vmin=-1, vmax=1)
        if gt.any():
            bottom[0].contour(gt, levels=[0.5], colors="lime", linewidths=0.9)
        for j, (name, z) in enumerate(items, start=1):
            top[j].imshow(z["filtered"][e], cmap="inferno", vmin=0, vmax=float(z["vmax"]))
            C.overlay_seg(bottom[j], z["x"][e], z["seg"][e].astype(bool), z["gt"][e].astype(bool))
            if np.isfinite(z["dice"][e]):
                bottom[j].text(0.02, 0.98, f"Dice {z['dice'][e]:.2f}", va="top", color="w",
                               fontsize=7, transform=bottom[j].transAxes)
            axes[0, j].set_title(name, fontsize=8)
    axes[0, 0].set_title("input / ground truth", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"{title}\nfiltered residuals (top), segmentations (bottom; yellow TP, red FP, "
                 f"cyan FN)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    C._save(fig, path)


def plot_fig6(sc, gt, row_group, threshold, val_values, path, args):
    """Fig. 6: histograms of the filtered residuals (inside the eroded brain) of normal test pixels,
    of each headline group's abnormal pixels and of the healthy validation pixels the threshold was
    taken from, with the threshold."""
    plt = C._plt()
    idx = C.sample_pixels(sc["brain_e"].ravel(), args.max_pixels, seed=1)
    s, y = sc["filtered"].ravel()[idx], gt.ravel()[idx]
    g = np.broadcast_to(row_group[:, None, None], gt.shape).ravel()[idx]
    fig, ax = plt.subplots(figsize=(6.4, 3.9))
    hi = float(max(np.percentile(s, 99.99), threshold * 1.5, 1e-6))
    bins = np.linspace(0, hi, 80)
    ax.hist(s[~y], bins=bins, density=True, alpha=0.5, color="tab:blue",
            label=f"normal test pixels (n={int((~y).sum())})")
    present = [n for n in HEADLINE_GROUPS if (y & (g == n)).any()]
    for name, col in zip(present, ("tab:red", "tab:orange", "tab:purple")):
        v = s[y & (g == name)]
        ax.hist(v, bins=bins, density=True, alpha=0.5, color=col,
                label=f"abnormal pixels, {name} (n={len(v)})")
    ax.hist(np.clip(val_values, 0, hi), bins=bins, density=True, histtype="step", color="k", lw=1,
            label="healthy validation pixels")
    ax.axvline(threshold, color="k", ls="--", lw=1.2, label=f"threshold {threshold:.3f}")
    ax.set_yscale("log")
    m = args.median
    ax.set(xlabel=f"filtered residual |x − x̂| (median {m}×{m}×{m}, eroded brain)",
           ylabel="density (log)", title=f"Fig. 6 ({args.model}): residuals; threshold = "
           f"{args.percentile:g}th pct. of healthy validation")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    C._save(fig, path)


if __name__ == "__main__":
    C.main_guard(main)
