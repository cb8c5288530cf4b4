"""3D f-AnoGAN: unsupervised anomaly detection in whole head-CT volumes.

J. Simarro Viana, E. de la Rosa, T. Vande Vyvere, D. Robben, D. M. Sima and CENTER-TBI participants
and investigators. "Unsupervised 3D Brain Anomaly Detection." BrainLes 2020 (MICCAI workshop), LNCS
12658, Springer 2021. arXiv:2010.04717. No public code; this is the first. It takes f-AnoGAN
(T. Schlegl et al., Medical Image Analysis 54, 2019 [20]) to volumes with the 3D brain WGAN-GP of
G. Kwon, C. Han, D. Kim (MICCAI 2019 [15]; WGAN-GP: I. Gulrajani et al., NeurIPS 2017 [9]).

Idea: a GAN learns healthy head CTs as whole 64³ volumes, an encoder E learns to invert its
generator G, and a volume that G(E(x)) cannot reproduce, in voxels or in the critic's features, is
anomalous; |x - G(E(x))| shows where (Fig. 6). §2 "Training strategy", then "Anomaly score":
  step 1  3D WGAN-GP on healthy volumes  Eq. (2) L_D = E[D(x~)] - E[D(x)] + λ E[(||∇D(x^)||_2 - 1)²]
                                         Eq. (3) L_G = -E[D(x~)]
  step 2  E alone, G and D frozen (izif) Eq. (4) L_img = ||x - G(E(x))||² / n     n voxels
                                         Eq. (5) L_feat = ||f(x) - f(G(E(x)))||² / m  f: a D layer
                                         Eq. (6) L_E = L_img + κ L_feat
  step 3  E and G fine-tuned together on Eq. (6) ("Techniques for improving the performance")
  score   L_E (Eq. 6) of a volume: ROC (Fig. 4), AP per haemorrhage type (Fig. 5), log scores per
          group (Fig. 7 = scores.png); the 2D f-AnoGAN on middle axial slices is the baseline (§3)

Deviations from the paper
  1. Fig. 3 (the layer table) is an image we cannot read, so the networks follow [15]: G = FC ->
     512x4³ -> 4 x (nearest upsample x2, 3³ conv, BatchNorm, ReLU) -> tanh; D = 4 strided 4³ convs
     (64..512 channels, LeakyReLU 0.2) -> a 4³ conv to one value, no BatchNorm (the gradient penalty
     is per sample, [9] §4); E = D's layout with BatchNorm and a 2500-d tanh output (§2); f(x) = D's
     last hidden layer (512x4³).
  2. Training hyperparameters are not given: WGAN-GP's (Adam lr 1e-4, betas (0, 0.9), n_critic 5,
     λ 10 [9]), batch 4 [15], κ 1 [20], fine-tuning at lr 1e-5; the iteration counts are ours.
  3. Preprocessing (§2 steps 1-7): no MNI registration, no icobrain quality control or skull strip
     (commercial): the data set's brain mask (CT-ICH: a HU fallback). Volumes are padded to a cube
     before the linear resize; σ = 1 voxel (not given); the window [-20, 100] HU -> [-1, 1] is step
     7's min-max normalisation. MRI (the paper's future work, §4): --modality t1|t2|flair maps the
     tissue median to -1/3 and 3x it to +1 (datasets.normalize_mri); on real data CT or MRI is
     detected (air at -1000 HU).
  4. G's BatchNorm stays in eval mode in steps 2 and 3 (step-1 statistics): the paper does not say.
  5. The 2D baseline is not described: the same networks in 2D on --n-slices middle axial slices;
     as in §3, slices of anomalous scans without lesion are dropped. A volume's 2D score, the mean
     of its slices', pairs it with the 3D model on the same volumes (--compare-3d).
  6. §3's Youden point uses the test labels (oracle_youden); the operating point is the
     --val-percentile of healthy validation scores.
  7. Data: the phantom's CT haemorrhages (intraparenchymal, subdural, epidural) stand in for TBI
     lesions; Fig. 7's post-surgical and low-quality groups are absent.

Presets: paper = 64³, widths 64..512, z 2500, batch 4, 20k / 10k / 2k iterations (a GPU job);
quick = 32³ phantom volumes on a 2-core CPU in minutes, the three steps, the fine-tuning ablation
and (--dims 2) the 2D baseline, paired 95% intervals (README.md, results/fidelity.md); smoke: tests.
  python fanogan3d.py --out runs/f3d                        # quick preset, 3D, the CT phantom
  python fanogan3d.py --dims 2 --compare-3d runs/f3d        # the 2D baseline (§3), paired with 3D
  python fanogan3d.py --modality flair                      # the FLAIR phantom, MRI normalisation
  python fanogan3d.py --preset paper --data ctich --amp     # the paper's settings, on a GPU
  torchrun --nproc_per_node=4 fanogan3d.py --preset paper --data ctich --batch-size 1   # 4 GPUs
"""
from __future__ import annotations


import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C
from data import datasets

METHOD = "fanogan3d"

# =================================================================================================
# Hyperparameters (the paper's value is the default of --preset paper; "not given" = our choice)
# =================================================================================================

HYPER = dict(
    dims=C.hp(3, "3: the paper's 3D model; 2: the 2D f-AnoGAN baseline on middle axial slices "
                 "(§3)", choices=[2, 3]),
    size=C.hp(64, "volume edge in voxels, a power of 2; §2 preprocessing step 5", lo=8, hi=512),
    width=C.hp(64, "channels of D's first layer, doubled per level (G mirrors it); Fig. 3 / [15]",
               lo=1, hi=1024),
    latent_dim=C.hp(2500, "size of z; §2 'Model architecture'", lo=1, hi=100000),
    batch_size=C.hp(4, "volumes per iteration (per process under torchrun); not given, [15]",
                    lo=1, hi=4096),
    n_critic=C.hp(5, "critic iterations per generator iteration in step 1; not given, [9]",
                  lo=1, hi=100),
    lam=C.hp(10.0, "λ of Eq. (2), the gradient-penalty weight; not given, [9]", lo=0),
    kappa=C.hp(1.0, "κ of Eq. (6), the feature-loss weight; not given, f-AnoGAN [20]", lo=0),
    lr_gan=C.hp(1e-4, "Adam learning rate of step 1 (Eq. 2-3); not given, [9]", lo=0, hi=1),
    lr_enc=C.hp(1e-4, "Adam learning rate of step 2 (Eq. 6, E alone); not given", lo=0, hi=1),
    lr_ft=C.hp(1e-5, "Adam learning rate of step 3 (Eq. 6, E and G): a fine-tuning; not given",
               lo=0, hi=1),
    beta1=C.hp(0.0, "Adam β1 of every step; not given, [9]", lo=0, hi=0.999999),
    beta2=C.hp(0.9, "Adam β2 of every step; not given, [9]", lo=0, hi=0.999999),
    gan_steps=C.hp(20000, "generator iterations of step 1; not given", lo=0, hi=10 ** 8),
    enc_steps=C.hp(10000, "encoder iterations of step 2; not given", lo=0, hi=10 ** 8),
    ft_steps=C.hp(2000, "iterations of step 3; not given", lo=0, hi=10 ** 8),
    finetune=C.hp(True, "run step 3, E and G fine-tuned on Eq. (6) (§2); --no-finetune: the "
                        "ablation of suppl. Table S2"),
    smooth_sigma=C.hp(1.0, "Gaussian smoothing σ in voxels before the resize; §2 step 5 (σ not "
                           "given)", lo=0, hi=20),
    window=C.hp([-20.0, 100.0], "CT soft-tissue window in HU, mapped to [-1, 1]; §2 steps 6-7",
                metavar=("LO", "HI")),
    modality=C.hp(None, "ct (the paper's NCCT, §2) or t1|t2|flair (MRI, its future work, §4): "
                        "the phantom's contrast (unset: ct), a real data set's image, and the CT "
                        "window or the MRI normalisation; unset on real data: detected from the "
                        "training volumes", type=str),
    encoder_out=C.hp("tanh", "E's output layer. tanh: §2 'Model architecture' (\"We add a "
                             "hyperbolic tangent activation in the last encoder\"), though G "
                             "learnt z ~ N(0, 1); 3tanh / linear: z_reg_type '3s_tanh_fc' / None "
                             "(its default) of f-AnoGAN's code, z_encoding_izif.py in "
                             "github.com/tSchlegl/f-AnoGAN", choices=["tanh", "3tanh", "linear"]),
    n_slices=C.hp(16, "--dims 2: middle axial slices per volume; §3 'a middle brain range' (not "
                      "given)", lo=1, hi=1000),
    val_percentile=C.hp(95.0, "operating point: this percentile of the healthy validation scores "
                              "(ours; §3 uses the Youden index of the test ROC)", lo=0, hi=100),
    compare_3d=C.hp(None, "--dims 2: a finished 3D run on the same data; reports its volume AUROC "
                          "minus this run's volume-level one with a paired 95% interval (§3)",
                    type=str, metavar="RUN_DIR"),
)
# quick: minutes on a 2-core CPU. 32³ volumes (1/8 of the voxels), widths and z scaled down, batch
# 16, and learning rates x5 so that 250 / 300 / 100 iterations (1-5% of the paper's) learn something
QUICK = dict(size=32, width=8, latent_dim=128, batch_size=16, lr_gan=5e-4, lr_enc=5e-4, lr_ft=1e-4,
             gan_steps=250, enc_steps=300, ft_steps=100, n_slices=8)
SMOKE = dict(size=16, width=4, latent_dim=16, batch_size=4, n_critic=2, lr_gan=5e-4, lr_enc=5e-4,
             lr_ft=1e-4, gan_steps=2, enc_steps=2, ft_steps=2, n_slices=4)


def parse_args(argv=None):
    return C.parse_args(argv, HYPER, {"quick": QUICK, "smoke": SMOKE}, method=METHOD, doc=__doc__,
                        check=check_args)


def check_args(args):
    if args.size & (args.size - 1):
        C.fail(f"--size must be a power of 2 (8, 16, 32, 64, ...), got {args.size}")
    if args.window[0] >= args.window[1]:
        C.fail(f"--window LO HI needs LO < HI, got {args.window[0]:g} {args.window[1]:g}")
    if args.modality:
        m = args.modality.lower()
        args.modality = datasets.MODALITY_ALIASES.get(m, m)
    if args.data == "synthetic" and args.modality not in (None, "ct", "t1", "t2", "flair"):
        C.fail(f"--modality {args.modality}: the phantom has ct, t1, t2 and flair")
    if args.compare_3d and args.dims != 2:
        C.fail("--compare-3d RUN_DIR compares a 3D run with this run's 2D model: add --dims 2")


# =================================================================================================
# Networks (Fig. 1 and Fig. 3: the 3D brain WGAN of Kwon et al. [15], deviation 1)
# =================================================================================================

def _layers(dims):
    """The same networks in 3D (the paper) and 2D (the §3 baseline)."""
    return (nn.Conv3d, nn.BatchNorm3d) if dims == 3 else (nn.Conv2d, nn.BatchNorm2d)


def n_levels(size):
    """Resolution levels between 4^d and size^d: 64 -> 4 (64, 32, 16, 8 -> 4)."""
    return int(round(math.log2(size // 4)))


class Generator(nn.Module):
    """G: z (B, latent) -> x~ (B, 1, S, S, S) in [-1, 1]. Channels 8w, 4w, 2w, w at 4³ .. S/2."""

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
            blocks += [nn.Upsample(scale_factor=2, mode="nearest"),
                       Conv(c_in, c_out, 3, padding=1, bias=False), BN(c_out),
                       nn.ReLU(inplace=True)]
        blocks += [nn.Upsample(scale_factor=2, mode="nearest"),
                   Conv(ch[-1], 1, 3, padding=1, bias=False), nn.Tanh()]
        self.blocks = nn.Sequential(*blocks)

    def forward(self, z):
        h = self.fc(z).view(len(z), self.c0, *[4] * self.dims)         # (B, 8w, 4, 4, 4)
        return self.blocks(F.relu(self.bn0(h)))                        # (B, 1, S, S, S)


class Critic(nn.Module):
    """D: x (B, 1, S, S, S) -> one unbounded value per sample (WGAN critic), and f(x), the last
    hidden layer (B, m), m = 8w * 4³ (Eq. 5). No BatchNorm: the gradient penalty is per sample."""

    def __init__(self, *, size=64, width=64, dims=3):
        super().__init__()
        Conv, _ = _layers(dims)
        L = n_levels(size)
        ch = [1] + [width * 2 ** i for i in range(L)]                  # paper: 1, 64, 128, 256, 512
        layers = []
        for c_in, c_out in zip(ch[:-1], ch[1:]):
            layers += [Conv(c_in, c_out, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        self.features_net = nn.Sequential(*layers)                     # (B, 8w, 4, 4, 4): Fig. 3 *
        self.out = Conv(ch[-1], 1, 4, stride=1, padding=0)             # (B, 1, 1, 1, 1)

    def features(self, x):
        return self.features_net(x).flatten(1)                         # f(x): (B, m)

    def forward(self, x):
        return self.out(self.features_net(x)).flatten()                # D(x): (B,)


class ScaledTanh(nn.Module):
    """3 tanh: f-AnoGAN's '3s_tanh_fc' output, z in (-3, 3), where 99.7% of z ~ N(0, 1) lie."""

    def forward(self, z):
        return 3 * torch.tanh(z)


ENCODER_OUT = {"tanh": nn.Tanh, "3tanh": ScaledTanh, "linear": nn.Identity}   # --encoder-out


class Encoder(nn.Module):
    """E: x (B, 1, S, S, S) -> z (B, latent) in (-1, 1): the critic's layout with BatchNorm and a
    tanh output (§2 'Model architecture': "We add a hyperbolic tangent activation in the last
    encoder"); out="3tanh": z in (-3, 3), out="linear": unbounded (--encoder-out)."""

    def __init__(self, *, latent_dim=2500, size=64, width=64, dims=3, out="tanh"):
        super().__init__()
        Conv, BN = _layers(dims)
        L = n_levels(size)
        ch = [1] + [width * 2 ** i for i in range(L)]
        layers = []
        for i, (c_in, c_out) in enumerate(zip(ch[:-1], ch[1:])):
            layers += [Conv(c_in, c_out, 4, stride=2, padding=1)]
            layers += [BN(c_out)] if i > 0 else []                    # none on the first layer [15]
            layers += [nn.LeakyReLU(0.2, inplace=True)]
        layers += [Conv(ch[-1], latent_dim, 4, stride=1, padding=0), nn.Flatten(),
                   ENCODER_OUT[out]()]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)                                             # (B, latent)


def check_encoder_out(state, args, what):
    """E's output layer has no weights, so checkpoint shapes cannot tell it: last.pt records it."""
    if state.setdefault("encoder_out", args.encoder_out) != args.encoder_out:
        C.fail(f"{what} was trained with --encoder-out {state['encoder_out']}; pass that, not "
               f"--encoder-out {args.encoder_out}")


def build(args, device):
    """G, D, E of --dims 2 or 3 on the device, channels-last (the same maths; 3D convolutions about
    twice as fast on a CPU)."""
    kw = dict(size=args.size, width=args.width, dims=args.dims)
    nets = {"G": Generator(latent_dim=args.latent_dim, **kw), "D": Critic(**kw),
            "E": Encoder(latent_dim=args.latent_dim, out=args.encoder_out, **kw)}
    fmt = torch.channels_last_3d if args.dims == 3 else torch.channels_last
    return {k: m.to(device).to(memory_format=fmt) for k, m in nets.items()}


# =================================================================================================
# Losses (one function per equation of §2)
# =================================================================================================

def critic_wasserstein_loss(d_real, d_fake):
    """First two terms of Eq. (2): E_{x~ ~ Pg}[D(x~)] - E_{x ~ Pr}[D(x)]."""
    # Eq. (2): L_D = E[D(x~)] - E[D(x)] + λ·GP
    return d_fake.mean() - d_real.mean()


def gradient_penalty(D, x, x_tilde, eps=None):
    """Third term of Eq. (2) without λ: E_{x^}[(||∇_{x^} D(x^)||_2 - 1)^2], x^ = ε x + (1-ε) x~
    with ε ~ U[0, 1] per sample; the norm is per sample, over ALL of its voxels and channels."""
    if eps is None:
        eps = torch.rand(len(x), *[1] * (x.dim() - 1), device=x.device, dtype=x.dtype)
    x_hat = (eps * x + (1 - eps) * x_tilde).detach().requires_grad_(True)  # (B, 1, S, S, S)
    grad, = torch.autograd.grad(D(x_hat).sum(), x_hat, create_graph=True)
    norm = grad.float().flatten(1).norm(2, dim=1)                    # (B,) ||∇ D(x^)||_2 per sample
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
# Anomaly score (§2 "Anomaly score": Eq. 6 per volume; voxel-wise |x - x~| localises, Fig. 6)
# =================================================================================================

@torch.no_grad()
def anomaly_score(E, G, D, x, kappa):
    """x (B, 1, S, S, S) -> dict(score=L_E, img=L_img, feat=L_feat: (B,), x_rec (B, 1, S, S, S))."""
    x_rec = G(E(x))                                                    # x~ = G(E(x))
    f_x, f_rec = D.features(x), D.features(x_rec)
    img, feat = image_loss(x, x_rec), feature_loss(f_x, f_rec)
    return {"score": img + kappa * feat, "img": img, "feat": feat, "x_rec": x_rec}


def anomaly_map(x, x_rec):
    """§3 "Qualitative results and anomaly localization": the voxel-wise error |x - x~| (Fig. 6)."""
    return np.abs(x - x_rec)


def volume_scores_2d(S, sc):
    """The 2D baseline's score of a volume: the mean of its middle slices' scores (deviation 5).
    -> {index into S.cases: score}"""
    return C.aggregate(sc["score"], [int(k) for k in S.case], how="mean")


def score(nets, S, args, device, rows=None, recon=False):
    """The trained model on a set: Eq. (6) for each row of S.x (or the given `rows`), in batches,
    the last partial one included -> numpy score / img / feat (N,) [and x_rec (N, S, S, S)]."""
    G, D, E = nets["G"].eval(), nets["D"].eval(), nets["E"].eval()
    idx = np.arange(len(S.x)) if rows is None else np.asarray(rows)
    out = {}
    for i0 in range(0, len(idx), args.batch_size):
        x = get_batch(S.x, idx[i0:i0 + args.batch_size], device)      # (B, 1, S, S, S)
        with C.autocast(device, args.amp):
            r = anomaly_score(E, G, D, x, args.kappa)
        r["x_rec"] = r["x_rec"][:, 0]                                  # (B, S, S, S)
        for k, v in r.items():
            if k != "x_rec" or recon:
                out.setdefault(k, []).append(v.float().cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


# =================================================================================================
# Training (§2 "Training strategy": step 1 WGAN-GP; step 2 E with G, D frozen; step 3 E and G)
# =================================================================================================

PHASES = {"gan": "step 1 WGAN-GP (Eq. 2-3)", "encoder": "step 2 encoder, G and D frozen (Eq. 6)",
          "finetune": "step 3 fine-tune E and G (Eq. 6)"}
OPTIMS = {"gan": ("G", "D"), "encoder": ("E",), "finetune": ("EG",)}   # the Adam of each step


def set_trainable(module, flag):
    for p in module.parameters():
        p.requires_grad_(flag)


def set_phase(phase, G, D, E):
    """Who learns in each step (§2, Fig. 2): step 1 G and D; step 2 E alone, G and D frozen in eval
    mode (G's BatchNorm keeps its step-1 statistics, deviation 4); step 3 E and G, D frozen."""
    G.train(phase == "gan"), D.train(phase == "gan"), E.train(phase != "gan")
    set_trainable(D, phase == "gan")
    set_trainable(G, phase != "encoder")
    set_trainable(E, phase != "gan")


def update(opt, loss):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def train_step(phase, nets, opt, next_x, args, device):
    """One iteration of training step `phase` -> its losses. nets: G, D, E (their DDP wrappers
    under torchrun); opt: Adam of G, D, E and EG (E and G, step 3); next_x() -> (B, 1, S, S, S)."""
    G, D, E = nets["G"], nets["D"], nets["E"]
    if phase == "gan":          # step 1: n_critic updates of D on Eq. (2), then one of G on Eq. (3)
        set_trainable(C.unwrap(D), True)
        for _ in range(args.n_critic):
            x = next_x()
            z = torch.randn(len(x), args.latent_dim, device=device)       # z ~ N(0, I)   (Eq. 1)
            with C.autocast(device, args.amp):
                with torch.no_grad():
                    x_tilde = G(z)                                        # x~: (B, 1, S, S, S)
                W = critic_wasserstein_loss(D(x), D(x_tilde)).float()
                gp = gradient_penalty(D, x, x_tilde)
                L_D = W + args.lam * gp                                   # Eq. (2)
            update(opt["D"], L_D)
        set_trainable(C.unwrap(D), False)                                 # G's update leaves D be
        z = torch.randn(len(x), args.latent_dim, device=device)
        with C.autocast(device, args.amp):
            L_G = generator_loss(C.unwrap(D)(G(z))).float()               # Eq. (3)
        update(opt["G"], L_G)
        return {"L_D (Eq. 2)": L_D, "L_G (Eq. 3)": L_G, "W distance -(E[D(x~)]-E[D(x)])": -W,
                "gradient penalty": gp}
    # steps 2 and 3: the "izif" encoder training of f-AnoGAN [20] (Fig. 2); D only provides f
    x = next_x()
    G_ = G if phase == "finetune" else C.unwrap(G)                        # a frozen G needs no DDP
    D = C.unwrap(D)
    with C.autocast(device, args.amp):
        x_rec = G_(E(x))                                                  # x~ = G(E(x))
        with torch.no_grad():
            f_x = D.features(x)                                           # f(x): (B, m)
        L_E = encoder_loss(x, x_rec, f_x, D.features(x_rec), args.kappa).mean()   # Eq. (6)
    update(opt["E" if phase == "encoder" else "EG"], L_E)
    return {f"L_E (Eq. 6), {PHASES[phase]}": L_E}


def get_batch(X, idx, device):
    """Rows idx of a (N, S, S[, S]) array -> float32 tensor (B, 1, S, S[, S]) on the device."""
    x = torch.as_tensor(np.asarray(X[np.asarray(idx)]), dtype=torch.float32)
    return x.unsqueeze(1).to(device)


def train(run, args, nets, S_train, S_test):
    """The three steps as three phases of one C.Loop (resume, checkpoints, --max-steps, NaN stop),
    each with its own shuffled stream of healthy training volumes. -> (loop, training seconds)."""
    G, D, E = nets["G"], nets["D"], nets["E"]

    adam = lambda ps, lr: torch.optim.Adam(ps, lr=lr, betas=(args.beta1, args.beta2))   # noqa: E731
    opt = {"G": adam(G.parameters(), args.lr_gan), "D": adam(D.parameters(), args.lr_gan),
           "E": adam(E.parameters(), args.lr_enc),
           "EG": adam([*E.parameters(), *G.parameters()], args.lr_ft)}
    steps = {"gan": args.gan_steps, "encoder": args.enc_steps,
             "finetune": args.ft_steps * args.finetune}
    batches = {p: C.Batches(len(S_train.x), args.batch_size, args.seed, stream=i)
               for i, p in enumerate(steps)}
    loop = C.Loop(run, args, models=nets, optims=opt, batches=batches)
    check_encoder_out(loop.state, args, f"--resume {args.resume}")
    ddp = {k: C.ddp_wrap(m, run.device) for k, m in nets.items()}   # alone: the networks themselves
    for phase, n in steps.items():
        if not n:
            continue
        set_phase(phase, G, D, E)
        next_x = lambda b=batches[phase]: get_batch(S_train.x, next(b), run.device)   # noqa: E731
        for _ in loop.phase(phase, n, desc=PHASES[phase]):
            loop.log(train_step(phase, ddp, opt, next_x, args, run.device))
        if phase not in loop.state["done"]:
            break                                                    # --max-steps or NaN: stop here
        for k in OPTIMS[phase]:   # a finished step's gradients and Adam moments: out of GPU memory
            opt[k].zero_grad(set_to_none=True)                      # and of later checkpoints
            opt[k].state.clear()
        done_s = loop.state.setdefault("phase_s", {})
        if phase in done_s:
            continue                                                 # finished before this --resume
        done_s[phase] = round(loop.state["train_s"] - sum(done_s.values()), 2)
        if run.device.type == "cuda":
            peak = loop.state.setdefault("peak_cuda_mb", {})
            peak[phase] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
            torch.cuda.reset_peak_memory_stats()
        if phase == "encoder" and steps["finetune"]:   # the test scores before step 3: Table S2
            loop.state["scores_step2"] = C.on_main(
                lambda: score(nets, S_test, args, run.device)["score"].tolist())
    return loop, loop.close()


# =================================================================================================
# Scoring and evaluation
# =================================================================================================

def lesion_type(case):
    """Haemorrhage subtype from the phantom/CT-ICH metadata, else the test group."""
    return str(case.meta.get("subtype") or case.group)


def make_rows(S, sc, dims, noft=None):
    """Rows for C.report (one per scored unit) and each row's index into S. 3D: one per volume. 2D:
    one per slice, `case` = its volume; slices of anomalous scans without lesion are dropped (§3:
    "images with abnormalities that are not located in the selected slice are discarded")."""
    rows, at = [], []
    for i in range(len(S.x)):
        c = S.cases[int(S.case[i])]
        r = {"id": c.id, "group": c.group, "label": int(c.label)}
        if dims == 2:
            lesion = bool(np.asarray(S.mask[i]).any()) if c.mask else True   # no mask: keep it
            if c.label == 1 and not lesion:
                continue
            r.update(id=f"{c.id}/z{int(S.z[i])}", label=int(c.label == 1 and lesion), case=c.id)
        r.update(score=float(sc["score"][i]), type=lesion_type(c) if c.label else "normal",
                 L_img=float(sc["img"][i]), L_feat=float(sc["feat"][i]))
        if noft is not None:
            r["score_no_finetune"] = float(noft[i])
        rows.append(r)
        at.append(i)
    return rows, at


def per_type(rows, key="score"):
    """Fig. 5: AUROC and AP of each lesion type against the normal scans, 95% intervals (cases)."""
    ev = C.evaluate([{**r, "group": r["type"]} for r in rows], key=key)["groups"]
    return {t: {"n": e["n_anomalous"], "auroc": e["auroc"], "auroc_ci": e["auroc_ci"],
                "ap": e["auprc"], "ap_ci": e["auprc_ci"]} for t, e in ev.items() if "auroc" in e}


def paper_tables(args, nets, rows, S_test, sc, state, val_from, loop):
    """The paper's tables beside C.report's: AUROC/AP per lesion type (Fig. 5), the Youden point
    (§3, with the test labels: oracle_), the fine-tuning ablation (suppl. Table S2), the 2D volume
    level and 3D - 2D (§3), each difference with a paired 95% interval; memory, checkpoint I/O."""
    y, s = np.array([r["label"] for r in rows]), np.array([r["score"] for r in rows])
    extra = {"dims": args.dims, "world_size": C.ddp_world(),
             "effective_batch_size": args.batch_size * C.ddp_world(), "per_type": per_type(rows),
             "oracle_youden": C.youden(y, s), "operating_point_from": val_from,
             "params": {k: sum(p.numel() for p in m.parameters()) for k, m in nets.items()},
             "steps": {"gan": args.gan_steps, "encoder": args.enc_steps,
                       "finetune": args.ft_steps * args.finetune},
             "phase_s": state.get("phase_s", {}),
             "memory_estimate": {f"batch_{b}": memory_estimate_mb(args, b)
                                 for b in sorted({1, 4, args.batch_size})}}
    if state.get("peak_cuda_mb"):
        extra["memory"] = {**C.peak_memory_mb(torch.device("cuda")),
                           "cuda_mb_per_step": state["peak_cuda_mb"]}
    if loop is not None:
        extra["checkpoint_io"] = loop.io_report()
    if "score_no_finetune" in rows[0]:
        yn = np.array([r["score_no_finetune"] for r in rows])
        extra["ablation_no_finetune"] = {
            "auroc": C.auroc(y, yn), "auprc": C.auprc(y, yn),
            "per_type": per_type(rows, "score_no_finetune"),
            "finetuned_minus_step2_auroc": C.compare_by(rows, rows, "type", "score",
                                                        "score_no_finetune")}
    if args.dims == 2:                   # one row per volume: the same units as a 3D run's
        vs = volume_scores_2d(S_test, sc)
        vol = [{"id": c.id, "group": c.group, "label": int(c.label), "score": vs[i],
                "type": lesion_type(c) if c.label else "normal"}
               for i, c in enumerate(S_test.cases) if i in vs]
        ev = C.evaluate(vol)
        extra["volume_level"] = {**ev["metrics"], "groups": ev["groups"], "per_type": per_type(vol)}
        if args.compare_3d:
            r3, rows3 = C.read_run(args.compare_3d, METHOD, ids=[r["id"] for r in vol])
            if r3.get("dims") != 3:
                C.fail(f"--compare-3d {args.compare_3d}: a --dims {r3.get('dims')} run, not 3D")
            extra["compare_3d_vs_2d"] = {
                "run_3d": str(args.compare_3d), "n_volumes": len(vol),
                "3d_minus_2d_volume_auroc": C.compare_by(rows3, vol, "type")}
    return extra


def log_tables(run, extra):
    """The paper's comparisons on the terminal (results.json has them all)."""
    run.log("per type: " + ", ".join(f"{k} AUROC {v['auroc']:.3f} AP {v['ap']:.3f}"
                                     for k, v in extra["per_type"].items()))
    for key, sub, what in (("ablation_no_finetune", "finetuned_minus_step2_auroc", "fine-tuned - "
                            "step 2"), ("compare_3d_vs_2d", "3d_minus_2d_volume_auroc", "3D - 2D")):
        if key in extra:
            d = extra[key][sub]["all"]
            run.log(f"AUROC {what}: {d['a']:.3f} - {d['b']:.3f} = {C.fmt_ci(d['diff'], d['ci'])}")


# =================================================================================================
# main
# =================================================================================================

def main(argv=None):
    args = parse_args(argv)
    run = C.start_run(args, METHOD)
    nets = build(args, run.device)
    ck = C.load_models(args.checkpoint, nets, METHOD) if args.checkpoint else None
    if ck is not None:
        check_encoder_out(ck["loop"], args, f"--checkpoint {args.checkpoint}")
    with C.Timer() as t_data:
        data, S_train, S_val, S_test = datasets.ct_or_mri_stacks(args, run)
    if ck is None:
        loop, _ = train(run, args, nets, S_train, S_test)
        state, history = loop.state, loop.history
    else:
        loop, state, history = None, ck["loop"], ck["history"]
        run.log(f"scoring {args.checkpoint} (phase {state['phase']}, step {state['step']})")
    if not C.is_main():                                     # torchrun: process 0 scores and writes
        return None
    with C.Timer() as t_score:
        sc = score(nets, S_test, args, run.device)
        # the operating point from healthy volumes: the validation set, else 64 training volumes
        S_h, val_from = (S_val, "val") if S_val is not None else (S_train, "train (no val set)")
        val = score(nets, S_h, args, run.device, rows=None if S_val else range(min(64, len(S_h.x))))
    noft = state.get("scores_step2") if args.finetune else None      # the scores after step 2
    rows, at = make_rows(S_test, sc, args.dims, noft)
    C.add_baselines(rows, C.baseline_units(S_train, S_test, at, "mean"))       # issue 15.5
    extra = paper_tables(args, nets, rows, S_test, sc, state, val_from, loop)
    timing = {"train_s": state["train_s"], "score_s": t_score.seconds, "data_s": t_data.seconds,
              "score_s_per_sample": t_score.seconds / max(len(S_test.x) + len(val["score"]), 1)}
    res = C.report(run, args, "volume" if args.dims == 3 else "slice", rows, timing, extra=extra,
                   data_info=data.info, val_scores=val["score"], threshold_pct=args.val_percentile,
                   history={k: v for k, v in history.items() if not k.startswith("L_E")},
                   examples=figures(run, args, nets, S_test, rows, at, history), log_scores=True,
                   loop=loop, slabs=S_test.slabs or None, slab_cases=S_test.cases,
                   baselines_how="mean over the unit's voxels, as L_img of Eq. (4)",
                   titles={"roc": f"{args.dims}D f-AnoGAN: ROC, normal scans vs each group",
                           "losses": "step 1: WGAN-GP (Eq. 2-3)", "losses_ylabel": "loss (symlog)",
                           "losses_logy": True})
    log_tables(run, extra)
    return res


# =================================================================================================
# Appendix: the paper's figures (Fig. 4-6; Fig. 7 is scores.png) and the training memory estimate
# =================================================================================================

def pick_examples(rows, at):
    """Fig. 6's cases: the median normal, the lowest- and highest-scoring anomalous ('undetected'
    and 'detected'), then more normal/anomalous rows. -> [(title, row, index into S)]"""
    order = sorted(range(len(rows)), key=lambda k: rows[k]["score"])
    nor = [k for k in order if rows[k]["label"] == 0]
    ano = [k for k in order if rows[k]["label"] == 1]
    out = [("normal (median score)", nor[len(nor) // 2]), ("(lowest score)", ano[0]),
           ("(highest score)", ano[-1])] + [("normal (highest score)", nor[-1])] * (len(nor) > 1) \
        + [("(median score)", ano[len(ano) // 2])] * (len(ano) > 2)
    return [(t if t[0] == "n" else f"{rows[k]['type']} {t}", rows[k], at[k]) for t, k in out]


def figures(run, args, nets, S, rows, at, history):
    """Fig. 4 (ROC, also before step 3), Fig. 5 (PR per type), Fig. 6 (three planes through the
    lesion's centre), the encoder loss; -> the rows of examples.png (axial slices)."""
    y, s = np.array([r["label"] for r in rows]), np.array([r["score"] for r in rows])
    t = np.array([r["type"] for r in rows])
    per = {n: (y[(y == 0) | (t == n)], s[(y == 0) | (t == n)]) for n in sorted(set(t[y == 1]))}
    roc = {f"{args.dims}D f-AnoGAN" + (" (fine-tuned)" if args.finetune else ""): (y, s)}
    if "score_no_finetune" in rows[0]:
        roc["without fine-tuning (after step 2)"] = (y, [r["score_no_finetune"] for r in rows])
    unit = "volume" if args.dims == 3 else "slice"
    C.plot_roc({**roc, **{f"{n} only": v for n, v in per.items()}}, run.out / "fig4_roc.png",
               title=f"Fig. 4: {unit}-level ROC, hemorrhage vs normal")
    C.plot_pr(per, run.out / "fig5_pr_per_type.png", title="Fig. 5: precision-recall per type")
    shown = pick_examples(rows, at)
    recs = score(nets, S, args, run.device, rows=[i for _, _, i in shown], recon=True)["x_rec"]
    ex = [dict(title=f"{title}\n{r['id']}, L_E={r['score']:.4f}", input=np.asarray(S.x[i]),
               reconstruction=rec, amap=anomaly_map(np.asarray(S.x[i]), rec),
               gt=np.asarray(S.mask[i])) for (title, r, i), rec in zip(shown, recs)]
    if args.dims == 3:
        for e in ex:   # through the lesion's centre (a normal volume's centre)
            c = np.argwhere(e["gt"]).mean(0) if e["gt"].any() else np.array(e["gt"].shape) / 2
            e["at"] = tuple(int(round(v)) for v in c)
        C.plot_planes(ex[:3], run.out / "fig6_three_planes.png", title="Fig. 6: original, "
                    "reconstruction, voxel error and ground truth (three planes)",
                    names=("original x", "reconstruction x~", "voxel error |x - x~|",
                           "ground truth"))
        ex = [{**e, **{k: e[k][e["at"][0]] for k in ("input", "reconstruction", "amap", "gt")}}
              for e in ex]
    C.plot_curves({k: v for k, v in history.items() if k.startswith("L_E")},
                  run.out / "losses_encoder.png", title="steps 2-3: encoder loss L_E (Eq. 6)",
                  ylabel="L_E", xlabel="iteration of each step")
    return ex


def memory_estimate_mb(args, batch_size):
    """Rough peak training memory without a GPU: weights of G, D, E (fp32) + gradients and two Adam
    moments of the networks a step trains (a finished step's are cleared) + every layer's output in
    that step's forward passes, counted on the 'meta' device (shapes only). A critic iteration runs
    D on x, x~ and x^, and the penalty's double backward keeps about two more copies of D(x^)'s
    activations. cuDNN workspaces and allocator slack are not counted: +-50%."""
    with torch.device("meta"):
        kw = dict(size=args.size, width=args.width, dims=args.dims)
        G, D = Generator(latent_dim=args.latent_dim, **kw), Critic(**kw)
        E = Encoder(latent_dim=args.latent_dim, **kw)
        x = torch.zeros((batch_size, 1) + (args.size,) * args.dims)
        a_G = C.count_activations(G, torch.zeros(batch_size, args.latent_dim))
        a_D, a_E = C.count_activations(D, x), C.count_activations(E, x)
    P = {k: sum(p.numel() for p in m.parameters()) for k, m in (("G", G), ("D", D), ("E", E))}
    W = sum(P.values())
    steps = {"step 1 critic iteration": W + 3 * (P["G"] + P["D"]) + a_G + 5 * a_D,
             "step 1 generator iteration": W + 3 * (P["G"] + P["D"]) + a_G + a_D,
             "step 2 encoder": W + 3 * P["E"] + a_E + a_G + 2 * a_D,
             "step 3 fine-tune": W + 3 * (P["E"] + P["G"]) + a_E + a_G + 2 * a_D}
    mb = 4 / 2 ** 20
    return {"params": P, "weights_mb": round(W * mb, 1),
            "per_step_mb": {k: round(v * mb, 1) for k, v in steps.items()},
            "peak_mb": round(max(steps.values()) * mb, 1)}


if __name__ == "__main__":
    C.main_guard(main)
