"""Tiny copies of the real data sets' trees, for tests (../shared/DATASETS.md, data/README.md).

Each `make_<name>(root)` writes, under `root`, a few small volumes (48×56×40 voxels by default, a
head with skull, cortex, white matter and ventricles, or a skull-stripped brain where the real data
set is skull-stripped) with the real data set's file names, folder layouts and CSV headers, and
returns `root`. The trees are big enough for the method scripts' smoke presets:

    from tests.fixtures import make_oasis3
    root = make_oasis3(tmp_path / "oasis3")
    subprocess.run([sys.executable, "madgan.py", "--data", "oasis3", "--data-root", str(root),
                    "--preset", "smoke", "--out", str(tmp_path / "run")], check=True)

What each tree contains (and so what a loader must find in it) is listed in the builder's docstring.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

SHAPE = (48, 56, 40)   # (X, Y, Z) = (left-right, posterior-anterior, inferior-superior), RAS

# tissue intensities per contrast: background, scalp, skull, CSF, grey matter, white matter, lesion
TISSUE = {
    "t1": dict(bg=0, scalp=350, skull=60, csf=180, gm=560, wm=820, lesion=300, noise=18),
    "t2": dict(bg=0, scalp=300, skull=40, csf=950, gm=620, wm=430, lesion=880, noise=18),
    "flair": dict(bg=0, scalp=280, skull=40, csf=120, gm=520, wm=400, lesion=900, noise=15),
    "pd": dict(bg=0, scalp=500, skull=60, csf=800, gm=720, wm=600, lesion=820, noise=18),
    "ct": dict(bg=-1000, scalp=30, skull=1200, csf=6, gm=40, wm=27, lesion=72, noise=3),
}


LABELS = ("bg", "scalp", "skull", "csf", "gm", "wm", "lesion")   # tissue label k = LABELS[k]


def head_labels(rng, shape=SHAPE, skull=True, atrophy=0.0, lesions=()):
    """A head as a tissue label map (indices into LABELS) -> (labels uint8, brain mask uint8, anomaly mask uint8).

    atrophy >= 0 enlarges the ventricles and sulci and thins the cortex (CDR-like stages 0.5, 1, 2).
    lesions: list of (centre as fractions of the brain box (fx, fy, fz), radius in voxels)."""
    g = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    c = (np.array(shape, np.float32) - 1) / 2 + rng.uniform(-1, 1, 3).astype(np.float32)
    r = np.array(shape, np.float32) * np.array([0.34, 0.36, 0.36], np.float32) * np.float32(rng.uniform(0.95, 1.04))
    d = np.sqrt((((g - c[:, None, None, None]) / r[:, None, None, None]) ** 2).sum(0))  # 1 = brain surface
    lab = np.zeros(shape, np.uint8)
    if skull:
        lab[(d >= 1.08) & (d < 1.22)] = 1
        lab[(d >= 1.0) & (d < 1.08)] = 2
    brain = d < 1.0
    lab[brain] = 3
    lab[d < 0.97] = 4
    lab[d < 0.78 - 0.1 * atrophy] = 5
    for side in (-1, 1):   # lateral ventricles, larger with atrophy
        v = g - (c + np.array([side * 0.18 * r[0], 0.05 * r[1], 0.1 * r[2]], np.float32))[:, None, None, None]
        vr = np.array([0.1, 0.38, 0.22], np.float32) * r * (1 + 0.5 * atrophy)
        lab[((v / vr[:, None, None, None]) ** 2).sum(0) < 1] = 3
    ang = np.arctan2(g[1] - c[1], g[0] - c[0])   # sulci: CSF clefts through the cortex
    lab[(d > 0.8 - 0.1 * atrophy) & brain & (np.cos(ang * 7 + rng.uniform(0, 6)) > 0.93 - 0.1 * atrophy)] = 3
    mask = np.zeros(shape, np.uint8)
    for (fx, fy, fz), rad in lesions:
        p = c + (np.array([fx, fy, fz], np.float32) - 0.5) * 2 * r * 0.6
        blob = (((g - p[:, None, None, None]) ** 2).sum(0) < rad ** 2) & brain
        lab[blob] = 6
        mask[blob] = 1
    return lab, brain.astype(np.uint8), mask


def paint(lab, contrast, rng):
    """Label map -> image of the contrast's tissue intensities plus noise (none in the background)."""
    t = TISSUE[contrast]
    img = np.array([t[k] for k in LABELS], np.float32)[lab]
    return img + rng.normal(0, t["noise"], lab.shape).astype(np.float32) * (lab > 0)


def head(seed=0, contrast="t1", shape=SHAPE, skull=True, atrophy=0.0, lesions=(), rng=None):
    """A head volume -> (image float32, brain mask uint8, anomaly mask uint8); see head_labels."""
    rng = rng or np.random.default_rng(seed)
    lab, brain, mask = head_labels(rng, shape, skull, atrophy, lesions)
    return paint(lab, contrast, rng), brain, mask


def save(path, arr, dtype=np.int16, spacing=(1.0, 1.0, 1.0)):
    """Write a NIfTI file (.nii or .nii.gz by the name) with a diagonal RAS affine."""
    import nibabel as nib
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    aff = np.diag([*spacing, 1.0])
    nib.save(nib.Nifti1Image(np.asarray(np.round(arr) if np.dtype(dtype).kind in "iu" else arr, dtype=dtype), aff),
             str(path))
    return path


def _csv(path, header, rows):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


# ---- OASIS-3 ------------------------------------------------------------------------------------

# subject -> clinical visits (day, CDR)
OASIS3_VISITS = {
    "OAS30001": [(0, 0.0), (380, 0.0)],
    "OAS30002": [(50, 0.0), (900, 0.0)],
    "OAS30003": [(10, 0.0)],
    "OAS30004": [(0, 0.0), (300, 0.0)],
    "OAS30005": [(0, 0.0), (650, 0.0)],
    "OAS30006": [(0, 0.0)],
    "OAS30007": [(0, 0.0), (1100, 0.0)],
    "OAS30010": [(0, 0.0), (700, 0.5)],      # CDR changes: never healthy
    "OAS30011": [(0, 0.5), (400, 1.0)],      # closest-date rule
    "OAS30012": [(0, 2.0)],
    "OAS30013": [(0, 1.0), (365, 1.0)],
}
# (subject, day, layout, extra): layout bids | bids-sess | download | xnat; extra: run numbers
OASIS3_SCANS = [
    ("OAS30001", 0, "bids", (1, 2)),          # a session with two runs: run-01 is used
    ("OAS30001", 400, "bids", ()),
    ("OAS30002", 100, "bids-sess", ()),       # `sess-` spelling
    ("OAS30003", 0, "download", (1,)),        # OAS30003_MR_d0000/anat1/ (+ .json sidecar)
    ("OAS30004", 200, "xnat", ()),            # raw XNAT layout
    ("OAS30005", 0, "bids", ()),
    ("OAS30005", 700, "download", (1,)),
    ("OAS30006", 0, "bids", (1,)),
    ("OAS30007", 0, "bids", ()),
    ("OAS30007", 1000, "xnat", ()),
    ("OAS30010", 0, "bids", ()),              # CDR 0 scan of a changing subject: excluded
    ("OAS30010", 720, "bids", ()),            # -> cdr_0.5
    ("OAS30011", 100, "download", (1,)),      # closest visit d0000 -> cdr_0.5
    ("OAS30011", 250, "bids", ()),            # closest visit d0400 (150 days, not 250) -> cdr_1
    ("OAS30012", 30, "xnat", ()),             # -> cdr_2
    ("OAS30012", 1500, "bids", ()),           # closest visit 1500 days away: outside the window
    ("OAS30013", 0, "bids-sess", ()),         # -> cdr_1
    ("OAS30014", 0, "bids", ()),              # no CDR visit at all: excluded
]
OASIS3_EXPECTED = {   # with --cdr-window-days 365
    "healthy": ["OAS30001_MR_d0000", "OAS30001_MR_d0400", "OAS30002_MR_d0100", "OAS30003_MR_d0000",
                "OAS30004_MR_d0200", "OAS30005_MR_d0000", "OAS30005_MR_d0700", "OAS30006_MR_d0000",
                "OAS30007_MR_d0000", "OAS30007_MR_d1000"],
    "cdr_0.5": ["OAS30010_MR_d0720", "OAS30011_MR_d0100"],
    "cdr_1": ["OAS30011_MR_d0250", "OAS30013_MR_d0000"],
    "cdr_2": ["OAS30012_MR_d0030"],
    "excluded": {"run": 1, "changing_cdr0": 1, "window": 1, "no_cdr": 1},
}


def _oasis3_file(root, subj, day, layout, run):
    ses = f"d{day:04d}"
    key = "sess" if layout == "bids-sess" else "ses"
    name = f"sub-{subj}_{key}-{ses}{f'_run-{run:02d}' if run else ''}_T1w.nii.gz"
    if layout in ("bids", "bids-sess"):
        return root / f"sub-{subj}" / f"{key}-{ses}" / "anat" / name
    if layout == "download":
        return root / f"{subj}_MR_{ses}" / "anat1" / name
    return root / f"{subj}_MR_{ses}" / "scans" / "anat2-T1w" / "resources" / "NIFTI" / "files" / name


def make_oasis3(root, csv_schema="both", shape=SHAPE):
    """OASIS-3: T1w scans of OASIS3_SCANS in the BIDS, download-script and raw XNAT layouts, and the
    CDR visits of OASIS3_VISITS in the current (`OASIS3_UDSb4_cdr.csv`, nested under
    OASIS3_data_files/) and/or the legacy ADRC clinical csv schema (`csv_schema` = udsb4 | legacy |
    both: subjects OAS30011-13 go to the legacy table, the others to the current one). Scans of
    subjects with a higher CDR have larger ventricles. OASIS3_EXPECTED says what a loader must find."""
    root = Path(root)
    cdr_of = {s: max(c for _, c in v) for s, v in OASIS3_VISITS.items()}
    for i, (subj, day, layout, runs) in enumerate(OASIS3_SCANS):
        for run in runs or (0,):
            img, _, _ = head(seed=1000 + i * 7 + run, contrast="t1", shape=shape, atrophy=cdr_of.get(subj, 0.0))
            p = save(_oasis3_file(root, subj, day, layout, run), img)
            if layout == "download":
                p.with_name(p.name.replace(".nii.gz", ".json")).write_text(
                    json.dumps({"MagneticFieldStrength": 3, "Manufacturer": "Siemens"}))
    udsb4, legacy = [], []
    for subj, visits in OASIS3_VISITS.items():
        for day, cdr in visits:
            to_legacy = csv_schema == "legacy" or (csv_schema == "both" and subj in ("OAS30011", "OAS30012", "OAS30013"))
            if to_legacy:
                legacy.append([f"{subj}_ClinicalData_d{day:04d}", subj, day, 70.5, 29, 68.0, cdr, 0.0,
                               "Cognitively normal" if cdr == 0 else "AD Dementia", cdr * 2])
            else:
                udsb4.append([subj, f"{subj}_UDSb4_d{day:04d}", day, 71.2, 29, cdr, cdr * 2,
                              "Cognitively normal" if cdr == 0 else "AD Dementia"])
    if udsb4:
        udsb4.insert(2, ["OAS30006", "OAS30006_UDSb4_d0500", 500, 72.0, "", "", "", ""])   # a visit without CDR
        _csv(root / "OASIS3_data_files" / "UDSb4" / "csv" / "OASIS3_UDSb4_cdr.csv",
             ["OASISID", "OASIS_session_label", "days_to_visit", "age at visit", "MMSE", "CDRTOT",
              "CDRSUM", "dx1"], udsb4)
    if legacy:
        _csv(root / "ADRC_Clinical_Data.csv",
             ["ADRC_ADRCCLINICALDATA ID", "Subject", "Date", "Age", "mmse", "ageAtEntry", "cdr", "commun",
              "dx1", "sumbox"], legacy)
    _csv(root / "OASIS3_data_files" / "demo" / "OASIS3_demographics.csv", ["OASISID", "AgeatEntry", "GENDER"],
         [[s, 70, 1] for s in OASIS3_VISITS])   # an unrelated csv the loader must ignore
    return root


# ---- a raw T1w head with neck and shoulders (OASIS-3 is not skull-stripped) ----------------------
# In millimetres, in Talairach-like scanner coordinates (RAS, origin on the AC-PC plane at the
# midline; Talairach & Tournoux 1988): the top of the brain 74 mm above the AC-PC plane, scalp and
# skull 13 mm over it, so the top of the head is at z = +87; the head is 162 x 194 mm. Shapes: an
# ellipsoid (centre, semi-axes), a "pair" of ellipsoids at +-x, a vertical cylinder (centre x, y;
# (radius, z_lo, z_hi)). Later parts overwrite earlier ones.
# (part, tissue label, shape, centre (x, y, z), semi-axes or (radius, z_lo, z_hi))
NECK_HEAD_PARTS = [
    ("head", "scalp", "ellipsoid", (0, -17, 15), (81, 97, 72)),
    ("face", "scalp", "ellipsoid", (0, 25, -45), (58, 60, 50)),              # face and jaw
    ("neck", "scalp", "cylinder", (0, -20, 0), (55, -200, -40)),
    ("shoulders", "scalp", "ellipsoid", (0, -20, -290), (240, 95, 120)),     # wider than the FOV
    ("spine", "skull", "cylinder", (0, -40, 0), (9, -200, -45)),
    ("airway", "bg", "cylinder", (0, 10, 0), (7, -170, -60)),
    ("skull", "skull", "ellipsoid", (0, -17, 15), (76, 92, 66)),
    ("csf", "csf", "ellipsoid", (0, -17, 15), (70, 86, 62)),
    ("cortex", "gm", "ellipsoid", (0, -17, 15), (68, 84, 59)),               # cerebrum: z -44..74
    ("white matter", "wm", "ellipsoid", (0, -17, 15), (65, 81, 56)),
    ("cerebellum", "gm", "ellipsoid", (0, -55, -35), (50, 30, 22)),
    ("ventricles", "csf", "pair", (10, -10, 14), (7, 30, 13)),               # z 1..27
    ("temporal horns", "csf", "pair", (30, -12, -12), (4, 14, 6)),           # z -18..-6
    ("hippocampus", "gm", "pair", (28, -24, -9), (6, 18, 9)),                # z -18..0
    ("amygdala", "gm", "pair", (22, -4, -17), (7, 7, 7)),                    # z -24..-10
]
# what MADGAN's slab must cover (its lateral ventricles include the temporal horns)
NECK_HEAD_STRUCTURES = {"ventricles": ("ventricles", "temporal horns"),
                        "hippocampus": ("hippocampus",), "amygdala": ("amygdala",)}
NECK_HEAD_TOP_MM = 87.0


def _part(X, Y, Z, shape, c, r):
    """Boolean mask of one NECK_HEAD_PARTS shape on the broadcast grid X, Y, Z (mm)."""
    if shape == "cylinder":
        return ((X - c[0]) ** 2 + (Y - c[1]) ** 2 < r[0] ** 2) & (Z > r[1]) & (Z < r[2])
    m = False
    for cx in ((c[0], -c[0]) if shape == "pair" else (c[0],)):
        m = m | (((X - cx) / r[0]) ** 2 + ((Y - c[1]) / r[1]) ** 2 + ((Z - c[2]) / r[2]) ** 2 < 1)
    return m


def neck_head(spacing=(2.0, 2.0, 1.5), fov_mm=(176, 208, 300), top_margin_mm=10.0, seed=0):
    """A T1w head with neck and shoulders on a grid of `spacing` mm -> (image float32 (X, Y, Z),
    affine (scanner mm = the coordinates of NECK_HEAD_PARTS), {structure: (z_lo, z_hi)}: the
    scanner z of the lowest and highest slice that holds some of each NECK_HEAD_STRUCTURES). The
    field of view `fov_mm` ends `top_margin_mm` above the head and reaches down into the neck."""
    spacing = np.asarray(spacing, float)
    shape = tuple(int(round(f / s)) for f, s in zip(fov_mm, spacing))
    corner = [-fov_mm[0] / 2, -17 - fov_mm[1] / 2, NECK_HEAD_TOP_MM + top_margin_mm - fov_mm[2]]
    origin = np.array(corner) + spacing / 2                           # the first voxel's centre
    x, y, z = (origin[a] + spacing[a] * np.arange(shape[a], dtype=np.float32) for a in range(3))
    X, Y, Z = x[:, None, None], y[None, :, None], z[None, None, :]   # broadcast, not a full grid
    lab = np.zeros(shape, np.uint8)
    parts = {}
    for name, tissue, kind, c, r in NECK_HEAD_PARTS:
        parts[name] = np.broadcast_to(_part(X, Y, Z, kind, c, r), shape)
        lab[parts[name]] = LABELS.index(tissue)
    levels = {}
    for name, members in NECK_HEAD_STRUCTURES.items():
        ks = np.nonzero(np.any([parts[m] for m in members], axis=0).any(axis=(0, 1)))[0]
        levels[name] = (float(z[ks.min()]), float(z[ks.max()]))
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return paint(lab, "t1", np.random.default_rng(seed)), affine, levels


def make_neck_head(path, **kw):
    """neck_head() written to `path` (int16 NIfTI with its affine) -> (path, levels)."""
    import nibabel as nib
    img, affine, levels = neck_head(**kw)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.round(img).astype(np.int16), affine), str(path))
    return path, levels


# ---- IXI ----------------------------------------------------------------------------------------

IXI_SUBJECTS = ["IXI002-Guys-0828", "IXI012-HH-1211", "IXI013-HH-1212", "IXI014-HH-1236",
                "IXI015-HH-1258", "IXI016-Guys-0697", "IXI017-Guys-0698", "IXI019-Guys-0702",
                "IXI020-Guys-0700", "IXI021-Guys-0703", "IXI022-Guys-0701", "IXI023-Guys-0699",
                "IXI024-Guys-0705", "IXI025-Guys-0852"]


def make_ixi(root, n=10, modalities=("T1", "T2"), shape=SHAPE):
    """IXI: one flat folder per modality (IXI-T1/, IXI-T2/) of `IXI002-Guys-0828-T1.nii.gz` files,
    heads with skull (IXI is not skull-stripped); the last subject has no T2 image."""
    root = Path(root)
    for i, s in enumerate(IXI_SUBJECTS[:n]):
        rng = np.random.default_rng(2000 + i)
        lab, _, _ = head_labels(rng, shape)
        for mod in modalities:
            if mod == "T2" and i == n - 1:
                continue
            save(root / f"IXI-{mod}" / f"{s}-{mod}.nii.gz", paint(lab, mod.lower(), rng))
    return root


# ---- BraTS --------------------------------------------------------------------------------------

def _tumour(rng, shape, seg_labels):
    """-> (tissue labels, seg): a skull-stripped brain with one tumour; seg = edema / enhancing /
    necrotic core as nested shells of the blob, with the release's label values."""
    from scipy.ndimage import binary_erosion
    # off the axial centre, so that a central slab of slices has tumour and tumour-free slices
    centre = (rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.choice([0.3, 0.7]) + rng.uniform(-0.02, 0.02))
    lab, _, mask = head_labels(rng, shape, skull=False, lesions=[(centre, 4.5)])
    seg = mask.astype(np.uint8) * seg_labels[1]
    inner = binary_erosion(mask, iterations=2)
    seg[inner] = seg_labels[2]
    seg[binary_erosion(inner, iterations=2)] = seg_labels[0]
    return lab, seg


def make_brats(root, release="2021", n=6, shape=SHAPE):
    """BraTS `release` 2020 | 2021 | 2023: n training cases (folder per case, four modalities and a
    seg with the release's labels; skull-stripped brains with one tumour each) and, under
    validation/, one validation case without seg (a loader must exclude it). 2020 adds case 355 whose seg is named W39_1998.09.19_Segm.nii (as in the real
    release); 2023 gives the last subject a second timepoint (BraTS-GLI-0000k-001)."""
    root = Path(root)
    for i in range(n):
        if release == "2023":
            cid = f"BraTS-GLI-{i:05d}-000"
            mods, seg_labels, sep, ext = ("t1n", "t1c", "t2w", "t2f"), (1, 2, 3), "-", ".nii.gz"
        elif release == "2021":
            cid = f"BraTS2021_{i:05d}"
            mods, seg_labels, sep, ext = ("t1", "t1ce", "t2", "flair"), (1, 2, 4), "_", ".nii.gz"
        else:
            cid = f"BraTS20_Training_{i + 1:03d}" if i < n - 1 else "BraTS20_Training_355"
            mods, seg_labels, sep, ext = ("t1", "t1ce", "t2", "flair"), (1, 2, 4), "_", ".nii"
        _brats_case(root / cid, cid, i, mods, seg_labels, sep, ext, shape,
                    seg_name="W39_1998.09.19_Segm.nii" if cid == "BraTS20_Training_355" else None)
        if release == "2023" and i == n - 1:
            c2 = f"BraTS-GLI-{i:05d}-001"
            _brats_case(root / c2, c2, i + 100, mods, seg_labels, sep, ext, shape)
    val = {"2023": "BraTS-GLI-09999-000", "2021": "BraTS2021_09999", "2020": "BraTS20_Validation_001"}[release]
    vmods = ("t1n", "t1c", "t2w", "t2f") if release == "2023" else ("t1", "t1ce", "t2", "flair")
    _brats_case(root / "validation" / val, val, 99, vmods, None,
                "-" if release == "2023" else "_", ".nii.gz", shape)
    return root


def _brats_case(folder, cid, i, mods, seg_labels, sep, ext, shape, seg_name=None):
    contrast = {"t1": "t1", "t1n": "t1", "t1ce": "t1", "t1c": "t1", "t2": "t2", "t2w": "t2", "flair": "flair",
                "t2f": "flair"}
    rng = np.random.default_rng(3000 + i)
    lab, seg = _tumour(rng, shape, seg_labels or (1, 2, 4))
    for m in mods:
        img = paint(lab, contrast[m], rng)
        if m in ("t1ce", "t1c"):   # enhancing rim
            img = img + 200 * (seg == (seg_labels or (1, 2, 4))[2])
        save(folder / f"{cid}{sep}{m}{ext}", img)
    if seg_labels:
        save(folder / (seg_name or f"{cid}{sep}seg{ext}"), seg, dtype=np.uint8)


# ---- PhysioNet CT-ICH ---------------------------------------------------------------------------

CTICH_TYPES = ["Intraventricular", "Intraparenchymal", "Subarachnoid", "Epidural", "Subdural"]
# patient -> list of (hemorrhage type, centre fractions, radius); [] = normal scan
CTICH_PATIENTS = {
    49: [], 50: [], 51: [], 52: [], 53: [], 54: [], 58: [],
    66: [("Subdural", (0.15, 0.5, 0.6), 4.0), ("Subarachnoid", (0.6, 0.8, 0.45), 2.0)],   # dominant: subdural
    67: [("Intraparenchymal", (0.35, 0.45, 0.5), 4.5), ("Intraventricular", (0.55, 0.5, 0.55), 2.0)],
    68: [("Epidural", (0.85, 0.5, 0.55), 3.5)],
    69: [("Intraparenchymal", (0.6, 0.35, 0.45), 3.5)],
}


def make_ctich(root, shape=(48, 56, 32)):
    """PhysioNet CT-ICH 1.3.1: ct_scans/NNN.nii (HU, int16, uncompressed) and masks/NNN.nii for the
    patients of CTICH_PATIENTS (7 normal, 4 with hemorrhage of the listed types), and
    hemorrhage_diagnosis_raw_ct.csv with one row per slice (1-based), flags set on the slices the
    hemorrhage covers. Scan 070 has no csv rows (a loader must exclude it)."""
    root = Path(root)
    rows = []
    for pid, bleeds in CTICH_PATIENTS.items():
        rng = np.random.default_rng(4000 + pid)
        img, brain, _ = head(rng=rng, contrast="ct", shape=shape)
        mask = np.zeros(shape, np.uint8)
        flags = np.zeros((shape[2], len(CTICH_TYPES)), int)
        for kind, centre, rad in bleeds:
            _, _, m = head_labels(np.random.default_rng(4000 + pid), shape, lesions=[(centre, rad)])
            img[m > 0] = rng.normal(70, 3, int(m.sum()))
            mask[m > 0] = 1
            flags[m.reshape(-1, shape[2]).any(0), CTICH_TYPES.index(kind)] = 1
        save(root / "ct_scans" / f"{pid:03d}.nii", img, spacing=(0.45, 0.45, 5.0))
        save(root / "masks" / f"{pid:03d}.nii", mask, dtype=np.uint8, spacing=(0.45, 0.45, 5.0))
        for z in range(shape[2]):
            f = flags[z]
            rows.append([pid, z + 1, *f.tolist(), int(not f.any()), 0])
    img, _, _ = head(seed=4070, contrast="ct", shape=shape)
    save(root / "ct_scans" / "070.nii", img, spacing=(0.45, 0.45, 5.0))
    _csv(root / "hemorrhage_diagnosis_raw_ct.csv",
         ["PatientNumber", "SliceNumber", *CTICH_TYPES, "No_Hemorrhage", "Fracture_Yes_No"], rows)
    _csv(root / "Patient_demographics.csv", ["Patient Number", "Age (years)", "Gender"],
         [[p, 40, "Male"] for p in CTICH_PATIENTS])
    return root


# ---- MS lesions: MSLUB and ISBI 2015 ------------------------------------------------------------

def _ms(i, shape):
    """-> (rng, tissue labels, brain mask, lesion mask): a skull-stripped brain with 4 small lesions."""
    rng = np.random.default_rng(5000 + i)
    # one lesion near the axial centre, three further out: a central slab has lesion and lesion-free slices
    zs = [rng.uniform(0.48, 0.52), rng.uniform(0.0, 0.05), rng.uniform(0.95, 1.0), rng.uniform(0.95, 1.0)]
    les = [((rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), z), rng.uniform(2.0, 2.6)) for z in zs]
    return (rng, *head_labels(rng, shape, skull=False, lesions=les))


def make_mslub(root, n=5, prefix=True, shape=SHAPE):
    """MSLUB: patientXX/patientXX_{FLAIR,T1W,T1WKS,T2W}.nii.gz + _brainmask + _consensus_gt (or,
    with prefix=False, patientXX/FLAIR.nii.gz ...: the naming of some mirrors); skull-stripped
    brains with a few white-matter lesions."""
    root = Path(root)
    for i in range(1, n + 1):
        pid = f"patient{i:02d}"
        pre = f"{pid}_" if prefix else ""
        rng, lab, brain, mask = _ms(i, shape)
        for mod, contrast in (("FLAIR", "flair"), ("T1W", "t1"), ("T1WKS", "t1"), ("T2W", "t2")):
            save(root / pid / f"{pre}{mod}.nii.gz", paint(lab, contrast, rng))
        save(root / pid / f"{pre}brainmask.nii.gz", brain, dtype=np.uint8)
        save(root / pid / f"{pre}consensus_gt.nii.gz", mask, dtype=np.uint8)
    return root


def make_isbi2015(root, timepoints=(2, 3, 2, 2), shape=SHAPE):
    """ISBI 2015: training/trainingNN/preprocessed/trainingNN_TT_{flair,mprage,pd,t2}_pp.nii and
    training/trainingNN/masks/trainingNN_TT_mask{1,2}.nii (two raters) for len(timepoints) subjects;
    an orig/ copy (no _pp) of training01_01's FLAIR, which the loader must not prefer; and
    testdata_website/test01/preprocessed/test01_01_flair_pp.nii without masks."""
    root = Path(root)
    for s, n_tp in enumerate(timepoints, 1):
        sid = f"training{s:02d}"
        for tp in range(1, n_tp + 1):
            rng, lab, _, mask = _ms(s * 10 + tp, shape)
            for mod, contrast in (("flair", "flair"), ("mprage", "t1"), ("pd", "pd"), ("t2", "t2")):
                save(root / "training" / sid / "preprocessed" / f"{sid}_{tp:02d}_{mod}_pp.nii",
                     paint(lab, contrast, rng), dtype=np.float32)
            save(root / "training" / sid / "masks" / f"{sid}_{tp:02d}_mask1.nii", mask, dtype=np.uint8)
            from scipy.ndimage import binary_dilation
            save(root / "training" / sid / "masks" / f"{sid}_{tp:02d}_mask2.nii", binary_dilation(mask), dtype=np.uint8)
    rng, lab, _, _ = _ms(11, (shape[0] + 4, shape[1], shape[2]))   # orig/ is in the scanner's grid
    save(root / "training" / "training01" / "orig" / "training01_01_flair.nii.gz", paint(lab, "flair", rng))
    rng, lab, _, _ = _ms(99, shape)
    save(root / "testdata_website" / "test01" / "preprocessed" / "test01_01_flair_pp.nii", paint(lab, "flair", rng),
         dtype=np.float32)
    return root


BUILDERS = {"oasis3": make_oasis3, "ixi": make_ixi, "brats": make_brats, "ctich": make_ctich,
            "mslub": make_mslub, "isbi2015": make_isbi2015}


def check_report_extras(out, slices=True, training=True):
    """A smoke run's like-for-like baselines (scores.csv columns, results.json "baselines"), its
    slabs (one per scored scan, slabs.png) and its training record; -> the results dict."""
    out = Path(out)
    with open(out / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"baseline_intensity", "baseline_zscore"} <= set(rows[0]), list(rows[0])
    assert all(np.isfinite(float(r["baseline_intensity"])) for r in rows)
    res = json.loads((out / "results.json").read_text())
    for name in ("intensity", "zscore"):
        b = res["baselines"][name]
        assert 0 <= b["auroc"] <= 1 and len(b["auroc_ci"]) == 2
        assert "diff" in b["method_minus_baseline_auroc"]
    if slices:
        scans = {r.get("case") or r["id"] for r in rows}
        missing = scans - set(res["slabs"])
        assert not missing, sorted(missing)[:5]
        s = next(iter(res["slabs"].values()))
        assert s["first"] <= s["last"] and len(s["z_mm"]) == 2
        assert (out / "slabs.png").stat().st_size > 0
    if training:
        assert set(res["training"]) == {"phases", "io"} and res["training"]["phases"]
    return res
