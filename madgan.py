"""MADGAN: multiple adjacent brain MRI slice reconstruction for unsupervised anomaly detection.

    Han C., Rundo L., Murao K., Noguchi T., Shimahara Y., Milacski Z.Á., Koshino S., Sala E.,
    Nakayama H., Satoh S. "MADGAN: unsupervised medical anomaly detection GAN using multiple
    adjacent brain MRI slice reconstruction." BMC Bioinformatics 22 (Suppl 2):31, 2021.
    https://doi.org/10.1186/s12859-020-03936-1
(not the time-series MAD-GAN of Li et al. 2019). No public code exists: written from the paper.

Idea: healthy anatomy is continuous from slice to slice. A GAN trained on healthy scans predicts the
next 3 axial slices from the previous 3 (stacked as 3 channels); where it fails, the anatomy is
unusual. A scan's anomaly score is its average reconstruction loss over all of its windows.

  Fig. 2       U-Net generator, 3-conv critic, 0 / 3 / 7 self-attention modules   # Networks
  Eq. (1)      l1 = Σ_i |x_i - x'_i|: the generator minimises WGAN-GP + 100 l1    # Losses
  Eq. (2)      l2 = Σ_i (x_i - x'_i)^2 of a window s_j..j+2 -> s_j+3..j+5        # Losses
  §Diagnosis   scan score: mean l2 over all windows, or over the 10 consecutive
               windows with the highest loss (Tables 1-2)                      # Anomaly score
  §Impl.       Adam 2e-4, batch 16, 1.8M steps, labels flipped once in three   # Training
  Tables 1-2   AUC of CDR 0 vs CDR 0.5 / 1 / 2 / all (Fig. 10)                 # Scoring
  Figs. 3, 8   slices with their pixelwise l2; AUC over training steps         # Appendix
A WGAN critic has no labels, only the signs with which real and synthetic samples enter its loss
E[D(x~)] - E[D(x)]: "flipping the labels" swaps them on every third critic update (--flip-every).

Deviations from the paper (and readings of what it leaves open):
  1. Fig. 2's widths, kernels and SA positions are not in the text: 4x4 stride-2 convs with
     64-128-256-512 channels (pix2pix-like, --base-ch); SA positions in SA_SLOTS, none on the
     half-resolution maps (at 256x176 their attention matrix does not fit a batch of 16).
  2. The critic ("a discriminator with 3 decoders", read as 3 convs) sees the 3 input and the 3
     next slices (conditional, as pix2pix), has no BatchNorm (it breaks the per-sample gradient
     penalty, Gulrajani et al. §4) and averages a 1-channel map into one score per sample.
  3. Unstated, taken from the cited sources: gradient-penalty weight 10 (Gulrajani et al.), Adam
     betas (0.5, 0.999) and one critic update per generator update (pix2pix; WGAN-GP uses 5).
  4. Eqs. (1)/(2) sum over the P pixels; we take means (sum / P): 100 keeps its pix2pix meaning and
     the scan score changes by the constant P only. l2 is on intensities in [0, 1] (Fig. 3's scale).
  5. Slices: the paper keeps the ~51 axial slices with hippocampus, amygdala and ventricles; we take
     --n-slices consecutive slices centred at --slice-center of the brain's inferior->superior
     extent, or on raw heads with a neck (OASIS-3) of a nominal brain measured in mm below the
     vertex (data/README.md, "The axial slab"; no registration; results.json "slabs" records
     each scan's), and drop no "low-quality slices" (the paper's rule is unstated).
  6. Scoring uses the generator in eval mode (BatchNorm running statistics, no dropout).
  7. On the phantom atrophy_1/2/3 stand in for CDR 0.5/1/2; its lesion and tumour groups are scored
     too. The T1c metastasis experiment (private data) is not reproduced.
  8. The figures show the middle window of the first test scan of each group (the paper's choice
     of examples is not stated).

Read the results against the untrained generator: auc_steps.png (Fig. 8) starts at step 0, and on
the phantom an untrained generator already separates atrophy, which darkens the slab (more CSF) and
so raises the l2 score; what training adds is the rise above step 0. On phantom 2.0 (atrophy
overlaps an ageing healthy population) the quick preset (64x64, 24 slices, 1,200 steps) ends near
chance on atrophy 1-2 and near its step 0 on atrophy_3 (3 seeds: README.md, results/fidelity.md).

    python madgan.py                                  # quick: the T1 phantom on a CPU
    python madgan.py --sa 7 --l1-weight 0             # an ablation of Table 1 (7-SA, w/o l1)
    python madgan.py --data oasis3 --data-root data/oasis3 --preset paper --amp   # the paper (GPU)
    python madgan.py --data oasis3 --checkpoint runs/.../last.pt                  # score only
    torchrun --nproc_per_node=4 madgan.py --data oasis3 --preset paper --amp --batch-size 4
                                  # 4 GPUs x 4 windows = the paper's batch of 16 (its 4 GV100s)
"""
import functools

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C
from data import datasets

METHOD = "madgan"

# =================================================================================================
# Hyperparameters (§Datasets, §Implementation details; the paper's value is the default)
# =================================================================================================

HYPER = dict(
    # data: windows of adjacent axial slices
    image_size=C.hp([256, 176], "slice size H W, §Datasets (176x256 after zero-padding)", lo=16,
                    metavar=("H", "W")),
    n_slices=C.hp(51, "consecutive axial slices per scan, those with hippocampus, amygdala and "
                      "ventricles, §Datasets (57,834 slices / 1,133 scans; Deviation 5)", lo=2),
    slice_center=C.hp(0.5, "centre of that slab as a fraction of the brain's inferior->superior "
                           "extent (our stand-in for the anatomical selection, Deviation 5)",
                      lo=0, hi=1),
    k_in=C.hp(3, "input slices per window, §Methods", lo=1),
    k_out=C.hp(3, "reconstructed next slices per window, §Methods", lo=1),
    # networks (Fig. 2)
    base_ch=C.hp(64, "channels of the first conv, Fig. 2 as we read it (Deviation 1)", lo=1),
    sa=C.hp(0, "SAGAN self-attention modules, Fig. 2: 0 = MADGAN, 3 = 3-SA, 7 = 7-SA MADGAN",
            choices=[0, 3, 7]),
    dropout=C.hp(0.5, "rate of the generator's two dropout layers, §Implementation details",
                 lo=0, hi=0.99),
    # losses and optimisation (§Implementation details)
    l1_weight=C.hp(100.0, "weight of the l1 loss Eq. (1) in WGAN-GP + 100 l1 (0 = the 'w/o l1' "
                          "ablation of Table 1)", lo=0),
    gp_weight=C.hp(10.0, "gradient-penalty weight λ (unstated; Gulrajani et al. 2017)", lo=0),
    lr=C.hp(2e-4, "Adam learning rate, §Implementation details", lo=1e-8, hi=1),
    beta1=C.hp(0.5, "Adam β1 (unstated; pix2pix)", lo=0, hi=0.9999),
    beta2=C.hp(0.999, "Adam β2 (unstated; pix2pix)", lo=0, hi=0.9999),
    batch_size=C.hp(16, "windows per step (per process under torchrun), §Implementation details",
                    lo=1),
    steps=C.hp(1_800_000, "generator steps, §Implementation details", lo=0),
    n_critic=C.hp(1, "critic updates per generator update (unstated; pix2pix 1, WGAN-GP 5)", lo=1),
    flip_every=C.hp(3, "flip the critic's real/synthetic labels once every N critic updates, "
                       "§Implementation details ('once in three times'; 0 = never)", lo=0),
    # anomaly score and evaluation (§Unsupervised medical anomaly detection, Tables 1-2, Fig. 8)
    score_windows=C.hp(0, "scan score = mean l2 over all windows (0, the main result) or over the "
                          "K consecutive windows with the highest loss (10), Tables 1-2; both are "
                          "always reported", lo=0),
    eval_every=C.hp(150_000, "AUC over training steps every N steps, Fig. 8 (150k ... 1.8M; "
                             "reporting only, never used to pick a checkpoint; 0 = off)", lo=0),
    eval_batch=C.hp(64, "windows per forward pass when scoring", lo=1),
)
# quick: a CPU run of minutes: 64x64 slices, 24 slices per scan (the phantom's 2 mm slices span the
# ~48 mm of the paper's ~51 1-mm ones), a half-width network and 1,200 of the 1.8M steps
QUICK = dict(image_size=[64, 64], n_slices=24, base_ch=32, steps=1200, eval_every=300)
# smoke: seconds, for the tests: tiny slices, tiny nets, a few steps
SMOKE = dict(image_size=[32, 32], n_slices=8, base_ch=8, batch_size=4, steps=4, eval_every=2)


def parse_args(argv=None):
    return C.parse_args(argv, HYPER, {"quick": QUICK, "smoke": SMOKE}, method=METHOD, doc=__doc__,
                        check=check_args)


def check_args(args):
    H, W = args.image_size
    if H % 16 or W % 16:
        C.fail(f"--image-size {H} {W}: both sides must be positive multiples of 16 "
               f"(the U-Net halves them four times)")
    if args.n_slices < args.k_in + args.k_out:
        C.fail(f"--n-slices {args.n_slices} is shorter than one window (--k-in + --k-out = "
               f"{args.k_in + args.k_out})")


# =================================================================================================
# Networks (Fig. 2)
# =================================================================================================

# Where the self-attention modules sit, as we read Fig. 2 (Deviation 1): 3-SA MADGAN has the
# "red-contoured" modules, 7-SA MADGAN the red and the "blue-contoured" ones.
SA_SLOTS = {
    0: (),
    3: ("G.enc2", "G.dec2", "D.conv2"),
    7: ("G.enc2", "G.dec2", "D.conv2", "G.enc3", "G.enc4", "G.dec1", "D.conv3"),
}


class SelfAttention(nn.Module):
    """SAGAN self-attention (Zhang et al., ICML 2019, §3):
    f(x) = W_f x, g(x) = W_g x (C/8 channels), h(x) = W_h x (C channels), all 1x1 convs;
    s_ij = f(x_i)^T g(x_j);  β_{j,i} = exp(s_ij) / Σ_i exp(s_ij);  o_j = Σ_i β_{j,i} h(x_i);
    y = γ·o + x, with γ initialised to 0 (the module starts as the identity)."""

    def __init__(self, channels, *, reduction=8):
        super().__init__()
        c_red = max(channels // reduction, 1)
        self.f = nn.Conv2d(channels, c_red, 1)
        self.g = nn.Conv2d(channels, c_red, 1)
        self.h = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):                                     # (B, C, H, W)
        B, Ch, H, W = x.shape
        f = self.f(x).flatten(2)                              # (B, C/8, N), N = H·W
        g = self.g(x).flatten(2)                              # (B, C/8, N)
        h = self.h(x).flatten(2)                              # (B, C, N)
        s = torch.bmm(f.transpose(1, 2), g)                   # (B, N_i, N_j): f(x_i)^T g(x_j)
        beta = torch.softmax(s.float(), dim=1).to(h.dtype)    # β_{j,i}: normalised over i (dim 1)
        o = torch.bmm(h, beta)                                # (B, C, N_j): Σ_i β_{j,i} h(x_i)
        return x + self.gamma * o.view(B, Ch, H, W)


def _sa_or_identity(name, channels, sa_at):
    return SelfAttention(channels) if name in sa_at else nn.Identity()


class Down(nn.Module):
    """Encoder layer (Fig. 2): 4x4 stride-2 conv -> [SA] -> BatchNorm -> LeakyReLU(0.2)."""

    def __init__(self, c_in, c_out, *, name, sa_at):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 4, stride=2, padding=1, bias=False)
        self.sa = _sa_or_identity(name, c_out, sa_at)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x):                                     # (B, c_in, H, W) -> (.., H/2, W/2)
        return F.leaky_relu(self.bn(self.sa(self.conv(x))), 0.2)


class Up(nn.Module):
    """Decoder layer: 4x4 stride-2 deconv -> [SA] -> BatchNorm -> ReLU [-> dropout 0.5]."""

    def __init__(self, c_in, c_out, *, name, sa_at, dropout=0.0):
        super().__init__()
        self.deconv = nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False)
        self.sa = _sa_or_identity(name, c_out, sa_at)
        self.bn = nn.BatchNorm2d(c_out)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):                                     # (B, c_in, H, W) -> (.., 2H, 2W)
        return self.drop(F.relu(self.bn(self.sa(self.deconv(x)))))


class Generator(nn.Module):
    """U-Net of Fig. 2: 4 conv encoder layers, 4 deconv decoder layers with skip connections,
    3 input slices -> 3 next slices in [-1, 1] (tanh); dropout in the first two decoder layers."""

    def __init__(self, *, k_in=3, k_out=3, base=64, sa_at=(), dropout=0.5):
        super().__init__()
        c1, c2, c3, c4 = base, 2 * base, 4 * base, 8 * base
        self.enc1 = Down(k_in, c1, name="G.enc1", sa_at=sa_at)
        self.enc2 = Down(c1, c2, name="G.enc2", sa_at=sa_at)
        self.enc3 = Down(c2, c3, name="G.enc3", sa_at=sa_at)
        self.enc4 = Down(c3, c4, name="G.enc4", sa_at=sa_at)
        self.dec1 = Up(c4, c3, name="G.dec1", sa_at=sa_at, dropout=dropout)
        self.dec2 = Up(2 * c3, c2, name="G.dec2", sa_at=sa_at, dropout=dropout)
        self.dec3 = Up(2 * c2, c1, name="G.dec3", sa_at=sa_at)
        self.out = nn.ConvTranspose2d(2 * c1, k_out, 4, stride=2, padding=1)

    def forward(self, x):                                     # (B, 3, H, W) previous slices
        e1 = self.enc1(x)                                     # (B, c1, H/2, W/2)
        e2 = self.enc2(e1)                                    # (B, c2, H/4, W/4)
        e3 = self.enc3(e2)                                    # (B, c3, H/8, W/8)
        e4 = self.enc4(e3)                                    # (B, c4, H/16, W/16)
        d1 = self.dec1(e4)                                    # (B, c3, H/8, W/8)
        d2 = self.dec2(torch.cat([d1, e3], 1))                # (B, c2, H/4, W/4)
        d3 = self.dec3(torch.cat([d2, e2], 1))                # (B, c1, H/2, W/2)
        return torch.tanh(self.out(torch.cat([d3, e1], 1)))   # (B, 3, H, W) next slices


class Critic(nn.Module):
    """WGAN-GP critic (Fig. 2's discriminator, 3 conv layers; Deviation 2): conditional on the
    input slices, no normalisation layers, LeakyReLU(0.2); a final 1-channel conv map averaged to
    one real number per sample."""

    def __init__(self, *, k_in=3, k_out=3, base=64, sa_at=()):
        super().__init__()
        c1, c2, c3 = base, 2 * base, 4 * base
        self.conv1 = nn.Conv2d(k_in + k_out, c1, 4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 4, stride=2, padding=1)
        self.sa2 = _sa_or_identity("D.conv2", c2, sa_at)
        self.conv3 = nn.Conv2d(c2, c3, 4, stride=2, padding=1)
        self.sa3 = _sa_or_identity("D.conv3", c3, sa_at)
        self.head = nn.Conv2d(c3, 1, 3, stride=1, padding=1)

    def forward(self, cond, x):                               # (B, 3, H, W) input, next slices
        h = F.leaky_relu(self.conv1(torch.cat([cond, x], 1)), 0.2)   # (B, c1, H/2, W/2)
        h = F.leaky_relu(self.sa2(self.conv2(h)), 0.2)               # (B, c2, H/4, W/4)
        h = F.leaky_relu(self.sa3(self.conv3(h)), 0.2)               # (B, c3, H/8, W/8)
        return self.head(h).mean(dim=(1, 2, 3))                      # (B,)


def build_models(args):
    sa_at, k = SA_SLOTS[args.sa], dict(k_in=args.k_in, k_out=args.k_out, base=args.base_ch)
    return Generator(**k, sa_at=sa_at, dropout=args.dropout), Critic(**k, sa_at=sa_at)


# =================================================================================================
# Losses (§Methods: WGAN-GP + 100 l1; Eqs. (1), (2))
# =================================================================================================

def l1_loss(x, x_rec):
    """Eq. (1): l1 = Σ_{i=1}^{P} |x_i - x'_i|, divided by P (Deviation 4); mean over the batch."""
    # Eq. (1): l1 = Σ_i |x_i − x'_i|  (/P)
    return (x - x_rec).abs().mean()


def l2_per_window(x, x_rec):
    """Eq. (2): l2 = Σ_{i=1}^{P} (x_i - x'_i)^2, divided by P, one value per window (B,).
    x, x_rec in [-1, 1] are first rescaled to [0, 1] (Deviation 4): ((x - x')/2)^2."""
    d = (x.float() - x_rec.float()) / 2                        # (B, 3, H, W), [0, 1] intensities
    # Eq. (2): l2 = Σ_i (x_i − x'_i)^2  (/P)
    return d.pow(2).flatten(1).mean(1)                         # (B,)


def critic_loss(d_real, d_fake, flip=False):
    """Wasserstein critic loss (Gulrajani et al. 2017, Alg. 1): L_D = E[D(x~)] - E[D(x)].
    With the paper's label flip the real and synthetic samples swap roles: E[D(x)] - E[D(x~)]."""
    if flip:
        # flipped labels: L_D = E[D(x)] − E[D(x~)]
        return d_real.mean() - d_fake.mean()
    # L_D = E[D(x~)] − E[D(x)]
    return d_fake.mean() - d_real.mean()


def gradient_penalty(critic, cond, real, fake, eps=None):
    """WGAN-GP penalty: E[(||∇_x^ D(x^)||_2 - 1)^2], x^ = ε x + (1 - ε) x~, ε ~ U[0, 1] per sample.
    The norm is taken per sample over all of (C, H, W), never over one axis."""
    B = real.shape[0]
    if eps is None:
        eps = torch.rand(B, 1, 1, 1, device=real.device, dtype=real.dtype)
    x_hat = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)  # (B, 3, H, W)
    d_hat = critic(cond, x_hat)                                                      # (B,)
    grad, = torch.autograd.grad(d_hat.sum(), x_hat, create_graph=True)             # (B, 3, H, W)
    norm = grad.float().flatten(1).norm(2, dim=1)                                    # (B,)
    # GP = E[(‖∇_x^ D(x^)‖₂ − 1)²]
    return ((norm - 1) ** 2).mean()


def generator_loss(d_fake, x, x_rec, l1_weight):
    """Generator objective: WGAN-GP adversarial term + 100 x l1 (§Methods):
    L_G = -E[D(x~)] + λ_l1 · l1(x, x~). Returns (total, adversarial, l1)."""
    adv = -d_fake.mean()
    l1 = l1_loss(x, x_rec)
    # L_G = −E[D(G(s_{1..3}))] + 100 · l1(s_{4..6}, G(s_{1..3}))
    return adv + l1_weight * l1, adv, l1


# =================================================================================================
# Anomaly score (§Unsupervised medical anomaly detection: average l2 per scan, Eq. (2))
# =================================================================================================

def slice_windows(n_slices, k_in=3, k_out=3):
    """Start indices s of every window of one scan of n slices: input slices s .. s+k_in-1, next
    slices s+k_in .. s+k_in+k_out-1 (s1..3 -> s4..6, s2..4 -> s5..7, ...; none if it is short)."""
    return np.arange(max(n_slices - k_in - k_out + 1, 0))


def window_table(S, k_in=3, k_out=3):
    """Every window of every scan of an ArraySet: rows (W, k_in + k_out) of slice rows in S, and
    the scan (case index) of each window. Windows are built per scan, so none crosses two scans:
    scan i with n slices gives windows s = 0..n-k_in-k_out (slice_windows)."""
    rows, case = [], []
    for i in range(len(S.cases)):
        r = S.slices_of(i)                                     # (n,) rows of scan i in slice order
        starts = slice_windows(len(r), k_in, k_out)            # (w,)
        if len(starts):
            rows.append(r[starts[:, None] + np.arange(k_in + k_out)[None, :]])  # (w, k_in + k_out)
            case.append(np.full(len(starts), i, np.int64))
    if not rows:
        return np.zeros((0, k_in + k_out), np.int64), np.zeros(0, np.int64)
    return np.concatenate(rows).astype(np.int64), np.concatenate(case)


def top_consecutive_mean(losses, k):
    """Mean of the k consecutive window losses with the highest mean (the paper's "continuous 10
    slice sets exhibiting the highest loss"); the plain mean if the scan has <= k windows."""
    v = np.asarray(losses, dtype=np.float64)
    if k <= 0 or len(v) <= k:
        return float(v.mean())
    csum = np.concatenate([[0.0], np.cumsum(v)])
    return float(((csum[k:] - csum[:-k]) / k).max())


def scan_scores(window_loss, window_case, n_cases, score_windows=0):
    """Average l2 loss per scan over all its windows (score_windows=0) or over the best run of
    `score_windows` consecutive windows. -> (n_cases,) with nan for scans without windows."""
    out = np.full(n_cases, np.nan)
    for i in range(n_cases):
        v = window_loss[window_case == i]                      # in window (slice) order
        if len(v):
            out[i] = top_consecutive_mean(v, score_windows)
    return out


def split_window(batch, k_in, device):
    """(B, k_in + k_out, H, W) numpy windows -> input slices, next slices (tensors on device)."""
    t = torch.from_numpy(batch).to(device, non_blocking=True)
    return t[:, :k_in], t[:, k_in:]


@torch.no_grad()
def score(G, S, args, device, keep=()):
    """The trained generator applied to a slice set: Eq. (2) for every window (eval mode), averaged
    per scan over all its windows ("all") and over the best --score-windows (or 10) consecutive ones
    ("top"). keep: scans whose middle window the figures show, kept during this one pass.
    -> dict(all, top, n_windows: (n_scans,); losses: (windows,); kept: {scan: window, recon, rows})
    """
    G.eval()
    win_rows, case = window_table(S, args.k_in, args.k_out)
    mid = {}                                                   # window index -> scan to keep it for
    for i in keep:
        w = np.nonzero(case == i)[0]
        if len(w):
            mid[int(w[len(w) // 2])] = i
    read = datasets.RowReader(S.x)
    losses, kept = np.zeros(len(win_rows), np.float64), {}
    for a in range(0, len(win_rows), args.eval_batch):
        batch = read(win_rows[a: a + args.eval_batch])         # (b, 6, H, W)
        cond, real = split_window(batch, args.k_in, device)
        with C.autocast(device, args.amp):
            rec = G(cond)                                      # (b, 3, H, W)
        losses[a: a + len(batch)] = l2_per_window(real, rec).cpu().numpy()
        for w in sorted(set(mid) & set(range(a, a + len(batch)))):
            kept[mid[w]] = dict(window=batch[w - a], recon=rec[w - a].float().cpu().numpy(),
                                rows=win_rows[w])
    n = len(S.cases)
    return dict(all=scan_scores(losses, case, n, 0),
                top=scan_scores(losses, case, n, args.score_windows or 10),
                n_windows=np.bincount(case, minlength=n), losses=losses,
                kept={i: kept[i] for i in keep if i in kept})


# =================================================================================================
# Training (§Implementation details: WGAN-GP + 100 l1, Adam 2e-4, batch 16, 1.8M steps)
# =================================================================================================

def train_step(G, D, opt_G, opt_D, windows, step, args):
    """One generator step: n_critic WGAN-GP critic updates (labels flipped once in three), then the
    generator's WGAN + 100 l1 update on the last critic batch. windows: n_critic pairs (s_{1..3},
    s_{4..6}) of (B, 3, H, W); G and D may be DDP wrappers. -> this step's losses for the log."""
    dev, amp = windows[0][0].device, args.amp
    G.train()
    D.train()
    for i, (cond, real) in enumerate(windows):
        last = i == len(windows) - 1                           # the generator reuses the last one
        with torch.set_grad_enabled(last), C.autocast(dev, amp):
            fake = G(cond)                                     # (B, 3, H, W): x~ = G(s_{1..3})
        # the critic's real/synthetic labels flip on every flip_every-th critic update of the run
        flip = args.flip_every > 0 and ((step - 1) * args.n_critic + i + 1) % args.flip_every == 0
        with C.autocast(dev, amp):
            d_real, d_fake = D(cond, real), D(cond, fake.detach())   # (B,), (B,)
            # L_D = E[D(x~)] - E[D(x)] (flipped: E[D(x)] - E[D(x~)]) + λ·GP
            loss_wd = critic_loss(d_real, d_fake, flip=flip)
            gp = gradient_penalty(D, cond, real, fake.float())
            loss_D = loss_wd + args.gp_weight * gp
        opt_D.zero_grad(set_to_none=True)
        loss_D.backward()
        opt_D.step()
    with C.autocast(dev, amp):
        # L_G = -E[D(x~)] + 100 · l1(x, x~)
        loss_G, adv, l1 = generator_loss(D(cond, fake), real, fake, args.l1_weight)
    opt_G.zero_grad(set_to_none=True)
    loss_G.backward()
    opt_G.step()
    # loss_D is logged unflipped (E[D(x~)] - E[D(x)] + λ·GP), so that flipped updates don't zig-zag
    return {"loss_D": critic_loss(d_real, d_fake).detach() + args.gp_weight * gp.detach(),
            "loss_G_adv": adv, "loss_l1": l1, "gp": gp, "wdist": (d_real - d_fake).mean()}


def train(args, run, G, D, S_train, win_rows, fig8):
    """Train on the windows of healthy scans; fig8(step) -> the AUCs of Fig. 8 (reporting only).
    -> dict(history, state (with "auc_steps"), train_s, checkpoints: the loop's I/O report)"""
    opt_G = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(args.beta1, args.beta2))
    opt_D = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(args.beta1, args.beta2))
    batches = C.Batches(len(win_rows), args.batch_size, args.seed)
    loop = C.Loop(run, args, {"G": G, "D": D}, {"G": opt_G, "D": opt_D},
                  batches={"windows": batches}, log_every=max(1, args.steps // 60))
    # under torchrun, DDP wrappers that average the gradients over the processes (each has its own
    # --batch-size windows of every global batch); alone, G and D themselves
    G_, D_ = C.ddp_wrap(G, run.device), C.ddp_wrap(D, run.device)
    read = datasets.RowReader(S_train.x)
    world = f" x {C.ddp_world()} processes = {batches.global_batch}" if C.ddp_world() > 1 else ""
    run.log(f"training on {len(win_rows)} windows ({batches.steps_per_epoch} steps per epoch) for "
            f"{args.steps} steps, batch {args.batch_size}{world}; SA modules: "
            f"{', '.join(SA_SLOTS[args.sa]) or 'none'}")
    auc_steps = loop.state.setdefault("auc_steps", [])        # resumed with the loop's state

    def evaluate(step):                                        # on process 0; the others wait
        e = C.on_main(fig8, step)
        if e is not None:
            auc_steps.append(e)
    if args.eval_every and loop.state["total_steps"] == 0 and not auc_steps:
        evaluate(0)                                            # the untrained generator: a baseline
    for step in loop.phase("train", args.steps):
        windows = [split_window(read(win_rows[next(batches)]), args.k_in, run.device)
                   for _ in range(args.n_critic)]
        loop.log(train_step(G_, D_, opt_G, opt_D, windows, step, args))
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            evaluate(step)                                     # the last point: main's own scores
    train_s = loop.close()
    run.log(f"trained in {train_s:.0f}s; checkpoints {loop.io_report()}")
    return dict(history=loop.history, state=loop.state, train_s=train_s, loop=loop,
                checkpoints=loop.io_report())


# =================================================================================================
# Scoring and evaluation (Tables 1-2, Fig. 8; the rows of C.report)
# =================================================================================================

def load_slabs(data, args):
    """The --n-slices slab of every scan (Deviation 5), memory-mapped, whole (drop_anomalous=False:
    a window must never skip a slice). -> train, val (None if there is none), test"""
    stack = dict(size=tuple(args.image_size), norm="mri", n_slices=args.n_slices,
                 center=args.slice_center, cache_dir=args.cache_dir, drop_anomalous=False)
    S_train = datasets.slice_stack(data.train, desc="train", **stack)
    S_val = datasets.slice_stack(data.val, desc="val", **stack) if data.val else None
    S_test = datasets.slice_stack(data.test, desc="test", **stack)
    return S_train, S_val if S_val is not None and len(S_val) else None, S_test


def scan_rows(cases, out, args):
    """One row per scan with windows (a scan is its own case): the score of --score-windows and
    both scores of Table 1."""
    primary = out["top"] if args.score_windows else out["all"]
    return [dict(id=c.id, group=c.group, label=c.label, score=float(primary[i]),
                 score_all_windows=float(out["all"][i]), score_top10_windows=float(out["top"][i]),
                 n_windows=int(out["n_windows"][i]))
            for i, c in enumerate(cases) if np.isfinite(primary[i])]



def baseline_scores(S_train, S_test, rows, args):
    """Issue 15.5: the intensity and z-score baselines (C.baseline_maps) on MADGAN's own slabs,
    aggregated as Eq. (2) is: per window the mean over its k_out next slices, per scan the mean
    over its windows (or the best --score-windows). -> {name: one value per row}"""
    win_rows, case = window_table(S_test, args.k_in, args.k_out)
    at = {c.id: i for i, c in enumerate(S_test.cases)}
    out = {}
    for name, m in C.baseline_maps(S_train, S_test).items():
        w = m[win_rows[:, args.k_in:]].reshape(len(win_rows), -1).mean(1)    # (windows,)
        s = scan_scores(w, case, len(S_test.cases), args.score_windows)
        out[name] = [s[at[r["id"]]] for r in rows]
    return out

def is_stage(group):
    """Disease-stage groups: cdr_<x> (x > 0) on OASIS-3; atrophy_<k> on the phantom."""
    return group.startswith("atrophy_") or (group.startswith("cdr_")
                                            and group not in ("cdr_0", "cdr_0.0"))


def stage_order(groups):
    """Order groups for figures: normal, the stages (cdr_0.5 < cdr_1 < cdr_2), then the rest."""
    normal = ("normal", "cdr_0", "cdr_0.0")
    return sorted(groups, key=lambda n: (1 if is_stage(n) else 0 if n in normal else 2, n))


def group_aucs(rows, key="score"):
    """Table 1: AUROC of the normal scans (label 0) against each anomalous group, against all of
    them, and against all disease stages together (CDR 0.5 + 1 + 2; atrophy_1 + 2 + 3)."""
    y = np.array([r["label"] for r in rows])
    g = np.array([r["group"] for r in rows])
    s = np.array([r[key] for r in rows], np.float64)
    out = {"all": C.auroc(y, s)}
    for name in sorted(set(g[y == 1])):
        sel = (g == name) | (y == 0)
        out[name] = C.auroc(y[sel], s[sel])
    stages = sorted({n for n in g[y == 1] if is_stage(n)})
    if len(stages) > 1:
        sel = (y == 0) | np.isin(g, stages)
        out["all_stages"] = C.auroc(y[sel], s[sel])
    return out


def table1(rows, args):
    """Tables 1-2: the AUCs of both scan scores and their paired difference ('limited', §Results)"""
    k = args.score_windows or 10
    return {"score": f"average l2 (Eq. 2) per scan over "
                     f"{f'the best {k} consecutive' if args.score_windows else 'all'} windows",
            "table1": {"all windows": group_aucs(rows, "score_all_windows"),
                       f"{k} consecutive windows": group_aucs(rows, "score_top10_windows")},
            "table1_all_minus_consecutive": C.compare_scores(
                rows, rows, key_a="score_all_windows", key_b="score_top10_windows")}


def auc_at_step(run, G, S_test, S_val, args, step, out=None, val=None):
    """Fig. 8: the AUCs at a training step (reporting only); out, val: scores already at hand."""
    rows = scan_rows(S_test.cases, out or score(G, S_test, args, run.device), args)
    e = {"step": step, "auroc": group_aucs(rows, "score_all_windows"),
         "auroc_top_windows": group_aucs(rows, "score_top10_windows")}
    if S_val is not None:
        e["val_l2_mean"] = float(np.nanmean((val or score(G, S_val, args, run.device))["all"]))
    run.log(f"step {step}: AUC " + ", ".join(f"{k} {v:.3f}" for k, v in e["auroc"].items()))
    return e


def fig8_last_point(run, G, S_test, S_val, args, state, out, val_out):
    """Fig. 8's last point from main's final scores (no second pass; --checkpoint: if recorded)."""
    steps, last = state.setdefault("auc_steps", []), state["total_steps"]
    if args.eval_every and (steps[-1]["step"] != last if steps else not args.checkpoint):
        steps.append(auc_at_step(run, G, S_test, S_val, args, last, out, val_out))


def example_scans(cases, max_rows=7):
    """The scans the figures show, chosen before scoring (by group, never by score): the first
    scan of every group, normal first, then the stages."""
    first = {c.group: i for i, c in reversed(list(enumerate(cases)))}   # group -> its first scan
    return [first[g] for g in stage_order(first)][:max_rows]


def example_rows(S, out, args):
    """examples.png: per example scan its middle next slice, reconstruction, pixelwise l2, mask."""
    j, rows = args.k_in + args.k_out // 2, []
    for i, ex in out["kept"].items():
        x, rec = ex["window"][j], ex["recon"][j - args.k_in]
        gt = np.asarray(S.mask[ex["rows"][j]])
        rows.append(dict(title=f"{S.cases[i].group} ({S.cases[i].id.split('/')[-1]})", input=x,
                         reconstruction=rec, amap=((x - rec) / 2) ** 2,
                         gt=gt if gt.any() else None))
    return rows


# =================================================================================================
# main
# =================================================================================================

def main(argv=None):
    args = parse_args(argv)
    run = C.start_run(args, METHOD)
    data = datasets.load_dataset(args, contrast="t1")
    with C.Timer() as t_cache:
        S_train, S_val, S_test = load_slabs(data, args)
    win_rows, _ = window_table(S_train, args.k_in, args.k_out)
    if len(win_rows) == 0:
        C.fail(f"no training window: every scan has fewer than --k-in + --k-out = "
               f"{args.k_in + args.k_out} slices")
    run.log(f"slices: train {len(S_train)} ({len(win_rows)} windows), test {len(S_test)} "
            f"({len(data.test)} scans); caches ready in {t_cache.seconds:.1f}s")
    G, D = (m.to(run.device) for m in build_models(args))
    if args.checkpoint:                                        # score only
        ck = C.load_models(args.checkpoint, {"G": G}, METHOD)
        trained = dict(history=ck["history"], state=ck["loop"], train_s=0.0, checkpoints=None)
        C.save_checkpoint(run.out / "last.pt", ck)
    else:
        fig8 = functools.partial(auc_at_step, run, G, S_test, S_val, args)
        trained = train(args, run, G, D, S_train, win_rows, fig8)
    if not C.is_main():                                        # torchrun: process 0 scores, writes
        return None
    with C.Timer() as t:
        out = score(G, S_test, args, run.device, keep=example_scans(S_test.cases))
    key = "top" if args.score_windows else "all"               # the scan score of --score-windows
    val_out = score(G, S_val, args, run.device) if S_val is not None else None
    val = val_out[key] if val_out is not None else None
    fig8_last_point(run, G, S_test, S_val, args, trained["state"], out, val_out)
    rows = scan_rows(S_test.cases, out, args)
    C.add_baselines(rows, baseline_scores(S_train, S_test, rows, args))
    timing = {"cache_s": round(t_cache.seconds, 2), "train_s": round(trained["train_s"], 2),
              "score_s": round(t.seconds, 2), "checkpoints": trained["checkpoints"],
              "score_s_per_sample": round(t.seconds / len(S_test.cases), 4)}
    extra = {"sa": args.sa, "sa_modules": list(SA_SLOTS[args.sa]), "l1_weight": args.l1_weight,
             "steps": args.steps, "score_windows": args.score_windows, "world_size": C.ddp_world(),
             "effective_batch_size": args.batch_size * C.ddp_world(),
             "slices": {"train": len(S_train), "train_windows": len(win_rows), "test": len(S_test)},
             **table1(rows, args), "auc_over_steps": trained["state"].get("auc_steps", []),
             "skipped_scans_without_windows": [c.id for c, n in zip(S_test.cases, out["n_windows"])
                                               if not n]}
    examples = example_rows(S_test, out, args)
    cols = ("real next slice", "reconstruction", "pixelwise l2 (Eq. 2)", "anomaly mask")
    res = C.report(run, args, "scan", rows, timing, extra=extra, data_info=data.info,
                   val_scores=val, threshold_pct=95.0, loop=trained.get("loop"),
                   slabs=S_test.slabs, slab_cases=S_test.cases, skipped=S_test.skipped,
                   baselines_how="per window mean over its next slices, per scan as the score",
                   history=trained["history"], examples=examples, titles={
                       "roc": f"MADGAN {args.sa}-SA: per-scan average l2, normal vs each group",
                       "losses": f"MADGAN ({args.sa}-SA) training: critic, adversarial, l1 terms",
                       "losses_logy": True,
                       "examples_cols": cols if any(r["gt"] is not None for r in examples)
                       else cols[:3]})
    plot_fig3([dict(group=S_test.cases[i].group, score=float(out["all"][i]), **ex)
               for i, ex in out["kept"].items()], run.out / "fig3_slices.png")
    if extra["auc_over_steps"]:
        plot_auc_steps(extra["auc_over_steps"], run.out / "auc_steps.png", title=f"AUC over "
                       f"training steps (Fig. 8), {args.sa}-SA, l1 weight {args.l1_weight:g}")
    return res


# =================================================================================================
# Appendix: the paper's figures (Fig. 3: slices and pixelwise l2; Fig. 8: AUC over training steps)
# =================================================================================================

def plot_auc_steps(auc_steps, path, title):
    """Fig. 8: AUC of normal vs each group over training steps."""
    plt = C._plt()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name in stage_order([k for k in auc_steps[0]["auroc"] if k != "all"]) + ["all"]:
        st, v = np.asarray([(e["step"], e["auroc"][name]) for e in auc_steps if name in e["auroc"]],
                           dtype=float).T
        ax.plot(st, v, marker="o", ms=3, lw=2.2 if name in ("all", "all_stages") else 1.3,
                ls="--" if name == "all" else "-", label=name)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="training step", ylabel="AUC (per-scan average l2)", ylim=(0, 1.02), title=title)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    ax.grid(alpha=0.3)
    C._save(fig, path)


def plot_fig3(examples, path, vmax=0.1):
    """Fig. 3: one row per scan: the 3 input slices | the real next 3 | the reconstructed next 3 |
    their pixelwise l2 (jet in [0, vmax], alpha-blended over the real slice) with each slice's l2.
    One mosaic image, so that it stays fast for many rows."""
    plt = C._plt()
    jet = plt.get_cmap("jet")
    k = len(examples[0]["recon"])
    k_in, (H, W) = len(examples[0]["window"]) - k, examples[0]["window"].shape[1:]
    gap = max(H // 16, 1)
    gray = lambda a: np.repeat(((np.clip(a, -1, 1) + 1) / 2)[..., None], 3, -1)  # noqa: E731
    x0 = lambda j: j * (W + gap) + gap * (j // 3)   # noqa: E731  left edge of tile j (gap after 3)
    mosaic = np.ones((len(examples) * (H + gap), x0(k_in + 3 * k), 3), np.float32)
    fig, ax = plt.subplots(figsize=(min(1.1 * (k_in + 3 * k), 16), 1.15 * len(examples) + 0.7))
    for i, ex in enumerate(examples):
        win, rec, y0 = ex["window"], ex["recon"], i * (H + gap)   # (6, H, W), (3, H, W)
        l2 = ((win[k_in:] - rec) / 2) ** 2                     # (3, H, W): Eq. (2) per pixel
        a = np.clip(l2 / vmax, 0, 1)[..., None] * 0.85         # (3, H, W, 1) overlay opacity
        over = [(1 - a[j]) * gray(win[k_in + j]) + a[j] * jet(np.clip(l2[j] / vmax, 0, 1))[..., :3]
                for j in range(k)]
        for j, tile in enumerate([gray(s) for s in win] + [gray(s) for s in rec] + over):
            mosaic[y0: y0 + H, x0(j): x0(j) + W] = np.clip(tile, 0, 1)
        ax.text(-gap, y0 + H / 2, f"{ex['group']}\nscan l2 {ex['score']:.4f}", ha="right",
                va="center", fontsize=7)
        for j in range(k):
            ax.text(x0(k_in + 2 * k + j) + 1, y0 + H - 1, f"{l2[j].mean():.4f}", color="white",
                    fontsize=6, va="bottom")
    ax.imshow(mosaic, interpolation="nearest")
    heads = [f"input s{j + 1}" for j in range(k_in)] + [f"{what} s{j + 1 + k_in}" for what in
                                                         ("real", "recon.", "l2") for j in range(k)]
    for j, h in enumerate(heads):
        ax.text(x0(j) + W / 2, -gap, h, ha="center", va="bottom", fontsize=7)
    ax.axis("off")
    ax.set_title(f"MADGAN: 3 input slices, real and reconstructed next 3, pixelwise l2 in jet "
                 f"[0, {vmax}] (Fig. 3; the paper uses [0, 0.2] for T1)", fontsize=8, pad=14)
    C._save(fig, path)


if __name__ == "__main__":
    C.main_guard(main)
