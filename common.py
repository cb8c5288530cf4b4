"""Plumbing shared by the five method scripts: loading, windowing, metrics, plotting, run files.

This module holds no paper: no network, no loss, no anomaly score. Those live in each method's
script (anogan.py, fanogan3d.py, anovaegan.py, madgan.py, reversed_ae.py) even where two of them
look alike, so that every script can be read on its own, top to bottom, next to its paper.

Sections, in order:
  1. Errors          -- one clear `error:` line for user mistakes (../shared/CONTRACT.md, "Bad input")
  2. Loading         -- NIfTI reading (nibabel, canonical orientation), cases, the dataset registry
                        (`synthetic`, `folder` and the real datasets), subject-level splits
  3. Windowing       -- CT windowing, MRI normalisation, crops/resizes, axial slices, memory-mapped
                        caches of preprocessed slices and volumes, patches, slice windows, augmentation
  4. Metrics         -- AUROC/AUPRC (scikit-learn), Youden point, Dice, thresholds from healthy data,
                        3D post-processing, per-group evaluation
  5. Plotting        -- ROC curves, score distributions, example grids, training curves (Agg backend)
  6. Run files       -- arguments and presets, seeding, device, checkpoints, config/results/scores
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
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
# 2. Loading
# =================================================================================================

DATA_README = "data/README.md"


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


def read_case(case: Case, kind="mri"):
    """-> image float32 (X, Y, Z), anomaly mask uint8 or None, brain mask uint8, spacing."""
    img, spacing, _ = read_nifti(case.image)
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
    if brain is None:
        brain = auto_brain_mask(img, kind)
    return img, mask, brain, spacing


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


def _stem(p: Path):
    n = p.name
    for e in NIFTI_EXT:
        if n.endswith(e):
            return n[: -len(e)]
    return n


def _images_in(folder: Path):
    """Image files in a folder (not masks), sorted by name, with their side files."""
    out = []
    if not folder.is_dir():
        return out
    files = sorted(p for p in folder.iterdir() if p.name.endswith(NIFTI_EXT))
    names = {_stem(p): p for p in files}
    for p in files:
        s = _stem(p)
        if s.endswith("_mask") or s.endswith("_brainmask"):
            continue
        out.append((s, p, names.get(s + "_mask"), names.get(s + "_brainmask")))
    return out


@register_dataset("folder", "ROOT/train, ROOT/val (optional), ROOT/test/<group>/ of NIfTI volumes")
def load_folder(root: Path, args=None, contrast=None) -> Splits:
    """The contract's `--data folder` layout (../shared/CONTRACT.md)."""
    meta = {}
    if (root / "meta.json").is_file():
        meta = json.loads((root / "meta.json").read_text())

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
    s = load_folder(Path(variant), args)
    s.info.update({"phantom": f"{contrast}_{size}", "phantom_ready_s": round(time.time() - t, 2)})
    return s


def load_dataset(args, contrast="t1", groups=None) -> Splits:
    """Resolve --data/--data-root (and --train-data/--train-root) into train/val/test cases.

    `contrast` picks the phantom's contrast for `--data synthetic` (real loaders use --modality).
    `groups` keeps only these test groups (plus the normal ones)."""
    def one(name, root):
        if name not in DATASETS:
            fail(f"--data {name}: unknown dataset; choose one of {', '.join(sorted(DATASETS))}")
        root = Path(root) if root else (REPO / "data" / name)
        if name != "synthetic" and not root.is_dir():
            fail(f"data root {root} for --data {name} does not exist; {DATA_README} explains how to get "
                 f"the {name} dataset and which folder to pass as --data-root")
        return DATASETS[name][0](root, args, contrast)

    s = one(args.data, args.data_root)
    if getattr(args, "train_data", None):
        t = one(args.train_data, args.train_root)
        s.info["train_from"] = args.train_data
        s = Splits(t.train, t.val, s.test, {**s.info, "train_info": t.info})
    if groups is not None and any(c.group in groups for c in s.test if c.label == 1):
        # the groups a script asks for (e.g. the phantom's) filter only data sets that have them
        s.test = [c for c in s.test if c.label == 0 or c.group in groups]
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
        rest, test = subject_split(cases, _test_frac(args) or 0.3, seed)
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
    for p, _ in _walk(root, r".*\.csv"):
        try:
            with open(p, newline="", encoding="utf-8-sig") as f:
                rows = list(csv.DictReader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            if re.search(r"cdr|clinical|uds", p.name, re.IGNORECASE):
                fail(f"--data oasis3: cannot read the CDR table {p} ({type(e).__name__}); re-download it")
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
    used = [{"path": str(p), "schema": s, "rows": len(v)} for _, p, s, v in tables]
    return out, used, {"cdr_rows_without_subject_day_or_cdr": skipped, "cdr_visits_conflicting": conflicts}


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
                      "(~51 per scan); choose the range with the script's slice flags"}
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
                          meta={"release": release, "modality": t}))
    _check_headers("brats", [p for c in cases for p in (c.image, c.mask)])
    train, val, test, sinfo = _anomalous_splits("brats", cases, args, "tumor", "tumour")
    info = {"dataset": "brats", "root": str(root), "modality": key,
            "releases": {r: sum(c.meta["release"] == r for c in cases) for r in sorted({c.meta["release"] for c in cases})},
            **sinfo, "groups": _counts(train + val + test), **ex.info()}
    return Splits(train, val, test, info)


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
                rows.setdefault(int(float(r["PatientNumber"])), []).append(
                    {k: int(float(r[k] or 0)) for k in need[2:]})
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as e:
        fail(f"--data ctich: cannot read {tables[0]} ({type(e).__name__}: {e}); re-download it")
    ex, normal, bleed = _Excluded(), [], []
    for pid, p in sorted(scans.items()):
        if pid not in rows:
            ex(f"no rows in {tables[0].name}", p.name)
            continue
        mask = next((q for q in (p.parent.parent / "masks" / p.name,
                                 p.parent.parent / "masks" / (p.name + ".gz"),
                                 p.parent.parent / "masks" / p.name.replace(".nii.gz", ".nii"))
                     if q.is_file()), None)
        slices = rows[pid]
        per_type = {t.lower(): sum(r[t] for r in slices) for t in CTICH_TYPES}
        types = [t for t, n in per_type.items() if n > 0]
        meta = {"subtypes": types, "slices_per_type": {t: per_type[t] for t in types},
                "fracture": any(r["Fracture_Yes_No"] for r in slices), "n_slices_csv": len(slices)}
        c = Case(id=f"{pid:03d}", subject=f"ctich{pid:03d}", group="", label=0, image=str(p),
                 mask=str(mask) if mask else None, meta=meta)
        if all(r["No_Hemorrhage"] == 1 for r in slices):
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
            "brain_mask": "none in the data set: auto_brain_mask(kind='ct'), a simple HU skull strip", **ex.info()}
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
                                            "preprocessed": found[0][0] == 0}))
    _check_headers("isbi2015", [p for c in cases for p in (c.image, c.mask)])
    train, val, test, sinfo = _anomalous_splits("isbi2015", cases, args, "ms_lesion", "lesion")
    info = {"dataset": "isbi2015", "root": str(root), "modality": tok, **sinfo,
            "groups": _counts(train + val + test), **ex.info()}
    return Splits(train, val, test, info)


# =================================================================================================
# 3. Windowing and preprocessing
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


@dataclass
class ArraySet:
    """Preprocessed arrays of a list of cases (memory-mapped when cached)."""
    x: np.ndarray          # (N, H, W) slices or (N, D, H, W) volumes, float32 in [-1, 1]
    mask: np.ndarray       # same shape, uint8 anomaly mask (zeros where a case has none)
    brain: np.ndarray      # same shape, uint8 brain mask
    case: np.ndarray       # (N,) int32 index into `cases`
    z: np.ndarray          # (N,) int32 axial index of the slice in its volume (0 for volumes)
    cases: list

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


def _cached_build(kind, cases, params, cache_dir, builder, desc):
    """Build (or reuse) a memory-mapped cache: raw .dat arrays appended case by case, so peak memory
    is one case, not the data set. Built in a temp dir and renamed, so a crash leaves no half cache."""
    cache_dir = Path(cache_dir or REPO / "data" / "cache")
    key = _cache_key(cases, {"kind": kind, **params})
    d = cache_dir / f"{kind}-{key}"
    if not (d / "meta.json").is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_dir / f".tmp-{kind}-{key}-{os.getpid()}"
        tmp.mkdir(parents=True, exist_ok=True)
        files = {k: open(tmp / f"{k}.dat", "wb") for k in ("x", "mask", "brain", "case", "z")}
        n, shape, t0 = 0, None, time.time()
        for i, c in enumerate(progress(cases, total=len(cases), desc=f"cache {desc}")):
            x, m, b, z = builder(c)
            shape = x.shape[1:]
            files["x"].write(x.astype(np.float32).tobytes())
            files["mask"].write(m.astype(np.uint8).tobytes())
            files["brain"].write(b.astype(np.uint8).tobytes())
            files["case"].write(np.full(len(x), i, np.int32).tobytes())
            files["z"].write(np.asarray(z, np.int32).tobytes())
            n += len(x)
        for f in files.values():
            f.close()
        (tmp / "meta.json").write_text(json.dumps({"n": n, "shape": list(shape), "params": params,
                                                   "build_s": round(time.time() - t0, 2)}, default=str))
        try:
            os.rename(tmp, d)
        except OSError:  # another process finished the same cache first
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    meta = json.loads((d / "meta.json").read_text())
    n, shape = meta["n"], tuple(meta["shape"])

    def mm(k, dt, shp):
        return np.memmap(d / f"{k}.dat", dtype=dt, mode="r", shape=shp) if n else np.zeros(shp, dt)
    return ArraySet(x=mm("x", np.float32, (n, *shape)), mask=mm("mask", np.uint8, (n, *shape)),
                    brain=mm("brain", np.uint8, (n, *shape)), case=np.array(mm("case", np.int32, (n,))),
                    z=np.array(mm("z", np.int32, (n,))), cases=list(cases))


def slice_stack(cases, size=(128, 128), norm="mri", n_slices=20, center=0.5, step=1,
                ct_window=(-20, 100), crop=True, strip=True, margin=2, cache_dir=None, desc="",
                drop_anomalous=True) -> ArraySet:
    """Axial slices of each case, normalised to [-1, 1] and resized to `size`, memory-mapped.

    Per case: `n_slices` consecutive slices (every `step`-th) centred at `center` = fraction of the
    brain's inferior->superior extent (0 = lowest brain slice, 1 = highest); n_slices=None takes every
    slice that contains brain. In-plane, all slices of a case share one crop (the brain's bounding box
    over the chosen slab + `margin`, padded to a square) so adjacent slices stay aligned.
    `drop_anomalous`: for real data sets whose every scan is anomalous (BraTS, MSLUB, ISBI 2015),
    cases whose meta says {"healthy_slices_only": True} (healthy training slices, the test's `normal`
    group) keep only the chosen slices without anomaly-mask voxels, and cases marked
    {"anomalous_slices_only": True} only those with some; a case left with no slice is dropped
    from S.cases (S.case indexes the remaining ones)."""
    kind = "ct" if norm == "ct" else "mri"
    params = dict(size=list(size), norm=norm, n_slices=n_slices, center=center, step=step,
                  ct_window=list(ct_window), crop=crop, strip=strip, margin=margin)
    only = {k: [i for i, c in enumerate(cases) if drop_anomalous and c.meta.get(k)]
            for k in ("healthy_slices_only", "anomalous_slices_only")}
    params.update({k: v for k, v in only.items() if v})

    def build(c):
        img, m, b, _ = read_case(c, kind)
        x = axial_stack(_normalize(img, b, norm, ct_window, strip))          # (Z, H, W)
        b = axial_stack(b)
        m = axial_stack(m) if m is not None else np.zeros_like(b)
        zs = np.nonzero(b.reshape(len(b), -1).any(1))[0]
        lo, hi = (int(zs.min()), int(zs.max())) if len(zs) else (0, len(b) - 1)
        if n_slices is None:
            z = np.arange(lo, hi + 1, step)
        else:
            span = (n_slices - 1) * step
            start = int(round(lo + center * (hi - lo) - span / 2))
            start = min(max(start, 0), max(len(b) - 1 - span, 0))
            z = np.clip(start + np.arange(n_slices) * step, 0, len(b) - 1)
        x, m, b = x[z], m[z], b[z]
        if crop:
            _, sy, sx = bbox(b, margin)
            x, m, b = x[:, sy, sx], m[:, sy, sx], b[:, sy, sx]
        if drop_anomalous and (c.meta.get("healthy_slices_only") or c.meta.get("anomalous_slices_only")):
            # after the crop, so that both parts of a scan share the crop of the whole slab
            keep = m.reshape(len(m), -1).any(1) == bool(c.meta.get("anomalous_slices_only"))
            x, m, b, z = x[keep], m[keep], b[keep], z[keep]
            if not len(z):
                e = np.zeros((0, *size), np.float32)
                return e, e.astype(bool), e.astype(bool), z
        x, m, b = pad_to_square(x, -1.0), pad_to_square(m, 0), pad_to_square(b, 0)
        return (resize(x, size, 1), resize(m, size, 1) > 0.5, resize(b, size, 1) > 0.5, z)
    S = _cached_build("slices", cases, params, cache_dir, build, desc)
    n = np.bincount(S.case, minlength=len(cases))
    if (n == 0).any():   # cases left without slices by drop_anomalous
        keep = np.nonzero(n)[0]
        new = np.full(len(cases), -1, np.int32)
        new[keep] = np.arange(len(keep), dtype=np.int32)
        S.case, S.cases = new[S.case], [cases[i] for i in keep]
    return S


def volume_stack(cases, size=(64, 64, 64), norm="ct", ct_window=(-20, 100), smooth_sigma=0.0,
                 crop=True, strip=True, margin=1, cache_dir=None, desc="") -> ArraySet:
    """Whole volumes (D, H, W) = (axial, anterior->posterior, left->right), normalised to [-1, 1]:
    skull-stripped with the brain mask (`strip`), cropped to the brain's bounding box (removes black
    borders), optional Gaussian smoothing (sigma in voxels, before resizing), padded to a cube and
    resized (linear) to `size`. Memory-mapped like slice_stack."""
    kind = "ct" if norm == "ct" else "mri"
    params = dict(size=list(size), norm=norm, ct_window=list(ct_window), smooth=smooth_sigma, crop=crop,
                  strip=strip, margin=margin)

    def build(c):
        img, m, b, _ = read_case(c, kind)
        x = axial_stack(_normalize(img, b, norm, ct_window, strip))
        b = axial_stack(b)
        m = axial_stack(m) if m is not None else np.zeros_like(b)
        if crop:
            sl = bbox(b, margin)
            x, m, b = x[sl], m[sl], b[sl]
        x = gaussian_smooth(x, smooth_sigma)
        x, m, b = pad_to_cube(x, -1.0), pad_to_cube(m, 0), pad_to_cube(b, 0)
        return (resize(x, size, 1)[None], (resize(m, size, 1) > 0.5)[None], (resize(b, size, 1) > 0.5)[None],
                np.zeros(1, np.int32))
    return _cached_build("volumes", cases, params, cache_dir, build, desc)


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
# 4. Metrics
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
# 5. Plotting
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
# 6. Run files: arguments, seeding, device, checkpoints, results
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
    g.add_argument("--data", default="synthetic", help=f"dataset: {', '.join(sorted(DATASETS))} (default synthetic)")
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
