"""A procedural 3D brain phantom: the embedded default dataset of this repository (`--data synthetic`).

Every script trains and scores on it out of the box, on a laptop CPU, with no download. It is built
from simple geometry (superellipsoids, tubes along curves, band-limited noise on a sphere), fast
enough to generate 250 volumes in seconds, and is meant to LOOK like a brain on an axial slice:
scalp, skull with marrow, CSF, a folded cortical ribbon (gyri and sulci), white matter, butterfly
lateral ventricles, caudate/putamen/pallidum/thalamus, hippocampi, cerebellum with folia, brainstem.

    from data.phantom import ensure_phantom, GROUPS
    variant_dir = ensure_phantom(root="data/synthetic", contrast="t1", size="full", seed=0)

    python data/phantom.py --contrast all --size tiny --preview phantom.png   # look at it

Geometry: canonical RAS affine, 2 mm voxels, grid 88 x 104 x 88 (X = left->right, Y = posterior->
anterior, Z = inferior->superior); an axial slice is vol[:, :, k]. Images are int16: MRI in arbitrary
units (about 0..1000, background exactly 0), CT in Hounsfield units (background exactly -1000).

Groups (test folders), each anomalous case with a voxel mask NAME_mask.nii.gz:
  t1, t2, flair: ms_lesion  MS-like ovoid white-matter lesions (mostly periventricular, long axis
                               pointing away from the ventricles): T2/FLAIR-bright, T1 iso- to mildly
                               hypointense; per-case load and count as in MS data sets
                 black_hole   T1 "black holes": T1-hypointense (darker than cortex), T2/FLAIR-bright
                 tumor         a mass (solid rim, often a necrotic core) with white-matter edema and
                               mass effect; T1-hypointense, T2/FLAIR-bright edema
                 atrophy_1..3  stages like CDR 0.5 / 1 / 2 as shifts of the healthy population's
                               latent brain age plus hippocampal / temporal-horn / ventricular change;
                               the mask is every voxel whose tissue differs from the same subject's
                               healthy anatomy
  ct:            hemorrhage    meta["subtype"]: intraparenchymal | subdural (crescent along the
                               inner skull) | epidural (biconvex lens), balanced by case index
Healthy subjects vary like an elderly cohort (latent brain age), and every scan like a raw,
unregistered acquisition (pose +-10 deg / +-8 mm, head size, bias field, gain, contrast); see
data/README.md for the levels, their sources and `python -m data.phantom --report`.
The brain mask (NAME_brainmask.nii.gz, beside every image) is the intracranial cavity above the
foramen magnum: brain tissue and the CSF inside the skull, so that extra-axial blood is inside it.

Determinism: each case is generated from its own seed, derived from (seed, group, index), so a case
does not depend on how many cases are asked for, and the three MRI contrasts of one case name show
the same subject (same anatomy, same anomaly), like a co-registered multi-contrast scan.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

VERSION = "2.0"
REPO = Path(__file__).resolve().parent.parent

# =================================================================================================
# Constants: grid, groups, sizes, labels, intensities
# =================================================================================================
SHAPE = (88, 104, 88)                                    # (X, Y, Z) voxels
VOXEL_MM = 2.0
AFFINE = np.diag([VOXEL_MM, VOXEL_MM, VOXEL_MM, 1.0])
AFFINE[:3, 3] = -VOXEL_MM * (np.array(SHAPE) - 1) / 2    # world origin at the grid centre
WORLD = [(VOXEL_MM * (np.arange(n) - (n - 1) / 2)).astype(np.float32) for n in SHAPE]  # mm per axis

MRI_GROUPS = ["ms_lesion", "black_hole", "tumor", "atrophy_1", "atrophy_2", "atrophy_3"]
GROUPS = {"t1": list(MRI_GROUPS), "t2": list(MRI_GROUPS), "flair": list(MRI_GROUPS), "ct": ["hemorrhage"]}
CONTRASTS = tuple(GROUPS)
SIZES = {"full": dict(train=100, val=10, normal=40, per_group=40),   # test sets: data/README
         "tiny": dict(train=8, val=2, normal=4, per_group=4)}
HEMORRHAGE_SUBTYPES = ("intraparenchymal", "subdural", "epidural")
# stable ids for seed derivation (never reorder: changing them changes every case)
_GROUP_ID = {"train": 0, "val": 1, "normal": 2, "ms_lesion": 3, "black_hole": 4, "tumor": 5,
             "atrophy_1": 6, "atrophy_2": 7, "atrophy_3": 8, "hemorrhage": 9}
_CONTRAST_ID = {"t1": 1, "t2": 2, "flair": 3, "ct": 4}

LABEL_NAMES = ("background", "scalp", "soft_tissue", "bone", "marrow", "csf", "gm", "wm", "ventricle",
               "striatum", "pallidum", "thalamus", "hippocampus", "cerebellum_gm", "cerebellum_wm",
               "brainstem", "eye", "spinal_cord", "lesion", "tumor", "necrosis", "edema", "blood",
               "perihematomal_edema")
L = {n: i for i, n in enumerate(LABEL_NAMES)}
(BG, SCALP, SOFT, BONE, MARROW, CSF, GM, WM, VENT, STRIATUM, PALLIDUM, THALAMUS, HIPPO, CB_GM, CB_WM,
 STEM, EYE, CORD, LESION, TUMOR, NECROSIS, EDEMA, BLOOD, PH_EDEMA) = range(len(LABEL_NAMES))
BRAIN_TISSUE = (GM, WM, STRIATUM, PALLIDUM, THALAMUS, HIPPO, CB_GM, CB_WM, STEM)

# Mean intensity per label and contrast. MRI: arbitrary units; CT: Hounsfield units.
# T1 (MPRAGE-like): WM > GM > CSF, fat bright.  T2: CSF > GM > WM.  FLAIR: GM > WM > CSF (CSF nulled).
# Lesion intensities depend on the group (hyper/hypo) and are filled in by _intensity_table().
INTENSITY = {
    #        bg scalp soft bone marrow csf  gm   wm  vent  str  pal  thal hip  cbgm cbwm stem eye  cord les  tum  nec  edem blood phe
    "t1":    (0, 820, 380,  40, 560, 120, 480, 760, 115, 560, 650, 620, 470, 470, 720, 690, 100, 690,   0, 430, 170, 560, 560, 520),
    "t2":    (0, 620, 300,  30, 380, 960, 600, 420, 970, 530, 360, 480, 630, 610, 430, 460, 950, 460,   0, 710, 900, 770, 300, 760),
    "flair": (0, 560, 300,  30, 360,  70, 620, 470,  60, 545, 460, 520, 640, 610, 480, 500,  60, 500,   0, 760, 330, 820, 400, 800),
    "ct":    (-1000, 15, 45, 1400, 600, 6,  40,  26,   5,  38,  35,  36,  38,  40,  28,  32,  10,  32,   0,  32,  12,  18,  70,  16),
}
# Lesion intensity as a multiple of the subject's white matter, per group and contrast (each case
# draws within +-6 %). MS lesions (demyelination, oedema, gliosis: long T1 and T2) are bright in T2
# and FLAIR and iso- to mildly hypointense in T1; "black holes" (chronic lesions with axonal loss)
# are hypointense in T1 (between grey matter and CSF) and, like every MS lesion, T2/FLAIR-bright.
LESION_GROUPS = ("ms_lesion", "black_hole")
LESION_INTENSITY = {"ms_lesion": {"t1": 0.9, "t2": 1.75, "flair": 1.7},
                    "black_hole": {"t1": 0.42, "t2": 1.95, "flair": 1.45}}
# Lesion load per case: total volume (ml) lognormal with this median and log-SD, clipped; number of
# lesions grows with the load. MS (T2/FLAIR) loads of a few ml, up to tens of ml in a few patients;
# T1 black holes a fraction of that (see data/README.md for the sources).
LESION_LOAD = {"ms_lesion": dict(median_ml=5.0, log_sd=0.8, lo=0.8, hi=35.0, n_min=4, n_max=40),
               "black_hole": dict(median_ml=2.0, log_sd=0.7, lo=0.4, hi=12.0, n_min=2, n_max=15)}

# Healthy ageing and atrophy. Every subject has a latent "brain age" z ~ N(0, 1) (one SD is about
# a decade of healthy ageing in an elderly cohort, or the spread of brain reserve between people):
# it widens ventricles and sulci, thins the cortex, shrinks hippocampi and the brain inside its skull
# (AGEING: effect per unit of z). A disease stage adds `load` units of z on top (a shift of the
# healthy distribution, not a separate cluster) plus changes that act where early Alzheimer-type
# disease acts (hippocampus, temporal horns, ventricles): radius factors beyond the ageing effect.
AGEING = dict(vent=0.20, sulc=0.16, cortex=0.03, hippo=0.03, hull=0.007, horn=0.05)
ATROPHY = {1: dict(load=0.55, vent=1.05, horn=1.08, hippo=0.95, cortex=1.0, sulc=0.0, hull=0.0),
           2: dict(load=0.95, vent=1.10, horn=1.16, hippo=0.91, cortex=0.98, sulc=0.05, hull=0.002),
           3: dict(load=1.8, vent=1.16, horn=1.25, hippo=0.89, cortex=0.96, sulc=0.1, hull=0.004)}
_NO_STAGE = dict(load=0.0, vent=1.0, horn=1.0, hippo=1.0, cortex=1.0, sulc=0.0, hull=0.0)


def atrophy_params(P, stage=0):
    """Effective ventricle / temporal-horn / hippocampal radius factors, cortical thickness factor,
    sulcal half-width added (mm) and brain-hull shrink (fraction; the skull stays) of subject P at
    atrophy stage 0 (healthy) .. 3: its own healthy ageing (z = P["age"]) plus the stage."""
    S = ATROPHY.get(stage, _NO_STAGE)
    z = float(P.get("age", 0.0)) + S["load"]
    return dict(vent=float(np.exp(AGEING["vent"] * z)) * S["vent"],
                horn=float(np.exp(AGEING["horn"] * z)) * S["horn"],
                hippo=(1 - AGEING["hippo"] * z) * S["hippo"],
                cortex=(1 - AGEING["cortex"] * z) * S["cortex"],
                sulc=AGEING["sulc"] * z + S["sulc"],
                hull=AGEING["hull"] * z + S["hull"])


# Everything that changes the generated data; written to manifest.json (a change regenerates).
PARAMS = dict(shape=SHAPE, voxel_mm=VOXEL_MM, labels=LABEL_NAMES, intensity=INTENSITY,
              lesion_intensity=LESION_INTENSITY, lesion_load=LESION_LOAD, atrophy={str(k): v for k, v in ATROPHY.items()}, ageing=AGEING,
              hemorrhage_subtypes=HEMORRHAGE_SUBTYPES, fold_map=(160, 320), fold_bank=8, noise_cube=48)

F32 = np.float32


# =================================================================================================
# Subject space and geometric helpers (all distances in mm of a canonical head)
# =================================================================================================
class _Space:
    """Maps world mm to the subject's canonical head frame: h = M @ (w - t) (rotation, scale).
    Smooth fields are evaluated on a coarse grid (every 2nd voxel) and upsampled linearly (_field)."""

    def __init__(self, M, t):
        self.M, self.t = np.asarray(M, float), np.asarray(t, float)
        self.Minv = np.linalg.inv(self.M)

    def coords(self, box=None, step=1):
        """Head coordinates (X, Y, Z) of the voxels in `box` (slices of the grid; default all),
        taking every `step`-th voxel; float32 arrays."""
        box = box or tuple(slice(0, n) for n in SHAPE)
        ax = [WORLD[i][box[i]][::step].astype(float) - self.t[i] for i in range(3)]
        return [(self.M[r, 0] * ax[0]).astype(F32)[:, None, None]
                + (self.M[r, 1] * ax[1]).astype(F32)[None, :, None]
                + (self.M[r, 2] * ax[2]).astype(F32)[None, None, :] for r in range(3)]

    def coords_at(self, i, j, k):
        """Head coordinates of voxels given by index arrays (1D float32 arrays)."""
        w = [WORLD[0][i] - F32(self.t[0]), WORLD[1][j] - F32(self.t[1]), WORLD[2][k] - F32(self.t[2])]
        return [F32(self.M[r, 0]) * w[0] + F32(self.M[r, 1]) * w[1] + F32(self.M[r, 2]) * w[2] for r in range(3)]

    def box(self, lo, hi, pad=2):
        """Grid slices covering the head-frame box [lo, hi] (mm); starts and lengths even so that
        the box can be evaluated on the coarse grid."""
        c = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])], float)
        idx = self.to_voxel(c)
        i0 = np.clip(np.floor(idx.min(0)).astype(int) - pad, 0, SHAPE) // 2 * 2
        i1 = np.clip(np.ceil(idx.max(0)).astype(int) + pad + 1, 0, SHAPE)
        i1 = np.minimum(i0 + (i1 - i0 + 1) // 2 * 2, SHAPE)
        return tuple(slice(int(a), int(max(b, a + 2))) for a, b in zip(i0, i1))

    def to_voxel(self, h):
        """Head-frame point(s) (..., 3) -> voxel index coordinates (float)."""
        w = np.asarray(h, float) @ self.Minv.T + self.t
        return w / VOXEL_MM + (np.array(SHAPE) - 1) / 2

    def to_head(self, v):
        """Voxel index coordinates (..., 3) -> head frame (mm)."""
        w = (np.asarray(v, float) - (np.array(SHAPE) - 1) / 2) * VOXEL_MM
        return (w - self.t) @ self.M.T


def _up2(c):
    """Linear upsampling by 2 along every axis: fine[2i] = c[i], fine[2i+1] = (c[i] + c[i+1]) / 2
    (the last odd sample extrapolated)."""
    n0, n1, n2 = c.shape
    o = np.empty((2 * n0, 2 * n1, 2 * n2), F32)
    e = o[::2, ::2, ::2]
    e[...] = c
    for ax in range(3):
        src = [slice(None, None, 2) if q > ax else slice(None) for q in range(3)]
        def at(s):
            idx = list(src)
            idx[ax] = s
            return tuple(idx)
        if c.shape[ax] > 1:
            np.add(o[at(slice(0, -2, 2))], o[at(slice(2, None, 2))], out=o[at(slice(1, -1, 2))])
            o[at(slice(1, -1, 2))] *= 0.5
            np.subtract(1.5 * o[at(slice(-2, -1))], 0.5 * o[at(slice(-4, -3))], out=o[at(slice(-1, None))])
        else:
            o[at(slice(1, 2))] = o[at(slice(0, 1))]
    return o


def _field(sp, box, fn):
    """Evaluate fn(X, Y, Z) -> array or tuple of arrays on the coarse grid of `box`, upsampled."""
    out = fn(*sp.coords(box, step=2))
    return tuple(_up2(o) for o in out) if isinstance(out, tuple) else _up2(out)


def _rotation(ax, ay, az):
    """Rotation matrix from angles (radians) about x, y, z."""
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    Rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    Rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return Rz @ Ry @ Rx


def _random_rotation(rng):
    q = rng.standard_normal(4)
    a, b, c, d = q / np.linalg.norm(q)
    return np.array([[a*a + b*b - c*c - d*d, 2*(b*c - a*d), 2*(b*d + a*c)],
                     [2*(b*c + a*d), a*a - b*b + c*c - d*d, 2*(c*d - a*b)],
                     [2*(b*d - a*c), 2*(c*d + a*b), a*a - b*b - c*c + d*d]])


def _ell_depth(X, Y, Z, c, a, box=0.0):
    """Approximate depth (mm, > 0 inside) below the surface of an ellipsoid with centre c and
    semi-axes a (arrays allowed), measured along the ray from the centre; box in [0, 1] blends the
    2-norm with the 4-norm (a boxier superellipsoid, like a brain)."""
    x, y, z = X - F32(c[0]), Y - F32(c[1]), Z - F32(c[2])
    qx, qy, qz = x / a[0], y / a[1], z / a[2]
    qx, qy, qz = qx * qx, qy * qy, qz * qz
    n = np.sqrt(qx + qy + qz)
    if box:
        n = (1 - F32(box)) * n + F32(box) * np.sqrt(np.sqrt(qx * qx + qy * qy + qz * qz))
    r = np.sqrt(x * x + y * y + z * z)
    return r * (1.0 / np.maximum(n, F32(1e-3)) - 1.0)


def _quad(X, Y, Z, c, s):
    """Ellipsoid implicit function, < 0 inside (smooth: safe to evaluate coarse and upsample)."""
    return ((X - F32(c[0])) / s[0]) ** 2 + ((Y - F32(c[1])) / s[1]) ** 2 + ((Z - F32(c[2])) / s[2]) ** 2 - 1


def _tube(X, Y, Z, pts, radii, n_sub=3):
    """Signed distance (mm, < 0 inside) to a tube of varying radius along a smooth curve through
    `pts` (Catmull-Rom spline, each span cut into n_sub straight segments)."""
    pts, radii = np.asarray(pts, float), np.asarray(radii, float)
    P = np.concatenate([pts[:1], pts, pts[-1:]])
    cp, cr = [], []
    for i in range(1, len(P) - 2):
        for t in np.linspace(0, 1, n_sub, endpoint=False):
            t2, t3 = t * t, t * t * t
            w = (-0.5*t3 + t2 - 0.5*t, 1.5*t3 - 2.5*t2 + 1, -1.5*t3 + 2*t2 + 0.5*t, 0.5*t3 - 0.5*t2)
            cp.append(sum(wk * P[i - 1 + k] for k, wk in enumerate(w)))
            cr.append(radii[i - 1] + (radii[i] - radii[i - 1]) * t)
    cp.append(pts[-1])
    cr.append(radii[-1])
    best = None
    for a, b, ra, rb in zip(cp[:-1], cp[1:], cr[:-1], cr[1:]):
        ab = b - a
        l2 = float(ab @ ab) + 1e-9
        dx, dy, dz = X - F32(a[0]), Y - F32(a[1]), Z - F32(a[2])
        t = np.clip((dx * F32(ab[0]) + dy * F32(ab[1]) + dz * F32(ab[2])) * F32(1 / l2), 0, 1)
        dx -= t * F32(ab[0])
        dy -= t * F32(ab[1])
        dz -= t * F32(ab[2])
        d = np.sqrt(dx * dx + dy * dy + dz * dz) - (F32(ra) + t * F32(rb - ra))
        best = d if best is None else np.minimum(best, d)
    return best


def _sigmoid(u):
    return 1.0 / (1.0 + np.exp(-u))


def _floor_z(X, Y, mid=True):
    """Inferior surface of the cerebrum (mm): a bowl for the temporal lobes in the middle fossae,
    the orbital roofs in front and the tentorium behind, and (if mid) the diencephalon in the middle."""
    yt = Y - 2
    z = -44 + 22 * (np.maximum(yt, 0) / 26) ** 2 + 24 * (np.maximum(-yt, 0) / 34) ** 2 + 14 * ((np.abs(X) - 38) / 22) ** 2
    z = np.minimum(z, -21)
    if mid:
        z = np.maximum(z, -44 + 26 * np.exp(-(X / 15) ** 4))
    return z


# =================================================================================================
# Folding pattern: band-limited noise on a sphere (shared noise cubes, one random rotation per subject)
# =================================================================================================
_BANK = {}


def _noise_bank():
    """Periodic noise cubes, computed once per process (~0.1 s): a band-pass one and its gradient
    (sulci run along its zero set) and a smooth one (sulcal depth, sulcal bending)."""
    if _BANK:
        return _BANK
    n = PARAMS["noise_cube"]
    rng = np.random.default_rng(20240531)
    k = np.fft.fftfreq(n)
    KX, KY, KZ = np.meshgrid(k, k, np.fft.rfftfreq(n), indexing="ij")
    kk = np.sqrt(KX ** 2 + KY ** 2 + KZ ** 2)
    F = np.fft.rfftn(rng.standard_normal((n, n, n))) * np.exp(-0.5 * ((kk - 1 / 6.0) / 0.035) ** 2)
    g = np.fft.irfftn(F, s=(n, n, n), axes=(0, 1, 2))
    sd = g.std()
    grad = [np.fft.irfftn(F * (2j * np.pi * K), s=(n, n, n), axes=(0, 1, 2)) for K in (KX, KY, KZ)]
    _BANK["g4"] = (np.stack([g] + grad, -1) / sd).astype(F32)                       # (n, n, n, 4)
    smooth = np.exp(-0.5 * (kk / 0.03) ** 2)
    low = [np.fft.irfftn(np.fft.rfftn(rng.standard_normal((n, n, n))) * smooth, s=(n, n, n), axes=(0, 1, 2))
           for _ in range(3)]
    _BANK["low3"] = np.stack([q / q.std() for q in low], -1).astype(F32)            # (n, n, n, 3)
    return _BANK


def _bank_map(k):
    """Fold map k of the shared bank over (theta, phi) (polar axis anterior-posterior; its poles
    hide in the interhemispheric fissure): H = angular distance (rad) to the nearest sulcal axis,
    and three smooth unit-variance maps (sulcal depth, bending of the sulcal sheets in theta, phi).
    Computed once per process when first needed."""
    key = ("map", k)
    if key in _BANK:
        return _BANK[key]
    bank = _noise_bank()
    rng = np.random.default_rng([20240531, k])
    n = PARAMS["noise_cube"]
    nt, npp = PARAMS["fold_map"]
    th = (np.arange(nt) + 0.5) * np.pi / nt
    ph = (np.arange(npp) + 0.5) * 2 * np.pi / npp - np.pi
    T, P = np.meshgrid(th, ph, indexing="ij")
    u = np.stack([np.sin(T) * np.cos(P), np.cos(T), np.sin(T) * np.sin(P)], -1).reshape(-1, 3)
    v = u @ _random_rotation(rng).T
    r0 = 28.0 * (0.9 + 0.2 * k / max(1, PARAMS["fold_bank"] - 1))   # sphere radius in cube voxels
    Ggrad = _trilinear_wrap(bank["g4"], rng.uniform(0, n, 3) + r0 * v)              # (N, 4)
    gt = Ggrad[:, 1:] - (Ggrad[:, 1:] * v).sum(-1, keepdims=True) * v  # tangential gradient
    H = np.minimum(np.abs(Ggrad[:, 0]) / (r0 * np.sqrt((gt ** 2).sum(-1)) + 1e-3), 0.5)
    low = _trilinear_wrap(bank["low3"], rng.uniform(0, n, 3) + 14.0 * v)            # (N, 3)
    _BANK[key] = np.stack([H] + [low[:, q] for q in range(3)]).reshape(4, nt, npp).astype(F32)
    return _BANK[key]


def _fold_maps(P):
    """A subject's folding maps: one bank map, rotated about the anterior-posterior axis by a
    random angle and randomly mirrored (front/back, and about that axis)."""
    M = _bank_map(P["fold_map"])
    M = np.roll(M, P["fold_shift"], axis=2)
    if P["fold_flip"] & 1:
        M = M[:, ::-1]
    if P["fold_flip"] & 2:
        M = M[:, :, ::-1]
    return [np.ascontiguousarray(m).ravel() for m in M]


def _trilinear_wrap(cube, pts):
    """Trilinear interpolation of a periodic cube (n, n, n, C) at points (N, 3) -> (N, C)."""
    n = cube.shape[0]
    flat = cube.reshape(-1, cube.shape[-1])
    f = np.floor(pts)
    w = (pts - f).astype(F32)
    i0 = f.astype(np.int64) % n
    i1 = (i0 + 1) % n
    out = 0
    for cx in (0, 1):
        wx, ix = (w[:, 0], i1[:, 0]) if cx else (1 - w[:, 0], i0[:, 0])
        for cy in (0, 1):
            wy, iy = (w[:, 1], i1[:, 1]) if cy else (1 - w[:, 1], i0[:, 1])
            for cz in (0, 1):
                wz, iz = (w[:, 2], i1[:, 2]) if cz else (1 - w[:, 2], i0[:, 2])
                out = out + flat[(ix * n + iy) * n + iz] * (wx * wy * wz)[:, None]
    return out


# =================================================================================================
# Subjects: random parameters of one healthy head
# =================================================================================================
def sample_subject(rng):
    """Random parameters of one subject: head size/shape/pose, brain shape, ventricles, folding,
    cortex, deep nuclei."""
    U = rng.uniform
    P = dict(
        # head size: intracranial volume SD ~10% between adults -> linear SD ~3.3%
        scale=float(np.clip(rng.normal(0.98, 0.033), 0.90, 1.05)), aspect=U(-0.035, 0.035, 3) + 1,
        # pose of a raw (unregistered) scan: pitch (nodding, x) varies most, then yaw (z) and roll (y)
        angles=np.radians([U(-10, 10), U(-6, 6), U(-8, 8)]),
        shift=np.array([U(-8, 8), U(-8, 8) - 4.0, U(-8, 8) + 6.0]),   # mm, about the FOV centre
        brain=np.array([64.0, 80.0, 56.0]) * (1 + U(-0.03, 0.03, 3)),
        box=U(0.35, 0.6), egg=U(0.03, 0.09), gap=U(1.8, 2.8), skull=U(5.5, 7.5), scalp=U(4.5, 7.0),
        vent=float(np.clip(np.exp(rng.normal(0, 0.14)), 0.78, 1.3)), vent_asym=rng.normal(0, 0.04),
        cortex=U(2.9, 3.5), sulc=U(0.8, 1.1), sulc_depth=U(12, 16), age=float(np.clip(rng.normal(), -2.5, 2.5)),
        fissure=U(1.1, 1.6), hippo=U(0.9, 1.1), deep=rng.normal(0, 1.2, (4, 3)),
        zcc=U(20, 25), ycc=U(33, 39), x_ins=U(37, 40), z_syl=U(-8, -4),
    )
    P.update(fold_map=int(rng.integers(PARAMS["fold_bank"])), fold_shift=int(rng.integers(PARAMS["fold_map"][1])),
             fold_flip=int(rng.integers(4)))
    return P


def _space(P):
    R = _rotation(*P["angles"])
    M = np.diag(1 / (P["scale"] * P["aspect"])) @ R.T
    return _Space(M, P["shift"])


# =================================================================================================
# Anatomy: label map of one subject (optionally atrophied)
# =================================================================================================
Z_FM = -62.0            # foramen magnum (head frame, mm): the brain mask ends here


def head(P):
    """Everything outside the brain: labels with scalp, skull (marrow), neck and face, and the
    intracranial cavity filled with CSF; returns (labels, brain mask, aux fields)."""
    sp = _space(P)
    a, egg, p, g = P["brain"], P["egg"], P["box"], P["gap"]

    def coarse(X, Y, Z):
        cav = np.maximum(np.minimum(_ell_depth(X, Y, Z, (0, 0, 0), ((a[0] + g) * (1 - egg * Y / a[1]), a[1] + g, a[2] + g), p),
                                    Z - (_floor_z(X, Y) - g)),
                         _ell_depth(X, Y, Z, (0, -42, -38), (52, 38, 27)))
        neck = np.minimum(19 * (1 - (X / 38) ** 2 - ((Y + 14) / 42) ** 2), -28 - Z)
        face = np.minimum(_ell_depth(X, Y, Z, (0, 46, -52), (46, 38, 34)), -18 - Z)
        base = np.minimum(_ell_depth(X, Y, Z, (0, 4, -24), (a[0] + 14, a[1] + 15, 50)), -12 - Z)  # temporalis etc.
        return cav, np.maximum(np.maximum(neck, face), base)

    full = tuple(slice(0, n) for n in SHAPE)
    X, Y, Z = sp.coords(full, step=2)
    cav_c, soft_c = coarse(X, Y, Z)
    cav = _up2(cav_c)
    lab = np.zeros(SHAPE, np.uint8)
    tsk, tsc = P["skull"], P["scalp"]
    lab[cav > -(tsk + tsc)] = SCALP
    bl = sp.box((-a[0] - 30, -a[1] - 30, -200), (a[0] + 30, a[1] + 40, -10))
    k0 = bl[2].start // 2
    soft = _up2(soft_c[bl[0].start // 2:bl[0].stop // 2, bl[1].start // 2:bl[1].stop // 2, k0:bl[2].stop // 2])
    lab[bl][soft > 0] = SOFT
    w = [WORLD[q] - F32(sp.t[q]) for q in range(3)]
    Zf = (F32(sp.M[2, 0]) * w[0])[:, None, None] + (F32(sp.M[2, 1]) * w[1])[None, :, None] + (F32(sp.M[2, 2]) * w[2])[None, None, :]
    thick = F32(tsk) * (F32(0.35) + F32(0.65) * _sigmoid((Zf + F32(14)) / F32(4)))   # thinner skull base
    lab[(cav > -thick) & (cav <= 0)] = BONE
    lab[(cav > -thick + 1.8) & (cav < -1.8)] = MARROW
    # eyes, nasal cavity and maxillary sinuses (air), spinal column below the foramen magnum
    bf = sp.box((-45, 30, -80), (45, 80, -22))
    X, Y, Z = sp.coords(bf)
    lb = lab[bf]
    for sx in (-1, 1):
        lb[(_quad(X, Y, Z, (sx * 28, 52, -38), (16, 22, 13)) < 0) & (lb != BONE)] = SCALP   # orbital fat
        lb[(X - sx * 30) ** 2 + (Y - 58) ** 2 + (Z + 38) ** 2 < 12 ** 2] = EYE
        lb[_quad(X, Y, Z, (sx * 18, 46, -62), (12, 14, 12)) < 0] = BG
    lb[(np.abs(X) < 6) & (Y > 36) & (Z < -44) & (Z > -78) & (lb == SOFT)] = BG
    bs = sp.box((-18, -50, -90), (18, -12, Z_FM))
    X, Y, Z = sp.coords(bs)
    ls = lab[bs]
    rr = np.sqrt(X ** 2 + (Y + 32) ** 2)
    below = Z < Z_FM - 2
    ls[below & (rr < 15)] = BONE
    ls[below & (rr < 9)] = CSF
    ls[below & (rr < 5.5)] = CORD
    inside = cav > 0
    lab[inside] = CSF
    brain = inside & (Zf > Z_FM)
    return lab, brain, dict(space=sp, cav=cav)


def paint_brain(P, lab, brain, aux, stage=0):
    """Paint the brain into `lab` (in place) at atrophy stage 0 (healthy) .. 3. Returns aux
    (with the ventricle distance field used by the lesion generator)."""
    A = atrophy_params(P, stage)
    sp = aux["space"]
    a, egg, p = P["brain"], P["egg"], P["box"]
    if "fold" not in aux:
        aux["fold"] = _fold_maps(P)
    Hm, Dm, B1, B2 = aux["fold"]
    nt, npp = PARAMS["fold_map"]

    # ---- cerebrum: hull (shrinks with atrophy; the skull does not), fissures, folded cortex ----
    shrink = 1 - A["hull"]
    bc = sp.box((-a[0] * 1.15, -a[1] - 3, -48), (a[0] * 1.15, a[1] + 3, a[2] + 3))

    def coarse(X, Y, Z):
        e = _ell_depth(X, Y, Z, (0, 0, 0), (a[0] * shrink * (1 - egg * Y / a[1]), a[1] * shrink, a[2] * shrink), p)
        return e, Z - _floor_z(X, Y) - a[2] * A["hull"] * 0.5

    src, floor = _field(sp, bc, coarse)
    hull = np.minimum(src, floor)
    m = (hull > 0) & brain[bc]
    i, j, k = np.nonzero(m)
    X, Y, Z = sp.coords_at(i + bc[0].start, j + bc[1].start, k + bc[2].start)
    h, s_src, h_floor = hull[m], src[m], floor[m]
    AX = np.abs(X)
    w_extra = A["sulc"]
    # interhemispheric fissure, down to the corpus callosum (an arch from genu to splenium)
    ay = np.abs(Y) / P["ycc"]
    zcc = P["zcc"] - 8 * ay ** 2 - 80 * np.maximum(0, ay - 1)
    w_fis = P["fissure"] + 0.5 * w_extra
    d_fis = np.sqrt(np.maximum(AX - w_fis, 0) ** 2 + np.maximum(zcc - Z, 0) ** 2)
    d_fis = np.where((AX < w_fis) & (Z > zcc), AX - w_fis, d_fis)
    # Sylvian fissure: an oblique sheet z = z_syl + 0.35 y lateral to the insula + the insular cistern
    x_ins = P["x_ins"] - 0.006 * (Y + 5) ** 2                  # the insula bulges laterally
    dz = np.abs(Z - (P["z_syl"] + 0.35 * Y + 0.12 * (AX - x_ins)))
    d_lat = np.where(AX >= x_ins, dz, np.sqrt((x_ins - AX) ** 2 + dz ** 2))
    d_ins = np.sqrt((AX - x_ins) ** 2 + np.maximum(0, dz - 11) ** 2)
    d_syl = (np.minimum(d_lat, d_ins) + 2 * np.maximum(0, Y - 20) + 2 * np.maximum(0, -36 - Y)
             - (1.2 + 0.5 * w_extra))
    # sulci: sheets along the zero set of the noise on the sphere, reaching from the convexity and
    # the medial surface down to ~sulc_depth, bent sideways with depth so they are not straight spokes
    s_src = np.minimum(s_src, 1.6 * d_fis + 4)          # medial sulci are shallower
    d_sulc = np.full(h.shape, 1e3, F32)
    q = np.flatnonzero((s_src < 1.7 * P["sulc_depth"] + 8) | (h_floor < P["sulc_depth"] + 8))  # deep WM: none
    X, Y, Z, s_src, s_fl = X[q], Y[q], Z[q], s_src[q], h_floor[q]
    rho = np.sqrt(X * X + Y * Y + Z * Z) + F32(1e-3)
    th = np.arctan2(np.sqrt(X * X + Z * Z), Y)
    ph = np.arctan2(Z, X)
    kt = F32(nt / np.pi)
    kp = F32(npp / (2 * np.pi))
    k0 = np.minimum((th * kt).astype(np.int32), nt - 1) * npp + ((ph + F32(np.pi)) * kp).astype(np.int32) % npp
    sd = np.clip(s_src, 0, 25)
    bend = sd * F32(0.5) * (1 + F32(0.06) * sd) / rho
    th = np.clip(th + bend * B1[k0], 0, F32(np.pi - 1e-4))
    ph = ph + bend * B2[k0] / np.maximum(np.sin(th), F32(0.15))
    k1 = np.minimum((th * kt).astype(np.int32), nt - 1) * npp + ((ph + F32(3 * np.pi)) * kp).astype(np.int32) % npp
    dh = Hm[k1] * rho
    depth = P["sulc_depth"] * np.maximum(1 + F32(0.2) * Dm[k0], F32(0.75))
    w = (P["sulc"] + w_extra) + F32(0.7) * np.maximum(0, 1 - s_src / F32(5))      # open at the surface
    ds = np.sqrt(dh * dh + np.maximum(0, s_src - depth) ** 2) - w
    # the inferior surface (floor): vertical sulcal sheets from the same pattern laid flat
    kf = (np.clip(((Y + F32(100)) * F32(0.8)).astype(np.int32), 0, nt - 1) * npp
          + np.clip(((X + F32(100)) * F32(0.8)).astype(np.int32), 0, npp - 1))
    d_fl = np.sqrt((Hm[kf] * F32(60)) ** 2 + np.maximum(0, s_fl - depth * F32(0.5)) ** 2) - w
    d_sulc[q] = np.minimum(ds, np.where(s_fl < s_src, d_fl, F32(1e3)))
    dist = np.minimum(np.minimum(np.minimum(h, d_fis), d_syl), d_sulc)               # to the nearest CSF
    T = P["cortex"] * A["cortex"]
    lc = lab[bc]
    lc[m] = np.where(dist < 0, CSF, np.where(dist < T, GM, WM))

    # ---- cerebellum (folia) and brainstem ----
    bb = sp.box((-50, -78, -62), (50, -22, -18))

    def coarse_cb(X, Y, Z):
        cb = np.maximum(np.maximum(_ell_depth(X, Y, Z, (22, -50, -40), (25, 24, 18)),
                                   _ell_depth(X, Y, Z, (-22, -50, -40), (25, 24, 18))),
                        _ell_depth(X, Y, Z, (0, -52, -37), (10, 22, 17)))
        core = np.minimum(_quad(np.abs(X), Y, Z, (15, -47, -37), (9, 12, 7)), _quad(X, Y, Z, (0, -46, -36), (5, 9, 6)))
        return cb - F32(20 * A["hull"]), core

    cb, core = _field(sp, bb, coarse_cb)
    m = (cb > 0) & brain[bb]
    i, j, k = np.nonzero(m)
    X, Y, Z = sp.coords_at(i + bb[0].start, j + bb[1].start, k + bb[2].start)
    rf = np.sqrt(X * X + (Y + 12) ** 2 + (Z + 20) ** 2) + F32(2.0) * np.sin(F32(0.21) * X) * np.cos(F32(0.17) * Y)
    folia = (np.cos(rf * F32(2 * np.pi / 7.0)) > 0.72 - 0.4 * A["sulc"]) & (cb[m] < 9)
    lb = lab[bb]
    lb[m] = np.where(folia, CSF, np.where(core[m] < 0, CB_WM, CB_GM))
    bs = sp.box((-16, -44, -62), (16, -4, -2))
    stem = _field(sp, bs, lambda X, Y, Z: _tube(X, Y, Z, [(0, -14, -4), (0, -18, -18), (0, -22, -32), (0, -27, -46),
                                                          (0, -30, -62), (0, -32, -80)], [9, 10, 11.5, 8, 6, 5.5], n_sub=2))
    lab[bs][(stem < 0) & brain[bs]] = STEM
    b4 = sp.box((-8, -44, -44), (8, -32, -26))
    X, Y, Z = sp.coords(b4)
    lab[b4][(_quad(X, Y, Z, (0, -38, -35), (5.5, 3.5, 7)) < 0) & brain[b4]] = VENT

    # ---- deep grey nuclei, hippocampi, lateral and third ventricles ----
    bd = sp.box((-42, -62, -32), (42, 38, 28))
    vs = P["vent"] * A["vent"]
    hs = P["hippo"] * A["hippo"]
    dd = P["deep"]
    asym = P["vent_asym"]
    kz = F32(1 / 1.25)                                 # lateral ventricles: taller than wide
    vpts = [(12, 30, -2), (11, 24, 2), (8, 14, 7), (7, 2, 12), (8, -12, 14), (12, -24, 12), (20, -34, 5),
            (20, -46, 4), (16, -56, 5)]
    vr = np.array([3.0, 5.0, 5.5, 5.0, 5.0, 5.5, 7.0, 4.5, 2.0])
    tr = np.array([5.0, 3.5, 2.6, 1.8]) * (1 + 0.35 * (vs - 1)) * A["horn"]

    def coarse_deep(X, Y, Z):
        AXc = np.abs(X)
        side = np.where(X > 0, F32(1 + asym), F32(1 - asym))
        d_v = _tube(AXc, Y, Z * kz, [(x, y, z * kz) for x, y, z in vpts], vr * vs) / side
        d_t = _tube(AXc, Y, Z, [(20, -34, 6), (27, -30, -6), (30, -16, -16), (29, -2, -22)], tr) / side
        d_h = _tube(AXc, Y, Z, [(24, 0, -22), (26, -14, -17), (23, -28, -9), (16, -36, 0)],
                    np.array([5.5, 5.0, 3.5, 2.0]) * hs, n_sub=2)
        nuc = [_quad(AXc, Y, Z, np.add(c, o), s) for c, s, o in (
            ((13.5, 13, 5), (4.5, 9, 8), dd[0]), ((13.5, -6, 14), (3, 11, 3.5), dd[0]),   # caudate head, body
            ((25, 4, -2), (5, 13, 9), dd[1]), ((18.5, 3, -3), (3.5, 7, 5.5), dd[1]),      # putamen, pallidum
            ((10, -15, 4), (7.5, 13, 8), dd[2]))]                                          # thalamus
        return (np.minimum(d_v, d_t), d_h, np.minimum(nuc[0], nuc[1]), nuc[2], nuc[3], nuc[4])

    d_vent, d_h, q_caud, q_put, q_pal, q_thal = _field(sp, bd, coarse_deep)
    X, Y, Z = sp.coords(bd)
    AX = np.abs(X)
    ld = lab[bd]
    bb_ = brain[bd]
    ld[(d_vent < 0) & (AX > 1.0) & bb_] = VENT
    ld[(q_caud < 0) & bb_] = STRIATUM
    ld[(q_put < 0) & bb_] = STRIATUM
    ld[(q_pal < 0) & bb_] = PALLIDUM
    ld[(q_thal < 0) & bb_] = THALAMUS
    ld[(d_h < 0) & bb_] = HIPPO                    # the hippocampus bulges into the ventricle
    w3 = 1.4 * (1 + 0.8 * (vs - 1))                   # third ventricle between the thalami
    ld[(AX < w3) & (_quad(X, Y, Z, (0, -8, -2), (w3 + 1, 13, 10)) < 0) & bb_] = VENT
    aux.update(box_deep=bd, d_vent=d_vent)
    return aux


def anatomy(P, stage=0):
    """Label map (uint8, SHAPE) of subject P at atrophy stage 0 (healthy) .. 3, its brain mask
    (bool) and auxiliary fields for the anomaly generators."""
    lab, brain, aux = head(P)
    paint_brain(P, lab, brain, aux, stage)
    return lab, brain, aux


# =================================================================================================
# Anomalies
# =================================================================================================
def _sample_voxels(mask, rng, n):
    idx = np.flatnonzero(mask)
    if len(idx) == 0:
        return np.zeros((0, 3), int)
    return np.stack(np.unravel_index(rng.choice(idx, size=n, replace=len(idx) < n), mask.shape), -1)


def add_lesions(lab, brain, aux, rng, group="ms_lesion"):
    """MS-like ovoid white-matter lesions, 70% periventricular with the long axis pointing away from
    the ventricle wall (Dawson's fingers), the rest in deep/juxtacortical white matter. The case's
    total load is drawn first (LESION_LOAD[group]), then the number of lesions (growing with the
    load) and lognormal sizes that share it; lesions are clipped to white matter, so the recorded
    volume (lesion_volume_ml) is what is painted."""
    sp, bd, d_vent = aux["space"], aux["box_deep"], aux["d_vent"]
    cfg = LESION_LOAD[group]
    load = float(np.clip(cfg["median_ml"] * np.exp(rng.normal(0, cfg["log_sd"])), cfg["lo"], cfg["hi"]))
    n = int(np.clip(round(cfg["n_min"] + 2.5 * load ** 0.8 + rng.normal(0, 1.5)), cfg["n_min"], cfg["n_max"]))
    wv = np.exp(rng.normal(0, 0.9, n))
    vols = 1.6 * 1000 * load * wv / wv.sum()         # mm^3 each; +60% for what white matter clips
    wm = lab == WM
    peri = np.zeros(SHAPE, bool)
    peri[bd] = (d_vent > 1.0) & (d_vent < 9.0)
    peri &= wm
    n_peri = int(round(0.7 * n))
    centers = np.concatenate([_sample_voxels(peri, rng, n_peri), _sample_voxels(wm & ~peri, rng, n - n_peri)])
    gx, gy, gz = np.gradient(np.where(np.isfinite(d_vent), d_vent, 0))
    out = np.zeros(SHAPE, bool)
    for i, c in enumerate(centers):
        elong = rng.uniform(1.3, 2.6)
        short = float(np.clip((3 * vols[i] / (4 * np.pi * elong)) ** (1 / 3), 1.5, 8.0))
        long_ax = min(elong * short, 16.0)
        if i < n_peri:
            j = tuple(int(c[q] - bd[q].start) for q in range(3))
            d = np.array([gx[j], gy[j], gz[j]], float)
            d = d / (np.linalg.norm(d) + 1e-6)
        else:
            d = rng.standard_normal(3)
            d /= np.linalg.norm(d)
        ch = sp.to_head(c)
        r = int(np.ceil(long_ax / VOXEL_MM / min(sp.Minv.diagonal().min(), 1.0))) + 2
        sl = tuple(slice(max(0, c[q] - r), min(SHAPE[q], c[q] + r + 1)) for q in range(3))
        X, Y, Z = sp.coords(sl)
        dx, dy, dz = X - F32(ch[0]), Y - F32(ch[1]), Z - F32(ch[2])
        along = dx * F32(d[0]) + dy * F32(d[1]) + dz * F32(d[2])
        perp2 = dx * dx + dy * dy + dz * dz - along * along
        m = (along / long_ax) ** 2 + perp2 / short ** 2 < 1
        out[sl] |= m
    out &= wm
    if not out.any():                                  # never an empty mask (practically unreachable)
        c = _sample_voxels(wm, rng, 1)[0]
        out[tuple(slice(q, q + 2) for q in c)] = True
        out &= wm
    lab[out] = LESION
    vol = float(out.sum() * VOXEL_MM ** 3 / 1000)
    n_vis = int(ndi.label(out)[1])
    return out, dict(n_lesions=int(len(centers)), n_components=n_vis, lesion_load_target_ml=round(load, 2),
                     lesion_volume_ml=round(vol, 3))


def _warp_labels(lab, brain, sl, src):
    """Labels of `lab` resampled (nearest) at voxel coordinates src (3, ...) inside box sl; only
    brain-mask voxels change and anything that would come from outside the brain becomes CSF."""
    idx = [np.clip(np.rint(src[q]).astype(np.int32), 0, SHAPE[q] - 1) for q in range(3)]
    new = lab[idx[0], idx[1], idx[2]]
    new = np.where(brain[idx[0], idx[1], idx[2]], new, CSF).astype(np.uint8)
    sub = lab[sl]
    b = brain[sl]
    sub[b] = new[b]


def _radial_push(lab, brain, aux, c_head, R, a, L):
    """Mass effect: tissue around c is pushed outward; a voxel at distance rho samples the healthy
    anatomy at rho0 = rho - a R exp(-(rho - R)/L) (monotone, so nothing folds over)."""
    sp = aux["space"]
    reach = R + 3 * L
    sl = sp.box(np.array(c_head) - reach, np.array(c_head) + reach)
    X, Y, Z = sp.coords(sl)
    dx, dy, dz = X - F32(c_head[0]), Y - F32(c_head[1]), Z - F32(c_head[2])
    rho = np.sqrt(dx * dx + dy * dy + dz * dz) + F32(1e-3)
    rho0 = np.maximum(rho - a * R * np.exp(-np.maximum(rho - R, 0) / L), 0)
    f = rho0 / rho
    hsrc = np.stack([F32(c_head[0]) + dx * f, F32(c_head[1]) + dy * f, F32(c_head[2]) + dz * f], -1)
    src = np.moveaxis(sp.to_voxel(hsrc), -1, 0)
    _warp_labels(lab, brain, sl, src)
    return sl


def _lowfreq_sphere(rng, k=5):
    """A random smooth function of direction: sum of k cosines of u . w_j (returns a callable)."""
    W = rng.standard_normal((k, 3)) * 1.6
    ph = rng.uniform(0, 2 * np.pi, k)
    amp = rng.uniform(0.5, 1.0, k) / k
    return lambda ux, uy, uz: sum(F32(amp[j]) * np.cos(F32(W[j, 0]) * ux + F32(W[j, 1]) * uy
                                                         + F32(W[j, 2]) * uz + F32(ph[j])) for j in range(k))


def add_tumor(lab, brain, aux, rng):
    """A glioma-like mass: irregular solid rim, necrotic core in ~60% of cases, vasogenic edema that
    spreads through white matter only (finger-like), and mass effect (radial push)."""
    sp = aux["space"]
    R = rng.uniform(9, 20)
    # centre: cerebral white matter, away from the surface
    cand = (lab == WM) & (aux["cav"] > R + 10)
    cand[aux["box_deep"]] &= aux["d_vent"] > 0.8 * R    # not inside a ventricle
    c = sp.to_head(_sample_voxels(cand, rng, 1)[0]) if cand.any() else np.array([25.0, 10.0, 20.0])
    sl_push = _radial_push(lab, brain, aux, c, R, a=rng.uniform(0.45, 0.7), L=rng.uniform(0.8, 1.2) * R)
    E = R * rng.uniform(0.6, 1.3)
    reach = R * 1.4 + E * 1.5
    sl = sp.box(c - reach, c + reach)
    Xs, Ys, Zs = sp.coords(sl)
    dx, dy, dz = Xs - F32(c[0]), Ys - F32(c[1]), Zs - F32(c[2])
    rho = np.sqrt(dx * dx + dy * dy + dz * dz) + F32(1e-3)
    m = _lowfreq_sphere(rng)(dx / rho, dy / rho, dz / rho)
    r = rho / (R * (1 + 0.35 * m))                     # < 1 inside the irregular mass
    sub = lab[sl]
    b = brain[sl]
    wm_like = np.isin(sub, (WM, STRIATUM, PALLIDUM, THALAMUS)) & b
    edema = wm_like & (rho < R + E * (1 + 0.5 * _lowfreq_sphere(rng)(dx / rho, dy / rho, dz / rho))) & (r >= 1)
    necrotic = rng.random() < 0.6
    rn = rng.uniform(0.35, 0.65) if necrotic else 0.0
    core = (r < 1) & b
    sub[edema] = EDEMA
    sub[core] = TUMOR
    sub[(r < rn) & b] = NECROSIS
    mask = np.zeros(SHAPE, bool)
    mask[sl] = edema | core
    return mask, dict(radius_mm=round(float(R), 1), edema_mm=round(float(E), 1), necrotic=bool(necrotic),
                      center_head_mm=[round(float(q), 1) for q in c],
                      tumor_volume_ml=round(float(core.sum() * VOXEL_MM ** 3 / 1000), 2),
                      edema_volume_ml=round(float(edema.sum() * VOXEL_MM ** 3 / 1000), 2))


def add_hemorrhage(lab, brain, aux, rng, subtype):
    """Acute blood (CT 55-85 HU). intraparenchymal: an irregular ovoid clot with a thin hypodense
    edema rim; subdural: a crescent along the inner skull of one convexity (thin, wide, concave
    inner border); epidural: a biconvex lens (short, thick). All with mass effect."""
    sp = aux["space"]
    cav = aux["cav"]
    info = dict(subtype=subtype)
    if subtype == "intraparenchymal":
        R = rng.uniform(6, 16)
        deep = rng.random() < 0.5                      # basal ganglia / thalamus or lobar
        tissue = np.isin(lab, (STRIATUM, THALAMUS, PALLIDUM)) if deep else (lab == WM) & (cav > R + 8)
        cand = tissue & (cav > R + 4)
        c = sp.to_head(_sample_voxels(cand if cand.any() else lab == WM, rng, 1)[0])
        _radial_push(lab, brain, aux, c, R, a=0.5, L=R)
        reach = R * 1.5 + 6
        sl = sp.box(c - reach, c + reach)
        X, Y, Z = sp.coords(sl)
        dx, dy, dz = X - F32(c[0]), Y - F32(c[1]), Z - F32(c[2])
        rho = np.sqrt(dx * dx + dy * dy + dz * dz) + F32(1e-3)
        ax = rng.uniform(0.7, 1.3, 3)
        r = np.sqrt((dx / ax[0]) ** 2 + (dy / ax[1]) ** 2 + (dz / ax[2]) ** 2) / (
            R * (1 + 0.25 * _lowfreq_sphere(rng)(dx / rho, dy / rho, dz / rho)))
        sub = lab[sl]
        b = brain[sl]
        rim = (r < 1 + 3.5 / R) & (r >= 1) & b & np.isin(sub, BRAIN_TISSUE)
        blood = (r < 1) & b
        sub[rim] = PH_EDEMA
        sub[blood] = BLOOD
        info.update(location="deep" if deep else "lobar", radius_mm=round(float(R), 1))
    else:
        # direction of the centre of the collection (upper convexity, one side), angular extent
        side = rng.choice([-1, 1])
        az = rng.uniform(-0.9, 0.9)                    # around the head, 0 = lateral
        el = rng.uniform(0.05, 0.7)                    # elevation
        u0 = np.array([side * np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])
        if subtype == "subdural":
            ang_max, t_max = rng.uniform(0.75, 1.1), rng.uniform(6, 15)
        else:
            ang_max, t_max = rng.uniform(0.35, 0.55), rng.uniform(10, 20)
        o = np.array([0.0, -5.0, 5.0])                 # centre for directions
        X, Y, Z = sp.coords()
        dx, dy, dz = X - F32(o[0]), Y - F32(o[1]), Z - F32(o[2])
        rho = np.sqrt(dx * dx + dy * dy + dz * dz) + F32(1e-3)
        cosang = (dx * F32(u0[0]) + dy * F32(u0[1]) + dz * F32(u0[2])) / rho
        ang = np.arccos(np.clip(cosang, -1, 1))
        q = np.clip(ang / ang_max, 0, 1)
        if subtype == "subdural":                      # flat, long, tapering: crescent
            t = t_max * (1 - q ** 4) ** 1.2
        else:                                          # elliptic profile: biconvex lens
            t = t_max * np.sqrt(1 - q ** 2)
        t = np.where(ang < ang_max, t, 0).astype(F32)
        same_side = (X * F32(side) > 1.5)              # falx: never crosses the midline
        t = np.where(same_side & (Z > -12), t, 0)       # supratentorial convexity only
        # mass effect: depth d below the inner table samples the healthy anatomy at depth d'
        D = 45.0
        d = cav
        sl = tuple(slice(None) for _ in range(3))
        region = (t > 0) & (d > 0) & (d < D)
        dprime = np.where(region, (d - t) * D / (D - t), d)
        f = (rho + (d - dprime)) / rho
        src_h = [F32(o[0]) + dx * f, F32(o[1]) + dy * f, F32(o[2]) + dz * f]
        src = np.moveaxis(sp.to_voxel(np.stack(src_h, -1)), -1, 0)
        _warp_labels(lab, brain, sl, src)
        blood = (d > 0) & (d < t) & brain
        lab[blood] = BLOOD
        info.update(side="right" if side > 0 else "left", max_thickness_mm=round(float(t_max), 1),
                    angular_extent_deg=round(float(np.degrees(ang_max)), 1))
        mask = blood
        info["blood_volume_ml"] = round(float(mask.sum() * VOXEL_MM ** 3 / 1000), 2)
        return mask, info
    mask = lab == BLOOD
    info["blood_volume_ml"] = round(float(mask.sum() * VOXEL_MM ** 3 / 1000), 2)
    return mask, info


# =================================================================================================
# Rendering: labels -> image (intensities, partial volume, bias field, noise)
# =================================================================================================
def _intensity_table(contrast, group, rng):
    t = np.array(INTENSITY[contrast], F32)
    if contrast != "ct":
        gain, gamma = rng.uniform(0.85, 1.15), rng.uniform(0.85, 1.15)
        ref = F32(0.5 * (t[GM] + t[WM]))
        t[1:] = ref * (t[1:] / ref) ** F32(gamma)                      # scanner contrast (power law)
        t[1:] *= F32(gain)                                             # scanner gain
        t[1:] *= (1 + rng.normal(0, 0.035, len(t) - 1)).astype(F32)     # per-tissue variation
        if group in LESION_INTENSITY:
            t[LESION] = LESION_INTENSITY[group][contrast] * t[WM] * F32(rng.uniform(0.94, 1.06))
        else:
            t[LESION] = t[WM]
    else:
        t[CSF:] += rng.normal(0, 1.5, len(t) - CSF).astype(F32)       # HU offsets
        t[BLOOD] = rng.uniform(55, 85)
        t[BONE] = rng.uniform(1150, 1600)
        t[MARROW] = rng.uniform(450, 750)
        gain = gamma = 1.0
    return t, gain, gamma


def _blur(img):
    """Partial-volume blur: separable [1/4, 1/2, 1/4] kernel along each axis (sigma ~0.7 voxel)."""
    for ax in range(3):
        img = ndi.correlate1d(img, np.array([0.25, 0.5, 0.25], F32), axis=ax, mode="nearest")
    return img


def render(lab, contrast, group, rng):
    """Image (int16) of a label map in a contrast: tissue means, partial volume (blur), smooth
    multiplicative bias field (MRI), noise (MRI: |signal + Gaussian|, which is Rician-like in dark
    regions; CT: Gaussian); background exactly 0 (MRI) or -1000 HU (CT)."""
    t, gain, gamma = _intensity_table(contrast, group, rng)
    head = lab != BG
    if contrast == "ct":
        t0 = t.copy()
        t0[BG] = 0                                      # blur against water, not air, inside the head
        img = _blur(t0[lab])
        sigma = rng.uniform(3.0, 5.0)
        img[head] += rng.standard_normal(int(head.sum()), dtype=F32) * F32(sigma)
        img[~head] = -1000
        return np.clip(np.rint(img), -1024, 3071).astype(np.int16), dict(noise=round(float(sigma), 2))
    img = _blur(t[lab])
    # bias field: exp of a random quadratic polynomial in world coordinates, with a per-scan
    # strength (coefficient SD 0.03..0.12: from a nearly flat field to about +-25 % over the head,
    # the range of uncorrected 1.5-3 T head-coil scans), applied as factors on planes
    x, y, z = (w / 90.0 for w in WORLD)
    c = (rng.normal(0, 1, 9) * rng.uniform(0.03, 0.12)).astype(F32)
    bias = np.exp(c[0] * x + c[3] * x * x)[:, None, None] * np.exp(c[1] * y + c[4] * y * y + c[6] * x[:, None] * y[None, :])[:, :, None]
    bias = bias * np.exp(c[2] * z + c[5] * z * z + c[7] * y[:, None] * z[None, :])[None, :, :]
    bias *= np.exp(c[8] * x[:, None] * z[None, :])[:, None, :]
    img *= bias
    bb = bias[lab != BG]
    bias_range = (round(float(bb.min()), 3), round(float(bb.max()), 3))
    sigma = F32(rng.uniform(0.012, 0.028) * t[WM])
    v = img[head]
    v += rng.standard_normal(v.shape, dtype=F32) * sigma
    img[head] = np.abs(v)
    img[~head] = 0
    return np.clip(np.rint(img), 0, 32767).astype(np.int16), dict(noise=round(float(sigma), 1), bias_range=bias_range,
                                                                   gain=round(float(gain), 3), contrast_gamma=round(float(gamma), 3))


# =================================================================================================
# One case
# =================================================================================================
def case_seed(seed, group, index):
    return np.random.SeedSequence(entropy=int(seed), spawn_key=(_GROUP_ID[group], int(index)))


def make_case(contrast, group, index, seed=0, return_labels=False):
    """Generate one case. group in train|val|normal|<anomaly group>. Returns a dict with image
    (int16), brain (uint8), mask (uint8), meta (dict) and, if asked, labels (uint8 label map)."""
    if contrast not in GROUPS:
        raise ValueError(f"contrast must be one of {CONTRASTS}, got {contrast!r}")
    if group not in _GROUP_ID or (group not in ("train", "val", "normal") and group not in GROUPS[contrast]):
        raise ValueError(f"group {group!r} is not a {contrast} group ({['normal'] + GROUPS[contrast]})")
    ss = case_seed(seed, group, index)
    rng_anat, rng_anom, _ = (np.random.default_rng(s) for s in ss.spawn(3))
    rng_img = np.random.default_rng(np.random.SeedSequence(entropy=int(seed),
                                                           spawn_key=(_GROUP_ID[group], int(index), 100 + _CONTRAST_ID[contrast])))
    P = sample_subject(rng_anat)
    meta = dict(group=group, contrast=contrast, head_scale=round(float(P["scale"]), 3),
                ventricle_scale=round(float(P["vent"]), 3), age_z=round(float(P["age"]), 3),
                pose_deg=[round(float(np.degrees(q)), 2) for q in P["angles"]],
                shift_mm=[round(float(q), 2) for q in P["shift"]])
    stage = int(group[-1]) if group.startswith("atrophy_") else 0
    lab, brain, aux = head(P)
    lab_head = lab.copy() if stage else None
    paint_brain(P, lab, brain, aux, 0)
    mask = np.zeros(SHAPE, bool)
    if stage:                         # the same subject's healthy anatomy vs the atrophied one
        paint_brain(P, lab_head, brain, aux, stage)
        mask = (lab_head != lab) & brain
        lab = lab_head
        meta.update(stage=stage, atrophy={k: round(v, 4) for k, v in atrophy_params(P, stage).items()}, changed_ml=round(float(mask.sum() * VOXEL_MM ** 3 / 1000), 1))
    elif group in LESION_GROUPS:
        mask, info = add_lesions(lab, brain, aux, rng_anom, group)
        meta.update(info)
    elif group == "tumor":
        mask, info = add_tumor(lab, brain, aux, rng_anom)
        meta.update(info)
    elif group == "hemorrhage":
        mask, info = add_hemorrhage(lab, brain, aux, rng_anom, HEMORRHAGE_SUBTYPES[int(index) % 3])
        meta.update(info)
    mask &= brain
    if group not in ("train", "val", "normal"):
        meta["anomaly_volume_ml"] = round(float(mask.sum() * VOXEL_MM ** 3 / 1000), 3)
    img, info = render(lab, contrast, group, rng_img)
    meta.update(info)
    out = dict(image=img, brain=brain.astype(np.uint8), mask=mask.astype(np.uint8), meta=meta)
    if return_labels:
        out["labels"] = lab
    return out


# =================================================================================================
# The dataset on disk: ensure_phantom (safe when several processes ask at once)
# =================================================================================================
def _jobs(contrast, size):
    n = SIZES[size]
    jobs = [("train", "train", i) for i in range(n["train"])]
    jobs += [("val", "val", i) for i in range(n["val"])]
    jobs += [("normal", "test/normal", i) for i in range(n["normal"])]
    for g in GROUPS[contrast]:
        jobs += [(g, f"test/{g}", i) for i in range(n["per_group"])]
    return jobs


def manifest_for(contrast, size, seed):
    n = SIZES[size]
    counts = {"train": n["train"], "val": n["val"], "test/normal": n["normal"]}
    counts.update({f"test/{g}": n["per_group"] for g in GROUPS[contrast]})
    return json.loads(json.dumps(dict(generator="data/phantom.py", version=VERSION, contrast=contrast, size=size,
                                      seed=int(seed), groups=GROUPS[contrast], counts=counts,
                                      affine=AFFINE.tolist(), params=PARAMS)))


def _save(arr, path):
    img = nib.Nifti1Image(arr, AFFINE)
    img.header.set_xyzt_units("mm")
    img.set_qform(AFFINE, 1)
    img.set_sform(AFFINE, 1)
    nib.save(img, str(path))


def _write_case(job):
    contrast, seed, group, folder, index, outdir = job
    name = f"{group}_{index:03d}"
    c = make_case(contrast, group, index, seed)
    d = Path(outdir) / folder
    _save(c["image"], d / f"{name}.nii.gz")
    _save(c["brain"], d / f"{name}_brainmask.nii.gz")
    if folder.startswith("test/"):
        _save(c["mask"], d / f"{name}_mask.nii.gz")
    meta = dict(c["meta"], subject=f"{group}_{index:03d}")
    return f"{folder}/{name}.nii.gz", meta


def _is_ready(variant, manifest):
    try:
        if json.loads((variant / "manifest.json").read_text()) != manifest:
            return False
        for folder, n in manifest["counts"].items():
            if sum(1 for p in os.scandir(variant / folder) if p.name.endswith("_brainmask.nii.gz")) != n:
                return False
        return True
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _lock(path):
    """An exclusive lock on a file (fcntl where available; elsewhere no lock, and the rename below
    still keeps a half-written folder from ever being seen)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _n_workers(n_jobs):
    env = os.environ.get("PHANTOM_WORKERS")
    if env:
        return max(1, int(env))
    return max(1, min(2, os.cpu_count() or 1, n_jobs // 8))


def ensure_phantom(root="data/synthetic", contrast="t1", size="full", seed=0, workers=None, verbose=True):
    """Return root/<contrast>_<size>/, generating it first if it is missing or its manifest differs
    from this request (a relative root is taken relative to the repository). Safe when several
    processes ask at once: one builds into a temporary folder beside it and renames it into place
    under a lock; the others wait and use it."""
    if contrast not in GROUPS:
        raise ValueError(f"contrast must be one of {', '.join(CONTRASTS)}, got {contrast!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    root = Path(root)
    if not root.is_absolute():
        root = REPO / root
    variant = root / f"{contrast}_{size}"
    manifest = manifest_for(contrast, size, seed)
    if _is_ready(variant, manifest):
        return variant
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / f".{variant.name}.lock"):
        if _is_ready(variant, manifest):                 # built by someone else meanwhile
            return variant
        t0 = time.time()
        tmp = Path(tempfile.mkdtemp(prefix=f".{variant.name}.tmp-", dir=root))
        try:
            for folder in manifest["counts"]:
                (tmp / folder).mkdir(parents=True, exist_ok=True)
            jobs = [(contrast, seed, g, f, i, str(tmp)) for g, f, i in _jobs(contrast, size)]
            nw = workers or _n_workers(len(jobs))
            if verbose:
                print(f"phantom: generating {len(jobs)} {contrast} volumes into {variant} ({nw} worker(s))",
                      file=sys.stderr, flush=True)
            _noise_bank()
            if nw > 1:
                method = "fork" if sys.platform.startswith("linux") else "spawn"
                with mp.get_context(method).Pool(nw) as pool:
                    results = pool.map(_write_case, jobs, chunksize=max(1, len(jobs) // (nw * 8)))
            else:
                results = [_write_case(j) for j in jobs]
            (tmp / "meta.json").write_text(json.dumps(dict(sorted(results)), indent=1))
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            if variant.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{variant.name}.old-", dir=root))
                os.rename(variant, old / "x")
                shutil.rmtree(old, ignore_errors=True)
            os.rename(tmp, variant)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if verbose:
            print(f"phantom: {variant} ready in {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
    return variant


# =================================================================================================
# Preview montage and command line
# =================================================================================================
def preview(contrasts, path, seed=0, index=0):
    """PNG montage: one axial slice per group (rows = contrasts), the anomaly mask in translucent
    red. Normal and atrophy cases show the slice with the largest lateral ventricles, the others
    the slice with the largest anomaly."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = max(len(GROUPS[c]) for c in contrasts) + 1
    fig, axes = plt.subplots(len(contrasts), cols, figsize=(2.4 * cols, 2.9 * len(contrasts)), squeeze=False)
    red = np.zeros((1, 1, 4))
    red[..., 0], red[..., 3] = 1.0, 0.45
    for r, con in enumerate(contrasts):
        groups = ["normal"] + GROUPS[con]
        for k in range(cols):
            ax = axes[r, k]
            ax.axis("off")
            if k >= len(groups):
                continue
            g = groups[k]
            c = make_case(con, g, index, seed, return_labels=True)
            img, m = c["image"].astype(np.float32), c["mask"]
            if m.any() and not g.startswith("atrophy"):
                z = int(np.argmax(m.sum((0, 1))))
            else:
                z = int(np.argmax((c["labels"] == VENT).sum((0, 1))))
            lo, hi = (-20, 100) if con == "ct" else (0, np.percentile(img[c["brain"] > 0], 99.5))
            ax.imshow(img[:, :, z].T, cmap="gray", origin="lower", vmin=lo, vmax=hi, interpolation="nearest")
            if m[:, :, z].any():
                ax.imshow(np.where(m[:, :, z].T[..., None] > 0, red, 0), origin="lower", interpolation="nearest")
            meta = c["meta"]
            extra = meta.get("subtype", "")
            if g.startswith("atrophy"):
                extra = f"changed {meta['changed_ml']} ml"
            elif "lesion_volume_ml" in meta:
                extra = f"{meta['n_lesions']} lesions"
            ax.set_title(f"{con} {g}\n{extra} z={z}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _auroc(neg, pos):
    neg, pos = np.asarray(neg, float), np.asarray(pos, float)
    return float(((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])).mean())


def _dice(a, b):
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def realism(n_healthy=16, n_per_group=16, seed=0, contrast="t1", mod=None):
    """The realism numbers of the phantom, from generated cases (labels, masks, meta): healthy
    CSF/ICV mean and SD; per atrophy stage the AUROC of CSF/ICV alone and of hippocampal volume/ICV
    alone against the healthy test subjects; pose, head size, bias-field and gain ranges; lesion
    (and tumour) volume quantiles; pairwise brain-mask Dice between healthy subjects. `mod` is the
    phantom module to measure (default this one; another version of data/phantom.py works too)."""
    mod = mod or sys.modules[__name__]
    groups = mod.GROUPS[contrast]
    rows = {}

    def feats(g, i):
        c = mod.make_case(contrast, g, i, seed, return_labels=True)
        lab, brain = c["labels"], c["brain"] > 0
        icv = float(brain.sum())
        P = mod.sample_subject(np.random.default_rng(mod.case_seed(seed, g, i).spawn(3)[0]))
        return dict(csf=float(np.isin(lab[brain], (mod.CSF, mod.VENT)).mean()),
                    hippo=float((lab == mod.HIPPO).sum() / icv), icv_ml=icv * VOXEL_MM ** 3 / 1000,
                    brain=brain, meta=c["meta"], mask_ml=float(c["mask"].sum() * VOXEL_MM ** 3 / 1000),
                    angles=np.degrees(P["angles"]), shift=np.asarray(P["shift"], float), scale=float(P["scale"]))

    healthy = [feats("normal", i) for i in range(n_healthy)]
    for g in groups:
        rows[g] = [feats(g, i) for i in range(n_per_group)]
    csf0 = np.array([h["csf"] for h in healthy])
    hip0 = np.array([h["hippo"] for h in healthy])
    out = dict(version=mod.VERSION, contrast=contrast, n_healthy=n_healthy, n_per_group=n_per_group,
               healthy_csf_icv_mean=float(csf0.mean()), healthy_csf_icv_sd=float(csf0.std(ddof=1)),
               healthy_icv_ml_mean=float(np.mean([h["icv_ml"] for h in healthy])),
               healthy_icv_ml_sd=float(np.std([h["icv_ml"] for h in healthy], ddof=1)), stages={})
    for g in groups:
        if g.startswith("atrophy_"):
            csf = [r["csf"] for r in rows[g]]
            hip = [r["hippo"] for r in rows[g]]
            out["stages"][g] = dict(csf_icv_mean=float(np.mean(csf)), auroc_csf_icv=_auroc(csf0, csf),
                                    d_csf_icv=float((np.mean(csf) - csf0.mean()) / csf0.std(ddof=1)),
                                    auroc_hippo_icv=_auroc(-hip0, -np.array(hip)),
                                    hippo_rel=float(np.mean(hip) / hip0.mean()))
    allc = healthy + [r for g in groups for r in rows[g]]
    ang = np.array([c["angles"] for c in allc])
    sh = np.array([c["shift"] for c in allc])
    out["pose"] = dict(rot_deg_min=ang.min(0).round(1).tolist(), rot_deg_max=ang.max(0).round(1).tolist(),
                       shift_mm_sd=sh.std(0).round(1).tolist(), shift_mm_range=(sh.max(0) - sh.min(0)).round(1).tolist(),
                       head_scale_range=[round(min(c["scale"] for c in allc), 3), round(max(c["scale"] for c in allc), 3)])
    br = [c["meta"].get("bias_range") for c in allc]
    if all(br):
        out["bias"] = dict(min_q05=float(np.percentile([b[0] for b in br], 5)), max_q95=float(np.percentile([b[1] for b in br], 95)),
                           ratio_median=float(np.median([b[1] / b[0] for b in br])))
    gains = [c["meta"].get("gain") for c in allc]
    if all(g is not None for g in gains):
        out["gain_range"] = [round(min(gains), 3), round(max(gains), 3)]
    out["lesion_ml"] = {}
    for g in groups:
        if g.startswith("atrophy_"):
            continue
        v = [r["meta"].get("lesion_volume_ml", r["mask_ml"]) for r in rows[g]]
        out["lesion_ml"][g] = np.percentile(v, [5, 25, 50, 75, 95]).round(2).tolist()
        n = [r["meta"]["n_lesions"] for r in rows[g] if "n_lesions" in r["meta"]]
        if n:
            out["lesion_ml"][g + " (count)"] = np.percentile(n, [5, 25, 50, 75, 95]).round(1).tolist()
    d = [_dice(healthy[i]["brain"], healthy[j]["brain"]) for i in range(n_healthy) for j in range(i + 1, n_healthy)]
    out["healthy_brain_dice"] = dict(mean=float(np.mean(d)), min=float(np.min(d)), max=float(np.max(d)))
    return out


def format_realism(r):
    L_ = [f"phantom {r['version']} ({r['contrast']}, {r['n_healthy']} healthy test subjects, {r['n_per_group']} per group)",
          f"  healthy CSF/ICV          {r['healthy_csf_icv_mean']:.3f} ± {r['healthy_csf_icv_sd']:.3f}   "
          f"(ICV {r['healthy_icv_ml_mean']:.0f} ± {r['healthy_icv_ml_sd']:.0f} ml)"]
    for g, s in r["stages"].items():
        L_.append(f"  {g}: CSF/ICV {s['csf_icv_mean']:.3f} ({s['d_csf_icv']:+.2f} SD)  AUROC CSF/ICV {s['auroc_csf_icv']:.2f}"
                  f"  AUROC hippocampus/ICV {s['auroc_hippo_icv']:.2f}  hippocampus x{s['hippo_rel']:.2f}")
    p = r["pose"]
    L_.append(f"  rotation (deg, x/y/z)    {p['rot_deg_min']} .. {p['rot_deg_max']}")
    L_.append(f"  translation (mm, x/y/z)  SD {p['shift_mm_sd']}, range {p['shift_mm_range']}")
    L_.append(f"  head scale               {p['head_scale_range'][0]} .. {p['head_scale_range'][1]}")
    if "bias" in r:
        b = r["bias"]
        L_.append(f"  bias field over the head 5% min {b['min_q05']:.2f}, 95% max {b['max_q95']:.2f}, median max/min {b['ratio_median']:.2f}")
    else:
        L_.append("  bias field               (not recorded by this version)")
    if "gain_range" in r:
        L_.append(f"  scanner gain             {r['gain_range'][0]} .. {r['gain_range'][1]}")
    for g, q in r["lesion_ml"].items():
        unit = "" if g.endswith("(count)") else " ml"
        L_.append(f"  {g:<24} q05/25/50/75/95 {q}{unit}")
    d = r["healthy_brain_dice"]
    L_.append(f"  brain-mask Dice between healthy subjects  mean {d['mean']:.3f} (min {d['min']:.3f}, max {d['max']:.3f})")
    return "\n".join(L_)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Generate or preview the procedural brain phantom.")
    ap.add_argument("--contrast", default="t1", choices=list(CONTRASTS) + ["all"])
    ap.add_argument("--size", default="full", choices=list(SIZES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--root", default=None, help="output root (default data/synthetic in the repository)")
    ap.add_argument("--preview", default=None, help="write a PNG montage (one axial slice per group) and stop")
    ap.add_argument("--index", type=int, default=0, help="case index shown by --preview")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--report", action="store_true",
                    help="print the realism table (healthy spread, atrophy AUROCs, pose, bias, lesion volumes, "
                         "brain-mask Dice) and write a montage (--out) of one case per group in every contrast")
    ap.add_argument("--out", default="phantom_report.png", help="montage PNG of --report")
    ap.add_argument("--n", type=int, default=24, help="healthy subjects and cases per group measured by --report")
    args = ap.parse_args(argv)
    contrasts = list(CONTRASTS) if args.contrast == "all" else [args.contrast]
    if args.report:
        con = "t1" if args.contrast in ("all", "ct") else args.contrast
        r = realism(args.n, args.n, seed=args.seed, contrast=con)
        print(format_realism(r))
        preview(list(CONTRASTS), args.out, seed=args.seed, index=args.index)
        print(f"wrote {args.out}")
        return
    if args.preview:
        preview(contrasts, args.preview, seed=args.seed, index=args.index)
        print(f"wrote {args.preview}")
        return
    root = Path(args.root).resolve() if args.root else REPO / "data" / "synthetic"
    for con in contrasts:
        t = time.time()
        v = ensure_phantom(root, con, args.size, args.seed, workers=args.workers)
        mb = sum(p.stat().st_size for p in v.rglob("*") if p.is_file()) / 1e6
        print(f"{v}: {time.time() - t:.1f} s, {mb:.1f} MB")


if __name__ == "__main__":
    main()
