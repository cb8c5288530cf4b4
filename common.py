"""Plumbing shared by the five method scripts: windowing, metrics, plotting, run files.

This module holds no paper: no network, no loss, no anomaly score. Those live in each method's
script (anogan.py, fanogan3d.py, anovaegan.py, madgan.py, reversed_ae.py) even where two of them
look alike, so that every script can be read on its own, top to bottom, next to its paper.
Loading (NIfTI files, the data sets, the memory-mapped caches) lives in data/datasets.py.

Sections, in order:
  1. Errors          -- one clear `error:` line for user mistakes (../shared/CONTRACT.md, "Bad input")
  2. Windowing       -- CT windowing, MRI normalisation, crops/resizes, axial slices, patches,
                        augmentation
  3. Metrics         -- AUROC/AUPRC (scikit-learn), Youden point, Dice, thresholds from healthy data,
                        3D post-processing, per-group evaluation
  4. Plotting        -- ROC curves, score distributions, example grids, training curves (Agg backend)
  5. Run files       -- arguments and presets, seeding, device, checkpoints, config/results/scores
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent

# =================================================================================================
# 1. Errors
# =================================================================================================


class UserError(Exception):
    """A mistake the user can fix (bad path, bad flag, corrupt file): printed as one `error:` line."""


def fail(msg: str):
    """Stop with one line `error: msg` (see main_guard)."""
    raise UserError(msg)


def main_guard(main, argv=None):
    """Run `main(argv)`; a UserError becomes one line `error: ...` on stderr and exit status 2."""
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted; resume with --resume <out>/last.pt", file=sys.stderr, flush=True)
        sys.exit(130)
    finally:
        if "torch.distributed" in sys.modules:
            ddp_teardown()


# =================================================================================================
# 2. Windowing and preprocessing
# =================================================================================================

def ct_window(hu, lo=-20.0, hi=100.0):
    """CT window [lo, hi] HU -> [-1, 1] (values outside are clipped). Default: brain window L40/W120."""
    hu = np.asarray(hu, dtype=np.float32)
    return (np.clip((hu - lo) / (hi - lo), 0, 1) * 2 - 1).astype(np.float32)


def normalize_mri(img, brain=None, lo_pct=1.0, hi_pct=99.0):
    """MRI intensities -> [-1, 1] by the lo/hi percentiles of the brain voxels (all voxels > min if no mask)."""
    img = np.asarray(img, dtype=np.float32)
    sel = img[brain > 0] if brain is not None and brain.any() else img[img > img.min()]
    lo, hi = np.percentile(sel, [lo_pct, hi_pct])
    return (np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1) * 2 - 1).astype(np.float32)


def axial_stack(vol):
    """(X, Y, Z) canonical RAS volume -> (Z, Y, X) axial slices for display: anterior up, subject's
    left on the image left (neurological convention), slice 0 = most inferior."""
    return np.ascontiguousarray(np.flip(np.transpose(vol, (2, 1, 0)), axis=1))


def bbox(mask, margin=0):
    """Bounding box of a boolean array as a tuple of slices, grown by `margin` voxels."""
    idx = np.nonzero(mask)
    if len(idx[0]) == 0:
        return tuple(slice(0, s) for s in mask.shape)
    return tuple(slice(max(int(i.min()) - margin, 0), min(int(i.max()) + margin + 1, s))
                 for i, s in zip(idx, mask.shape))


def pad_to_square(arr, value, axes=(-2, -1)):
    """Pad the given axes to equal length (centred) with `value`."""
    n = max(arr.shape[a] for a in axes)
    pads = [(0, 0)] * arr.ndim
    for a in axes:
        d = n - arr.shape[a]
        pads[a] = (d // 2, d - d // 2)
    return np.pad(arr, pads, constant_values=value)


def pad_to_cube(arr, value):
    return pad_to_square(arr, value, axes=(-3, -2, -1))


def resize(arr, shape, order=1):
    """Resize the last len(shape) dims of `arr` (linear if order=1, nearest if 0) with torch."""
    import torch
    import torch.nn.functional as F
    shape = tuple(int(s) for s in shape)
    if tuple(arr.shape[-len(shape):]) == shape:
        return np.asarray(arr, dtype=np.float32)
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    lead = t.shape[: t.ndim - len(shape)]
    t = t.reshape(1, -1, *t.shape[-len(shape):])
    mode = {2: "bilinear", 3: "trilinear"}[len(shape)] if order == 1 else "nearest"
    kw = {"align_corners": False} if order == 1 else {}
    t = F.interpolate(t, size=shape, mode=mode, **kw)
    return t.reshape(*lead, *shape).numpy()


def gaussian_smooth(arr, sigma):
    from scipy.ndimage import gaussian_filter
    return gaussian_filter(arr, sigma) if sigma and sigma > 0 else arr


def random_patches(x, brain, size=64, n=1000, rng=None, min_brain=0.5, max_tries=50):
    """`n` random size×size patch positions whose brain fraction is >= min_brain.
    x: (N, H, W) slices, brain: (N, H, W). Returns arrays (idx, top, left)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    N, H, W = x.shape
    if H < size or W < size:
        fail(f"patch size {size} is larger than the slices ({H}x{W})")
    out = []
    need = n
    for _ in range(max_tries):
        idx = rng.integers(0, N, need * 2)
        top = rng.integers(0, H - size + 1, need * 2)
        left = rng.integers(0, W - size + 1, need * 2)
        frac = np.array([brain[i, t:t + size, l:l + size].mean() for i, t, l in zip(idx, top, left)])
        ok = frac >= min_brain
        out += list(zip(idx[ok], top[ok], left[ok]))[:need]
        need = n - len(out)
        if need <= 0:
            break
    if not out:
        fail(f"no {size}x{size} patch with >= {min_brain:.0%} brain found; lower the patch size")
    a = np.array(out[:n])
    return a[:, 0].astype(np.int64), a[:, 1].astype(np.int64), a[:, 2].astype(np.int64)


def extract_patches(x, idx, top, left, size):
    """(N, H, W) array + positions -> (n, size, size) float32 array."""
    return np.stack([np.asarray(x[i, t:t + size, l:l + size], dtype=np.float32)
                     for i, t, l in zip(idx, top, left)]) if len(idx) else np.zeros((0, size, size), np.float32)


def grid_patches(brain2d, size, stride, min_brain=0.5):
    """Positions (top, left) of a regular grid of patches over one slice with enough brain."""
    H, W = brain2d.shape
    return [(t, l) for t in range(0, H - size + 1, stride) for l in range(0, W - size + 1, stride)
            if brain2d[t:t + size, l:l + size].mean() >= min_brain]


def slice_windows(n_slices, k_in=3, k_out=3):
    """Start indices s of every window of one scan: input slices s..s+k_in-1, target slices
    s+k_in..s+k_in+k_out-1 (MADGAN: s1..3 -> s4..6, s2..4 -> s5..7, ...). Empty if the scan is short."""
    return np.arange(max(n_slices - k_in - k_out + 1, 0))


def augment_2d(x, rot_deg=10.0, translate=0.1, scale=(0.9, 1.1), hflip=0.5, generator=None):
    """Random affine augmentation of a (B, C, H, W) batch for TRAINING only: rotation up to ±rot_deg,
    translation up to ±translate of the image size, isotropic scaling in `scale`, horizontal flip with
    probability hflip. Background fill is -1 (the normalised background)."""
    import torch
    import torch.nn.functional as F
    B = x.shape[0]
    g = generator

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand(B, generator=g)
    a = u(-rot_deg, rot_deg) * math.pi / 180
    s = u(*scale)
    tx, ty = u(-translate, translate) * 2, u(-translate, translate) * 2
    flip = torch.where(torch.rand(B, generator=g) < hflip, -1.0, 1.0)
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0] = torch.cos(a) / s * flip
    theta[:, 0, 1] = -torch.sin(a) / s
    theta[:, 1, 0] = torch.sin(a) / s * flip
    theta[:, 1, 1] = torch.cos(a) / s
    theta[:, 0, 2], theta[:, 1, 2] = tx, ty
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


# =================================================================================================
# 3. Metrics
# =================================================================================================

def _yl(y, s):
    y, s = np.asarray(y).astype(int).ravel(), np.asarray(s, dtype=np.float64).ravel()
    return y, s


def auroc(y, s):
    """Area under the ROC curve (scikit-learn); nan if only one class is present."""
    from sklearn.metrics import roc_auc_score
    y, s = _yl(y, s)
    return float(roc_auc_score(y, s)) if len(set(y)) == 2 else float("nan")


def auprc(y, s):
    """Average precision (area under the precision-recall curve, scikit-learn)."""
    from sklearn.metrics import average_precision_score
    y, s = _yl(y, s)
    return float(average_precision_score(y, s)) if len(set(y)) == 2 else float("nan")


def roc_points(y, s):
    from sklearn.metrics import roc_curve
    return roc_curve(*_yl(y, s))


def pr_points(y, s):
    from sklearn.metrics import precision_recall_curve
    return precision_recall_curve(*_yl(y, s))


def binary_stats(y, pred):
    """Confusion-matrix statistics of boolean predictions."""
    y, pred = np.asarray(y).astype(bool).ravel(), np.asarray(pred).astype(bool).ravel()
    tp, fp = int((y & pred).sum()), int((~y & pred).sum())
    fn, tn = int((y & ~pred).sum()), int((~y & ~pred).sum())
    sens = tp / max(tp + fn, 1)
    prec = tp / max(tp + fp, 1)
    return dict(sensitivity=sens, specificity=tn / max(tn + fp, 1), precision=prec, recall=sens,
                accuracy=(tp + tn) / max(len(y), 1), f1=2 * prec * sens / max(prec + sens, 1e-12),
                tp=tp, fp=fp, fn=fn, tn=tn)


def youden(y, s):
    """Operating point maximising Youden's J = sensitivity + specificity - 1 on the ROC curve.
    NB: chosen with the labels it is evaluated on (as the papers report it): descriptive, not a
    deployable threshold."""
    y, s = _yl(y, s)
    fpr, tpr, thr = roc_points(y, s)
    i = int(np.argmax(tpr - fpr))
    t = float(thr[i]) if np.isfinite(thr[i]) else float(s.max())
    return {"threshold": t, "youden_j": float(tpr[i] - fpr[i]), **binary_stats(y, s >= t)}


def fpr_at_tpr(y, s, tpr=0.95):
    """False-positive rate at the first threshold reaching the given true-positive rate."""
    from sklearn.metrics import roc_curve
    fpr, t, _ = roc_curve(*_yl(y, s), drop_intermediate=False)
    return float(fpr[np.searchsorted(t, tpr - 1e-12, side="left")])


def dice(pred, gt):
    """Dice = 2|P∩G| / (|P|+|G|); 1.0 when both are empty."""
    p, g = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
    den = p.sum() + g.sum()
    return 1.0 if den == 0 else float(2 * (p & g).sum() / den)


def threshold_from_healthy(values, percentile=None, fpr=None):
    """A threshold from HEALTHY data only: its `percentile` (e.g. 98), or the value that flags a
    fraction `fpr` of the healthy values (e.g. 0.05 -> the 95th percentile)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if (percentile is None) == (fpr is None):
        raise ValueError("give exactly one of percentile= or fpr=")
    q = percentile if percentile is not None else 100.0 * (1.0 - fpr)
    return float(np.percentile(v, q))


def oracle_best_dice(scores, gt, n_thresholds=100):
    """Best Dice over thresholds chosen WITH the ground truth: an upper bound, report as `oracle_dice`."""
    s, g = np.asarray(scores, dtype=np.float32).ravel(), np.asarray(gt).astype(bool).ravel()
    ts = np.unique(np.quantile(s, np.linspace(0.5, 1.0, n_thresholds)))
    best = (0.0, float(ts[-1]))
    for t in ts:
        d = dice(s >= t, g)
        if d > best[0]:
            best = (d, float(t))
    return best


def aggregate(values, keys, how="mean"):
    """Aggregate per-unit values by key (e.g. patch scores -> slice score): mean, max or p99."""
    fn = {"mean": np.mean, "max": np.max, "p99": lambda v: np.percentile(v, 99)}[how]
    out = {}
    buckets: dict = {}
    for v, k in zip(np.asarray(values, dtype=np.float64).ravel(), keys):
        buckets.setdefault(k, []).append(v)
    for k, v in buckets.items():
        out[k] = float(fn(np.asarray(v)))
    return out


def postprocess_3d(residual, brain, median=5, erode=1, threshold=None, min_size=6):
    """Residual volume (Z, H, W) -> median-filtered residual masked by the eroded brain; with a
    threshold: the binary segmentation with connected components under `min_size` voxels removed."""
    from scipy import ndimage as ndi
    r = ndi.median_filter(np.asarray(residual, dtype=np.float32), size=median) if median and median > 1 \
        else np.asarray(residual, dtype=np.float32)
    b = np.asarray(brain).astype(bool)
    if erode:
        # border_value=1: the array's ends are not brain boundaries (a slab of 20 slices would otherwise
        # lose its first and last slice entirely)
        b = ndi.binary_erosion(b, iterations=erode, border_value=1)
    r = r * b
    if threshold is None:
        return r
    seg = r > threshold
    if min_size and min_size > 1:
        lab, n = ndi.label(seg)
        if n:
            sizes = np.bincount(lab.ravel())
            keep = sizes >= min_size
            keep[0] = False
            seg = keep[lab]
    return seg


def evaluate(rows):
    """Contract metrics from per-unit rows (dicts with group, label, score): `metrics` = every
    anomalous unit against every normal one; `groups` = per group n, and for anomalous groups
    AUROC/AUPRC against the normal units."""
    y = np.array([int(r["label"]) for r in rows])
    s = np.array([float(r["score"]) for r in rows])
    g = np.array([r["group"] for r in rows])
    out = {"metrics": {"auroc": auroc(y, s), "auprc": auprc(y, s), "fpr_at_95tpr": fpr_at_tpr(y, s)
                       if len(set(y)) == 2 else float("nan")}, "groups": {}}
    for name in sorted(set(g), key=lambda n: (y[g == n].max(), n)):
        sel = g == name
        entry = {"n": int(sel.sum()), "score_mean": float(s[sel].mean()), "score_std": float(s[sel].std())}
        if y[sel].max() == 1:
            both = sel | (y == 0)
            entry.update(auroc=auroc(y[both], s[both]), auprc=auprc(y[both], s[both]))
        out["groups"][str(name)] = entry
    return out


# =================================================================================================
# 4. Plotting
# =================================================================================================

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)


def plot_roc(curves, path, title=""):
    """ROC curves of several groups on one axis: curves = {name: (labels, scores)}."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.8, 4.6))
    for name, (y, s) in curves.items():
        if len(set(np.asarray(y).astype(int).tolist())) < 2:
            continue
        fpr, tpr, _ = roc_points(y, s)
        ax.plot(fpr, tpr, lw=1.8, label=f"{name} (AUC {auroc(y, s):.3f})")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01),
           title=title or "ROC")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_pr(curves, path, title=""):
    """Precision-recall curves: curves = {name: (labels, scores)}."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.8, 4.6))
    for name, (y, s) in curves.items():
        if len(set(np.asarray(y).astype(int).tolist())) < 2:
            continue
        p, r, _ = pr_points(y, s)
        ax.plot(r, p, lw=1.8, label=f"{name} (AP {auprc(y, s):.3f})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01), title=title or "Precision-recall")
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_scores(groups, path, log=False, title="", xlabel="anomaly score", threshold=None):
    """Score distribution per group: a box plot with every sample as a dot."""
    plt = _plt()
    names = list(groups)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(names) + 1.5), 4))
    data = [np.asarray(groups[n], dtype=np.float64) for n in names]
    ax.boxplot(data, widths=0.5, showfliers=False)
    rng = np.random.default_rng(0)
    for i, d in enumerate(data):
        ax.scatter(i + 1 + rng.uniform(-0.15, 0.15, len(d)), d, s=8, alpha=0.6,
                   color="tab:blue" if names[i] in ("normal", "train", "val") or names[i].endswith("_0") else "tab:red")
    if threshold is not None:
        ax.axhline(threshold, color="k", ls="--", lw=1, label="threshold (healthy data)")
        ax.legend(fontsize=8)
    ax.set_xticks(range(1, len(names) + 1), [f"{n}\n(n={len(d)})" for n, d in zip(names, data)], fontsize=8)
    if log:
        ax.set_yscale("log")
    ax.set(ylabel=xlabel, title=title or "Score per group")
    ax.grid(alpha=0.3, axis="y")
    _save(fig, path)


def plot_examples(rows, path, cols=("input", "reconstruction", "anomaly map", "ground truth"), vmax=None):
    """Example grid: one row per case: input | reconstruction | anomaly map (jet over the input) |
    ground truth (red contour over the input). rows: dicts with title, input, reconstruction, amap, gt."""
    plt = _plt()
    n = len(rows)
    fig, axes = plt.subplots(n, len(cols), figsize=(2.3 * len(cols), 2.3 * n + 0.3), squeeze=False)
    amaps = [np.asarray(r["amap"], dtype=np.float32) for r in rows if r.get("amap") is not None]
    vmax = vmax if vmax is not None else (float(np.percentile(np.concatenate([a.ravel() for a in amaps]), 99.5))
                                          if amaps else 1.0)
    for i, r in enumerate(rows):
        x = np.asarray(r["input"], dtype=np.float32)
        panels = [("input", x), ("reconstruction", r.get("reconstruction")), ("anomaly map", r.get("amap")),
                  ("ground truth", r.get("gt"))]
        for j, (name, img) in enumerate(panels[: len(cols)]):
            ax = axes[i, j]
            ax.axis("off")
            if i == 0:
                ax.set_title(cols[j], fontsize=9)
            if img is None:
                continue
            img = np.asarray(img, dtype=np.float32)
            if name == "anomaly map":
                ax.imshow(x, cmap="gray", vmin=-1, vmax=1)
                ax.imshow(img, cmap="jet", alpha=0.55, vmin=0, vmax=max(vmax, 1e-6))
            elif name == "ground truth":
                ax.imshow(x, cmap="gray", vmin=-1, vmax=1)
                if img.any():
                    ax.contour(img > 0, levels=[0.5], colors="red", linewidths=1.0)
            else:
                ax.imshow(img, cmap="gray", vmin=-1, vmax=1)
        axes[i, 0].text(-0.05, 0.5, r.get("title", ""), transform=axes[i, 0].transAxes, rotation=90,
                        ha="right", va="center", fontsize=8)
    _save(fig, path)


def plot_curves(curves, path, title="", ylabel="", logy=False, xlabel="step"):
    """Training curves: curves = {name: [(step, value), ...]}, one line each (raw + smoothed)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, pts in curves.items():
        if not len(pts):
            continue
        st, v = np.asarray(pts, dtype=np.float64).T
        line, = ax.plot(st, v, lw=0.6, alpha=0.35)
        k = max(1, len(v) // 50)
        if k > 1:
            sm = np.convolve(v, np.ones(k) / k, mode="valid")
            ax.plot(st[k - 1:], sm, lw=1.8, color=line.get_color(), label=name)
        else:
            line.set_alpha(1.0)
            line.set_linewidth(1.8)
            line.set_label(name)
    if logy:
        ax.set_yscale("symlog")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


# =================================================================================================
# 5. Run files: arguments, seeding, device, checkpoints, results
# =================================================================================================

class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line `error: ...` (the contract's bad-input rule)."""

    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*a, **kw)

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def add_contract_args(p, method):
    """The flags every script shares (../shared/CONTRACT.md), identical across the five scripts."""
    g = p.add_argument_group("shared flags (../shared/CONTRACT.md)")
    g.add_argument("--data", default="synthetic", help="dataset: synthetic (default, the phantom), folder, oasis3, ixi, brats, ctich, mslub, isbi2015")
    g.add_argument("--data-root", default=None, help="where the dataset lives (default data/<NAME>)")
    g.add_argument("--train-data", default=None, help="take the healthy training set from another dataset")
    g.add_argument("--train-root", default=None, help="root of --train-data (default data/<NAME>)")
    g.add_argument("--modality", default=None, help="real datasets: which image to load (e.g. t1, t2, flair)")
    g.add_argument("--cdr-window-days", type=int, default=365,
                   help="oasis3: a scan takes the CDR of the closest visit within this many days (default 365)")
    g.add_argument("--test-frac", type=float, default=None,
                   help="real data sets: fraction of the healthy (or, for brats/mslub/isbi2015, of all) "
                        "subjects held out for testing, split by subject with --seed (default 0.3)")
    g.add_argument("--preset", default="quick", choices=["smoke", "quick", "paper"],
                   help="smoke: seconds (tests); quick: minutes on a 2-core CPU (default); paper: the paper's settings")
    g.add_argument("--out", default=None, help=f"run directory (default runs/{method}__<data>__<seed>__<time>)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="default auto")
    g.add_argument("--seed", type=int, default=0, help="seeds python, numpy, torch and data order (default 0)")
    g.add_argument("--resume", default=None, help="continue training from this checkpoint (last.pt)")
    g.add_argument("--checkpoint", default=None, help="skip training and score with this checkpoint")
    g.add_argument("--cache-dir", default=None, help="memory-mapped preprocessed arrays (default data/cache)")
    g.add_argument("--amp", action="store_true", help="mixed precision on CUDA (bf16); ignored on CPU")
    return p


def parse_args(parser, presets, argv=None, method=None):
    """Parse; every flag left at None takes the preset's value (an explicit flag always wins)."""
    args = parser.parse_args(argv)
    for k, v in presets[args.preset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    method = method or Path(sys.argv[0]).stem
    if args.out is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out = str(Path("runs") / f"{method}__{args.data}__{args.seed}__{stamp}")
    for p, what in ((args.resume, "--resume"), (args.checkpoint, "--checkpoint")):
        if p and not Path(p).is_file():
            fail(f"{what} {p}: no such checkpoint file")
    return args


def check_range(args, name, lo=None, hi=None, integer=False):
    """Flag validation: `--name` must lie in [lo, hi]."""
    v = getattr(args, name)
    flag = "--" + name.replace("_", "-")
    if v is None or (lo is not None and v < lo) or (hi is not None and v > hi) or (integer and int(v) != v):
        rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        fail(f"{flag} must be {'an integer ' if integer else ''}in {rng}, got {v}")


def seed_everything(seed):
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def get_device(name="auto"):
    import torch
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA GPU is available here; use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        fail("--device mps: Apple MPS is not available here; use --device cpu or auto")
    return torch.device(name)


def rng_state():
    import torch
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st):
    import torch
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"].cpu() if hasattr(st["torch"], "cpu") else st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    if ddp_world() > 1:   # the checkpoint holds process 0's state: give each process its own stream again
        seed_everything(int(torch.randint(2 ** 31 - 1, (1,))) + ddp_rank())


def save_checkpoint(path, state):
    """torch.save to a temp file in the same folder, then an atomic rename: a crash never leaves a
    half-written checkpoint in place of the last good one."""
    import torch
    if not is_main():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device="cpu"):
    import torch
    if not path or not Path(path).is_file():
        fail(f"checkpoint {path}: no such file")
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # noqa: BLE001
        fail(f"checkpoint {path} cannot be read ({type(e).__name__}); is it a last.pt of this script?")


def check_finite(loss, step=None, ckpt=None):
    """Stop a diverged run with a clear message; the last good checkpoint stays in place."""
    v = float(loss.detach()) if hasattr(loss, "detach") else float(loss)
    if not math.isfinite(v):
        where = f" at step {step}" if step is not None else ""
        keep = f"; the last good checkpoint is kept at {ckpt}" if ckpt and Path(ckpt).is_file() else ""
        fail(f"training diverged (loss is {v}){where}{keep}; try a lower learning rate or --seed")
    return v


@contextlib.contextmanager
def autocast(device, enabled=False):
    """Mixed precision (--amp) on CUDA in bf16; a no-op elsewhere. bf16 has float32's exponent range, so no
    GradScaler is needed. GPUs without bf16 (before Ampere) train in float32: fp16 would need loss scaling
    in every loop, including through the double backward of the gradient penalties."""
    import torch
    if enabled and getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_bf16_supported():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        if enabled and getattr(device, "type", str(device)) == "cuda" and not _warned.get("amp"):
            _warned["amp"] = True
            print("warning: --amp needs a GPU with bf16 (Ampere or newer); training in float32", file=sys.stderr)
        yield


_warned = {}


def progress(iterable, total=None, desc="", every=5.0, file=None):
    """Wrap an iterable; print `desc  i/n (p%)  rate it/s  eta` at most every `every` seconds."""
    file = file or sys.stderr
    total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
    t0 = last = time.time()
    i = 0
    for i, item in enumerate(iterable, 1):
        yield item
        now = time.time()
        if (now - last >= every or (total and i == total and now - t0 > every)) and is_main():
            rate = i / max(now - t0, 1e-9)
            if total:
                eta = (total - i) / max(rate, 1e-9)
                print(f"{desc}  {i}/{total} ({100 * i / total:.0f}%)  {rate:.2f} it/s  eta {_fmt_s(eta)}",
                      file=file, flush=True)
            else:
                print(f"{desc}  {i}  {rate:.2f} it/s", file=file, flush=True)
            last = now


def _fmt_s(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


def peak_memory_mb(device=None):
    """Peak resident memory of this process (and peak CUDA memory allocated, on a GPU), in MB."""
    import resource
    out = {"rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device is not None and getattr(device, "type", str(device)) == "cuda":
        import torch
        out["cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    return out


def _versions():
    import importlib.metadata as md
    v = {"python": platform.python_version()}
    for pkg in ("torch", "numpy", "nibabel", "scikit-learn", "scipy", "matplotlib", "scikit-image"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return v


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def write_json(path, obj):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default, allow_nan=True))
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


# ---- several GPUs / machines: torchrun + DistributedDataParallel ------------------------------
# `torchrun --nproc_per_node=N script.py ...` sets RANK, LOCAL_RANK and WORLD_SIZE; without them every
# helper below is a no-op, so a reader who ignores DDP sees the plain single-process loop.

def ddp_setup():
    """Join the process group when launched by torchrun; -> (rank, world_size). NCCL on CUDA, else gloo."""
    import torch
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return ddp_rank(), world


def ddp_rank():
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def ddp_world():
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main():
    """True on the process that writes files and prints (rank 0, or the only process)."""
    return ddp_rank() == 0


def ddp_wrap(model, device):
    """DistributedDataParallel around `model` when running under torchrun; the model itself otherwise.
    On CUDA, BatchNorm layers become SyncBatchNorm (statistics over the global batch, as on one GPU);
    gloo on CPU has no SyncBatchNorm, so there each process normalises with its own share of the batch.
    Parameter names do not change, so checkpoints load in single-process runs and vice versa."""
    if ddp_world() == 1:
        return model
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP
    if device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # channels-last weights with one input channel have two equal layouts; DDP warns (speed only) when the
    # gradient picks the other one
    import warnings
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def global_batch_size(batch_size, n, what="training samples"):
    """--batch-size per process x processes; under torchrun every process needs its own share of the data."""
    g = batch_size * ddp_world()
    if ddp_world() > 1 and g > n:
        fail(f"--batch-size {batch_size} x {ddp_world()} processes = {g} is more than the {n} {what}; "
             f"use a smaller --batch-size")
    return g


def unwrap(model):
    """The plain module inside a DDP wrapper (checkpoints hold plain state_dicts: loadable either way)."""
    return getattr(model, "module", model)


def shard(indices):
    """This rank's share of a (seeded, identical on every rank) index permutation: disjoint across ranks,
    like DistributedSampler, for arrays that are memory-mapped rather than wrapped in a DataLoader."""
    return indices[ddp_rank()::ddp_world()]


def ddp_barrier():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def ddp_teardown():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@dataclass
class Run:
    out: Path
    device: object
    method: str
    t0: float

    def log(self, msg):
        if is_main():
            print(f"[{self.method} {time.time() - self.t0:7.1f}s] {msg}", flush=True)


def start_run(args, method):
    """Seed everything, choose the device, create the run directory and write config.json."""
    import torch
    rank, world = ddp_setup()
    # one random stream per process (noise, dropout, z): process 0 has --seed's, so a single-process run is
    # unchanged; data order comes from seeded generators of its own, identical on every process
    seed_everything(args.seed + rank)
    device = get_device(args.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"--out {out}: cannot create the run directory ({e.strerror})")
    if is_main():
        write_json(out / "config.json", {
            "method": method, "args": vars(args), "device": str(device), "world_size": world,
            "versions": _versions(), "git_commit": _git_commit(),
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
            "started": _dt.datetime.now().isoformat(timespec="seconds")})
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    run = Run(out=out, device=device, method=method, t0=time.time())
    run.log(f"device {device}, preset {args.preset}, data {args.data}, out {out}")
    return run


def finish_run(run, args, method, unit, rows, timing, extra=None, data_info=None, roc_title="", log_scores=False):
    """Write the contract's scores.csv, results.json, roc.png and scores.png; return the results dict.
    Under torchrun only rank 0 writes."""
    if not is_main():
        return evaluate(rows)
    labels = {int(r["label"]) for r in rows}
    if labels != {0, 1}:
        missing = "normal (label 0)" if 0 not in labels else "anomalous (label 1)"
        fail(f"no {missing} {unit} among the {len(rows)} scored, so AUROC is undefined and no results.json is "
             f"written; score more of each scan (e.g. more test slices, see --help) or use a test set with both "
             f"(the checkpoint {run.out / 'last.pt'} can be re-scored with --checkpoint)")
    out = run.out
    keys = ["id", "group", "label", "score"]
    extra_cols = [k for k in rows[0] if k not in keys] if rows else []
    with open(out / ".scores.csv.tmp", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys + extra_cols)
        for r in rows:
            w.writerow([r.get(k) for k in keys + extra_cols])
    os.replace(out / ".scores.csv.tmp", out / "scores.csv")
    ev = evaluate(rows)
    res = {"method": method, "data": args.data, "preset": args.preset, "seed": args.seed, "unit": unit,
           **ev, "timing": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in timing.items()},
           "memory": peak_memory_mb(run.device)}
    if data_info is not None:
        res["data_info"] = data_info
    res.update(extra or {})
    write_json(out / "results.json", res)
    y = np.array([int(r["label"]) for r in rows])
    s = np.array([float(r["score"]) for r in rows])
    g = np.array([r["group"] for r in rows])
    curves = {}
    anomalous = [n for n in dict.fromkeys(g) if y[g == n].max() == 1]
    for n in anomalous:
        sel = (g == n) | (y == 0)
        curves[n] = (y[sel], s[sel])
    if len(anomalous) > 1:
        curves["all anomalous"] = (y, s)
    plot_roc(curves, out / "roc.png", title=roc_title or f"{method}: {unit}-level ROC, normal vs each group")
    order = sorted(dict.fromkeys(g), key=lambda n: (y[g == n].max(), n))
    plot_scores({n: s[g == n] for n in order}, out / "scores.png", log=log_scores,
                title=f"{method}: {unit} scores per group")
    m = res["metrics"]
    run.log(f"AUROC {m['auroc']:.3f}  AUPRC {m['auprc']:.3f}  ("
            + ", ".join(f"{k} {v['auroc']:.3f}" for k, v in res["groups"].items() if "auroc" in v) + ")")
    run.log(f"wrote {out}/results.json, scores.csv, roc.png, scores.png")
    return res
