"""Plumbing shared by the five method scripts: windowing, metrics, plotting, run files.

This module holds no paper: no network, no loss, no anomaly score. Those live in each method's
script (anogan.py, fanogan3d.py, anovaegan.py, madgan.py, reversed_ae.py) even where two of them
look alike, so that every script can be read on its own, top to bottom, next to its paper.
Loading (NIfTI files, the data sets, the memory-mapped caches) lives in data/datasets.py.

Sections, in order:
  1. Errors          -- one clear `error:` line for user mistakes (../shared/CONTRACT.md, "Bad input")
  2. Windowing       -- patches, augmentation (CT window, MRI normalisation, crop/pad/resize are
                        loading: data/datasets.py)
  3. Metrics         -- AUROC/AUPRC (scikit-learn), Youden point, Dice, thresholds from healthy data,
                        3D post-processing, per-group evaluation
  4. Plotting        -- ROC curves, score distributions, example grids, training curves (Agg backend)
  5. Run files       -- arguments and presets, seeding, device, checkpoints, config/results/scores
  6. Helpers first written for one script: patches back into slices, run comparison, pixel metrics,
                        figures
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
    """Run `main(argv)`; a UserError becomes one line `error: ...` on stderr and exit status 2. A run that
    stops on bad input before it wrote anything but config.json leaves no run folder behind."""
    try:
        out = main(argv)
        if "torch.distributed" in sys.modules:
            ddp_barrier()   # under torchrun every process leaves together: gloo can abort (SIGABRT) a
        return out          # process whose peer tears the group down while it still exits
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        _drop_empty_run()
        sys.exit(2)
    except KeyboardInterrupt:
        ck = _RUN["out"] / "last.pt" if _RUN.get("out") else None
        hint = f"; resume with --resume {ck}" if ck is not None and ck.is_file() else ""
        print(f"error: interrupted{hint}", file=sys.stderr, flush=True)
        sys.exit(130)
    finally:
        if "torch.distributed" in sys.modules:
            ddp_teardown()


def _drop_empty_run():
    out = _RUN.get("out")
    if out is not None and _RUN.get("created") and out.is_dir() and is_main():
        if {p.name for p in out.iterdir()} <= {"config.json"}:
            import shutil
            shutil.rmtree(out, ignore_errors=True)


# =================================================================================================
# 2. Windowing
# =================================================================================================

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


def equalize_adapthist(x, clip_limit=0.01, nbins=256):
    """skimage.exposure.equalize_adapthist (0.26, default kernel: 1/8 of each side) of a batch of 2D
    images at once, equal to it bit for bit (tests/test_common.py). skimage clips and redistributes
    each tile's histogram in a Python loop (2.7 ms per 64² image); here the loop runs over all tiles
    of all images together. x: (B, H, W) floats in [0, 1] -> (B, H, W) float64 in [0, 1]."""
    from skimage.exposure import rescale_intensity
    from skimage.util import img_as_uint
    x = np.asarray(x, dtype=np.float64)
    B, H, W = x.shape
    G = 2 ** 14                                   # skimage's NR_OF_GRAY
    im = img_as_uint(x)
    im = np.stack([np.round(rescale_intensity(i, out_range=(0, G - 1))) for i in im]).astype(np.uint16)
    k = [max(H // 8, 1), max(W // 8, 1)]
    p0 = [kk // 2 for kk in k]
    p1 = [(kk - s % kk) % kk + int(np.ceil(kk / 2.0)) for kk, s in zip(k, (H, W))]
    im = np.pad(im, [[0, 0], [p0[0], p1[0]], [p0[1], p1[1]]], mode="reflect")
    im = im // (1 + G // nbins)                   # gray level -> bin
    PH, PW = im.shape[1:]
    # the histogram of every tile between the interpolation centres, (B·nh·nw, nbins)
    nh, nw = int(PH / k[0]) - 1, int(PW / k[1]) - 1
    t = im[:, k[0] // 2:k[0] // 2 + nh * k[0], k[1] // 2:k[1] // 2 + nw * k[1]]
    t = t.reshape(B, nh, k[0], nw, k[1]).transpose(0, 1, 3, 2, 4).reshape(B * nh * nw, -1)
    n_px = k[0] * k[1]
    clim = int(np.clip(clip_limit * n_px, 1, None)) if clip_limit > 0 else n_px
    idx = t + (np.arange(len(t)) * nbins)[:, None]
    hist = np.bincount(idx.ravel(), minlength=len(t) * nbins).reshape(len(t), nbins)
    hist = _clip_histograms(hist, clim)
    lut = np.cumsum(hist, axis=-1).astype(float)  # skimage's map_histogram
    lut *= (G - 1) / n_px
    np.clip(lut, None, G - 1, out=lut)
    lut = lut.astype(int).reshape(B, nh, nw, nbins)
    lut = np.pad(lut, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="edge")
    # bilinear interpolation of the four neighbouring tiles' mappings, block by block
    mh, mw = int(PH / k[0]), int(PW / k[1])
    blocks = im.reshape(B, mh, k[0], mw, k[1]).transpose(0, 1, 3, 2, 4).reshape(B, mh * mw, -1)
    cy, cx = np.meshgrid(np.arange(k[1]) / k[1], np.arange(k[0]) / k[0], indexing="ij")
    cy, cx = cy.T.flatten(), cx.T.flatten()      # skimage's coeffs[0] (columns), coeffs[1] (rows)
    coeffs, inv = [cy, cx], [1 - cy, 1 - cx]
    out = np.zeros(blocks.shape, np.float32)
    for e0, e1 in ((0, 0), (0, 1), (1, 0), (1, 1)):
        m = lut[:, e0:e0 + mh, e1:e1 + mw].reshape(B, mh * mw, nbins)
        mapped = np.take_along_axis(m, blocks.astype(np.intp), axis=-1)
        w = np.prod([[inv, coeffs][e][d] for d, e in enumerate((e1, e0))], 0)
        out += (mapped * w).astype(np.float32)
    out = out.astype(np.uint16).reshape(B, mh, mw, k[0], k[1]).transpose(0, 1, 3, 2, 4)
    out = out.reshape(B, PH, PW)[:, p0[0]:PH - p1[0], p0[1]:PW - p1[1]].astype(np.float64)
    return np.stack([rescale_intensity(o) for o in out])


def _clip_histograms(hist, clim):
    """skimage's clip_histogram on every row of hist (int64, (T, nbins)) at once, step for step:
    clip at clim, spread the excess evenly, then hand out what is left one count at a time."""
    n = np.maximum(hist - clim, 0).sum(1)
    hist = np.minimum(hist, clim)
    incr = n // hist.shape[1]
    if incr.any():
        upper = (clim - incr)[:, None]
        low = hist < upper
        n -= low.sum(1) * incr
        hist += low * incr[:, None]
        mid = (hist >= upper) & (hist < clim)
        n += ((hist - clim) * mid).sum(1)
        hist[mid] = clim
    bins = np.arange(hist.shape[1])
    todo = n > 0
    while todo.any():                             # one pass of skimage's `for index` loop per while
        prev = n.copy()
        live = todo.copy()
        for index in range(hist.shape[1]):
            if not live.any():
                break
            r = np.flatnonzero(live)
            h = hist[r]
            under = h < clim
            step = np.maximum(1, under.sum(1) // n[r])
            hit = under & (bins >= index) & ((bins - index) % step[:, None] == 0)
            hist[r] += hit
            n[r] -= hit.sum(1)
            live[r] = n[r] > 0
        todo = (n > 0) & (n != prev)
    return hist


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


# ---- two baselines, computed on a method's OWN arrays, so that they are like for like -------------
# A deep method is compared with the baselines at its resolution, region and unit: the maps below are
# made from the same preprocessed arrays the method scores, and each script aggregates them per unit
# exactly as it aggregates its own anomaly map (rows gain columns baseline_intensity, baseline_zscore).

def slab_positions(S):
    """Position of every row of a slice ArraySet within its case's slab, centred: the middle slice of
    every slab is 0, its neighbours -1 and +1, ... (slabs of all cases are placed by one rule, so equal
    positions are comparable anatomy without registration). Volumes (one row per case) -> 0."""
    pos = np.zeros(len(S.case), np.int64)
    for i in np.unique(S.case):
        rows = np.nonzero(S.case == i)[0]
        rank = np.argsort(np.argsort(S.z[rows], kind="stable"), kind="stable")
        pos[rows] = rank - (len(rows) - 1) // 2
    return pos


def baseline_maps(S_train, S_test, eps=0.05):
    """Anomaly maps of two simple baselines on the rows of S_test (same shape as S_test.x):
      intensity: the normalised image itself, (x + 1) / 2 -- hyperintense anomalies (Meissen et al. 2022
                 showed that thresholding FLAIR intensities rivals published deep methods);
      zscore:    |x - mean| / (sd + eps) against the healthy training rows at the same slab position
                 (slices) or voxel (volumes): what a voxel-wise normative model finds.
    Both are zero outside the brain mask."""
    pos_tr, pos_te = slab_positions(S_train), slab_positions(S_test)
    mu, sd = {}, {}
    for p in np.unique(pos_tr):
        x = np.asarray(S_train.x[np.nonzero(pos_tr == p)[0]], np.float32)
        mu[p], sd[p] = x.mean(0), x.std(0) + eps
    known = np.array(sorted(mu))
    x = np.asarray(S_test.x, np.float32)
    brain = np.asarray(S_test.brain) > 0
    z = np.empty_like(x)
    for p in np.unique(pos_te):
        rows = np.nonzero(pos_te == p)[0]
        q = known[np.argmin(np.abs(known - p))]            # nearest training position
        z[rows] = np.abs(x[rows] - mu[q]) / sd[q]
    return {"intensity": (x + 1) / 2 * brain, "zscore": z * brain}



def baseline_units(S_train, S_test, units, how="mean"):
    """The two baselines per scored unit, aggregated as the method aggregates its own map:
    units: one entry per row, a function (map (N, ...) -> that unit's pixels, any shape) or a row
    index of S_test (the whole row); how: "mean", "sum" or "max" over those pixels.
    -> {"intensity": (n_units,), "zscore": (n_units,)}"""
    maps = baseline_maps(S_train, S_test)
    red = {"mean": np.mean, "sum": np.sum, "max": np.max}[how]
    return {name: np.array([float(red(u(m) if callable(u) else m[int(u)])) for u in units])
            for name, m in maps.items()}


def add_baselines(rows, values):
    """rows gain the columns baseline_<name> (values: {name: one value per row}); -> rows."""
    for name, v in values.items():
        assert len(v) == len(rows), (name, len(v), len(rows))
        for r, x in zip(rows, v):
            r[f"baseline_{name}"] = float(x)
    return rows


def baseline_results(rows, how=""):
    """results.json "baselines": per baseline column of the rows, its AUROC/AUPRC with intervals
    (as evaluate) and the paired difference method - baseline (compare_scores) on the same units."""
    out = {}
    for key in [k for k in rows[0] if k.startswith("baseline_")]:
        e = evaluate(rows, key=key)
        out[key[len("baseline_"):]] = {
            **{m: e["metrics"].get(m) for m in ("auroc", "auroc_ci", "auprc", "auprc_ci")},
            "groups": {g: {m: v.get(m) for m in ("n", "auroc", "auroc_ci") if m in v}
                       for g, v in e["groups"].items()},
            "method_minus_baseline_auroc": compare_scores(rows, rows, key_b=key), "unit_rule": how}
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


# ---- per-group evaluation with clean negatives and intervals over cases -------------------------
# A row is one scored unit: {id, group, label, score, [case]}. `group` is the group of the unit's CASE
# (the scan it comes from), `label` the unit's own label, `case` the case id (default: the unit's id, for
# scan- and volume-level scores). So a lesion-free patch of a tumour scan is {group: tumor, label: 0}.
# Units of one scan are correlated: every interval resamples whole cases, each group's cases within
# their group (a stratified bootstrap), seeded, never single patches or slices.

N_BOOT = 1000          # bootstrap resamples for every interval (percentile method, 95%)


def _ranked(s, W, y, descending=False):
    """Unit weights summed per distinct score (ties are one threshold), positives and negatives apart."""
    order = np.argsort(-s if descending else s, kind="mergesort")
    s_sorted = s[order]
    _, start = np.unique(-s_sorted if descending else s_sorted, return_index=True)
    W, y = W[:, order], y[order]
    return np.add.reduceat(W * (y == 1), start, axis=1), np.add.reduceat(W * (y == 0), start, axis=1)


def weighted_auroc(y, s, W):
    """AUROC = P(score of a positive > score of a negative) + ½ P(tie), each unit counted W times.
    y, s: (n,); W: (B, n) weights (e.g. bootstrap counts) -> (B,). Equals scikit-learn's
    roc_auc_score(y, s, sample_weight=W[b]) (tested)."""
    P, N = _ranked(np.asarray(s, np.float64), np.atleast_2d(W), np.asarray(y))
    below = np.cumsum(N, axis=1) - N                             # negative weight strictly below
    den = P.sum(1) * N.sum(1)
    return np.where(den > 0, (P * (below + 0.5 * N)).sum(1) / np.where(den > 0, den, 1), np.nan)


def weighted_auprc(y, s, W):
    """Average precision AP = Σ_k (R_k − R_{k−1}) P_k over decreasing thresholds (scikit-learn's
    average_precision_score with sample_weight, tested). y, s: (n,); W: (B, n) -> (B,)."""
    P, N = _ranked(np.asarray(s, np.float64), np.atleast_2d(W), np.asarray(y), descending=True)
    tp, fp = np.cumsum(P, axis=1), np.cumsum(N, axis=1)
    total = tp[:, -1:]
    prec = tp / np.where(tp + fp > 0, tp + fp, 1)
    rec = tp / np.where(total > 0, total, 1)
    d_rec = np.diff(rec, axis=1, prepend=0.0)
    return np.where(total[:, 0] > 0, (d_rec * prec).sum(1), np.nan)


def case_bootstrap(case, strata, n_boot=N_BOOT, seed=0):
    """(n_boot, n_units) weights: in each resample every stratum's cases are drawn with replacement
    (as many as it has) and a unit weighs as often as its case was drawn. case, strata: (n_units,)."""
    cases, unit_case = np.unique(np.asarray(case).astype(str), return_inverse=True)
    case_stratum = np.empty(len(cases), dtype=object)
    case_stratum[unit_case] = np.asarray(strata).astype(str)
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_boot, len(cases)), np.float32)
    for st in sorted(set(case_stratum)):
        idx = np.nonzero(case_stratum == st)[0]
        draws = rng.integers(0, len(idx), (n_boot, len(idx)))
        np.add.at(counts, (np.arange(n_boot)[:, None], idx[draws]), 1.0)
    return counts[:, unit_case]


def interval(values):
    """95% percentile interval of bootstrap values (nan-aware) -> [lo, hi]."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) else [float("nan")] * 2


def _metrics_ci(y, s, case, strata, n_boot, seed):
    W = case_bootstrap(case, strata, n_boot, seed)
    return {"auroc": auroc(y, s), "auroc_ci": interval(weighted_auroc(y, s, W)),
            "auprc": auprc(y, s), "auprc_ci": interval(weighted_auprc(y, s, W))}


def mean_ci(values, n_boot=N_BOOT, seed=0):
    """Mean of per-case values (e.g. Dice per scan) with its 95% bootstrap interval over the cases."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return {"mean": float("nan"), "ci": [float("nan")] * 2, "n": 0}
    draws = np.random.default_rng(seed).integers(0, len(v), (n_boot, len(v)))
    return {"mean": float(v.mean()), "ci": interval(v[draws].mean(1)), "n": int(len(v))}


def _columns(rows, key="score"):
    y = np.array([int(r["label"]) for r in rows])
    s = np.array([float(r[key]) for r in rows])
    g = np.array([str(r["group"]) for r in rows])
    c = np.array([str(r.get("case", r.get("id", i))) for i, r in enumerate(rows)])
    return y, s, g, c


def normal_groups(y, g):
    """Groups none of whose units is anomalous: the normal scans (e.g. `normal`, `cdr_0`)."""
    return sorted({n for n in set(g) if y[g == n].max() == 0})


def evaluate(rows, key="score", n_boot=N_BOOT, seed=0):
    """Contract metrics of per-unit rows (see above), negatives from normal scans only:
      metrics        every anomalous unit against every unit of a normal scan (+ FPR at 95% TPR)
      groups[g]      n, n_cases, score mean/std; for an anomalous group: its anomalous units against
                     the units of normal scans, AUROC/AUPRC with 95% intervals over cases
      groups_same_scan[g]  only where g's scans also hold normal units (a lesion-free patch of a
                     lesion scan): g's anomalous units against g's own normal units, the negatives
                     of AnoGAN's §3, reported under this name so it is never mistaken for the above."""
    y, s, g, c = _columns(rows, key)
    normal = np.isin(g, normal_groups(y, g))
    clean = (y == 1) | normal
    out = {"metrics": {}, "groups": {}, "negatives": "units of normal scans only (groups "
           + ", ".join(normal_groups(y, g)) + ")", "bootstrap": f"{n_boot} resamples of cases, "
           "stratified by group, seed " + str(seed)}
    if len(set(y[clean])) == 2:
        out["metrics"] = {**_metrics_ci(y[clean], s[clean], c[clean], g[clean], n_boot, seed),
                          "fpr_at_95tpr": fpr_at_tpr(y[clean], s[clean])}
    same = {}
    for name in sorted(set(g), key=lambda n: (y[g == n].max(), n)):
        sel = g == name
        e = {"n": int(sel.sum()), "n_cases": int(len(set(c[sel]))), "score_mean": float(s[sel].mean()),
             "score_std": float(s[sel].std())}
        pos = sel & (y == 1)
        if pos.any() and normal.any():
            both = pos | normal
            e.update(_metrics_ci(y[both], s[both], c[both], g[both], n_boot, seed), n_anomalous=int(pos.sum()))
        if pos.any() and (sel & (y == 0)).any():
            same[str(name)] = {"n_anomalous": int(pos.sum()), "n_normal": int((sel & (y == 0)).sum()),
                               **_metrics_ci(y[sel], s[sel], c[sel], np.where(y[sel] == 1, "a", "n"),
                                             n_boot, seed)}
        out["groups"][str(name)] = e
    if same:
        out["groups_same_scan"] = same
    return out


def paired_difference(y, s_a, s_b, case, strata, metric="auroc", n_boot=2 * N_BOOT, seed=0):
    """metric(s_a) − metric(s_b) on the same units, with a 95% interval from ONE bootstrap over cases
    (both scores see the same resampled cases, so their correlation is kept). "A beats B" needs an
    interval that excludes 0; otherwise the difference is not resolved. -> {diff, ci, a, b, resolved}"""
    fn = {"auroc": weighted_auroc, "auprc": weighted_auprc}[metric]
    y = np.asarray(y)
    W = case_bootstrap(case, strata, n_boot, seed)
    one = np.ones((1, len(y)))
    a, b = float(fn(y, s_a, one)[0]), float(fn(y, s_b, one)[0])
    ci = interval(fn(y, s_a, W) - fn(y, s_b, W))
    return {"diff": a - b, "ci": ci, "a": a, "b": b, "resolved": bool(ci[0] > 0 or ci[1] < 0)}


def compare_scores(rows_a, rows_b, group=None, key_a="score", key_b="score", **kw):
    """paired_difference of two score columns over the units both row lists share (joined by id),
    normal scans against `group` (None: all anomalous units), negatives from normal scans only."""
    b = {r["id"]: r for r in rows_b}
    rows = [r for r in rows_a if r["id"] in b]
    y, sa, g, c = _columns(rows, key_a)
    sb = np.array([float(b[r["id"]][key_b]) for r in rows])
    sel = np.isin(g, normal_groups(y, g)) | ((y == 1) & ((g == group) if group else True))
    return paired_difference(y[sel], sa[sel], sb[sel], c[sel], g[sel], **kw)


def compare_by(rows_a, rows_b, by, key_a="score", key_b="score"):
    """metric(a) - metric(b) on the same units with a 95% interval from one bootstrap over cases
    (compare_scores): all anomalous units, then each value of the rows' column `by` (a lesion type),
    each against the normal units."""
    typed = [[{**r, "group": r[by]} for r in rows] for rows in (rows_a, rows_b)]
    out = {"all": compare_scores(rows_a, rows_b, None, key_a, key_b)}
    for t in sorted({r[by] for r in rows_a if int(r["label"])}):
        out[t] = compare_scores(*typed, t, key_a, key_b)
    return out


def fmt_ci(v, ci, digits=3):
    """0.812 [0.71, 0.90]"""
    return f"{v:.{digits}f} [{ci[0]:.2f}, {ci[1]:.2f}]" if v == v else "nan"


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
# 5. Run files: arguments, seeding, device, checkpoints, the training loop, results
# =================================================================================================

class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line `error: ...` (the contract's bad-input rule)."""

    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        kw.setdefault("conflict_handler", "resolve")   # a script's own flag may refine a shared one
        super().__init__(*a, **kw)

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def hp(default, help, lo=None, hi=None, **kw):
    """One hyperparameter, declared once: its paper value (the default of --preset paper), its source
    (`help`) and its valid range [lo, hi]. kw: choices, metavar, type (for a None default), odd."""
    return dict(default=default, help=help, lo=lo, hi=hi, **kw)


def add_contract_args(p, method):
    """The flags every script shares (../shared/CONTRACT.md), identical across the five scripts."""
    g = p.add_argument_group("shared flags (../shared/CONTRACT.md)")
    a = g.add_argument
    a("--data", default="synthetic",
      help="dataset: synthetic (default, the phantom), folder, oasis3, ixi, brats, ctich, mslub, isbi2015")
    a("--data-root", default=None, help="where the dataset lives (default data/<NAME>)")
    a("--train-data", default=None, help="take the healthy training set from another dataset")
    a("--train-root", default=None, help="root of --train-data (default data/<NAME>)")
    a("--modality", default=None, help="real datasets: which image to load (e.g. t1, t2, flair)")
    a("--cdr-window-days", type=int, default=365,
      help="oasis3: a scan takes the CDR of the closest visit within this many days (default 365)")
    a("--test-frac", type=float, default=None,
      help="real data sets: fraction of the healthy (or, for brats/mslub/isbi2015, of all) subjects "
           "held out for testing, split by subject with --seed (default 0.3)")
    a("--preset", default="quick", choices=["smoke", "quick", "paper"],
      help="smoke: seconds (tests); quick: minutes on a 2-core CPU (default); paper: the paper's settings")
    a("--out", default=None, help=f"run directory (default runs/{method}__<data>__<seed>__<time>)")
    a("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="default auto")
    a("--seed", type=int, default=0, help="seeds python, numpy, torch and data order (default 0)")
    a("--resume", default=None, help="continue training from this checkpoint (last.pt)")
    a("--checkpoint", default=None, help="skip training and score with this checkpoint")
    a("--cache-dir", default=None, help="memory-mapped preprocessed arrays (default data/cache)")
    a("--amp", action="store_true", help="mixed precision on CUDA (bf16); ignored on CPU")
    a("--max-test-cases", type=int, default=0,
      help="score only the first N normal and the first N anomalous test scans, for a short trial such "
           "as benchmark.py --gpu-check (default 0: all)")
    r = p.add_argument_group("training run (the same in every script)")
    r.add_argument("--max-steps", type=int, default=None,
                   help="stop training after N steps in all (all phases together) for a short trial; every "
                        "file is still written, and --resume of its last.pt continues exactly")
    r.add_argument("--ckpt-every", type=int, default=0,
                   help="write last.pt every N steps (default 0: on a time budget, see --ckpt-minutes)")
    r.add_argument("--ckpt-minutes", type=float, default=10.0,
                   help="with --ckpt-every 0: write last.pt every this many minutes, and never so often that "
                        "writing takes over 2%% of the time (default 10); always at the end of each phase")
    return p


def _flag(name):
    return "--" + name.replace("_", "-")


def parse_args(argv, hyper=None, presets=None, method=None, doc=None, check=None):
    """The command line of a method script, generated from its hyperparameter table.

    hyper: {name: hp(paper value, source, lo, hi)}; presets: {"quick": {name: value}, "smoke": {...}},
    what each CPU preset changes (paper = the declared values). A flag given on the command line always
    wins. Range checks come from the table (floats must be finite); `check(args)` adds the script's own."""
    p = ArgumentParser(description=doc)
    add_contract_args(p, method)
    g = p.add_argument_group(f"{method}: the paper's value is the default of --preset paper (source in "
                             f"brackets); --preset quick/smoke change the values shown")
    for name, spec in hyper.items():
        d = spec["default"]
        shown = {k: v[name] for k, v in presets.items() if name in v}
        txt = spec["help"] + (" [paper: %s%s]" % (d, "".join(f"; {k}: {v}" for k, v in shown.items())))
        txt = txt.replace("%", "%%")
        if isinstance(d, bool):
            g.add_argument(_flag(name), action=argparse.BooleanOptionalAction, default=None, help=txt)
        elif isinstance(d, (list, tuple)):
            g.add_argument(_flag(name), type=type(d[0]), nargs=len(d), default=None, help=txt,
                           metavar=spec.get("metavar"))
        else:
            g.add_argument(_flag(name), type=spec.get("type", type(d)), default=None, help=txt,
                           choices=spec.get("choices"), metavar=spec.get("metavar"))
    args = p.parse_args(argv)
    for name, spec in hyper.items():
        if getattr(args, name) is None:
            v = presets.get(args.preset, {}).get(name, spec["default"])
            setattr(args, name, list(v) if isinstance(v, tuple) else v)
        check_range(args, name, spec["lo"], spec["hi"])
    if not 0 <= args.seed < 2 ** 32:
        fail(f"--seed must be in [0, 2^32 - 1], got {args.seed}")
    for name in ("max_steps", "ckpt_every", "max_test_cases"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            fail(f"{_flag(name)} must be >= 0, got {getattr(args, name)}")
    if not (math.isfinite(args.ckpt_minutes) and args.ckpt_minutes > 0):
        fail(f"--ckpt-minutes must be a positive number, got {args.ckpt_minutes}")
    if args.out is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out = str(Path("runs") / f"{method}__{args.data}__{args.seed}__{stamp}")
    for path, what in ((args.resume, "--resume"), (args.checkpoint, "--checkpoint")):
        if path and not Path(path).is_file():
            fail(f"{what} {path}: no such checkpoint file")
    if check is not None:
        check(args)
    return args


def check_range(args, name, lo=None, hi=None, integer=False):
    """Flag validation: `--name` must lie in [lo, hi] (each element of a list); a float must be finite."""
    v = getattr(args, name)
    for x in (v if isinstance(v, (list, tuple)) else [v]):
        if isinstance(x, float) and not math.isfinite(x):
            fail(f"{_flag(name)} must be a finite number, got {x}")
        if isinstance(x, (int, float)) and not isinstance(x, bool) and (
                (lo is not None and x < lo) or (hi is not None and x > hi)):
            fail(f"{_flag(name)} must be in [{lo if lo is not None else '-inf'}, "
                 f"{hi if hi is not None else 'inf'}], got {x}")
        if integer and int(x) != x:
            fail(f"{_flag(name)} must be an integer, got {x}")


def seed_everything(seed):
    import torch
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
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
    """Every random stream of this process (python, numpy, torch CPU, each CUDA device), as CPU objects."""
    import torch
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return st


def set_rng_state(st):
    """Restore rng_state(). The torch/CUDA states must be CPU ByteTensors (torch refuses others), so they
    are moved to the CPU whatever device a checkpoint was loaded to; CUDA states apply to as many devices
    as both the checkpoint and this machine have, and are skipped on a machine without CUDA."""
    import torch
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(torch.as_tensor(st["torch"]).cpu().to(torch.uint8))
    if st.get("cuda") is not None and torch.cuda.is_available():
        for i, s in enumerate(st["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(torch.as_tensor(s).cpu().to(torch.uint8), i)
    if ddp_world() > 1:   # the checkpoint holds process 0's state: give each process its own stream again
        seed_everything(int(torch.randint(2 ** 31 - 1, (1,))) + ddp_rank())


def save_checkpoint(path, state):
    """torch.save to a temp file in the same folder, then an atomic rename: a crash never leaves a
    half-written checkpoint in place of the last good one. -> seconds the write took."""
    import torch
    if not is_main():
        return 0.0
    t0 = time.perf_counter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        fail(f"cannot write the checkpoint {path} ({e.strerror}); free disk space or choose another --out")
    return time.perf_counter() - t0


def load_checkpoint(path, method=None):
    """torch.load onto the CPU (models and optimisers copy what they need to their own device; the RNG
    states must stay CPU tensors). With `method`: a checkpoint of another script is one clear error."""
    import torch
    method = method if isinstance(method, str) else None   # (an older call passed a device here)
    if not path or not Path(path).is_file():
        fail(f"checkpoint {path}: no such file")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        fail(f"checkpoint {path} cannot be read ({type(e).__name__}); is it a last.pt of "
             f"{method + '.py' if method else 'this script'}?")
    if method and (not isinstance(ck, dict) or ck.get("method", method) != method or "models" not in ck):
        other = ck.get("method") if isinstance(ck, dict) else None
        fail(f"checkpoint {path} is not a last.pt of {method}.py"
             + (f" (it is one of {other}.py)" if other else ""))
    return ck


def load_models(path, models, method):
    """Load the weights of a checkpoint into `models` ({name: nn.Module}); -> the checkpoint dict."""
    ck = load_checkpoint(path, method)
    try:
        for k, m in models.items():
            m.load_state_dict(ck["models"][k])
    except (KeyError, RuntimeError) as e:
        was = ck.get("args", {})
        fail(f"checkpoint {path} is a last.pt of {method}.py with other network settings (preset "
             f"{was.get('preset', '?')}; {type(e).__name__}: {str(e).splitlines()[0][:120]}); pass the "
             f"--preset and network flags of its config.json")
    return ck


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

_SYNC = {}   # a gloo process group with a week-long timeout: waits for process 0 that must not time out


def ddp_setup():
    """Join the process group when launched by torchrun; -> (rank, world_size). NCCL on CUDA, else gloo."""
    import datetime
    import torch
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_cuda else "gloo")
        _SYNC["group"] = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7))
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
    """Wait for every process, without the collective timeout (process 0 may be building a cache or
    evaluating for many minutes); a no-op alone."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=_SYNC.get("group"))


@contextlib.contextmanager
def main_first():
    """Under torchrun: process 0 runs the block first (e.g. builds a cache on disk), the others wait for
    it (without a timeout) and then run the block themselves (opening what process 0 built)."""
    if not is_main():
        ddp_barrier()
    yield
    if is_main():
        ddp_barrier()


def on_main(fn, *args, **kw):
    """fn(*args) on process 0 alone (evaluation during training) while the others wait for it without a
    timeout; -> fn's result on process 0, None on the others."""
    out = fn(*args, **kw) if is_main() else None
    ddp_barrier()
    return out


def ddp_any(flag, device=None):
    """True on every process if `flag` is true on any of them (one all-reduce; the flag itself alone)."""
    if ddp_world() == 1:
        return bool(flag)
    import torch
    import torch.distributed as dist
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def ddp_teardown():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---- the training loop: everything besides the paper's update, the same in all five scripts -------

class Batches:
    """Shuffled minibatches of row indices of a training set of n rows, resumable.

    Epoch e visits the rows in the order of a permutation seeded by (seed, stream, e), so where a run is
    in its data is two numbers (epoch, pos) and a resumed run draws exactly the batches an uninterrupted
    one would. `drop_last` skips an epoch's last, smaller batch. Under torchrun every process draws the
    same global batch of batch_size x processes rows and takes its own share (shard)."""

    def __init__(self, n, batch_size, seed, drop_last=True, stream=0):
        if n < 1:
            fail("no training samples")
        self.n, self.seed, self.stream, self.drop_last = int(n), int(seed), int(stream), drop_last
        self.global_batch = global_batch_size(batch_size, n)
        per = self.n / self.global_batch
        self.steps_per_epoch = max(1, int(per) if drop_last else math.ceil(per))
        self.epoch, self.pos, self._perm = 0, 0, (None, None)

    def __iter__(self):
        return self

    def __next__(self):
        if self.pos >= self.steps_per_epoch:
            self.epoch, self.pos = self.epoch + 1, 0
        if self._perm[0] != self.epoch:
            rng = np.random.default_rng([self.seed, self.stream, self.epoch])
            self._perm = (self.epoch, rng.permutation(self.n))
        b = self.global_batch
        idx = self._perm[1][self.pos * b:(self.pos + 1) * b]
        self.pos += 1
        return shard(idx)

    @property
    def epoch_done(self):
        """True right after the last batch of an epoch was drawn."""
        return self.pos == self.steps_per_epoch

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, st):
        self.epoch, self.pos = int(st["epoch"]), int(st["pos"])


class Loop:
    """The plumbing of a training loop, so that a script's loop is only its paper's update:

        loop = C.Loop(run, args, models={"G": G, "D": D}, optims={"G": opt_G, "D": opt_D},
                      batches={"train": batches})
        for step in loop.phase("train", args.steps):        # 1, 2, ..., args.steps
            loop.log(train_step(G, D, next(batches), ...))  # losses: kept, and checked for NaN
        loop.close()                                         # last.pt of the finished run

    It resumes from --resume (weights, optimisers, every random stream, the data position, the loss
    history and `loop.state`, which a script may extend), shows progress with an ETA, stops a diverged
    run on every process at once, writes last.pt atomically on a step (--ckpt-every) or time budget
    (--ckpt-minutes, never over 2% of the time) and at each phase's end, stops after --max-steps (the run
    then scores what it has), and on Ctrl-C finishes the step, saves and exits with a resume hint.
    Phases (fanogan3d's three steps) run in order; a resumed run skips the finished ones."""

    def __init__(self, run, args, models, optims, batches=None, generators=None, log_every=1):
        self.run, self.args, self.models, self.optims = run, args, models, optims
        self.batches, self.generators = batches or {}, generators or {}
        self.log_every, self.path = max(int(log_every), 1), run.out / "last.pt"
        self.state = {"phase": None, "step": 0, "done": [], "total_steps": 0, "train_s": 0.0}
        self.history, self.step, self._stop, self.write_s = {}, 0, None, []
        self._last_save, self._t_phase = time.time(), None
        if args.resume:
            self._resume(args.resume)
        self._old_sigint = None

    # -- resume ---------------------------------------------------------------------------------
    def _resume(self, path):
        ck = load_models(path, self.models, self.run.method)
        for k, opt in self.optims.items():
            lr_now = [g["lr"] for g in opt.param_groups]
            opt.load_state_dict(ck["optims"][k])
            lr_was = [g["lr"] for g in opt.param_groups]
            if lr_was != lr_now:   # the command line wins over the checkpoint, and says so
                for g, lr in zip(opt.param_groups, lr_now):
                    g["lr"] = lr
                self.run.log(f"--resume: optimiser {k} learning rate {lr_was[0]:g} -> {lr_now[0]:g} "
                             f"(this command line's value)")
        for k, b in self.batches.items():
            b.load_state_dict(ck["batches"][k])
        for k, g in self.generators.items():
            g.set_state(ck["generators"][k])
        self.state.update(ck["loop"])
        self.history = ck["history"]
        set_rng_state(ck["rng"])
        self.run.log(f"resumed from {path}: phase {self.state['phase']}, step {self.state['step']}, "
                     f"{self.state['total_steps']} steps done")

    # -- the loop -------------------------------------------------------------------------------
    def phase(self, name, n_steps, desc=None):
        """Yield the step numbers of phase `name` still to run (1-based, up to n_steps)."""
        if name in self.state["done"] or self._stop:
            return
        if self.state["phase"] != name:
            self.state.update(phase=name, step=0)
        acct = self.state.setdefault("phases", {}).setdefault(name, {"steps": 0, "seconds": 0.0})
        acct["planned_steps"] = n_steps                # what the full run takes (for time projections)
        self._install_sigint()
        t0 = time.time()
        start = self.state["step"]
        try:
            for step in progress(range(start + 1, n_steps + 1), total=n_steps - start, desc=desc or name):
                self.step = step
                yield step
                dt = time.time() - t0
                self.state["step"] = step
                self.state["total_steps"] += 1
                self.state["train_s"] += dt
                acct["seconds"] += dt
                acct["steps"] += 1
                t0 = time.time()
                self._after_step(last=step == n_steps)
                if self._stop:
                    return
            self.state["done"].append(name)
            self._save()
        finally:
            self._restore_sigint()

    def log(self, values, every=None):
        """This step's losses {name: tensor or float}: stop if one is not finite (on every process at
        once, keeping the last good checkpoint); kept in `history` every `log_every` steps."""
        import torch
        names = list(values)
        t = torch.stack([torch.as_tensor(values[k]).detach().float().reshape(()).cpu() for k in names])
        bad = not bool(torch.isfinite(t).all())
        if ddp_any(bad):
            what = ", ".join(f"{k} = {float(v):g}" for k, v in zip(names, t)) if bad else "another process"
            keep = f"; the last good checkpoint is kept at {self.path}" if self.path.is_file() else ""
            fail(f"training diverged in {self.state['phase']} at step {self.step} ({what}){keep}; "
                 f"try a lower learning rate or another --seed")
        every = every or self.log_every
        if self.step % every == 0 or self.step == 1:
            for k, v in zip(names, t.tolist()):
                self.history.setdefault(k, []).append((self.step, v))

    def _after_step(self, last):
        a = self.args
        if a.max_steps is not None and self.state["total_steps"] >= a.max_steps:
            self._stop = "max_steps"
        if ddp_any(self._stop == "interrupt" or _INTERRUPT["flag"]):
            self._stop = "interrupt"
        if self._stop:
            self._save()
            if self._stop == "interrupt":
                raise KeyboardInterrupt
            self.run.log(f"--max-steps {a.max_steps}: training stopped after {a.max_steps} steps in "
                         f"{self.state['phase']} (step {self.step}); scoring this model")
            return
        if last:
            return   # the phase's end saves
        due = (self.state["total_steps"] % a.ckpt_every == 0) if a.ckpt_every else (
            time.time() - self._last_save >= max(60 * a.ckpt_minutes, 50 * max(self.write_s or [0])))
        if due:
            self._save()

    def _save(self):
        st = {"method": self.run.method, "models": {k: unwrap(m).state_dict() for k, m in self.models.items()},
              "optims": {k: o.state_dict() for k, o in self.optims.items()},
              "batches": {k: b.state_dict() for k, b in self.batches.items()},
              "generators": {k: g.get_state() for k, g in self.generators.items()},
              "loop": self.state, "history": self.history, "rng": rng_state(), "args": vars(self.args)}
        self.write_s.append(save_checkpoint(self.path, st))
        self._last_save = time.time()

    def close(self):
        """After the last phase: write last.pt of the finished (or stopped) run; -> training seconds."""
        if self._stop is None:
            self._save()
        return self.state["train_s"]

    @property
    def stopped_early(self):
        return self._stop == "max_steps"

    def io_report(self):
        """Checkpoint writes of this run (count, seconds, share of training time, size in MB) and the
        steps and seconds of each phase, with the steps a full run plans (for time projections)."""
        size = self.path.stat().st_size / 2 ** 20 if self.path.is_file() else 0.0
        tot = sum(self.write_s)
        return {"checkpoints": len(self.write_s), "write_s": round(tot, 3), "size_mb": round(size, 1),
                "share_of_train": round(tot / self.state["train_s"], 4) if self.state["train_s"] > 0 else 0.0,
                "phases": {k: {**v, "seconds": round(v["seconds"], 3)}
                           for k, v in self.state.get("phases", {}).items()}}

    # -- Ctrl-C: finish the step, save, exit with a resume hint -----------------------------------
    def _install_sigint(self):
        import signal
        import threading
        if threading.current_thread() is not threading.main_thread():
            return
        _INTERRUPT["flag"] = False

        def handler(sig, frame):
            if _INTERRUPT["flag"]:        # a second Ctrl-C: stop at once
                raise KeyboardInterrupt
            _INTERRUPT["flag"] = True
            print("\ninterrupted: finishing this step and writing last.pt (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)
        self._old_sigint = signal.signal(signal.SIGINT, handler)

    def _restore_sigint(self):
        import signal
        if self._old_sigint is not None:
            signal.signal(signal.SIGINT, self._old_sigint)
            self._old_sigint = None


_INTERRUPT = {"flag": False}


# ---- a run: its folder, config.json, results --------------------------------------------------------

@dataclass
class Run:
    out: Path
    device: object
    method: str
    t0: float

    def log(self, msg):
        if is_main():
            print(f"[{self.method} {time.time() - self.t0:7.1f}s] {msg}", flush=True)


_RUN = {}   # the current run's folder, for main_guard's messages


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
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file, not a folder")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        fail(f"--out {out}: cannot write the run directory ({e.strerror}); choose another --out")
    for stale in out.glob(".last.pt.tmp*"):   # left by a run killed while writing its checkpoint
        stale.unlink(missing_ok=True)
    _RUN.update(out=out, created=created)
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


def _check_scores(rows, unit):
    labels = {int(r["label"]) for r in rows}
    if labels != {0, 1}:
        missing = "normal (label 0)" if 0 not in labels else "anomalous (label 1)"
        fail(f"no {missing} {unit} among the {len(rows)} scored, so AUROC is undefined and no results.json "
             f"is written; score more of each scan (e.g. more test slices, see --help) or use a test set with "
             f"both (the checkpoint {_RUN.get('out', Path('.')) / 'last.pt'} can be re-scored with --checkpoint)")
    y, s, g, _ = _columns(rows)
    if not normal_groups(y, g):
        fail(f"no {unit} of a normal scan among the {len(rows)} scored (groups: {sorted(set(g))}): every "
             f"group holds anomalous units, so there are no clean negatives and no results.json is written; "
             f"score more of each scan or add normal test scans")
    if not np.isfinite(s).all():
        fail(f"{int((~np.isfinite(s)).sum())} of {len(s)} test scores are NaN or infinite; the model diverged "
             f"or an input is broken, so no results.json is written")
    if np.ptp(s) <= 1e-9 * max(1.0, float(np.abs(s).max())):
        fail(f"all {len(s)} test scores are identical ({s[0]:.6g}): the model's output does not depend on its "
             f"input, so every AUROC would be 0.5 by construction and no results.json is written; check the "
             f"preprocessing (e.g. MRI volumes through a CT window: see --modality / --help)")


def report(run, args, unit, rows, timing, extra=None, data_info=None, val_scores=None, threshold_pct=95.0,
           history=None, examples=None, titles=None, log_scores=False, slabs=None, loop=None,
           baselines_how="", slab_cases=None, skipped=None):
    """Everything a run reports, the same way in all five scripts; -> the results dict.

    rows: one dict per scored unit (id, group, label, score, optional case and more columns; see
    evaluate). Writes scores.csv; results.json with AUROC/AUPRC and their 95% intervals over cases,
    per group against normal scans only, the operating point at the `threshold_pct` percentile of the
    HEALTHY validation scores `val_scores` (never the test labels), timing, memory, data and `extra`;
    roc.png, scores.png, and examples.png / losses.png when `examples` (rows for plot_examples) /
    `history` ({curve: [(step, value)]}) are given. titles: {"roc", "losses", "losses_ylabel",
    "examples_cols"}. slabs: {scan id: S.slabs record} of the scored scans (results.json "slabs",
    and slabs.png when `slab_cases` are given); loop: the run's Loop (results.json "training": its
    phases and checkpoint I/O); skipped: {scan id: why it has no rows} (data_info
    "slices_skipped"); rows with baseline_* columns add results.json "baselines" (their
    unit rule: baselines_how). Under torchrun only process 0 writes."""
    if not is_main():
        return None
    titles = titles or {}
    _check_scores(rows, unit)
    out, method = run.out, run.method
    keys = ["id", "group", "label", "score"]
    cols = keys + [k for k in rows[0] if k not in keys]
    with open(out / ".scores.csv.tmp", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow([r.get(k) for k in cols])
    os.replace(out / ".scores.csv.tmp", out / "scores.csv")
    ev = evaluate(rows)
    res = {"method": method, "data": args.data, "preset": args.preset, "seed": args.seed, "unit": unit, **ev,
           "timing": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in timing.items()},
           "memory": peak_memory_mb(run.device)}
    y, s, g, _ = _columns(rows)
    thr = None
    if val_scores is not None and len(val_scores):
        thr = threshold_from_healthy(val_scores, percentile=threshold_pct)
        clean = (y == 1) | np.isin(g, normal_groups(y, g))
        res["operating_point"] = {"threshold": thr, "rule": f"{threshold_pct:g}th percentile of "
                                  f"{len(val_scores)} healthy validation {unit} scores",
                                  **binary_stats(y[clean], s[clean] >= thr)}
    if any(k.startswith("baseline_") for k in rows[0]):
        res["baselines"] = baseline_results(rows, baselines_how)
    if slabs is not None:
        res["slabs"] = {cid: {"first": r["first"], "last": r["last"], "z_mm": r["z_mm"],
                              **{k: v for k, v in r.items() if k not in ("first", "last", "z_mm")}}
                        for cid, r in slabs.items() if "first" in r}
    if loop is not None:
        res["training"] = {"phases": loop.state.get("phases", {}), "io": loop.io_report()}
    if skipped:
        data_info = {**(data_info or {}), "slices_skipped": dict(skipped)}
    if data_info is not None:
        res["data_info"] = data_info
    res.update(extra or {})
    write_json(out / "results.json", res)
    # figures: ROC of each anomalous group against the normal scans' units, score boxes per group
    normal = np.isin(g, normal_groups(y, g))
    curves = {n: (y[(g == n) & (y == 1) | normal], s[(g == n) & (y == 1) | normal])
              for n in dict.fromkeys(g) if (y[g == n] == 1).any()}
    if len(curves) > 1:
        curves["all anomalous"] = (y[(y == 1) | normal], s[(y == 1) | normal])
    plot_roc(curves, out / "roc.png", title=titles.get("roc", f"{method}: {unit}-level ROC, normal scans vs "
                                                              f"each group"))
    boxes = {}
    for n in sorted(dict.fromkeys(g), key=lambda n: (y[g == n].max(), n)):
        for lab in (1, 0):
            sel = (g == n) & (y == lab)
            if sel.any():
                both = (y[g == n] == 0).any() and (y[g == n] == 1).any()
                boxes[f"{n}{' (anomalous)' if both and lab else ' (normal units)' if both else ''}"] = s[sel]
    plot_scores(boxes, out / "scores.png", log=log_scores, threshold=thr,
                title=f"{method}: {unit} scores per group")
    if examples:
        plot_examples(examples, out / "examples.png", cols=titles.get("examples_cols",
                      ("input", "reconstruction", "anomaly map", "ground truth")))
    if history is not None:
        plot_curves(history or {"no training in this run": [(0, 0.0)]}, out / "losses.png",
                    title=titles.get("losses", f"{method} training"), ylabel=titles.get("losses_ylabel", "loss"),
                    logy=titles.get("losses_logy", False))
    if slabs and slab_cases:
        from data import datasets   # loading lives there; imported here to avoid a cycle
        datasets.plot_slabs(slab_cases, res["slabs"], out / "slabs.png",
                            title=f"{method}: the scored slab, one scan per group")
    m = res["metrics"]
    run.log(f"AUROC {fmt_ci(m['auroc'], m['auroc_ci'])}  AUPRC {fmt_ci(m['auprc'], m['auprc_ci'])}  ("
            + ", ".join(f"{k} {fmt_ci(v['auroc'], v['auroc_ci'])}" for k, v in res["groups"].items()
                        if "auroc" in v) + ")")
    run.log(f"wrote {out}/results.json, scores.csv and figures; 95% intervals: bootstrap over cases")
    return res



# ==================================================================================================
# 6. Helpers the scripts share: patches, run files, pixel metrics, figures
# ==================================================================================================

# -- first written for anogan.py

def stitch_patches(patches, shape, top, left, empty=0.0):
    """Patches (n, c, c) at their positions back into one (H, W) image, overlaps averaged, `empty`
    where no patch lies (e.g. a patch-wise reconstruction or residual map of a slice)."""
    acc, cnt = np.zeros(shape), np.zeros(shape)
    c = patches.shape[-1]
    for p, t, l in zip(patches, top, left):
        acc[t:t + c, l:l + c] += p
        cnt[t:t + c, l:l + c] += 1
    return np.where(cnt > 0, acc / np.maximum(cnt, 1), empty)


def grid_patch_set(S, size, stride, min_brain):
    """Grid patches (deviation 2) of every slice of an ArraySet -> x, mask (N, c, c) and row, top,
    left (N,) as a dict, or None when no patch has enough brain."""
    pos = [(i, t, l) for i in range(len(S))
           for t, l in grid_patches(np.asarray(S.brain[i]), size, stride, min_brain)]
    if not pos:
        return None
    i, t, l = (np.array(a, dtype=np.int64) for a in zip(*pos))
    return dict(x=extract_patches(S.x, i, t, l, size), row=i, top=t, left=l,
                mask=extract_patches(S.mask, i, t, l, size) > 0)


# -- the rows of patch-wise scores (anogan.py), and a memorising reference

def patch_rows(S, P, y, sc, keys):
    """One row per grid patch P of the slices S (the rows contract): group = the group of the
    patch's SCAN, label = y (the patch's own), case = the scan, score = sc[keys[0]] and the other
    keys found in sc as columns. A lesion-free patch of a tumour scan is {tumor, 0}."""
    n_px = P["mask"].reshape(len(P["mask"]), -1).sum(1)
    rows = []
    for k, r in enumerate(P["row"]):
        cs, z = S.cases[S.case[r]], int(S.z[r])
        rows.append(dict(id=f"{cs.id}/z{z}/y{int(P['top'][k])}x{int(P['left'][k])}",
                         group=cs.group, label=int(y[k]), score=float(sc[keys[0]][k]),
                         **{key: float(sc[key][k]) for key in keys[1:] if key in sc},
                         case=cs.id, slice=z, anomalous_px=int(n_px[k])))
    return rows


def level_rows(S, P, A, how):
    """Slice and scan scores = `how` (max) of the patch scores A of their grid patches P; a slice
    is anomalous if it holds >= 1 anomalous pixel, a scan as its group says -> (slices, scans)."""
    slices = []
    for r, s in aggregate(A, P["row"].tolist(), how=how).items():
        cs = S.cases[S.case[r]]
        slices.append(dict(id=f"{cs.id}/z{int(S.z[r])}", group=cs.group, score=s, case=cs.id,
                           label=int(np.asarray(S.mask[r]).any())))
    scans = [dict(id=S.cases[i].id, group=S.cases[i].group, label=S.cases[i].label, score=s)
             for i, s in aggregate(A, S.case[P["row"]].tolist(), how=how).items()]
    return slices, scans


def labels_groups(rows):
    return np.array([r["label"] for r in rows]), np.array([r["group"] for r in rows])


def clean_mask(rows):
    """The units every AUROC compares: anomalous ones and those of NORMAL scans, (N,) bool."""
    y, g = labels_groups(rows)
    return (y == 1) | np.isin(g, normal_groups(y, g))


def nearest_residual(x, X_ref, device, chunk=256):
    """R_nn(x) = min_t Σ|x - t| over reference images t (healthy training patches): the residual
    of a 'generator' that reproduces each reference exactly (a memoriser; a reference, not a
    bound). x: (N, c, c), X_ref: (M, c, c) -> (N,) numpy."""
    import torch
    T = torch.as_tensor(np.asarray(X_ref, dtype=np.float32)).reshape(len(X_ref), -1).to(device)
    out = []
    for s in range(0, len(x), chunk):
        q = torch.as_tensor(np.asarray(x[s:s + chunk], dtype=np.float32)).to(device)  # (n, c, c)
        out.append(torch.cdist(q.reshape(len(q), -1), T, p=1).min(1).values.cpu())  # (chunk,)
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def auroc_by_size(rows, groups, max_px, keys):
    """AUROC against the units of normal scans of each group's anomalous units with 1-3, 4-15,
    >= 16 anomalous pixels (rows' `anomalous_px`), with 95% intervals over scans.
    keys: {result name: scores.csv column}; columns the rows lack are skipped."""
    normal = set(normal_groups(*labels_groups(rows)))
    out = {}
    for g in groups:
        out[g] = {}
        for lo, hi in ((1, 3), (4, 15), (16, max_px)):
            sub = [r for r in rows if r["group"] in normal
                   or (r["group"] == g and r["label"] == 1 and lo <= r["anomalous_px"] <= hi)]
            n = sum(r["label"] for r in sub)
            if n and normal:
                out[g][f"{lo}-{hi}px"] = e = {"n": n}
                for name, column in keys.items():
                    if column in rows[0]:
                        m = evaluate(sub, key=column)["metrics"]
                        e[name], e[name + "_ci"] = m["auroc"], m["auroc_ci"]
    return out


def patch_baselines(S_train, S, P, c):
    """Issue 15.5 for patch units: the intensity and z-score baselines (baseline_maps, z against
    the healthy training slices S_train) on the c×c test patches P of the slices S, summed over
    each patch's pixels (as a residual is). -> {name: one value per patch row}"""
    n = len(P["row"])
    return {name: extract_patches(m, P["row"], P["top"], P["left"], c).reshape(n, -1).sum(1)
            for name, m in baseline_maps(S_train, S).items()}


def patch_example_rows(S, P, recon, groups):
    """examples.png of a patch-wise model: per group, the slice of its first scan with the most
    anomalous pixels, with the patches' reconstructions `recon` (one per patch of P) and their
    residuals stitched together."""
    out = []
    for want in groups:
        i = next((i for i, cs in enumerate(S.cases) if cs.group == want), None)
        if i is None:
            continue
        sl = S.slices_of(i)
        mid = int(sl[len(sl) // 2])
        best = max(sl, key=lambda r: (int(np.asarray(S.mask[r]).sum()), -abs(int(r) - mid)))
        k = np.nonzero(P["row"] == best)[0]                                # the slice's patches
        at = (S.x.shape[1:], P["top"][k], P["left"][k])
        name = S.cases[i].id.split('/')[-1]
        out.append(dict(title=f"{want}\n{name}", input=np.asarray(S.x[best]),
                        reconstruction=stitch_patches(recon[k], *at, empty=-1.0),
                        amap=stitch_patches(np.abs(P["x"][k] - recon[k]), *at),
                        gt=np.asarray(S.mask[best])))
    return out


# -- the lesion counterfactual (anogan.py; issue 20's mechanism for AnoGAN's patch sum)

def paste_lesions(x, x_lesion, mask):
    """Normal patches x (n, c, c) with the pixels of real lesions pasted in: x_lesion where the
    lesion masks `mask` (n, c, c) are set, x elsewhere."""
    return np.where(mask, x_lesion, x)


def lesion_counterfactual(score_fn, P, A, rows, n, path, how=""):
    """Why a patch sum misses small lesions (anogan.py): up to n patches of normal scans get a real
    lesion's pixels pasted in (those of a group's anomalous test patches in turn, by their masks);
    score_fn(x, desc) -> {"A", "R": (n,)} scores both versions. A: the score of every patch of P
    (rows). -> per lesion group the change of A and R (means over normal scans with 95%
    intervals), how far the lesion moved the pixels (Σ|x' - x|, what R would rise by if the
    reconstruction ignored it), the spread of A over normal patches, and the AUROC of A telling the
    pasted from the original patches; the figure at `path`."""
    y, g = labels_groups(rows)
    normal = np.nonzero(clean_mask(rows) & (y == 0))[0][:n]
    groups = [gn for gn in dict.fromkeys(g[y == 1]) if (y[g == gn] == 0).any()]   # local lesions
    if not len(normal) or not groups:
        return None
    case = np.array([rows[i]["case"] for i in normal])
    per_scan = lambda v: mean_ci([v[case == c].mean() for c in dict.fromkeys(case)])  # noqa: E731
    base = score_fn(P["x"][normal], "map normal")
    out = {"normal_patches": len(normal), "A_normal_mean": float(base["A"].mean()),
           "A_normal_std": float(base["A"].std())}
    shown = {}
    for gn in groups:
        les = np.nonzero((g == gn) & (y == 1))[0]
        j = les[np.arange(len(normal)) % len(les)]                          # lesion j -> patch i
        x = paste_lesions(P["x"][normal], P["x"][j], P["mask"][j])
        s = score_fn(x, f"map normal + {gn}")
        out[gn] = {"lesion_px_median": float(np.median(P["mask"][j].reshape(len(j), -1).sum(1))),
                   "delta_A": per_scan(s["A"] - base["A"]), "delta_R": per_scan(s["R"] - base["R"]),
                   "pasted_abs_sum": per_scan(np.abs(x - P["x"][normal]).sum((1, 2))),
                   "fraction_A_raised": float((s["A"] > base["A"]).mean()),
                   "auroc_pasted_vs_original": auroc(np.r_[np.zeros(len(j)), np.ones(len(j))],
                                                       np.r_[base["A"], s["A"]]),
                   "A_lesion_patches_mean": float(A[les].mean()),
                   "A_same_scan_lesion_free_mean": float(A[(g == gn) & (y == 0)].mean())}
        shown[gn] = (x, s, P["mask"][j])
    plot_counterfactual(out, P["x"][normal], base, shown, path, how)
    return out


def plot_counterfactual(cf, x0, base, shown, path, how=""):
    """counterfactual.png: a few normal patches without and with the first group's lesion pasted in
    (lesion outlined, A of each); per group the distribution of A over normal patches without and
    with it, beside the mean A of the group's lesion-free and lesion patches."""
    plt = _plt()
    groups, k = list(shown), min(4, len(x0))
    fig = plt.figure(figsize=(max(3.4 * len(groups), 7.5), 6.2))
    grid = fig.add_gridspec(2, 1, height_ratios=(1, 1.4), hspace=0.3)
    top = grid[0].subgridspec(1, 2 * k, wspace=0.05)
    x1, s1, m1 = shown[groups[0]]
    for i in range(k):
        for n, (img, A) in enumerate(((x0[i], base["A"][i]), (x1[i], s1["A"][i]))):
            ax = fig.add_subplot(top[0, 2 * i + n])
            ax.imshow(img, cmap="gray", vmin=-1, vmax=1)
            if n and m1[i].any():
                ax.contour(m1[i], levels=[0.5], colors="red", linewidths=0.8)
            ax.set(xticks=[], yticks=[])
            ax.set_title(f"{'+ lesion' if n else 'normal'}, A={A:.1f}", fontsize=8)
    bottom = grid[1].subgridspec(1, len(groups), wspace=0.3)
    for n, gn in enumerate(groups):
        ax, e, A1 = fig.add_subplot(bottom[0, n]), cf[gn], shown[gn][1]["A"]
        bins = np.linspace(min(base["A"].min(), A1.min()), max(base["A"].max(), A1.max()), 30)
        ax.hist(base["A"], bins=bins, alpha=0.5, color="tab:blue", label="normal patches")
        ax.hist(A1, bins=bins, alpha=0.5, color="tab:red", label=f"+ a {gn} lesion")
        ax.axvline(e["A_same_scan_lesion_free_mean"], color="k", ls=":", label=f"{gn}: lesion-free")
        ax.axvline(e["A_lesion_patches_mean"], color="k", ls="--", label=f"{gn}: lesion patches")
        d = e["delta_A"]
        ax.set_title(f"ΔA {d['mean']:+.1f} [{d['ci'][0]:+.1f}, {d['ci'][1]:+.1f}] ({gn})\n"
                     f"sd of A over normal patches {cf['A_normal_std']:.1f}", fontsize=9)
        ax.set(xlabel="A(x)")
        ax.legend(fontsize=7)
    fig.suptitle(f"Counterfactual (beyond the paper): {groups[0]} lesions pasted into normal test "
                 f"patches (red outline), both {how}", fontsize=10)
    _save(fig, path)


# -- the copy probe (anovaegan.py; issue 20's mechanism for the spatial bottleneck)

def copy_probe(recon, S, radii, seed=0):
    """Does a model copy an anomaly into its reconstruction? Label-free: a disc of the brightest
    intensity (1, like a FLAIR lesion) is painted into every healthy slice of S, inside its brain,
    and the fraction of the disc's contrast that the reconstruction keeps is measured,
    Σ_disc (x̂' − x̂) / Σ_disc (x' − x): 1 = copied (no residual), 0 = removed. recon: x (N, H, W)
    in [-1, 1] -> the model's reconstruction x̂ (N, H, W). Per radius:
    the mean over patients (of their slices' fractions) with its 95% interval over patients.
    -> ({radius: mean_ci}, {radius: (slice, painted x', its x̂')} for the figure)."""
    from scipy import ndimage as ndi
    x, brain = np.asarray(S.x, np.float32), np.asarray(S.brain) > 0
    x_hat = recon(x)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:x.shape[1], :x.shape[2]]                      # (S, S) pixel coordinates
    depth = [ndi.distance_transform_edt(b) for b in brain]          # distance to the brain's edge
    kept, shown = {}, {}
    for r in radii:
        painted, disc, ok = x.copy(), np.zeros(x.shape, bool), np.zeros(len(x), bool)
        for k in range(len(x)):
            centres = np.argwhere(depth[k] > r + 1)                  # the disc inside the brain
            if len(centres):
                cy, cx = centres[rng.integers(len(centres))]
                disc[k] = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
                painted[k][disc[k]] = 1.0
                ok[k] = (1.0 - x[k][disc[k]]).mean() >= 0.1         # enough contrast to measure
        x_hat_p = recon(painted)
        frac = [float(((x_hat_p[k] - x_hat[k])[disc[k]]).sum() / (painted[k] - x[k])[disc[k]].sum())
                if ok[k] else np.nan for k in range(len(x))]
        per_case = [np.nanmean(np.array(frac)[S.slices_of(i)]) for i in range(len(S.cases))
                    if ok[S.slices_of(i)].any()]
        kept[r] = mean_ci(per_case)
        k = int(np.nanargmin(np.abs(np.array(frac) - kept[r]["mean"]))) if ok.any() else 0
        shown[r] = (k, painted[k], x_hat_p[k])
    return kept, shown


def copy_probe_report(run, recon, S, radii, title):
    """copy_probe() on S, its figure (copy_probe.png), a log line -> the results.json entry."""
    kept, shown = copy_probe(recon, S, radii)
    plot_copy_probe(shown, kept, run.out / "copy_probe.png", title)
    run.log("copy probe (share of a painted disc's contrast the reconstruction keeps): "
            + ", ".join(f"r = {r} px {fmt_ci(v['mean'], v['ci'])}" for r, v in kept.items()))
    return {"radius_px": list(kept), "kept": {str(r): v for r, v in kept.items()},
            "what": "share of the contrast of a disc of intensity 1 painted into healthy validation "
            "slices that the reconstruction keeps (1 = copied)"}


def plot_copy_probe(shown, kept, path, title="copy probe"):
    """copy_probe.png: per disc radius a healthy slice with the painted disc, its reconstruction
    and the residual |x' − x̂'|: a disc the model copies leaves no residual to find."""
    plt = _plt()
    fig, axes = plt.subplots(3, len(shown), figsize=(2.2 * len(shown), 6.9), squeeze=False)
    for j, (r, (_, xp, xh)) in enumerate(shown.items()):
        for i, (img, kw) in enumerate(((xp, dict(cmap="gray", vmin=-1, vmax=1)),
                                       (xh, dict(cmap="gray", vmin=-1, vmax=1)),
                                       (np.abs(xp - xh), dict(cmap="inferno", vmin=0, vmax=1)))):
            axes[i, j].imshow(img, **kw)
            axes[i, j].set_xticks([]), axes[i, j].set_yticks([])
        k = kept[r]
        axes[0, j].set_title(f"r = {r} px: {100 * k['mean']:.0f}% kept\n"
                             f"[{100 * k['ci'][0]:.0f}, {100 * k['ci'][1]:.0f}]", fontsize=8)
    for i, t in enumerate(("painted x'", "reconstruction x̂'", "residual |x' − x̂'|")):
        axes[i, 0].set_ylabel(t, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    _save(fig, path)


def score_table(rows, cols):
    """AUROC/AUPRC of several score columns of the same rows ({name: column}): all anomalous units
    (with the interval), each group's AUROC, and each group's against its scans' normal units."""
    out = {}
    for name, key in cols.items():
        e = evaluate(rows, key=key)
        out[name] = {**{m: e["metrics"].get(m) for m in ("auroc", "auroc_ci", "auprc")},
                     **{g: v["auroc"] for g, v in e["groups"].items() if "auroc" in v},
                     "same_scan": {g: v["auroc"] for g, v in e.get("groups_same_scan", {}).items()}
                     }
    return out


# -- first written for fanogan3d.py

def read_run(path, method, ids=None):
    """A finished run of `method` -> (its results.json, its scores.csv rows with int label and
    float score), or one error line; `ids`: the units it must have scored (paired comparisons)."""
    import csv
    from pathlib import Path
    d = Path(path)
    if not ((d / "scores.csv").is_file() and (d / "results.json").is_file()):
        fail(f"{d}: no scores.csv and results.json (is it a finished run of {method}.py?)")
    res = json.loads((d / "results.json").read_text())
    if res.get("method") != method:
        fail(f"{d}: a run of {res.get('method')}.py, not of {method}.py")
    with open(d / "scores.csv", newline="") as f:
        rows = [{**r, "label": int(r["label"]), "score": float(r["score"])}
                for r in csv.DictReader(f)]
    if ids is not None and {r["id"] for r in rows} != set(ids):
        fail(f"{d} scored other units than this run; use the same --data, --data-root, --seed "
               f"and --preset")
    return res, rows


def count_activations(net, *inputs):
    """Elements of every leaf module's output in one forward pass (the meta device: no compute)."""
    n = [0]

    def hook(_m, _i, out):
        n[0] += out.numel()
    hooks = [m.register_forward_hook(hook) for m in net.modules() if not list(m.children())]
    try:
        net(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return n[0]


def plot_planes(rows, path, title="", names=("input", "reconstruction", "anomaly map",
                                             "ground truth")):
    """plot_examples for volumes: per case an axial, coronal and sagittal column through the voxel
    row["at"] (superior up); rows input | reconstruction | anomaly map | ground truth (red contour
    over the input). rows: dicts of (D, H, W) arrays input, reconstruction, amap, gt + title, at."""
    plt = _plt()
    fig, axes = plt.subplots(4, 3 * len(rows), figsize=(5.7 * len(rows), 8.2), squeeze=False)
    vmax = max(float(np.percentile(r["amap"], 99.8)) for r in rows) or 1.0
    for j, r in enumerate(rows):
        d, h, w = r["at"]
        vols = (np.asarray(r[k], np.float32) for k in ("input", "reconstruction", "amap", "gt"))
        planes = [[v[d], np.flipud(v[:, h, :]), np.flipud(v[:, :, w])] for v in vols]
        for p, (x, rec, amap, gt) in enumerate(zip(*planes)):
            ax = axes[:, 3 * j + p]
            ax[0].imshow(x, cmap="gray", vmin=-1, vmax=1)
            ax[1].imshow(rec, cmap="gray", vmin=-1, vmax=1)
            im = ax[2].imshow(amap, cmap="inferno", vmin=0, vmax=vmax)
            ax[3].imshow(x, cmap="gray", vmin=-1, vmax=1)
            if gt.any():
                ax[3].contour(gt > 0, levels=[0.5], colors="red", linewidths=1.0)
            ax[0].set_title(("axial", "coronal", "sagittal")[p], fontsize=8)
        top = axes[0, 3 * j + 1]
        top.text(0.5, 1.22, r.get("title", ""), transform=top.transAxes, ha="center", fontsize=9)
    for i, name in enumerate(names):
        axes[i, 0].text(-0.08, 0.5, name, transform=axes[i, 0].transAxes, rotation=90, ha="right",
                        va="center", fontsize=9)
    for ax in axes.ravel():
        ax.axis("off")
    fig.colorbar(im, ax=axes[2, :].tolist(), fraction=0.01, pad=0.01)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


# -- first written for anovaegan.py

def list_flags(argv, flags):
    """Flags that take one or more values (nargs='+', default None), which hp() cannot declare:
    flags = {name: METAVAR}. -> (their values as a Namespace, the rest of argv for parse_args).
    (Better: hp(None, help, nargs='+', type=str), passed through by parse_args.)"""
    import argparse
    import sys
    p = argparse.ArgumentParser(add_help=False)
    for name, metavar in flags.items():
        p.add_argument("--" + name.replace("_", "-"), nargs="+", default=None, metavar=metavar)
    return p.parse_known_args(sys.argv[1:] if argv is None else list(argv))


def plot_curve_panels(panels, path):
    """Training curves in panels side by side: [dict(title, ylabel, yscale, curves={name: [(step,
    value)]}, ref=None (a dashed reference line))]; raw values faint, a running mean over them."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.8), squeeze=False)
    for ax, p in zip(axes[0], panels):
        for name, pts in p["curves"].items():
            if not len(pts):
                continue
            st, v = np.asarray(pts, dtype=np.float64).T
            line, = ax.plot(st, v, lw=0.6, alpha=0.35, marker="o" if len(v) < 3 else None)
            k = max(1, len(v) // 50)
            sm = np.convolve(v, np.ones(k) / k, mode="valid")
            ax.plot(st[k - 1:], sm, lw=1.8, color=line.get_color(), label=name)
        if p.get("ref") is not None:
            ax.axhline(p["ref"], color="k", ls="--", lw=0.8)
        ax.set_yscale(p.get("yscale", "linear"))
        ax.set(xlabel="step", ylabel=p.get("ylabel", ""), title=p.get("title", ""))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    _save(fig, path)


def sample_pixels(sel, max_pixels, seed=0):
    """Indices of at most max_pixels True entries of the flat boolean array sel (uniform)."""
    idx = np.flatnonzero(sel)
    if len(idx) > max_pixels:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_pixels, replace=False))
    return idx


def pixel_metrics(score_map, gt, inside, max_pixels):
    """Pixel-level AUROC / AUPRC and the oracle Dice of an anomaly map over the pixels `inside`
    (at most max_pixels of them, sampled uniformly, seeded)."""
    idx = sample_pixels(inside.ravel(), max_pixels)
    s, y = score_map.ravel()[idx], gt.ravel()[idx]
    out = {"n_pixels": int(len(idx)), "n_lesion_pixels": int(y.sum())}
    if y.any() and not y.all():
        od, ot = oracle_best_dice(s, y)
        out.update(auroc=auroc(y, s), auprc=auprc(y, s), oracle_dice=od, oracle_threshold=ot)
    return out


def segmentation_metrics(patients, row_group, score_map, gt, brain, max_pixels, log=None):
    """Per group of a slice set and "all": the Dice of its patients (mean, std and the mean's 95%
    interval over patients; patients = [{group, dice or None}]) and the pixel-level metrics of
    score_map (pixel_metrics; row_group: (N,) the group of each slice); log: a line per group."""
    dice, pixel = {}, {}
    for g in list(dict.fromkeys(p["group"] for p in patients)) + ["all"]:
        ds = [p["dice"] for p in patients if p["dice"] is not None and g in ("all", p["group"])]
        if ds:
            dice[g] = {**mean_ci(ds), "std": float(np.std(ds))}
        sel = (row_group == g) | (g == "all")
        if gt[sel].any():
            pixel[g] = pixel_metrics(score_map[sel], gt[sel], np.asarray(brain[sel]) > 0, max_pixels)
    for g, d in dice.items():
        px = pixel.get(g, {})
        if log:
            log(f"Dice {g}: {fmt_ci(d['mean'], d['ci'])} (σ {d['std']:.3f}, n={d['n']})  pixel AUROC "
                f"{px.get('auroc', np.nan):.3f}  oracle Dice {px.get('oracle_dice', np.nan):.3f}")
    return {"dice": dice, "pixel": pixel}


def pick_examples(S, groups, per_group=1):
    """(case index, row index) of the slice with the largest ground-truth area of the first cases
    of each group of a slice set (the middle slice for cases without an anomaly)."""
    out = []
    for g in groups:
        cands = []
        for i, c in enumerate(S.cases):
            if c.group != g:
                continue
            r = S.slices_of(i)
            area = np.asarray(S.mask[r]).reshape(len(r), -1).sum(1)
            j = r[int(area.argmax())] if area.max() else r[len(r) // 2]
            cands.append((int(area.max()), i, int(j)))
        cands.sort(key=lambda t: -t[0])
        out += [(i, j) for _, i, j in cands[:per_group]]
    return out


def overlay_seg(ax, x, seg, gt):
    """A segmentation over its image: true positives yellow, false positives red, missed cyan."""
    ax.imshow(x, cmap="gray", vmin=-1, vmax=1)
    rgba = np.zeros((*x.shape, 4), np.float32)
    for m, col in ((seg & gt, (1, 0.85, 0)), (seg & ~gt, (1, 0.1, 0.1)), (~seg & gt, (0, 0.9, 1))):
        rgba[m] = (*col, 0.75)
    ax.imshow(rgba, interpolation="nearest")


# -- first written for reversed_ae.py

def read_scores(path):
    """The rows of a scores.csv (values as strings, labels as int), e.g. to compare two runs."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["label"] = int(r["label"])
    return rows


def paired_case_mean(rows_a, rows_b, key):
    """The mean over cases of a − b in column `key` (per case: the mean over its units, joined by
    id, blanks skipped), with its 95% interval over cases (mean_ci): paired per-unit TP, F1, ..."""
    b = {r["id"]: r for r in rows_b}
    per = {}
    for r in rows_a:
        o = b.get(r["id"])
        if o is not None and r.get(key) not in (None, "") and o.get(key) not in (None, ""):
            per.setdefault(r["case"], []).append(float(r[key]) - float(o[key]))
    return mean_ci([np.mean(v) for v in per.values()])
