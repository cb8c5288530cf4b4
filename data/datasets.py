"""Loading: NIfTI files -> cases -> preprocessed, memory-mapped arrays. No paper code here.

  * `read_nifti`, `read_case`: one scan in canonical RAS orientation, with its anomaly and brain masks,
    validated (the contract's "Bad input": one `error:` line naming the file).
  * The dataset registry: `--data synthetic` (the phantom, data/phantom.py), `folder`
    (../shared/CONTRACT.md layout) and the public data sets (OASIS-3, IXI, BraTS, CT-ICH, MSLUB,
    ISBI 2015; ../shared/DATASETS.md, data/README.md), all split per subject.
  * `slice_stack`, `volume_stack`: the preprocessed axial slices / volumes of a list of cases in a
    memory-mapped cache (data/cache/), built once, case by case, so memory stays at one case.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import common as C
from common import REPO, fail, progress

# =================================================================================================
# 2. Loading
# =================================================================================================

DATA_README = "data/README.md"


# ==================================================================================================
# Intensities and geometry: CT window, MRI normalisation, crop, pad, resize
# ==================================================================================================

def ct_window(hu, lo=-20.0, hi=100.0):
    """CT window [lo, hi] HU -> [-1, 1] (values outside are clipped). Default: brain window L40/W120."""
    hu = np.asarray(hu, dtype=np.float32)
    return (np.clip((hu - lo) / (hi - lo), 0, 1) * 2 - 1).astype(np.float32)


# MRI intensities have no physical unit: every scan is scaled by one number of its own. That number must
# not be one that pathology moves, or a score partly detects a scan-wide brightness shift instead of the
# anomaly: the 1st/99th percentiles of all brain voxels (this repository's earlier rule) moved a tumour
# scan's healthy tissue by about 6 healthy SDs, because oedema raised the 99th percentile by 28%, and
# clipped 90% of FLAIR lesion voxels at exactly 1.
#   tissue median m: the median of the brain voxels within a factor of 2 of m (found by iteration from
#     the plain median). The factor-2 window leaves out CSF-dark voxels in T1/FLAIR and background;
#     pathology covers a minority of the tissue, so the median barely moves (a painted-in tumour with
#     oedema changes the other voxels by < 0.02 at their median, tests/test_common.py), unlike a tail
#     percentile, which the brightest or darkest few percent - often the anomaly - decide.
#   x = 2 * clip(I / (HEADROOM * m), 0, 1) - 1: background -1, the tissue median -1/3, and three times
#     it +1, so hyperintense anomalies (FLAIR lesions and oedema ~2x white matter, T2 CSF ~2.3x) keep
#     their contrast instead of being clipped.
# The papers' own preprocessing differs and is named in each script's deviations (AnoVAEGAN and RA:
# per-scan [0, 1] scaling; MADGAN: [-1, 1]; AnoGAN: OCT B-scans, no MRI).
MRI_HEADROOM = 3.0


def tissue_median(img, brain=None, window=2.0, iters=5):
    """The median m of the brain voxels within [m / window, m * window] (iterated from the median)."""
    img = np.asarray(img, dtype=np.float32)
    v = img[brain > 0] if brain is not None and np.any(brain) else img[img > img.min()]
    v = v[v > 0] if (v > 0).any() else v
    m = float(np.median(v))
    for _ in range(iters):
        sel = v[(v >= m / window) & (v <= m * window)]
        if not len(sel):
            break
        m = float(np.median(sel))
    return m


MRI_RULE = "tissue"       # the rule every MRI path uses (data/datasets.py keys its caches on it)


def normalize_mri(img, brain=None, rule=MRI_RULE, lo_pct=1.0, hi_pct=99.0):
    """MRI intensities -> [-1, 1]. rule "tissue" (default, see above): 2 clip(I / (3 m), 0, 1) - 1 with m
    the tissue median; rule "percentile" (the earlier rule, kept for comparison): the lo/hi percentiles
    of the brain voxels -> -1 / 1, clipped."""
    img = np.asarray(img, dtype=np.float32)
    if rule == "tissue":
        m = tissue_median(img, brain)
        if not m > 0:
            fail("an MRI volume has no positive intensity inside its brain mask; is it a CT scan? (--modality)")
        return (np.clip(img / (MRI_HEADROOM * m), 0, 1) * 2 - 1).astype(np.float32)
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


@dataclass
class Case:
    """One scan: an image file with its optional anomaly mask and brain mask."""
    id: str
    subject: str
    group: str            # 'train' | 'val' | 'normal' | <anomaly group>
    label: int            # 0 healthy, 1 anomalous
    image: str
    mask: str | None = None
    brainmask: str | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class Splits:
    train: list
    val: list
    test: list
    info: dict = field(default_factory=dict)


def read_nifti(path, what="image"):
    """Read a NIfTI file -> (float32 array (X, Y, Z) in canonical RAS orientation, spacing, affine).

    Validates what a user can get wrong: unreadable/corrupt file, not 3D, NaN/inf, empty (constant)."""
    import nibabel as nib
    path = str(path)
    try:
        img = nib.as_closest_canonical(nib.load(path))
        arr = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:  # noqa: BLE001 -- any reader failure is a bad file for the user
        fail(f"cannot read {what} {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
             f" (is it a valid NIfTI file?)")
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        fail(f"{what} {path} has shape {arr.shape}; expected a 3D volume")
    if not np.isfinite(arr).all():
        fail(f"{what} {path} contains NaN or infinite values; fix or remove the file")
    if what == "image" and float(arr.max()) == float(arr.min()):
        fail(f"{what} {path} is empty (all voxels equal {arr.max():g}); remove the file")
    spacing = tuple(float(s) for s in img.header.get_zooms()[:3])
    return arr, spacing, img.affine


def auto_brain_mask(img, kind="mri"):
    """Fallback brain mask when a dataset has none.

    MRI: foreground by Otsu threshold, largest component, holes filled (a head mask, not a skull strip).
    CT: a simple HU skull strip (documented deviation for CT-ICH): soft tissue 0..100 HU, opened,
    largest component, holes filled."""
    from scipy import ndimage as ndi
    if kind == "ct":
        m = (img > 0) & (img < 100)
        m = ndi.binary_opening(m, iterations=2)
    else:
        from skimage.filters import threshold_otsu
        m = img > threshold_otsu(img[img > img.min()]) * 0.5
    lab, n = ndi.label(m)
    if n == 0:
        return m.astype(np.uint8)
    largest = np.argmax(np.bincount(lab.ravel())[1:]) + 1
    m = lab == largest
    m = np.stack([ndi.binary_fill_holes(m[:, :, k]) for k in range(m.shape[2])], axis=2)
    return m.astype(np.uint8)


def _load_case(case: Case, kind="mri"):
    """read_case plus the canonical affine (for the scanner z of the slices, see slice_stack)."""
    img, spacing, affine = read_nifti(case.image)
    masks = []
    for p, what in ((case.mask, "anomaly mask"), (case.brainmask, "brain mask")):
        if p is None:
            masks.append(None)
            continue
        m, _, _ = read_nifti(p, what)
        if m.shape != img.shape:
            fail(f"{what} {p} has shape {m.shape} but its image {case.image} has {img.shape}")
        masks.append((m > 0).astype(np.uint8))
    mask, brain = masks
    if brain is not None and not brain.any():
        # an all-zero mask would make every voxel background: the scan silently turns to -1
        fail(f"brain mask {case.brainmask} is empty (all voxels 0); fix it, or remove it and a "
             f"mask is computed from the image")
    if brain is None:
        brain = auto_brain_mask(img, kind)
    return img, mask, brain, spacing, affine


def read_case(case: Case, kind="mri"):
    """-> image float32 (X, Y, Z), anomaly mask uint8 or None, brain mask uint8, spacing."""
    return _load_case(case, kind)[:4]


# ---- dataset registry ---------------------------------------------------------------------------
DATASETS: dict = {}


def register_dataset(name, help=""):
    """Decorator: a loader `fn(root: Path, args, contrast: str) -> Splits` available as `--data name`."""
    def deco(fn):
        DATASETS[name] = (fn, help)
        return fn
    return deco


def subject_split(cases, frac, seed=0):
    """Split cases into (rest, held) by subject, `frac` of the subjects held out (at least one)."""
    subjects = sorted({c.subject for c in cases})
    rng = random.Random(seed)
    rng.shuffle(subjects)
    n = max(1, int(round(frac * len(subjects)))) if len(subjects) > 1 else 0
    held = set(subjects[:n])
    return [c for c in cases if c.subject not in held], [c for c in cases if c.subject in held]


NIFTI_EXT = (".nii.gz", ".nii")


def _is_nifti(name):
    """A NIfTI file name, whatever the case of its extension (`.NII.GZ` from some exporters)."""
    return name.lower().endswith(NIFTI_EXT)


def _stem(p: Path):
    n = p.name
    for e in NIFTI_EXT:
        if n.lower().endswith(e):
            return n[: -len(e)]
    return n


def _find_nifti(folder: Path, stem):
    """The NIfTI file `stem`.nii[.gz] in `folder` (any case of the extension), else None."""
    if not folder.is_dir():
        return None
    found = sorted(p for p in folder.iterdir()
                   if _is_nifti(p.name) and _stem(p) == stem and p.is_file())
    return found[0] if found else None


def _check_links(paths):
    """Stop on a symbolic link whose target is gone (it would fail later, far from its cause)."""
    for p in paths:
        if Path(p).is_symlink() and not Path(p).exists():
            fail(f"{p} is a broken symbolic link (its target {os.readlink(p)} does not exist); "
                 f"fix the link or remove it")


def _images_in(folder: Path):
    """Image files in a folder (not masks), sorted by name, with their side files. Extensions and
    the `_mask` / `_brainmask` suffixes are matched case-insensitively."""
    out = []
    if not folder.is_dir():
        return out
    files = sorted(p for p in folder.iterdir() if _is_nifti(p.name) and not p.is_dir())
    _check_links(files)
    names = {_stem(p).lower(): p for p in files}
    for p in files:
        s = _stem(p)
        if s.lower().endswith(("_mask", "_brainmask")):
            continue
        out.append((s, p, names.get(s.lower() + "_mask"), names.get(s.lower() + "_brainmask")))
    return out


def _read_meta(path: Path, hint=""):
    """The per-case metadata file of a folder data set: {relative image path: {key: value}}."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        why = str(e).splitlines()[0] if str(e) else ""
        fail(f"cannot read {path} ({type(e).__name__}: {why}); "
             f"{hint or 'fix the file or delete it (it is optional)'}")
    if not isinstance(meta, dict) or not all(isinstance(v, dict) for v in meta.values()):
        fail(f"{path} must be a JSON object mapping image paths to objects, e.g. "
             f'{{"train/a.nii.gz": {{"subject": "a"}}}}; {hint or "fix the file or delete it"}')
    return meta


@register_dataset("folder", "ROOT/train, ROOT/val (optional), ROOT/test/<group>/ of NIfTI volumes")
def load_folder(root: Path, args=None, contrast=None, meta_hint="") -> Splits:
    """The contract's `--data folder` layout (../shared/CONTRACT.md). `meta_hint`: what to do
    about a corrupt meta.json (the phantom regenerates its folder)."""
    meta = {}
    if (root / "meta.json").is_file() or (root / "meta.json").is_symlink():
        meta = _read_meta(root / "meta.json", meta_hint)

    def cases(folder, group, label):
        out = []
        for s, p, m, b in _images_in(folder):
            rel = str(p.relative_to(root))
            md = dict(meta.get(rel, {}))
            subject = str(md.get("subject", s))
            out.append(Case(id=f"{group}/{s}", subject=subject, group=group, label=label, image=str(p),
                            mask=str(m) if m else None, brainmask=str(b) if b else None, meta=md))
        return out

    train = cases(root / "train", "train", 0)
    val = cases(root / "val", "val", 0)
    if not train:
        fail(f"no training volumes (*.nii or *.nii.gz) in {root / 'train'}; "
             f"see ../shared/CONTRACT.md or {DATA_README} for the folder layout")
    if not val:
        train, val = subject_split(train, 0.1, seed=getattr(args, "seed", 0))
        for c in val:
            c.group = "val"
    test = []
    tdir = root / "test"
    if tdir.is_dir():
        for g in sorted(p.name for p in tdir.iterdir() if p.is_dir()):
            test += cases(tdir / g, g, 0 if g == "normal" else 1)
    return Splits(train, val, test, {"root": str(root)})


@register_dataset("synthetic", "the built-in procedural brain phantom (generated on first use)")
def load_synthetic(root: Path, args=None, contrast="t1") -> Splits:
    sys.path.insert(0, str(REPO)) if str(REPO) not in sys.path else None
    from data.phantom import ensure_phantom
    size = "tiny" if getattr(args, "preset", "quick") == "smoke" else "full"
    t = time.time()
    variant = ensure_phantom(root=root, contrast=contrast, size=size, seed=0)
    hint = f"delete the folder {variant} and it is generated again on the next run"
    s = load_folder(Path(variant), args, meta_hint=hint)
    s.info.update({"phantom": f"{contrast}_{size}", "phantom_ready_s": round(time.time() - t, 2)})
    return s


def _check_root(name, root: Path):
    """A data root must be a folder: say what it is instead (a file, a broken link, nothing)."""
    where = (f"{DATA_README} explains how to get the {name} dataset and which folder to pass as "
             f"--data-root")
    if root.is_symlink() and not root.exists():
        fail(f"data root {root} for --data {name} is a broken symbolic link (its target "
             f"{os.readlink(root)} does not exist); fix the link or pass another --data-root")
    if root.exists() and not root.is_dir():
        fail(f"data root {root} for --data {name} is a file, not a folder; pass the folder that "
             f"holds the data set as --data-root ({where})")
    if name != "synthetic" and not root.is_dir():
        fail(f"data root {root} for --data {name} does not exist; {where}")


def load_dataset(args, contrast="t1", groups=None) -> Splits:
    """Resolve --data/--data-root (and --train-data/--train-root) into train/val/test cases.

    `contrast` picks the phantom's contrast for `--data synthetic` (real loaders use --modality).
    `groups` keeps only these test groups (plus the normal ones)."""
    def one(name, root):
        if name not in DATASETS:
            fail(f"--data {name}: unknown dataset; choose one of {', '.join(sorted(DATASETS))}")
        root = Path(root) if root else (REPO / "data" / name)
        _check_root(name, root)
        return DATASETS[name][0](root, args, contrast)

    s = one(args.data, args.data_root)
    if getattr(args, "train_data", None):
        t = one(args.train_data, args.train_root)
        s.info["train_from"] = args.train_data
        s = Splits(t.train, t.val, s.test, {**s.info, "train_info": t.info})
    if groups is not None and any(c.group in groups for c in s.test if c.label == 1):
        # the groups a script asks for (e.g. the phantom's) filter only data sets that have them
        s.test = [c for c in s.test if c.label == 0 or c.group in groups]
    n_max = getattr(args, "max_test_cases", 0) or 0
    if n_max > 0:   # --max-test-cases: the first N of each label, so both stay (a short trial)
        s.test = [c for c in s.test if c.label == 0][:n_max] + [c for c in s.test if c.label == 1][:n_max]
    if not s.train:
        fail(f"--data {args.data}: no healthy training volumes found")
    if not s.test or len({c.label for c in s.test}) < 2:
        hint = f"; {s.info['hint']}" if s.info.get("hint") else ""
        fail(f"--data {args.data}: the test set needs both normal and anomalous volumes "
             f"(found groups: {sorted({c.group for c in s.test}) or 'none'}){hint}")
    overlap = {c.subject for c in s.train + s.val} & {c.subject for c in s.test}
    if overlap:
        fail(f"subjects {sorted(overlap)[:5]} appear in both training and test data; "
             f"a subject must stay on one side of the split")
    s.info.update({"n_train": len(s.train), "n_val": len(s.val),
                   "test_groups": {g: sum(c.group == g for c in s.test) for g in sorted({c.group for c in s.test})}})
    return s


# ---- real datasets ------------------------------------------------------------------------------
# Loaders for the public data sets, written from ../shared/DATASETS.md (the downloads' file names,
# folder layouts and CSV headers) and tested on fixture trees that copy them (tests/fixtures.py).
# data/README.md says where to get each one and which folder to pass as --data-root. A loader only
# indexes files (and opens their NIfTI headers, so an unreadable file is named at once); voxels are
# read later by read_case / slice_stack. Every Case carries its subject id and every split below is
# made per subject, so all of a subject's scans stay on one side.

MODALITY_ALIASES = {"t1": "t1", "t1w": "t1", "t1n": "t1", "mprage": "t1", "t2": "t2", "t2w": "t2",
                    "flair": "flair", "t2f": "flair", "t1ce": "t1ce", "t1c": "t1ce", "t1gd": "t1ce",
                    "t1wks": "t1ce", "pd": "pd", "mra": "mra"}


def _warn(msg):
    """One `warning: ...` line on stderr (process 0 only): for what is skipped but not fatal."""
    if C.is_main():
        print(f"warning: {msg}", file=sys.stderr, flush=True)


def _no_data(name, root, looked_for):
    fail(f"--data {name}: found no {looked_for} under {root}; {DATA_README} explains how to get the "
         f"data set and which folder to pass as --data-root")


def _walk(root, pattern, dirs=False):
    """[(path, match)] for every file (or folder, if `dirs`) under `root` whose name fully matches the
    regex `pattern` (case-insensitive), in sorted order; hidden folders are skipped."""
    rx = re.compile(pattern, re.IGNORECASE)
    out = []
    for d, sub, files in os.walk(root):
        sub[:] = sorted(s for s in sub if not s.startswith("."))
        for n in (sub if dirs else sorted(files)):
            m = rx.fullmatch(n)
            if m:
                out.append((Path(d) / n, m))
    _check_links(p for p, _ in out)
    return out


def _check_headers(name, paths):
    """Open the NIfTI header of every indexed file (no voxel data is read); name the ones that fail."""
    import nibabel as nib
    bad = []
    for p in paths:
        try:
            nib.load(str(p))
        except Exception as e:  # noqa: BLE001 -- any reader failure is a bad file for the user
            bad.append(f"{p} ({type(e).__name__})")
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        fail(f"--data {name}: cannot read {len(bad)} NIfTI file(s): {'; '.join(bad[:3])}{more}; "
             f"re-download or remove them")


def _modality(name, args, contrast, table, default):
    """-> (key, the data set's file token) for --modality, else the script's contrast when the data
    set has it, else `default`. `table` maps t1|t1ce|t2|flair|pd|mra -> the token in file names."""
    flag = getattr(args, "modality", None)
    if flag:
        key = MODALITY_ALIASES.get(str(flag).lower())
        if key not in table:
            fail(f"--modality {flag}: --data {name} has {', '.join(sorted(table))}")
        return key, table[key]
    key = MODALITY_ALIASES.get(str(contrast).lower())
    key = key if key in table else default
    return key, table[key]


def _with(c, **kw):
    """A copy of Case c with fields changed (a `meta` argument is merged into c.meta)."""
    meta = {**c.meta, **kw.pop("meta", {})}
    return Case(**{**vars(c), **kw, "meta": meta})


def _test_frac(args):
    f = getattr(args, "test_frac", None)
    f = 0.3 if f is None else float(f)
    if not 0 <= f < 1:
        fail(f"--test-frac must be in [0, 1), got {f}")
    return f


def _no_normals_hint(args):
    """data_info["hint"] for load_dataset's "needs normal and anomalous" error, --test-frac 0."""
    if _test_frac(args) == 0:
        return {"hint": "--test-frac 0 holds out no healthy subject, so there are no normal test "
                        "scans; use --test-frac > 0 (default 0.3)"}
    return {}


def _healthy_split(cases, args, normal="normal", test=True, val_frac=0.1):
    """Subject-level split of healthy cases -> (train, val, test normals), deterministic from --seed:
    --test-frac of the subjects (default 0.3) are held out as the test group `normal` (if `test`),
    then `val_frac` of the remaining subjects become the healthy validation set."""
    seed = getattr(args, "seed", 0) or 0
    frac = _test_frac(args)
    rest, held = subject_split(cases, frac, seed) if test and frac > 0 else (list(cases), [])
    train, val = subject_split(rest, val_frac, seed + 1)
    return ([_with(c, group="train", label=0) for c in train], [_with(c, group="val", label=0) for c in val],
            [_with(c, group=normal, label=0) for c in held])


def _counts(cases):
    """{group: {"subjects": n, "scans": n}} in group order of appearance."""
    out = {}
    for g in dict.fromkeys(c.group for c in cases):
        cs = [c for c in cases if c.group == g]
        out[g] = {"subjects": len({c.subject for c in cs}), "scans": len(cs)}
    return out


class _Excluded:
    """Counts of excluded files/scans per reason, with a few examples each (-> Splits.info)."""

    def __init__(self):
        self.n, self.examples = {}, {}

    def __call__(self, reason, what):
        self.n[reason] = self.n.get(reason, 0) + 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 3:
            ex.append(str(what))

    def info(self):
        return {"excluded": dict(self.n), "excluded_examples": dict(self.examples)}


def _anomalous_splits(name, cases, args, group, what):
    """Splits for a data set whose every scan is anomalous (BraTS, MSLUB, ISBI 2015).

    Test (slice level): every test-split scan twice, as `group` (label 1) with meta
    {"anomalous_slices_only": True} and as `normal` (label 0) with meta {"healthy_slices_only": True};
    slice_stack keeps the slices with, resp. without, anomaly-mask voxels, so each slice is scored
    once, under the right label. Healthy training: --train-data if given (then every scan is a test
    scan), else the anomaly-free slices of the training-split subjects."""
    info = {}
    if getattr(args, "train_data", None):
        train, val, test = [], [], list(cases)
        info["healthy_training"] = f"--train-data {args.train_data}"
    else:
        seed = getattr(args, "seed", 0) or 0
        frac = _test_frac(args)
        if frac == 0:   # 0 means no test subject, not the default
            fail(f"--test-frac 0 holds out no {name} subject, so there is nothing to test (every "
                 f"{name} scan is anomalous); use --test-frac > 0 (default 0.3), or train on "
                 f"another data set with --train-data ixi (then every {name} scan is a test scan)")
        rest, test = subject_split(cases, frac, seed)
        train, val = subject_split(rest, 0.1, seed + 1)
        flag = {"healthy_slices_only": True}
        train = [_with(c, group="train", label=0, meta=flag) for c in train]
        val = [_with(c, group="val", label=0, meta=flag) for c in val]
        info["healthy_training"] = (f"{what}-free slices of the training-split {name} subjects "
                                    f"(slice_stack drop_anomalous); pass --train-data ixi to train on IXI")
    test = ([_with(c, group=group, label=1, meta={"anomalous_slices_only": True}) for c in test]
            + [_with(c, id=f"{c.id}/{what}-free", group="normal", label=0, meta={"healthy_slices_only": True})
               for c in test])
    info["test_slices"] = (f"slice level: group {group} = the test scans' slices with {what} voxels, group "
                           f"normal = their slices without (slice_stack drop_anomalous); not for 3D methods")
    return train, val, test, info


# ---- OASIS-3 --------------------------------------------------------------------------------------

def _oasis3_cdr(root):
    """{subject: {day: CDR}} from every CDR table found under `root`, and the tables used.

    Current release: OASIS3_UDSb4_cdr.csv (OASISID, days_to_visit, CDRTOT; OASIS_session_label
    `OAS30001_UDSb4_d0339` as a fallback for the day). Legacy "ADRC Clinical Data" csv:
    `ADRC_ADRCCLINICALDATA ID` = `OAS30001_ClinicalData_d0000` (the day is the dNNNN suffix), Subject,
    cdr. Both may be present; a visit found in both keeps the current release's value."""
    def num(v):
        try:
            x = float(str(v).strip())
        except (TypeError, ValueError):
            return None
        return x if math.isfinite(x) else None

    def day_of(label):
        m = re.search(r"_d(\d+)\s*$", str(label or ""))
        return int(m.group(1)) if m else None

    tables = []   # (priority, path, schema, [(subject, day, cdr)])
    unreadable = []   # csv files named like a clinical table that could not be read
    for p, _ in _walk(root, r".*\.csv"):
        try:
            with open(p, newline="", encoding="utf-8-sig") as f:
                rows = list(csv.DictReader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            if re.search(r"cdr|clinical|uds", p.name, re.IGNORECASE):
                unreadable.append({"path": str(p), "error": type(e).__name__})
            continue
        col = {k.strip().lower(): k for k in (rows[0] if rows else {}) if k}
        visits = []
        if "oasisid" in col and "cdrtot" in col:
            for r in rows:
                d = num(r.get(col.get("days_to_visit"))) if "days_to_visit" in col else None
                d = int(d) if d is not None else day_of(r.get(col.get("oasis_session_label")))
                visits.append((str(r[col["oasisid"]]).strip(), d, num(r[col["cdrtot"]])))
            tables.append((0, p, "OASIS3_UDSb4_cdr (OASISID, days_to_visit, CDRTOT)", visits))
        elif "adrc_adrcclinicaldata id" in col and "cdr" in col:
            for r in rows:
                rid = str(r[col["adrc_adrcclinicaldata id"]]).strip()
                subj = str(r[col["subject"]]).strip() if "subject" in col else rid.split("_")[0]
                visits.append((subj, day_of(rid), num(r[col["cdr"]])))
            tables.append((1, p, "legacy ADRC clinical data (ADRC_ADRCCLINICALDATA ID, Subject, cdr)", visits))
    out, skipped, conflicts = {}, 0, 0
    for _, p, schema, visits in sorted(tables, key=lambda t: (t[0], str(t[1]))):
        for subj, d, cdr in visits:
            if not subj or d is None or cdr is None:
                skipped += 1
                continue
            v = out.setdefault(subj, {})
            if d in v and v[d] != cdr:
                conflicts += 1
            v.setdefault(d, cdr)
    if unreadable and not out:
        # nothing else to label the scans with: the unreadable table is the cause
        fail(f"--data oasis3: cannot read the CDR table {unreadable[0]['path']} "
             f"({unreadable[0]['error']}); re-download it")
    for u in unreadable:   # another table was read: go on, but say so
        _warn(f"--data oasis3: skipped the unreadable csv {u['path']} ({u['error']}); the CDR "
              f"labels come from the other table(s), see data_info.cdr_tables")
    used = [{"path": str(p), "schema": s, "rows": len(v)} for _, p, s, v in tables]
    return out, used, {"cdr_rows_without_subject_day_or_cdr": skipped,
                       "cdr_visits_conflicting": conflicts, "cdr_tables_unreadable": unreadable}


@register_dataset("oasis3", "OASIS-3 T1w MRI + Clinical Dementia Rating: unchanged CDR 0 vs CDR 0.5/1/2/3")
def load_oasis3(root: Path, args=None, contrast=None) -> Splits:
    """OASIS-3 as in MADGAN (Han et al. 2021, "AD dataset: OASIS-3"), see ../shared/DATASETS.md.

    Images: every `*T1w.nii[.gz]` under root, in any layout (BIDS `sub-X/ses-dNNNN/anat/`, the
    download script's `X_MR_dNNNN/anat1/`, raw XNAT `X_MR_dNNNN/scans/anat2-T1w/resources/NIFTI/files/`),
    `ses-` or `sess-`, optional `run-NN`: one scan per session (subject, day), the lowest run.
    Label: the CDR of the clinical visit closest in days (earlier visit on a tie), if within
    --cdr-window-days; else the scan is excluded. Healthy = subjects whose CDR is 0 at every visit;
    they are split by subject into train / val / test group `cdr_0` (--test-frac, default 0.3 ~ the
    paper's 168 of 576 healthy subjects). Scans of other subjects form the groups cdr_0.5, cdr_1,
    cdr_2, cdr_3 (label 1); their CDR-0 scans belong to no group. Exclusions are counted in info."""
    flag = getattr(args, "modality", None)
    if flag and MODALITY_ALIASES.get(str(flag).lower()) != "t1":
        fail(f"--modality {flag}: --data oasis3 loads T1w images only")
    window = getattr(args, "cdr_window_days", None)
    window = 365 if window is None else int(window)
    if window < 0:
        fail(f"--cdr-window-days must be >= 0, got {window}")
    ex = _Excluded()
    sessions, n_files = {}, 0
    for p, _ in _walk(root, r".*T1w\.nii(\.gz)?"):
        n_files += 1
        ent = {k.lower(): v for k, v in re.findall(r"([A-Za-z]+)-([A-Za-z0-9]+)", p.name)}
        m = re.search(r"(OAS3\d+)_MR_d(\d+)", str(p.relative_to(root)))
        subj = ent.get("sub") or (m.group(1) if m else None)
        ses = ent.get("ses") or ent.get("sess") or (f"d{m.group(2)}" if m else "")
        if not subj or not re.fullmatch(r"d\d+", ses):
            ex("T1w file whose name and folders give no subject and session dNNNN", p)
            continue
        run = int(ent["run"]) if ent.get("run", "").isdigit() else 0
        sessions.setdefault((subj, int(ses[1:])), []).append((run, str(p)))
    if not sessions:
        _no_data("oasis3", root, "OASIS-3 T1w images (*T1w.nii[.gz], e.g. sub-OAS30001_ses-d0129_run-01_T1w.nii.gz)")
    scans = []
    for (subj, day), runs in sorted(sessions.items()):
        runs.sort()
        for _, p in runs[1:]:
            ex("another run (or copy) of a session: the lowest run is used", p)
        scans.append((subj, day, runs[0][0], runs[0][1]))
    _check_headers("oasis3", [s[3] for s in scans])
    visits, tables, table_info = _oasis3_cdr(root)
    if not visits:
        fail(f"--data oasis3: found no CDR table under {root} (a csv with columns OASISID, days_to_visit, "
             f"CDRTOT such as OASIS3_UDSb4_cdr.csv, or the legacy ADRC clinical data csv with "
             f"`ADRC_ADRCCLINICALDATA ID`, Subject, cdr); {DATA_README} explains where to get it")
    healthy = {s for s, v in visits.items() if v and all(c == 0 for c in v.values())}
    pool, anomalous = [], []
    for subj, day, run, path in scans:
        sid = f"{subj}_MR_d{day:04d}"
        v = visits.get(subj)
        if not v:
            ex("no CDR visit of the subject in the CDR table", sid)
            continue
        vday = min(v, key=lambda d: (abs(d - day), d))
        if abs(vday - day) > window:
            ex(f"closest CDR visit more than {window} days from the scan (--cdr-window-days)", sid)
            continue
        cdr = v[vday]
        c = Case(id=sid, subject=subj, group="", label=0, image=path,
                 meta={"cdr": cdr, "days": day, "cdr_visit_days": vday, "days_scan_to_visit": vday - day,
                       "run": run or None, "subject_unchanged_cdr0": subj in healthy})
        if subj in healthy:
            pool.append(c)
        elif cdr == 0:
            ex("CDR 0 scan of a subject whose CDR changes (not unchanged CDR 0)", sid)
        elif cdr in (0.5, 1, 2, 3):
            anomalous.append(_with(c, group=f"cdr_{cdr:g}", label=1))
        else:
            ex("CDR value other than 0, 0.5, 1, 2, 3", sid)
    train, val, normal = _healthy_split(pool, args, normal="cdr_0")
    anomalous.sort(key=lambda c: (float(c.meta["cdr"]), c.id))
    seed = getattr(args, "seed", 0) or 0
    info = {"dataset": "oasis3", "root": str(root), "cdr_tables": tables, **table_info,
            "cdr_window_days": window, "t1w_files": n_files, "sessions": len(sessions),
            "subjects_with_cdr": len(visits), "subjects_unchanged_cdr0": len(healthy),
            "groups": _counts(train + val + normal + anomalous), **ex.info(),
            "split": f"by subject, seed {seed}: {_test_frac(args):.0%} of the unchanged-CDR-0 subjects -> "
                     f"test group cdr_0, 10% of the rest -> val; every other subject is test only",
            "slices": "MADGAN selects the axial slices through hippocampus, amygdala and lateral ventricles "
                      "(~51 per scan); choose the range with the script's slice flags",
            **_no_normals_hint(args)}
    return Splits(train, val, normal + anomalous, info)


# ---- IXI, BraTS, CT-ICH, MSLUB, ISBI 2015 ---------------------------------------------------------

@register_dataset("ixi", "IXI healthy MRI (T1/T2/PD; --modality): healthy training data, no test set")
def load_ixi(root: Path, args=None, contrast=None) -> Splits:
    """IXI: `IXI002-Guys-0828-T1.nii.gz` = IXI<id>-<site>-<number>-<modality>, any folders. Healthy
    only: split by subject into train / val; no test set (use it as --train-data, e.g.
    `--data brats --train-data ixi`). IXI has no FLAIR: a FLAIR script must say --modality t2."""
    if not getattr(args, "modality", None) and str(contrast).lower() == "flair":
        fail("--data ixi has no FLAIR images (T1, T2, PD); pass --modality t2 to use IXI T2 "
             "(the test data set is then read as T2 too)")
    key, tok = _modality("ixi", args, contrast, {"t1": "T1", "t2": "T2", "pd": "PD", "mra": "MRA"}, "t1")
    ex, cases = _Excluded(), {}
    for p, m in _walk(root, rf"(IXI\d+)-(Guys|HH|IOP)-(\d+)-{tok}\.nii(\.gz)?"):
        subj = m.group(1).upper()
        if subj in cases:
            ex("another file of the same IXI subject and modality", p)
            continue
        cases[subj] = Case(id=_stem(p), subject=subj, group="train", label=0, image=str(p),
                           meta={"site": m.group(2)})
    if not cases:
        _no_data("ixi", root, f"IXI {tok} images (IXI<id>-<Guys|HH|IOP>-<nnnn>-{tok}.nii.gz)")
    cases = list(cases.values())
    _check_headers("ixi", [c.image for c in cases])
    train, val, _ = _healthy_split(cases, args, test=False)
    info = {"dataset": "ixi", "root": str(root), "modality": tok, "groups": _counts(train + val),
            "sites": {s: sum(c.meta["site"] == s for c in cases) for s in sorted({c.meta["site"] for c in cases})},
            **ex.info(), "hint": "IXI is healthy only: use it as --train-data with a test data set, "
                                 "e.g. --data brats --train-data ixi"}
    return Splits(train, val, [], info)


@register_dataset("brats", "BraTS 2020/2021/2023 gliomas (FLAIR default; --modality), mask = seg > 0")
def load_brats(root: Path, args=None, contrast=None) -> Splits:
    """BraTS: 2020 `BraTS20_Training_001/BraTS20_Training_001_flair.nii[.gz]`, 2021
    `BraTS2021_00000/BraTS2021_00000_flair.nii.gz`, 2023 `BraTS-GLI-00000-000/BraTS-GLI-00000-000-t2f.nii.gz`
    (t2f = FLAIR, t1n = T1, t1c = T1ce, t2w = T2). Anomaly mask = seg > 0 (a case without seg, e.g.
    validation data, is excluded). 2023 subject = BraTS-GLI-00000 (the last number is the timepoint).
    Every scan has a tumour: see _anomalous_splits for the test normals and the healthy training."""
    key, _ = _modality("brats", args, contrast, {"t1": 0, "t1ce": 0, "t2": 0, "flair": 0}, "flair")
    tok = {"2023": {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}, "2020": {}}
    files = {}
    for p, m in _walk(root, r"(BraTS\d*_(?:[A-Za-z]+_)?\d+)_(flair|t1|t1ce|t2|seg)\.nii(\.gz)?"):
        files.setdefault((m.group(1), "2020"), {}).setdefault(m.group(2).lower(), p)
    for p, m in _walk(root, r"(BraTS-[A-Z]+-\d+-\d+)-(t1c|t1n|t2f|t2w|seg)\.nii(\.gz)?"):
        files.setdefault((m.group(1), "2023"), {}).setdefault(m.group(2).lower(), p)
    if not files:
        _no_data("brats", root, "BraTS cases (BraTS20_Training_001_flair.nii, BraTS2021_00000_flair.nii.gz "
                                "or BraTS-GLI-00000-000-t2f.nii.gz)")
    ex, cases = _Excluded(), []
    for (cid, rel), f in sorted(files.items()):
        t = tok[rel].get(key, key)
        if t not in f:
            ex(f"no {key} image", cid)
            continue
        seg = f.get("seg")
        if seg is None:  # BraTS 2020 case 355 names its seg W39_1998.09.19_Segm.nii
            seg = next((p for p in sorted(f[t].parent.iterdir()) if re.search(r"seg.*\.nii(\.gz)?$", p.name, re.I)), None)
        if seg is None:
            ex("no segmentation (validation/test data have none)", cid)
            continue
        release = "2023" if rel == "2023" else ("2021" if cid.startswith("BraTS2021") else "2020 or earlier")
        subj = "-".join(cid.split("-")[:3]) if rel == "2023" else cid
        cases.append(Case(id=cid, subject=subj, group="tumor", label=1, image=str(f[t]), mask=str(seg),
                          meta={"release": release, "modality": t, "skull_stripped": True}))
    _check_headers("brats", [p for c in cases for p in (c.image, c.mask)])
    cases = _dedupe_releases(cases, ex)
    train, val, test, sinfo = _anomalous_splits("brats", cases, args, "tumor", "tumour")
    info = {"dataset": "brats", "root": str(root), "modality": key,
            "releases": {r: sum(c.meta["release"] == r for c in cases) for r in sorted({c.meta["release"] for c in cases})},
            **sinfo, "groups": _counts(train + val + test), **ex.info()}
    return Splits(train, val, test, info)


BRATS_RELEASE_ORDER = ("2023", "2021", "2020 or earlier")   # newest first: its copy is kept


def _voxel_hash(path):
    """sha1 of a volume's voxels (canonical orientation, float32): equal for the same scan saved by
    two releases with other file names, compression or integer type."""
    arr, _, _ = read_nifti(path, "image")
    return hashlib.sha1(f"{arr.shape}".encode() + np.ascontiguousarray(arr).tobytes()).hexdigest()


def _dedupe_releases(cases, ex):
    """BraTS 2021 contains the 2020 cases and 2023-GLI renames 2021, under new names and no mapping
    file in ../shared/DATASETS.md: where several releases share a root, cases whose images have
    identical voxels are one patient, and only the newest release's copy is kept (a patient on both
    sides of the split would leak test data into training). One release alone is not read."""
    if len({c.meta["release"] for c in cases}) < 2:
        return cases
    kept = {}
    order = sorted(cases, key=lambda c: (BRATS_RELEASE_ORDER.index(c.meta["release"]), c.id))
    for c in progress(order, total=len(order), desc="brats: comparing releases"):
        h = _voxel_hash(c.image)
        if h in kept:
            ex("the same scan as a case of a newer release (identical voxels): that copy is used",
               f"{c.id} = {kept[h].id}")
            continue
        kept[h] = c
    ids = {c.id for c in kept.values()}
    return [c for c in cases if c.id in ids]


CTICH_TYPES = ("Intraventricular", "Intraparenchymal", "Subarachnoid", "Epidural", "Subdural")


@register_dataset("ctich", "PhysioNet CT-ICH head CT: normal scans vs hemorrhage (per-type meta)")
def load_ctich(root: Path, args=None, contrast=None) -> Splits:
    """PhysioNet CT-ICH 1.3.1: `ct_scans/NNN.nii` (HU) + `masks/NNN.nii` (> 0 = hemorrhage) +
    `hemorrhage_diagnosis_raw_ct.csv` (one row per slice). A scan is normal when every slice has
    No_Hemorrhage = 1; its hemorrhage types are those flagged on any slice: meta["subtypes"] (list)
    and meta["subtype"] (the type flagged on most slices). Normal scans are split by subject into
    train / val / test `normal`; the rest are the test group `hemorrhage`. No brain masks: read_case
    uses auto_brain_mask(kind="ct"), a simple HU skull strip (a documented deviation)."""
    scans = {}
    for p, m in _walk(root, r"(\d+)\.nii(\.gz)?"):
        if p.parent.name.lower() == "ct_scans":
            scans.setdefault(int(m.group(1)), p)
    if not scans:
        _no_data("ctich", root, "CT-ICH scans (ct_scans/049.nii ...)")
    tables = [p for p, _ in _walk(root, r"hemorrhage_diagnosis_raw_ct\.csv")]
    if not tables:
        _no_data("ctich", root, "CT-ICH slice labels (hemorrhage_diagnosis_raw_ct.csv)")
    need = ["PatientNumber", "SliceNumber", *CTICH_TYPES, "No_Hemorrhage", "Fracture_Yes_No"]
    rows = {}
    try:
        with open(tables[0], newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [h.strip() for h in reader.fieldnames or []]
            if set(need) - set(fields):
                fail(f"--data ctich: {tables[0]} lacks the columns {sorted(set(need) - set(fields))}; "
                     f"expected {', '.join(need)}")
            for r in reader:
                r = {k.strip(): v for k, v in r.items() if k}
                # an empty cell is 0 for a type flag, but unknown (None) for No_Hemorrhage
                row = {k: int(float(r[k] or 0)) for k in need[2:]}
                row["SliceNumber"] = r["SliceNumber"]
                if not str(r["No_Hemorrhage"] or "").strip():
                    row["No_Hemorrhage"] = None
                rows.setdefault(int(float(r["PatientNumber"])), []).append(row)
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as e:
        fail(f"--data ctich: cannot read {tables[0]} ({type(e).__name__}: {e}); re-download it")
    ex, normal, bleed = _Excluded(), [], []
    for pid, p in sorted(scans.items()):
        if pid not in rows:
            ex(f"no rows in {tables[0].name}", p.name)
            continue
        mask = _find_nifti(p.parent.parent / "masks", _stem(p))
        slices = rows[pid]
        per_type = {t.lower(): sum(r[t] for r in slices) for t in CTICH_TYPES}
        types = [t for t, n in per_type.items() if n > 0]
        meta = {"subtypes": types, "slices_per_type": {t: per_type[t] for t in types},
                "fracture": any(r["Fracture_Yes_No"] for r in slices), "n_slices_csv": len(slices)}
        c = Case(id=f"{pid:03d}", subject=f"ctich{pid:03d}", group="", label=0, image=str(p),
                 mask=str(mask) if mask else None, meta=meta)
        bleeds = any(r["No_Hemorrhage"] not in (1, None) for r in slices)
        if not bleeds and any(r["No_Hemorrhage"] is None for r in slices):
            # normal only if every slice says so: an empty cell leaves the scan unknown
            first = next(r["SliceNumber"] for r in slices if r["No_Hemorrhage"] is None)
            ex("empty No_Hemorrhage cell, the other slices No_Hemorrhage = 1: normal or not is "
               "unknown", f"{p.name} (slice {first})")
            continue
        if not bleeds:
            normal.append(c)
        else:
            sub = max(types, key=lambda t: per_type[t]) if types else "unspecified"
            bleed.append(_with(c, group="hemorrhage", label=1, meta={"subtype": sub}))
    _check_headers("ctich", [p for c in normal + bleed for p in (c.image, c.mask) if p])
    train, val, test = _healthy_split(normal, args)
    info = {"dataset": "ctich", "root": str(root), "labels_csv": str(tables[0]),
            "groups": _counts(train + val + test + bleed),
            "hemorrhage_scans_per_type": {t.lower(): sum(t.lower() in c.meta["subtypes"] for c in bleed)
                                          for t in CTICH_TYPES},
            "dominant_subtype": {s: sum(c.meta["subtype"] == s for c in bleed) for s in sorted({c.meta["subtype"] for c in bleed})},
            "brain_mask": "none in the data set: auto_brain_mask(kind='ct'), a simple HU skull "
                          "strip", **ex.info(), **_no_normals_hint(args)}
    return Splits(train, val, test + bleed, info)


@register_dataset("mslub", "MSLUB MS lesions (FLAIR default; consensus masks, brain masks)")
def load_mslub(root: Path, args=None, contrast=None) -> Splits:
    """MSLUB (Lesjak et al. 2018): `patientXX/patientXX_FLAIR.nii.gz` (or without the `patientXX_`
    prefix), T1W / T1WKS / T2W, `_brainmask`, `_consensus_gt` (lesion mask). Where a patient appears
    twice (raw and preprocessed copies), the copy whose path says "preprocessed" wins. Every scan has
    lesions: see _anomalous_splits for the test normals and the healthy training."""
    key, tok = _modality("mslub", args, contrast, {"flair": "flair", "t1": "t1w", "t1ce": "t1wks", "t2": "t2w"}, "flair")
    found = {}
    for d, _ in _walk(root, r"patient\d+", dirs=True):
        f = {}
        for p in sorted(d.iterdir()):
            m = re.fullmatch(rf"(?:{d.name}_)?(flair|t1w|t1wks|t2w|brainmask|consensus_gt)\.nii(\.gz)?", p.name, re.I)
            if m:
                f[m.group(1).lower()] = p
        if f:
            found.setdefault(d.name.lower(), []).append((d, f))
    if not found:
        _no_data("mslub", root, "MSLUB patients (patientXX/patientXX_FLAIR.nii.gz or patientXX/FLAIR.nii.gz)")
    ex, cases = _Excluded(), []
    for pid, copies in sorted(found.items()):
        copies.sort(key=lambda t: ("preprocessed" not in str(t[0]).lower(), str(t[0])))
        for d, _ in copies[1:]:
            ex("another copy of the patient (the preprocessed one, else the first, is used)", d)
        d, f = copies[0]
        if tok not in f or "consensus_gt" not in f:
            ex(f"no {tok.upper()} image or no consensus_gt lesion mask", d)
            continue
        cases.append(Case(id=pid, subject=pid, group="ms_lesion", label=1, image=str(f[tok]),
                          mask=str(f["consensus_gt"]), brainmask=str(f["brainmask"]) if "brainmask" in f else None,
                          meta={"modality": tok}))
    _check_headers("mslub", [p for c in cases for p in (c.image, c.mask, c.brainmask) if p])
    train, val, test, sinfo = _anomalous_splits("mslub", cases, args, "ms_lesion", "lesion")
    info = {"dataset": "mslub", "root": str(root), "modality": key, **sinfo,
            "groups": _counts(train + val + test), **ex.info()}
    return Splits(train, val, test, info)


@register_dataset("isbi2015", "ISBI 2015 longitudinal MS lesions (FLAIR default; rater-1 masks)")
def load_isbi2015(root: Path, args=None, contrast=None) -> Splits:
    """ISBI 2015: `training/training01/preprocessed/training01_01_flair_pp.nii` (mprage, pd, t2; the
    `orig/` copies without `_pp` are used only where no preprocessed one exists) and
    `training/training01/masks/training01_01_mask1.nii` (rater 1 = the mask; rater 2 in meta).
    Scans without masks (the challenge's test data) are excluded. A subject's timepoints stay together.
    Every scan has lesions: see _anomalous_splits for the test normals and the healthy training."""
    key, tok = _modality("isbi2015", args, contrast, {"flair": "flair", "t1": "mprage", "t2": "t2", "pd": "pd"}, "flair")
    imgs, masks = {}, {}
    for p, m in _walk(root, r"((?:training|test)\d+)_(\d+)_(flair|mprage|pd|t2)(_pp)?\.nii(\.gz)?"):
        if m.group(3).lower() == tok:
            imgs.setdefault((m.group(1).lower(), m.group(2)), []).append((0 if m.group(4) else 1, str(p)))
    for p, m in _walk(root, r"((?:training|test)\d+)_(\d+)_mask([12])\.nii(\.gz)?"):
        masks.setdefault((m.group(1).lower(), m.group(2)), {}).setdefault(int(m.group(3)), str(p))
    if not imgs:
        _no_data("isbi2015", root, f"ISBI 2015 {tok} images (training/training01/preprocessed/training01_01_{tok}_pp.nii)")
    ex, cases = _Excluded(), []
    for (subj, tp), found in sorted(imgs.items()):
        found.sort()
        mk = masks.get((subj, tp), {})
        if 1 not in mk:
            ex("no rater-1 lesion mask (e.g. the challenge's test data)", f"{subj}_{tp}")
            continue
        cases.append(Case(id=f"{subj}_{tp}", subject=subj, group="ms_lesion", label=1, image=found[0][1],
                          mask=mk[1], meta={"timepoint": int(tp), "mask_rater2": mk.get(2),
                                            "preprocessed": found[0][0] == 0,
                                            "skull_stripped": found[0][0] == 0}))
    _check_headers("isbi2015", [p for c in cases for p in (c.image, c.mask)])
    train, val, test, sinfo = _anomalous_splits("isbi2015", cases, args, "ms_lesion", "lesion")
    info = {"dataset": "isbi2015", "root": str(root), "modality": tok, **sinfo,
            "groups": _counts(train + val + test), **ex.info()}
    return Splits(train, val, test, info)




# =================================================================================================
# 3. Memory-mapped caches of preprocessed slices and volumes
# =================================================================================================

@dataclass
class ArraySet:
    """Preprocessed arrays of a list of cases (memory-mapped when cached)."""
    x: np.ndarray          # (N, H, W) slices or (N, D, H, W) volumes, float32 in [-1, 1]
    mask: np.ndarray       # same shape, uint8 anomaly mask (zeros where a case has none)
    brain: np.ndarray      # same shape, uint8 brain mask
    case: np.ndarray       # (N,) int32 index into `cases`
    z: np.ndarray          # (N,) int32 axial index of the slice in its volume (0 for volumes)
    cases: list
    # slice_stack: {case id: {"first", "last" (axial indices as in z), "z_mm": [lo, hi] (scanner
    # z of those slices), "rule", ...}}, for results.json and plot_slabs
    slabs: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)   # {case id: why it has no rows (too few slices)}
    stats: dict = field(default_factory=dict)     # {case id: {"brain_std", ...}}: _check_contrast

    def __len__(self):
        return len(self.x)

    def slices_of(self, i):
        """Row indices of case i, in slice order."""
        rows = np.nonzero(self.case == i)[0]
        return rows[np.argsort(self.z[rows], kind="stable")]


def _cache_key(cases, params):
    h = hashlib.sha1(json.dumps(params, sort_keys=True, default=str).encode())
    for c in cases:
        for p in (c.image, c.mask, c.brainmask):
            if p:
                st = os.stat(p)
                h.update(f"{p}|{st.st_size}|{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def _normalize(img, brain, norm, ct_win, strip):
    if norm == "ct":
        x = ct_window(img, *ct_win)
    elif norm == "mri":
        x = normalize_mri(img, brain)
    else:
        fail(f"unknown normalisation {norm!r} (use 'mri' or 'ct')")
    if strip:
        x = np.where(brain > 0, x, -1.0).astype(np.float32)
    return x


STAT_KEYS = ("brain_std", "saturated", "raw_min", "brain_voxels")   # per case, in meta.json


def _brain_stats(x, b, img):
    """Spread of the normalised intensities inside the brain and the raw image's minimum, for
    _check_contrast (cheap: one pass over one case)."""
    v = x[b > 0] if b.any() else x.ravel()    # no brain voxel: the whole, stripped to -1
    return {"brain_std": round(float(v.std()), 5),
            "saturated": round(float((np.abs(v) >= 0.999).mean()), 5),
            "raw_min": float(img.min()), "brain_voxels": int(np.count_nonzero(b))}


def _build_cache(d, cases, builder, params, desc):
    """Write cache folder `d`: raw .dat arrays appended case by case, so peak memory is one case,
    not the data set; built in a temp dir and renamed, so a crash leaves no half cache.
    builder(case) -> (x, mask, brain, z, info); the per-case `info` dicts go to meta.json."""
    import shutil
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = d.parent / f".tmp-{d.name}-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    files = {k: open(tmp / f"{k}.dat", "wb") for k in ("x", "mask", "brain", "case", "z")}
    n, shape, infos, t0 = 0, None, [], time.time()
    try:
        for i, c in enumerate(progress(cases, total=len(cases), desc=f"cache {desc}")):
            x, m, b, z, info = builder(c)
            shape = x.shape[1:]
            files["x"].write(x.astype(np.float32).tobytes())
            files["mask"].write(m.astype(np.uint8).tobytes())
            files["brain"].write(b.astype(np.uint8).tobytes())
            files["case"].write(np.full(len(x), i, np.int32).tobytes())
            files["z"].write(np.asarray(z, np.int32).tobytes())
            n += len(x)
            infos.append(info)
    except BaseException:   # a bad file (or Ctrl-C): leave no half-written temp folder behind
        for f in files.values():
            f.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for f in files.values():
        f.close()
    meta = {"n": n, "shape": list(shape or ()), "params": params,
            "build_s": round(time.time() - t0, 2), "cases": infos}
    (tmp / "meta.json").write_text(json.dumps(meta, default=str))
    try:
        os.rename(tmp, d)
    except OSError:  # another process finished the same cache first
        shutil.rmtree(tmp, ignore_errors=True)


def _cached_build(kind, cases, params, cache_dir, builder, desc):
    """Build (or reuse) the memory-mapped cache of `cases` and open it as an ArraySet.

    Under torchrun, process 0 builds while the others wait (C.main_first), then they open what
    it built: one build, not one per process. A process that still finds no cache then (its disk
    is not the one process 0 wrote to, or process 0 failed) builds its own; process 0's error is
    raised only after the others were released, so that no process waits forever."""
    cache_dir = Path(cache_dir or REPO / "data" / "cache")
    key = _cache_key(cases, {"kind": kind, **params,
                             **({"mri_rule": MRI_RULE} if params.get("norm") == "mri" else {})})
    d = cache_dir / f"{kind}-{key}"
    error = None
    with C.main_first():
        if not (d / "meta.json").is_file():
            try:
                _build_cache(d, cases, builder, params, desc)
            except Exception as e:  # noqa: BLE001 -- re-raised below, after the barrier
                if not C.is_main():
                    raise
                error = e
    if error is not None:
        raise error
    meta = json.loads((d / "meta.json").read_text())
    n, shape = meta["n"], tuple(meta["shape"])

    def mm(k, dt, shp):
        return np.memmap(d / f"{k}.dat", dtype=dt, mode="r", shape=shp) if n else np.zeros(shp, dt)
    S = ArraySet(x=mm("x", np.float32, (n, *shape)), mask=mm("mask", np.uint8, (n, *shape)),
                 brain=mm("brain", np.uint8, (n, *shape)),
                 case=np.array(mm("case", np.int32, (n,))), z=np.array(mm("z", np.int32, (n,))),
                 cases=list(cases))
    for c, info in zip(cases, meta.get("cases", [])):
        if "slab" in info:
            S.slabs[c.id] = info["slab"]
        if "skipped" in info:
            S.skipped[c.id] = info["skipped"]
        if "brain_std" in info:
            S.stats[c.id] = {k: info[k] for k in STAT_KEYS}
    return S


# ---- data the normalisation does not fit -------------------------------------------------------
# MRI volumes pushed through the CT window [-20, 100] HU clip to +1 inside a brain mask, and where
# the mask comes from the HU skull strip it is not a brain at all: a model trained on that learns
# nothing. Per case, the std and the clipped fraction of the normalised brain voxels and the raw
# minimum are recorded in the cache's meta.json; a set whose cases mostly fail is an error.
FLAT_STD = 0.02          # brain std below this (intensities in [-1, 1]) is flat
FLAT_SATURATED = 0.95    # or this fraction of the brain voxels at -1 or +1
CT_AIR_BELOW_HU = -200   # a head CT in Hounsfield units has air (-1000 HU) around the head


def _misfit(v, norm):
    """Why one case's stats (S.stats) say the normalisation does not fit it, or None."""
    why = [] if v["brain_voxels"] else ["no brain voxel in the slices"]
    if v["brain_std"] < FLAT_STD or v["saturated"] > FLAT_SATURATED:
        why.append(f"brain std {v['brain_std']:.3f}, {v['saturated']:.0%} at -1/+1")
    if norm == "ct" and v["raw_min"] > CT_AIR_BELOW_HU:
        why.append(f"no voxel below {CT_AIR_BELOW_HU} HU, so no air")
    return "; ".join(why) or None


def _check_contrast(S, norm, ct_window, desc, hint=None):
    """Stop when more than half of the cases of S are flat after normalisation (or, for the CT
    window, not in Hounsfield units); warn when a few are. hint: the caller's own advice (a flag),
    in place of the generic one."""
    bad = {cid: why for cid, why in ((cid, _misfit(v, norm)) for cid, v in S.stats.items()) if why}
    if not bad:
        return
    ex = ", ".join(f"{cid} ({why})" for cid, why in list(bad.items())[:3])
    if norm == "ct":
        how = (f"do not look like CT in Hounsfield units under the CT window [{ct_window[0]:g}, "
               f"{ct_window[1]:g}] HU", "are these MRI volumes? The CT window needs head CT in HU "
               "(--data ctich); for MRI use an MRI script or data set")
    else:
        how = ("are (nearly) constant in the brain after the MRI normalisation (tissue median "
               "-> -1/3, three times it -> +1)", "check --modality (is the image a mask or a constant channel?) "
               "and --data / --data-root (CT data need a CT script)")
    how = (how[0], hint or how[1])
    what = f"{len(bad)} of {len(S.stats)} scans of the {desc or 'data'} set {how[0]}: {ex}"
    if 2 * len(bad) > len(S.stats):
        fail(f"{what}; {how[1]}")
    _warn(what)


# ---- the axial slab of a scan -------------------------------------------------------------------
# Where a scan has no brain mask and is not skull-stripped (OASIS-3, IXI: auto_brain_mask is then
# a mask of the whole head, with the neck and shoulders when the field of view has them), the
# lower end of the mask says nothing about the brain. The slab is then placed down from the top of
# the head, in millimetres (the header's voxel size), on adult anatomy (Talairach & Tournoux 1988:
# the top of the brain ~75 mm above the AC-PC plane; scalp + skull + CSF ~13 mm at the vertex):
# `center` is a fraction of a nominal brain extent from HEAD_TO_BRAIN_MM to HEAD_TO_BRAIN_MM +
# BRAIN_HEIGHT_MM below the top of the head, so center=0.5 is 85 mm below it, at the AC-PC plane;
# a 51-mm slab then spans ~25 mm below to ~25 mm above that plane: amygdala, hippocampus,
# temporal horns and lateral ventricles.
HEAD_TO_BRAIN_MM = 13.0       # top of the head (scalp) -> top of the brain
BRAIN_HEIGHT_MM = 144.0       # top of the brain -> bottom of the cerebellum (nominal adult)
VERTEX_MIN_AREA_MM2 = 200.0   # the top of the head: the highest axial slice with this much head
SLAB_RULES = ("auto", "brain", "vertex")


def _slab_rule(case, kind, mask_height_mm, slab):
    """slice_stack's `slab` for one case: "auto" -> "vertex" for an MRI head mask (no brain mask
    file, not meta["skull_stripped"]) taller than a brain could be (so something below it is in
    the field of view), else "brain" (a fraction of the mask's extent)."""
    if slab != "auto":
        return slab
    head = kind == "mri" and case.brainmask is None and not case.meta.get("skull_stripped")
    return "vertex" if head and mask_height_mm > HEAD_TO_BRAIN_MM + BRAIN_HEIGHT_MM else "brain"


def _slab(case, b, affine, kind, n_slices, center, step, slab):
    """-> (axial indices of the case's slab, its record for S.slabs); indices None if the volume has
    fewer slices than the slab needs (the record then says why). `b`: the (Z, H, W) brain mask."""
    voxel = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)   # mm per voxel along X, Y, Z
    dz = float(voxel[2])
    area = b.reshape(len(b), -1).sum(1) * float(voxel[0] * voxel[1])
    zs = np.nonzero(area)[0]
    lo, hi = (int(zs.min()), int(zs.max())) if len(zs) else (0, len(b) - 1)
    rule = _slab_rule(case, kind, (hi - lo + 1) * dz, slab)
    rec = {"rule": rule}
    if rule == "vertex":
        tops = np.nonzero(area >= VERTEX_MIN_AREA_MM2)[0]
        top = int(tops.max()) if len(tops) else hi
        mid = top - (HEAD_TO_BRAIN_MM + (1 - center) * BRAIN_HEIGHT_MM) / dz
        lo = max(lo, int(math.ceil(top - (HEAD_TO_BRAIN_MM + BRAIN_HEIGHT_MM) / dz)))
        rec.update(vertex=top, vertex_z_mm=_z_mm(affine, b.shape, top),
                   vertex_in_fov=top < len(b) - 1)
    else:
        mid = lo + center * (hi - lo)
    if n_slices is None:
        z = np.arange(lo, hi + 1, step)
    else:
        span = (n_slices - 1) * step
        if len(b) < span + 1:   # never repeat edge slices to fill a slab
            rec["skipped"] = (f"{len(b)} axial slices, fewer than the {span + 1} the slab needs "
                              f"(n_slices {n_slices}, step {step})")
            return None, rec
        start = int(round(mid - span / 2))
        start = min(max(start, 0), len(b) - 1 - span)
        z = start + np.arange(n_slices) * step
    rec.update(first=int(z[0]), last=int(z[-1]), n=len(z), slice_mm=round(dz, 4),
               z_mm=[_z_mm(affine, b.shape, z[0]), _z_mm(affine, b.shape, z[-1])])
    return z, rec


def _z_mm(affine, shape_zyx, k):
    """Scanner z (mm, from the affine) of the centre of axial slice k of a (Z, Y, X) stack."""
    _, ny, nx = shape_zyx
    return round(float(np.asarray(affine)[2] @ [(nx - 1) / 2, (ny - 1) / 2, float(k), 1.0]), 2)


def _pad_to_aspect(arr, value, size):
    """Pad the last two axes (centred) to the aspect ratio of `size` = (H, W), so that resizing to
    `size` scales both axes alike (MADGAN zero-pads 176x240 to 176x256). A square `size`:
    pad_to_square, as before."""
    H, W = (int(v) for v in size)
    if H == W:
        return pad_to_square(arr, value)
    h, w = arr.shape[-2:]
    if h * W >= w * H:                       # taller than the target: widen
        th, tw = h, max(w, int(round(h * W / H)))
    else:                                    # wider: heighten
        th, tw = max(h, int(round(w * H / W))), w
    pads = [(0, 0)] * (arr.ndim - 2) + [((th - h) // 2, th - h - (th - h) // 2),
                                         ((tw - w) // 2, tw - w - (tw - w) // 2)]
    return np.pad(arr, pads, constant_values=value)


def slice_stack(cases, size=(128, 128), norm="mri", n_slices=20, center=0.5, step=1,
                ct_window=(-20, 100), crop=True, strip=True, margin=2, cache_dir=None, desc="",
                drop_anomalous=True, slab="auto", hint=None) -> ArraySet:
    """Axial slices of each case, normalised to [-1, 1] and resized to `size`, memory-mapped.

    Per case: `n_slices` consecutive slices (every `step`-th) around `center`, placed by `slab`:
      "brain": `center` = fraction of the brain mask's inferior->superior extent (0 = lowest brain
        slice, 1 = highest);
      "vertex": `center` = fraction of a nominal brain extent 13..157 mm below the top of the head
        (center 0.5 = 85 mm below it, at the AC-PC level; see HEAD_TO_BRAIN_MM);
      "auto" (default): "vertex" for MRI scans without a brain mask that are not skull-stripped and
        whose head mask is taller than 157 mm (a neck in the field of view), else "brain".
    n_slices=None takes every slice that contains brain. A volume with fewer slices than the slab is
    skipped (S.skipped says why, with a warning), not padded with repeated slices. S.slabs records
    every case's slab (first/last index, scanner z in mm). In-plane, all slices of a case share one
    crop (the brain's bounding box over the chosen slab + `margin`), padded to the aspect ratio of
    `size` (a square for a square `size`) and resized, so that both axes scale alike.
    `drop_anomalous`: for real data sets whose every scan is anomalous (BraTS, MSLUB, ISBI 2015),
    cases whose meta says {"healthy_slices_only": True} (healthy training slices, the test's `normal`
    group) keep only the chosen slices without anomaly-mask voxels, and cases marked
    {"anomalous_slices_only": True} only those with some; a case left with no slice is dropped
    from S.cases (S.case indexes the remaining ones). A set that is constant in the brain after
    normalisation (e.g. MRI through the CT window) stops with an error (_check_contrast)."""
    if slab not in SLAB_RULES:
        fail(f"slab={slab!r}: use one of {', '.join(SLAB_RULES)}")
    kind = "ct" if norm == "ct" else "mri"
    params = dict(size=list(size), norm=norm, n_slices=n_slices, center=center, step=step,
                  ct_window=list(ct_window), crop=crop, strip=strip, margin=margin, slab=slab)
    only = {k: [i for i, c in enumerate(cases) if drop_anomalous and c.meta.get(k)]
            for k in ("healthy_slices_only", "anomalous_slices_only")}
    params.update({k: v for k, v in only.items() if v})

    def empty(z, info):
        e = np.zeros((0, *size), np.float32)
        return e, e.astype(bool), e.astype(bool), np.asarray(z, np.int32), info

    def build(c):
        img, m, b, _, affine = _load_case(c, kind)
        x = axial_stack(_normalize(img, b, norm, ct_window, strip))          # (Z, H, W)
        b = axial_stack(b)
        m = axial_stack(m) if m is not None else np.zeros_like(b)
        z, rec = _slab(c, b, affine, kind, n_slices, center, step, slab)
        if z is None:
            return empty([], {"skipped": rec["skipped"]})
        info = {"slab": rec}
        x, m, b = x[z], m[z], b[z]
        if crop:
            _, sy, sx = bbox(b, margin)
            x, m, b = x[:, sy, sx], m[:, sy, sx], b[:, sy, sx]
        if drop_anomalous and (c.meta.get("healthy_slices_only") or c.meta.get("anomalous_slices_only")):
            # after the crop, so that both parts of a scan share the crop of the whole slab
            keep = m.reshape(len(m), -1).any(1) == bool(c.meta.get("anomalous_slices_only"))
            x, m, b, z = x[keep], m[keep], b[keep], z[keep]
            if not len(z):
                return empty(z, info)
        info.update(_brain_stats(x, b, img))
        x, m, b = (_pad_to_aspect(a, v, size) for a, v in ((x, -1.0), (m, 0), (b, 0)))
        return (resize(x, size, 1), resize(m, size, 1) > 0.5, resize(b, size, 1) > 0.5, z,
                info)
    S = _cached_build("slices", cases, params, cache_dir, build, desc)
    n = np.bincount(S.case, minlength=len(cases))
    if (n == 0).any():   # cases left without slices by drop_anomalous or too short for the slab
        keep = np.nonzero(n)[0]
        new = np.full(len(cases), -1, np.int32)
        new[keep] = np.arange(len(keep), dtype=np.int32)
        S.case, S.cases = new[S.case], [cases[i] for i in keep]
        S.slabs = {c.id: S.slabs[c.id] for c in S.cases if c.id in S.slabs}
    cut = [cid for cid, r in S.slabs.items() if r.get("vertex_in_fov") is False]
    if cut:   # the head touches the top slice: its real top is higher, so the slab too
        _warn(f"cache {desc}: the head reaches the top slice of {len(cut)} scan(s) "
              f"({', '.join(cut[:3])}), so the slab placed from the top of the head may lie too "
              f"low; check S.slabs")
    if S.skipped:
        ex = "; ".join(f"{cid}: {why}" for cid, why in list(S.skipped.items())[:3])
        if not len(S):
            fail(f"every scan of the {desc or 'data'} set is too short for the slab: {ex}; use a "
                 f"smaller number of slices (n_slices, e.g. the script's --n-slices) or step")
        _warn(f"cache {desc}: skipped {len(S.skipped)} scan(s) with too few slices: {ex}")
    _check_contrast(S, norm, ct_window, desc, hint)
    return S


def volume_stack(cases, size=(64, 64, 64), norm="ct", ct_window=(-20, 100), smooth_sigma=0.0,
                 crop=True, strip=True, margin=1, cache_dir=None, desc="", hint=None) -> ArraySet:
    """Whole volumes (D, H, W) = (axial, anterior->posterior, left->right), normalised to [-1, 1]:
    skull-stripped with the brain mask (`strip`), cropped to the brain's bounding box (removes black
    borders), optional Gaussian smoothing (sigma in voxels, before resizing), padded to a cube and
    resized (linear) to `size`. Memory-mapped like slice_stack, and checked alike
    (_check_contrast)."""
    kind = "ct" if norm == "ct" else "mri"
    params = dict(size=list(size), norm=norm, ct_window=list(ct_window), smooth=smooth_sigma, crop=crop,
                  strip=strip, margin=margin, stats=1)

    def build(c):
        img, m, b, _ = read_case(c, kind)
        x = axial_stack(_normalize(img, b, norm, ct_window, strip))
        b = axial_stack(b)
        m = axial_stack(m) if m is not None else np.zeros_like(b)
        if crop:
            sl = bbox(b, margin)
            x, m, b = x[sl], m[sl], b[sl]
        info = _brain_stats(x, b, img)
        x = gaussian_smooth(x, smooth_sigma)
        x, m, b = pad_to_cube(x, -1.0), pad_to_cube(m, 0), pad_to_cube(b, 0)
        return (resize(x, size, 1)[None], (resize(m, size, 1) > 0.5)[None], (resize(b, size, 1) > 0.5)[None],
                np.zeros(1, np.int32), info)
    S = _cached_build("volumes", cases, params, cache_dir, build, desc)
    _check_contrast(S, norm, ct_window, desc, hint)
    return S


# ---- a figure of the slabs ---------------------------------------------------------------------

def plot_slabs(cases, slabs, path, title=""):
    """A mid-sagittal view of the first scan of every group with its slab (S.slabs) marked, in
    scanner millimetres, to check that the slab lies where it should (MADGAN: hippocampus,
    amygdala, ventricles). -> the ids of the cases drawn (none: no figure is written)."""
    first = {}
    for c in cases:
        if c.id in slabs and c.group not in first:
            first[c.group] = c
    if not first:
        return []
    plt = C._plt()
    fig, axes = plt.subplots(1, len(first), figsize=(3.2 * len(first), 4.0), squeeze=False)
    for ax, (group, c) in zip(axes[0], first.items()):
        img, _, affine = read_nifti(c.image)
        sag = img[img.shape[0] // 2].T                     # (Z, Y): inferior->superior rows
        (y0, y1), (z0, z1) = (_axis_mm(affine, img.shape, a) for a in (1, 2))
        lo, hi = np.percentile(sag, [1, 99])
        ax.imshow(sag, cmap="gray", origin="lower", extent=(y0, y1, z0, z1), vmin=lo, vmax=hi,
                  aspect="equal")
        s = slabs[c.id]
        half = s.get("slice_mm", 1.0) / 2
        ax.axhspan(s["z_mm"][0] - half, s["z_mm"][1] + half, color="tab:orange", alpha=0.3, lw=0)
        for zz in s["z_mm"]:
            ax.axhline(zz, color="tab:orange", lw=0.8)
        ax.set_title(f"{group}: {c.id}\nslices {s['first']}-{s['last']}, {s['rule']} rule",
                     fontsize=8)
        ax.set_xlabel("posterior -> anterior (mm)", fontsize=7)
        ax.set_ylabel("inferior -> superior (mm)", fontsize=7)
        ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    C._save(fig, path)
    return [c.id for c in first.values()]


def _axis_mm(affine, shape, axis):
    """Scanner coordinate (mm) along `axis` of the first and last voxel centres (through the
    middle of the other axes)."""
    ends = []
    for k in (0, shape[axis] - 1):
        v = [(n - 1) / 2 for n in shape] + [1.0]
        v[axis] = float(k)
        ends.append(float(np.asarray(affine)[axis] @ v))
    return tuple(ends)


# ==================================================================================================
# Loading helpers of single scripts
# ==================================================================================================

# -- first written for fanogan3d.py

def choose_normalisation(args, data, run, phantom="ct"):
    """"ct" (the CT window --window) or "mri" (normalize_mri): --modality when given,
    the phantom's contrast (default `phantom`), else detected from the training volumes; logged and
    recorded in data.info["normalisation"]. -> (norm, what it maps to [-1, 1], for messages)"""
    if args.modality or args.data == "synthetic":
        norm = "ct" if (args.modality or phantom) == "ct" else "mri"
        how = f"--modality {args.modality}" if args.modality else "the CT phantom (default)"
    else:
        norm, how = detect_modality(data.train)
    to = ("CT window %g..%g HU" % tuple(args.window) if norm == "ct"
          else "MRI tissue median -> -1/3")
    run.log(f"modality {norm.upper()} ({how}): {to} -> [-1, 1]")
    data.info["normalisation"] = {"norm": norm, "how": how}
    return norm, to


def detect_modality(cases, n=3):
    """"ct" or "mri" from the raw intensities of the first n cases: a CT's background is air at
    about -1000 HU, MRI intensities are >= 0. -> (kind, how it was decided, for the log)."""
    p1 = float(np.median([np.percentile(read_nifti(c.image)[0], 1) for c in cases[:n]]))
    kind = "ct" if p1 < -500 else "mri"
    return kind, (f"detected from {min(n, len(cases))} training volumes: 1st intensity percentile "
                  f"{p1:g} ({'air, HU' if kind == 'ct' else 'no air at -1000 HU'}); --modality "
                  f"overrides")


def check_not_constant(S, what, after, n=64):
    """Refuse preprocessed arrays whose brain voxels are (almost) all one value, e.g. MRI through a
    CT window (every brain voxel clips to +1): a model would learn nothing and score all alike."""
    x, b = np.asarray(S.x[:n]), np.asarray(S.brain[:n]) > 0
    v = x[b] if b.any() else x.ravel()
    same = float(np.mean(np.abs(v - np.median(v)) < 1e-3))
    if same > 0.9:
        C.fail(f"{same:.0%} of the brain voxels of the first {len(x)} {what} have one value "
               f"({np.median(v):.3g}) after {after}; nothing to learn, so no training")


# -- first written for anovaegan.py

def slice_label(case, gt_slice):
    """(label, group) of one slice of a test case: label 1 where the slice holds anomaly voxels (an
    anomalous scan without a mask: every slice); group = the case's group, except that a data set of
    anomalous scans only (BraTS, MSLUB, ISBI: meta anomalous_slices_only) has no normal scan, so
    its anomaly-free slices are the `normal` group (the same patients; see _anomalous_splits)."""
    masked = case.mask is not None or case.label == 0
    label = int(np.asarray(gt_slice).any()) if masked else int(case.label)
    return label, "normal" if case.meta.get("anomalous_slices_only") and not label else case.group


def whole_slabs(cases):
    """One test case per scan with all its slices, for methods that post-process a scan in 3D.
    Data sets whose every scan is anomalous list a test scan twice, as its anomalous and its
    anomaly-free slices (_anomalous_splits); keep the anomalous case (its slices are then labelled
    by their own mask voxels) and drop its healthy twin."""
    anomalous = {c.image for c in cases if c.meta.get("anomalous_slices_only")}
    return [c for c in cases if not (c.meta.get("healthy_slices_only") and c.image in anomalous)]


# -- first written for madgan.py

class RowReader:
    """Rows of an array x (N, ...) as float32: reader(rows), rows an int array of any shape ->
    (*rows.shape, *x.shape[1:]), every distinct row read once. For x as np.memmap opened it (not a
    view of one), each run of consecutive rows is one plain file read, so the pages go to the OS
    page cache, not to this process's resident memory: peak RSS stays at one batch, whatever the
    size of the data set."""

    def __init__(self, x):
        self.x, self.row_bytes = x, int(np.prod(x.shape[1:])) * x.dtype.itemsize
        self.path = x.filename if isinstance(x, np.memmap) and x.flags.c_contiguous else None

    def __call__(self, rows):
        rows = np.asarray(rows)
        u, inv = np.unique(rows, return_inverse=True)          # sorted distinct rows
        if self.path is None:
            return np.asarray(self.x[u], dtype=np.float32)[inv.reshape(rows.shape)]
        out = np.empty((len(u), *self.x.shape[1:]), self.x.dtype)
        with open(self.path, "rb") as f:
            for run in np.split(np.arange(len(u)), np.nonzero(np.diff(u) != 1)[0] + 1):
                if len(run):
                    f.seek(self.x.offset + int(u[run[0]]) * self.row_bytes)
                    buf = f.read(len(run) * self.row_bytes)
                    out[run] = np.frombuffer(buf, self.x.dtype).reshape(len(run), *self.x.shape[1:])
        return out.astype(np.float32, copy=False)[inv.reshape(rows.shape)]


def grid_test_patches(data, X, args, log=print):
    """AnoGAN's test set (anogan.py, read before training): the central --test-slices of the test
    scans (the first --test-cases of every group), their grid patches P, the healthy validation
    patches (None if there is none) and --train-eval-patches of the training patches X.
    -> (S, P, x_val, x_train)"""
    test, c = data.test, args.patch_size
    if args.test_cases:                                     # the first N scans of every group
        test = [cs for g in dict.fromkeys(t.group for t in test)
                for cs in [t for t in test if t.group == g][:args.test_cases]]
    # the central --test-slices of the training slab (same centre and step)
    kw = dict(size=(args.slice_size, args.slice_size), norm="mri", cache_dir=args.cache_dir,
              n_slices=min(args.test_slices, args.train_slices), step=args.slice_step)
    S = slice_stack(test, desc="test", **kw)
    P = C.grid_patch_set(S, c, args.test_stride, args.min_brain)
    if P is None:
        fail(f"no {c}x{c} test patch with >= {args.min_brain:.0%} brain; lower --patch-size or "
             f"--min-brain")
    if not any(S.cases[i].label == 0 for i in set(S.case[P["row"]])):     # the AUROCs' negatives
        fail(f"no test patch of a normal scan at the {kw['n_slices']} central slices (BraTS's "
             f"normal scans are its tumour-free slices, away from the centre); raise "
             f"--test-slices (--train-slices bounds it)")
    # BraTS without --train-data leaves no healthy validation patch at the test level (the central
    # slices of its validation subjects hold tumour): then training patches set the operating point
    V = C.grid_patch_set(slice_stack(data.val, desc="val", **kw), c, args.test_stride,
                         args.min_brain)
    rng = np.random.default_rng([args.seed, 1])
    if V is not None and args.val_patches and len(V["x"]) > args.val_patches:
        keep = np.sort(rng.choice(len(V["x"]), args.val_patches, replace=False))
        V = {k: v[keep] for k, v in V.items()}
    if V is None:
        log("warning: no healthy validation patch; training patches set the operating point")
    n_tr = min(args.train_eval_patches or len(X), len(X))
    x_val = None if V is None else V["x"]
    return S, P, x_val, X[rng.choice(len(X), n_tr, replace=False), 0].numpy()


def ct_or_mri_stacks(args, run):
    """fanogan3d.py's data, §2 preprocessing: skull strip, crop the black borders, smooth, pad to a
    cube, resize (linear) to --size, then the CT window [-20, 100] HU -> [-1, 1] (steps 6-7), or for
    MRI the tissue median -> -1/3 (normalize_mri); --dims 2: middle axial slices (§3)."""
    data = load_dataset(args, contrast=(args.modality or "ct") if args.data == "synthetic"
                        else "ct")
    norm, to = choose_normalisation(args, data, run)
    hint = ("are these MRI volumes? pass --modality t1|t2|flair" if norm == "ct"
            else "pass --modality ct for CT volumes")
    kw = dict(norm=norm, ct_window=tuple(args.window), cache_dir=args.cache_dir, hint=hint)
    if args.dims == 3:
        stack, kw = volume_stack, dict(kw, size=(args.size,) * 3, smooth_sigma=args.smooth_sigma)
    else:
        stack, kw = slice_stack, dict(kw, size=(args.size,) * 2, n_slices=args.n_slices,
                                      center=0.5)
    S = [stack(c, desc=d, **kw) if c else None
         for c, d in zip((data.train, data.val, data.test), ("train", "val", "test"))]
    check_not_constant(S[0], "training " + ("volumes" if args.dims == 3 else "slices"),
                       f"the {to} ({hint})")
    run.log(f"{args.dims}D data: " + ", ".join(f"{k} {None if a is None else a.x.shape}"
                                               for k, a in zip(("train", "val", "test"), S)))
    return (data, *S)
