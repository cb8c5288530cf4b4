"""The real-data loaders of data/datasets.py on fixture trees laid out like the downloads.

The trees come from tests/fixtures.py (real file names, folder layouts and CSV headers, tiny
volumes); ../shared/DATASETS.md describes the real data sets. Run: python -m pytest tests/test_datasets.py
"""
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import common as C
from data import datasets
from tests import fixtures as F

REPO = Path(__file__).resolve().parents[1]


def ns(**kw):
    """The arguments a loader reads, as a script's parse_args would give them."""
    d = dict(data="synthetic", data_root=None, train_data=None, train_root=None, modality=None,
             cdr_window_days=365, test_frac=None, seed=0, preset="smoke")
    d.update(kw)
    return SimpleNamespace(**d)


def load(name, root, contrast="t1", **kw):
    return datasets.DATASETS[name][0](Path(root), ns(data=name, data_root=str(root), **kw), contrast)


def by_group(splits):
    out = {}
    for c in splits.train + splits.val + splits.test:
        out.setdefault(c.group, []).append(c)
    return out


def ids(cases):
    return sorted(c.id for c in cases)


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """Every fixture tree, built once for the module (a second OASIS-3 per csv schema, MSLUB without prefix)."""
    base = tmp_path_factory.mktemp("datasets")
    t = {name: build(base / name) for name, build in F.BUILDERS.items()}
    for schema in ("udsb4", "legacy"):
        t[f"oasis3_{schema}"] = F.make_oasis3(base / f"oasis3_{schema}", csv_schema=schema)
    for rel in ("2020", "2023"):
        t[f"brats{rel}"] = F.make_brats(base / f"brats{rel}", release=rel)
    t["mslub_noprefix"] = F.make_mslub(base / "mslub_noprefix", prefix=False)
    return t


# ---- OASIS-3 ------------------------------------------------------------------------------------

@pytest.mark.parametrize("tree", ["oasis3", "oasis3_udsb4", "oasis3_legacy"])
def test_oasis3_groups_from_either_cdr_schema(trees, tree):
    s = load("oasis3", trees[tree])
    g = by_group(s)
    exp = F.OASIS3_EXPECTED
    assert ids(g["train"] + g["val"] + g["cdr_0"]) == exp["healthy"]
    for k in ("cdr_0.5", "cdr_1", "cdr_2"):
        assert ids(g[k]) == exp[k], k
    assert "cdr_3" not in g
    assert {c.label for c in g["cdr_0"]} == {0} and {c.label for k in ("cdr_0.5", "cdr_1", "cdr_2") for c in g[k]} == {1}
    schemas = {t["schema"].split()[0] for t in s.info["cdr_tables"]}
    assert schemas == {"udsb4": {"OASIS3_UDSb4_cdr"}, "legacy": {"legacy"}}.get(tree.split("_")[-1],
                                                                                {"OASIS3_UDSb4_cdr", "legacy"})
    ex = s.info["excluded"]
    assert sum(ex.values()) == 4 and len(ex) == 4
    assert s.info["groups"]["cdr_0.5"] == {"subjects": 2, "scans": 2}
    json.dumps(s.info)   # goes to results.json as data_info


def test_oasis3_layouts_runs_and_ses_spellings(trees):
    s = load("oasis3", trees["oasis3"])
    cases = {c.id: c for c in s.train + s.val + s.test}
    # a session with two runs counts once, with run-01
    assert cases["OAS30001_MR_d0000"].image.endswith("sub-OAS30001_ses-d0000_run-01_T1w.nii.gz")
    assert "run-02" in str(s.info["excluded_examples"])
    assert "sess-d0100" in cases["OAS30002_MR_d0100"].image                       # sess- spelling
    assert "/anat1/" in cases["OAS30003_MR_d0000"].image                          # download layout
    assert "/resources/NIFTI/files/" in cases["OAS30004_MR_d0200"].image           # raw XNAT layout
    assert cases["OAS30005_MR_d0700"].subject == cases["OAS30005_MR_d0000"].subject == "OAS30005"
    assert s.info["t1w_files"] == 19 and s.info["sessions"] == 18


def test_oasis3_closest_visit_and_window(trees):
    s = load("oasis3", trees["oasis3"])
    cases = {c.id: c for c in s.test}
    # OAS30011 visits: d0000 CDR 0.5, d0400 CDR 1. Scan d0250 is 150 days from d0400, 250 from d0000.
    assert cases["OAS30011_MR_d0250"].meta["cdr_visit_days"] == 400
    assert cases["OAS30011_MR_d0250"].meta["cdr"] == 1.0 and cases["OAS30011_MR_d0250"].group == "cdr_1"
    assert cases["OAS30011_MR_d0100"].meta["cdr_visit_days"] == 0 and cases["OAS30011_MR_d0100"].group == "cdr_0.5"
    # OAS30012's scan at d1500 is 1500 days from its only visit: outside ±365, no label
    assert "OAS30012_MR_d1500" not in cases
    assert s.info["excluded_examples"]["closest CDR visit more than 365 days from the scan (--cdr-window-days)"] \
        == ["OAS30012_MR_d1500"]
    wide = load("oasis3", trees["oasis3"], cdr_window_days=2000)
    assert "OAS30012_MR_d1500" in ids(by_group(wide)["cdr_2"])
    # window 0: only scans on the very day of a visit keep a label
    zero = load("oasis3", trees["oasis3"], cdr_window_days=0)
    assert all(c.meta["days_scan_to_visit"] == 0 for c in zero.train + zero.val + zero.test)


def test_oasis3_changing_cdr_subject_is_never_healthy(trees):
    s = load("oasis3", trees["oasis3"])
    healthy_subjects = {c.subject for c in s.train + s.val + s.test if c.label == 0}
    assert "OAS30010" not in healthy_subjects
    assert s.info["excluded_examples"]["CDR 0 scan of a subject whose CDR changes (not unchanged CDR 0)"] \
        == ["OAS30010_MR_d0000"]


def test_oasis3_split_is_by_subject_and_follows_the_seed(trees):
    a, b = load("oasis3", trees["oasis3"], seed=0), load("oasis3", trees["oasis3"], seed=0)
    assert ids(a.train) == ids(b.train) and ids(a.test) == ids(b.test)
    splits = {load("oasis3", trees["oasis3"], seed=k).info["groups"]["cdr_0"]["scans"] for k in range(6)}
    assert len(splits) > 1   # the held-out healthy subjects change with the seed
    for s in (a, load("oasis3", trees["oasis3"], seed=3)):
        train_subjects = {c.subject for c in s.train + s.val}
        assert not train_subjects & {c.subject for c in s.test}
        assert not {c.subject for c in s.train} & {c.subject for c in s.val}


def test_oasis3_without_cdr_table_says_what_it_looked_for(trees, tmp_path):
    import shutil
    root = tmp_path / "oasis3"
    shutil.copytree(trees["oasis3"], root, ignore=shutil.ignore_patterns("*.csv"))
    with pytest.raises(C.UserError, match=r"no CDR table.*OASIS3_UDSb4_cdr\.csv.*data/README\.md"):
        load("oasis3", root)


def test_oasis3_through_load_dataset_and_group_filter(trees):
    # a script may ask for the phantom's groups; a real data set without them keeps its own
    s = datasets.load_dataset(ns(data="oasis3", data_root=str(trees["oasis3"])), "t1",
                       groups=["atrophy_1", "atrophy_2", "atrophy_3"])
    assert s.info["test_groups"] == {"cdr_0": 3, "cdr_0.5": 2, "cdr_1": 2, "cdr_2": 1}
    assert s.info["n_train"] == 6 and s.info["n_val"] == 1


# ---- BraTS, IXI ---------------------------------------------------------------------------------

@pytest.mark.parametrize("tree,first,token", [("brats", "BraTS2021_00000", "_flair.nii.gz"),
                                              ("brats2020", "BraTS20_Training_001", "_flair.nii"),
                                              ("brats2023", "BraTS-GLI-00000-000", "-t2f.nii.gz")])
def test_brats_release_names_flair_default(trees, tree, first, token):
    s = load("brats", trees[tree], contrast=None)
    cases = {c.id: c for c in s.train + s.val + s.test if c.group != "normal"}
    assert first in cases and cases[first].image.endswith(first + token)
    assert all(c.mask and ("seg" in Path(c.mask).name.lower()) for c in cases.values())
    assert s.info["excluded"] == {"no segmentation (validation/test data have none)": 1}
    assert s.info["modality"] == "flair"
    if tree == "brats2020":   # the real release's odd seg name of case 355
        assert cases["BraTS20_Training_355"].mask.endswith("W39_1998.09.19_Segm.nii")
    if tree == "brats2023":   # two timepoints of one patient: one subject, one side of the split
        both = [c for c in cases.values() if c.id.startswith("BraTS-GLI-00005")]
        assert len(both) == 2 and {c.subject for c in both} == {"BraTS-GLI-00005"}
        assert len({c.group for c in both}) == 1


@pytest.mark.parametrize("flag,token", [("t1", "-t1n."), ("t1ce", "-t1c."), ("t2", "-t2w."), ("flair", "-t2f.")])
def test_brats_2023_modality_flag(trees, flag, token):
    s = load("brats", trees["brats2023"], contrast="flair", modality=flag)
    assert all(token in c.image for c in s.train + s.test)


def test_brats_healthy_training_from_tumour_free_slices(trees, tmp_path):
    s = load("brats", trees["brats"], contrast="flair")
    g = by_group(s)
    assert {c.meta.get("healthy_slices_only") for c in g["train"] + g["val"] + g["normal"]} == {True}
    assert {c.meta.get("anomalous_slices_only") for c in g["tumor"]} == {True}
    assert ids(g["normal"]) == [f"{i}/tumour-free" for i in ids(g["tumor"])]
    assert "tumour-free slices" in s.info["healthy_training"]
    assert not {c.subject for c in s.train + s.val} & {c.subject for c in s.test}
    # slice_stack keeps only the slices without tumour voxels for those cases
    kw = dict(size=(32, 32), n_slices=24, cache_dir=tmp_path / "cache")
    kept = datasets.slice_stack(g["train"], **kw)
    every = datasets.slice_stack(g["train"], drop_anomalous=False, **kw)
    assert len(every) == 24 * len(g["train"]) and 0 < len(kept) < len(every)
    assert kept.mask.sum() == 0 and every.mask.sum() > 0
    # test: each slice of a test scan once, tumour slices under `tumor`, the others under `normal`
    test = datasets.slice_stack(g["tumor"] + g["normal"], **kw)
    whole = datasets.slice_stack(g["tumor"], drop_anomalous=False, **kw)
    assert len(test) == len(whole) == 24 * len(g["tumor"])
    label = np.array([test.cases[i].label for i in test.case])
    assert test.mask[label == 0].sum() == 0   # (a tumour edge may vanish in the resize: >= 80%, not all)
    assert test.mask[label == 1].reshape((label == 1).sum(), -1).any(1).mean() >= 0.8
    for i, c in enumerate(g["tumor"]):   # both parts of a scan share one crop: same pixels as the whole
        rows = [r for r in range(len(test)) if test.cases[test.case[r]].subject == c.subject]
        ref = {int(whole.z[r]): r for r in whole.slices_of(i)}
        assert sorted(int(test.z[r]) for r in rows) == sorted(ref)
        assert all(np.allclose(test.x[r], whole.x[ref[int(test.z[r])]], atol=1e-5) for r in rows)


def test_slice_stack_drops_cases_left_without_slices(tmp_path):
    img, brain, _ = F.head(seed=1, contrast="flair")
    F.save(tmp_path / "a.nii.gz", img)
    F.save(tmp_path / "a_mask.nii.gz", brain, dtype=np.uint8)   # every brain voxel anomalous
    a = dict(subject="a", image=str(tmp_path / "a.nii.gz"), mask=str(tmp_path / "a_mask.nii.gz"))
    cases = [datasets.Case(id="a", group="tumor", label=1, meta={"anomalous_slices_only": True}, **a),
             datasets.Case(id="a/free", group="normal", label=0, meta={"healthy_slices_only": True}, **a),
             datasets.Case(id="a/all", group="tumor", label=1, **a)]
    S = datasets.slice_stack(cases, size=(16, 16), n_slices=6, cache_dir=tmp_path / "cache")
    assert [c.id for c in S.cases] == ["a", "a/all"] and len(S) == 12
    assert [len(S.slices_of(i)) for i in range(2)] == [6, 6] and S.mask.reshape(12, -1).any(1).all()


def test_brats_tested_against_ixi_training(trees):
    args = ns(data="brats", data_root=str(trees["brats"]), train_data="ixi", train_root=str(trees["ixi"]),
              modality="t2")
    s = datasets.load_dataset(args, "flair")
    assert {c.subject[:3] for c in s.train + s.val} == {"IXI"} and s.info["train_from"] == "ixi"
    assert all(c.image.endswith("-T2.nii.gz") for c in s.train) and len(s.train + s.val) == 9
    assert s.info["test_groups"] == {"normal": 6, "tumor": 6}   # every BraTS case is a test case
    assert s.info["healthy_training"] == "--train-data ixi"
    # a FLAIR script must choose a modality IXI has
    with pytest.raises(C.UserError, match="--modality t2"):
        datasets.load_dataset(ns(**{**vars(args), "modality": None}), "flair")


def test_ixi_modalities_and_no_test_set(trees):
    t1 = load("ixi", trees["ixi"], contrast="t1")
    t2 = load("ixi", trees["ixi"], contrast="t1", modality="t2")
    assert len(t1.train + t1.val) == 10 and len(t2.train + t2.val) == 9 and t1.test == []
    assert all(c.image.endswith("-T1.nii.gz") and c.label == 0 for c in t1.train + t1.val)
    assert t1.info["sites"] == {"Guys": 6, "HH": 4}
    assert {c.subject for c in t1.train}.isdisjoint({c.subject for c in t1.val})
    with pytest.raises(C.UserError, match="no FLAIR"):
        load("ixi", trees["ixi"], contrast="flair")
    with pytest.raises(C.UserError, match="--modality flair: --data ixi has"):
        load("ixi", trees["ixi"], modality="flair")
    with pytest.raises(C.UserError, match="use it as --train-data"):
        datasets.load_dataset(ns(data="ixi", data_root=str(trees["ixi"])), "t1")


# ---- CT-ICH -------------------------------------------------------------------------------------

def test_ctich_normal_vs_hemorrhage_and_types(trees):
    s = load("ctich", trees["ctich"], contrast="ct")
    g = by_group(s)
    assert ids(g["hemorrhage"]) == ["066", "067", "068", "069"]
    assert ids(g["train"] + g["val"] + g["normal"]) == ["049", "050", "051", "052", "053", "054", "058"]
    h = {c.id: c for c in g["hemorrhage"]}
    assert h["066"].meta["subtypes"] == ["subarachnoid", "subdural"] and h["066"].meta["subtype"] == "subdural"
    assert h["067"].meta["subtypes"] == ["intraventricular", "intraparenchymal"]
    assert h["067"].meta["subtype"] == "intraparenchymal" and h["068"].meta["subtype"] == "epidural"
    assert s.info["hemorrhage_scans_per_type"] == {"intraventricular": 1, "intraparenchymal": 2,
                                                   "subarachnoid": 1, "epidural": 1, "subdural": 1}
    assert s.info["excluded"] == {"no rows in hemorrhage_diagnosis_raw_ct.csv": 1}     # scan 070
    assert all(c.mask and c.mask.endswith(f"masks/{c.id}.nii") for c in s.train + s.test)
    assert all(c.brainmask is None for c in s.train + s.test)
    # no brain masks in CT-ICH: read_case's HU skull strip keeps brain, drops skull and air
    img, mask, brain, spacing = datasets.read_case(h["066"], kind="ct")
    assert spacing == pytest.approx((0.45, 0.45, 5.0))
    assert brain.sum() > 0.1 * brain.size and img[brain > 0].max() < 150 and mask[brain == 0].sum() == 0


def test_ctich_csv_without_columns_is_named(trees, tmp_path):
    import shutil
    root = shutil.copytree(trees["ctich"], tmp_path / "ctich")
    (root / "hemorrhage_diagnosis_raw_ct.csv").write_text("PatientNumber,SliceNumber,Subdural\n49,1,0\n")
    with pytest.raises(C.UserError, match=r"hemorrhage_diagnosis_raw_ct\.csv lacks the columns"):
        load("ctich", root)


# ---- MSLUB, ISBI 2015 ---------------------------------------------------------------------------

@pytest.mark.parametrize("tree,prefix", [("mslub", "patient01_"), ("mslub_noprefix", "")])
def test_mslub_both_namings(trees, tree, prefix):
    s = load("mslub", trees[tree], contrast="flair")
    c = {c.id: c for c in s.train + s.val + s.test if c.group != "normal"}
    assert sorted(c) == [f"patient{i:02d}" for i in range(1, 6)]
    p1 = c["patient01"]
    assert p1.image.endswith(f"patient01/{prefix}FLAIR.nii.gz")
    assert p1.mask.endswith(f"{prefix}consensus_gt.nii.gz") and p1.brainmask.endswith(f"{prefix}brainmask.nii.gz")
    assert {g.group for g in s.test} == {"ms_lesion", "normal"}
    t2 = load("mslub", trees[tree], contrast="flair", modality="t2")
    assert all(x.image.endswith("T2W.nii.gz") for x in t2.test)


def test_isbi2015_preprocessed_rater1_and_timepoints(trees):
    s = load("isbi2015", trees["isbi2015"], contrast="flair")
    c = {c.id: c for c in s.train + s.val + s.test if c.group != "normal"}
    assert sorted(c) == ["training01_01", "training01_02", "training02_01", "training02_02", "training02_03",
                         "training03_01", "training03_02", "training04_01", "training04_02"]
    t = c["training01_01"]
    assert t.image.endswith("preprocessed/training01_01_flair_pp.nii")     # not the orig/ copy
    assert t.mask.endswith("masks/training01_01_mask1.nii") and t.meta["mask_rater2"].endswith("_mask2.nii")
    assert s.info["excluded"] == {"no rater-1 lesion mask (e.g. the challenge's test data)": 1}
    for subject in {x.subject for x in c.values()}:   # all timepoints of a subject on one side
        sides = {"train" if x.group in ("train", "val") else "test" for x in c.values() if x.subject == subject}
        assert len(sides) == 1
    img, mask, brain, _ = datasets.read_case(t)
    assert img.shape == mask.shape == F.SHAPE and mask.sum() > 0


# ---- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["oasis3", "ixi", "brats", "ctich", "mslub", "isbi2015"])
def test_missing_or_wrong_root(tmp_path, name):
    with pytest.raises(C.UserError, match=rf"data root .*nowhere.* --data {name}.*data/README\.md"):
        datasets.load_dataset(ns(data=name, data_root=str(tmp_path / "nowhere")), "t1")
    (tmp_path / "empty" / "docs").mkdir(parents=True)
    with pytest.raises(C.UserError, match=rf"--data {name}: found no .* under .*empty; data/README\.md"):
        datasets.load_dataset(ns(data=name, data_root=str(tmp_path / "empty")), "t1")


def test_unreadable_file_is_named(trees, tmp_path):
    import shutil
    root = shutil.copytree(trees["brats"], tmp_path / "brats")
    bad = root / "BraTS2021_00003" / "BraTS2021_00003_flair.nii.gz"
    bad.write_bytes(b"not a nifti file")
    with pytest.raises(C.UserError, match=r"cannot read 1 NIfTI file.*BraTS2021_00003_flair\.nii\.gz"):
        load("brats", root, contrast="flair")


def test_error_is_one_line_on_stderr(tmp_path):
    code = ("import common as C, types\nfrom data import datasets\n"
            "a = types.SimpleNamespace(data='oasis3', data_root=%r, train_data=None, train_root=None)\n"
            "C.main_guard(lambda argv: datasets.load_dataset(a))" % str(tmp_path / "missing"))
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "data/README.md" in lines[0]


# ---- every method script end to end on the fixture tree of a data set it is meant for -----------------
# (madgan.py on OASIS-3 is in tests/test_madgan.py)

SCRIPT_RUNS = [
    ("fanogan3d", ["--data", "ctich"], "ctich", {"hemorrhage"}),
    ("anovaegan", ["--data", "mslub"], "mslub", {"ms_lesion"}),
    ("anovaegan", ["--data", "isbi2015"], "isbi2015", {"ms_lesion"}),
    ("anogan", ["--data", "brats", "--test-slices", "4"], "brats", {"tumor"}),
    # BraTS' normal test slices are its tumour-free ones, away from the centre: score a thicker slab
    ("reversed_ae", ["--data", "brats", "--modality", "t1", "--train-data", "ixi", "--test-slices", "30"], "brats",
     {"tumor"}),
]


@pytest.mark.parametrize("script,flags,tree,expect", SCRIPT_RUNS, ids=[f"{s}-{t}" for s, _, t, _ in SCRIPT_RUNS])
def test_script_runs_on_its_fixture(trees, tmp_path, script, flags, tree, expect):
    import importlib
    mod = importlib.import_module(script)
    argv = ["--preset", "smoke", "--device", "cpu", "--out", str(tmp_path / "run"), "--cache-dir",
            str(tmp_path / "cache"), "--data-root", str(trees[tree]), *flags]
    if "--train-data" in flags:
        argv += ["--train-root", str(trees[flags[flags.index("--train-data") + 1]])]
    r = mod.main(argv)
    assert r["data"] == flags[1] and 0 <= r["metrics"]["auroc"] <= 1
    anomalous = {g for g, v in r["groups"].items() if "auroc" in v}
    assert expect <= anomalous, r["groups"]
    if "--train-data" in flags:
        assert r["data_info"]["train_from"] == "ixi"
    for f in ("config.json", "results.json", "scores.csv", "last.pt", "roc.png", "scores.png"):
        assert (tmp_path / "run" / f).is_file(), f


# ---- loader defects ------------------------------------------------------------------------------

def test_brats_patient_in_two_releases_is_kept_once(tmp_path):
    """BraTS 2021 contains the 2020 cases (new names, .nii.gz): one patient, one copy, one side."""
    import shutil

    import nibabel as nib
    root = tmp_path / "brats"
    F.make_brats(root / "2021", release="2021")
    F.make_brats(root / "2020", release="2020")
    for i in (0, 2, 4):   # 2020 cases 001, 003, 005 re-released as 2021 cases 00000, 00002, 00004
        old, new = f"BraTS20_Training_{i + 1:03d}", f"BraTS2021_{i:05d}"
        for mod in ("flair", "t1", "t1ce", "t2", "seg"):   # the same voxels, stored as float32
            src = nib.load(str(root / "2021" / new / f"{new}_{mod}.nii.gz"))
            nib.save(nib.Nifti1Image(np.asarray(src.dataobj, np.float32), src.affine),
                     str(root / "2020" / old / f"{old}_{mod}.nii"))
        # the fixture's 2020 case i is 2021 case i: make the other 2020 cases other patients
        other = f"BraTS20_Training_{i + 2:03d}" if i < 4 else "BraTS20_Training_355"
        for mod in ("flair", "t1", "t1ce", "t2"):
            f = root / "2020" / other / f"{other}_{mod}.nii"
            img = nib.load(str(f))
            nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[::-1].copy(), img.affine), str(f))
    shutil.rmtree(root / "2020" / "validation")
    s = load("brats", root, contrast="flair")
    scans = [c for c in s.train + s.val + s.test if c.group != "normal"]
    assert len(scans) == 12 - 3 and len({c.subject for c in scans}) == 9
    kept = {c.id for c in scans}
    assert {"BraTS2021_00000", "BraTS2021_00002", "BraTS2021_00004"} <= kept
    assert not kept & {"BraTS20_Training_001", "BraTS20_Training_003", "BraTS20_Training_005"}
    reason = "the same scan as a case of a newer release (identical voxels): that copy is used"
    assert s.info["excluded"][reason] == 3
    assert "BraTS20_Training_001 = BraTS2021_00000" in s.info["excluded_examples"][reason]


def test_oasis3_unreadable_csv_beside_a_readable_cdr_table(trees, tmp_path, capsys):
    import shutil
    root = shutil.copytree(trees["oasis3"], tmp_path / "oasis3")
    bad = root / "OASIS3_data_files" / "UDSb4" / "csv" / "OASIS3_UDSb4_cdr_backup.csv"
    bad.write_bytes(b"OASISID,CDRTOT\n\xff\xfe\x00broken")
    s = load("oasis3", root)
    assert s.info["cdr_tables_unreadable"] == [{"path": str(bad), "error": "UnicodeDecodeError"}]
    assert s.info["groups"] == load("oasis3", trees["oasis3"]).info["groups"]
    assert "skipped the unreadable csv" in capsys.readouterr().err
    # alone, the unreadable table is the error
    for p in root.rglob("*.csv"):
        if p != bad:
            p.unlink()
    with pytest.raises(C.UserError, match=r"cannot read the CDR table .*_UDSb4_cdr_backup\.csv"):
        load("oasis3", root)


def test_test_frac_zero_is_zero_or_an_error(trees):
    s = load("oasis3", trees["oasis3"], test_frac=0)
    assert "cdr_0" not in by_group(s) and len(s.train + s.val) == 10   # no healthy subject held out
    with pytest.raises(C.UserError, match=r"needs both.*--test-frac 0 holds out no healthy"):
        datasets.load_dataset(ns(data="oasis3", data_root=str(trees["oasis3"]), test_frac=0), "t1")
    with pytest.raises(C.UserError, match=r"--test-frac 0 holds out no brats subject.*--train"):
        load("brats", trees["brats"], contrast="flair", test_frac=0)
    # with --train-data, every BraTS scan is a test scan whatever --test-frac says
    s = datasets.load_dataset(ns(data="brats", data_root=str(trees["brats"]), train_data="ixi",
                                 train_root=str(trees["ixi"]), modality="t2", test_frac=0), "flair")
    assert s.info["test_groups"]["tumor"] == 6


def test_ctich_empty_no_hemorrhage_cell_is_unknown(trees, tmp_path):
    import csv
    import shutil
    root = shutil.copytree(trees["ctich"], tmp_path / "ctich")
    table = root / "hemorrhage_diagnosis_raw_ct.csv"
    rows = list(csv.reader(table.open()))
    col = rows[0].index("No_Hemorrhage")
    for r in rows[1:]:
        if r[0] == "49" and r[1] == "7":
            r[col] = ""              # normal scan 049, slice 7: the cell is empty
    with table.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    s = load("ctich", root, contrast="ct")
    g = by_group(s)
    assert "049" not in ids(g["hemorrhage"]) and "049" not in ids(s.train + s.val + s.test)
    reason = ("empty No_Hemorrhage cell, the other slices No_Hemorrhage = 1: normal or not is "
              "unknown")
    assert s.info["excluded"][reason] == 1
    assert s.info["excluded_examples"][reason] == ["049.nii (slice 7)"]
    assert ids(g["hemorrhage"]) == ["066", "067", "068", "069"]


# ---- bad input: one error line that names the file -----------------------------------------------

def _folder_tree(root, n_train=3):
    """A minimal --data folder tree of fixture heads (train/, test/normal/, test/lesion/)."""
    for i in range(n_train):
        F.save(root / "train" / f"t{i}.nii.gz", F.head(seed=10 + i)[0])
    F.save(root / "test" / "normal" / "n0.nii.gz", F.head(seed=20)[0])
    img, _, m = F.head(seed=21, lesions=[((0.5, 0.5, 0.5), 4.0)])
    F.save(root / "test" / "lesion" / "l0.nii.gz", img)
    F.save(root / "test" / "lesion" / "l0_mask.nii.gz", m, dtype=np.uint8)
    return root


def test_upper_case_nifti_extensions_are_found(tmp_path):
    root = _folder_tree(tmp_path / "f")
    up = root / "test" / "HYPER"
    up.mkdir()
    img, brain, m = F.head(seed=30, lesions=[((0.5, 0.5, 0.5), 4.0)])
    for name, a in (("L1.NII.GZ", img), ("L1_MASK.NII.GZ", m), ("L1_BrainMask.Nii.Gz", brain)):
        dtype = np.int16 if name == "L1.NII.GZ" else np.uint8
        F.save(up / "tmp.nii.gz", a, dtype=dtype).rename(up / name)   # nibabel wants lower case
    s = datasets.load_dataset(ns(data="folder", data_root=str(root)), "t1")
    c = next(c for c in s.test if c.group == "HYPER")
    assert c.image.endswith("L1.NII.GZ") and c.mask.endswith("L1_MASK.NII.GZ")
    assert c.brainmask.endswith("L1_BrainMask.Nii.Gz") and c.id == "HYPER/L1"


def test_empty_brain_mask_is_an_error(tmp_path):
    root = _folder_tree(tmp_path / "f")
    F.save(root / "train" / "t0_brainmask.nii.gz", np.zeros(F.SHAPE), dtype=np.uint8)
    s = datasets.load_dataset(ns(data="folder", data_root=str(root)), "t1")
    c = next(c for c in s.train + s.val if c.id.endswith("/t0"))
    with pytest.raises(C.UserError, match=r"brain mask .*t0_brainmask\.nii\.gz is empty.*remove"):
        datasets.slice_stack([c], size=(16, 16), n_slices=4, cache_dir=tmp_path / "cache")


def test_corrupt_meta_json_is_named(tmp_path):
    root = _folder_tree(tmp_path / "f")
    (root / "meta.json").write_text('{"train/t0.nii.gz": {"subject": "a"')
    with pytest.raises(C.UserError, match=r"cannot read .*f/meta\.json \(JSONDecodeError.*delete"):
        datasets.load_dataset(ns(data="folder", data_root=str(root)), "t1")
    (root / "meta.json").write_text('["not", "a", "mapping"]')
    with pytest.raises(C.UserError, match=r"meta\.json must be a JSON object"):
        datasets.load_dataset(ns(data="folder", data_root=str(root)), "t1")


def test_corrupt_phantom_meta_json_says_how_to_regenerate(tmp_path):
    import shutil

    from data.phantom import ensure_phantom
    built = REPO / "data" / "synthetic" / "t1_tiny"   # a copy of the smoke runs' phantom is quicker
    if (built / "manifest.json").is_file():
        shutil.copytree(built, tmp_path / "synthetic" / "t1_tiny")
    # (ensure_phantom regenerates the copy if it is not the current phantom)
    variant = ensure_phantom(root=tmp_path / "synthetic", contrast="t1", size="tiny", workers=1,
                             verbose=False)
    (Path(variant) / "meta.json").write_text("{ truncated")
    with pytest.raises(C.UserError, match=r"cannot read .*t1_tiny/meta\.json.*delete the folder"):
        datasets.load_dataset(ns(data="synthetic", data_root=str(tmp_path / "synthetic")), "t1")


def test_broken_symlink_and_file_as_root_are_named(trees, tmp_path):
    root = _folder_tree(tmp_path / "f")
    (root / "train" / "gone.nii.gz").symlink_to(tmp_path / "elsewhere.nii.gz")
    with pytest.raises(C.UserError, match=r"train/gone\.nii\.gz is a broken symbolic link.*elsew"):
        datasets.load_dataset(ns(data="folder", data_root=str(root)), "t1")
    import shutil
    ixi = shutil.copytree(trees["ixi"], tmp_path / "ixi")
    (ixi / "IXI-T1" / "IXI099-HH-9999-T1.nii.gz").symlink_to(tmp_path / "nowhere.nii.gz")
    with pytest.raises(C.UserError, match=r"IXI099-HH-9999-T1\.nii\.gz is a broken symbolic link"):
        load("ixi", ixi)
    (tmp_path / "data.nii.gz").write_bytes(b"x")
    for name in ("folder", "oasis3", "synthetic"):
        with pytest.raises(C.UserError, match=rf"root .*data\.nii\.gz for --data {name} is a file"):
            datasets.load_dataset(ns(data=name, data_root=str(tmp_path / "data.nii.gz")), "t1")


@pytest.mark.parametrize("case", ["root_is_file", "corrupt_meta", "broken_link"])
def test_bad_input_is_one_error_line(tmp_path, case):
    root = _folder_tree(tmp_path / "f", n_train=2)
    if case == "root_is_file":
        root, said = tmp_path / "f.nii.gz", "is a file, not a folder"
        root.write_bytes(b"x")
    elif case == "corrupt_meta":
        (root / "meta.json").write_text("{")
        said = "cannot read"
    else:
        (root / "test" / "normal" / "n1.nii.gz").symlink_to(tmp_path / "missing.nii.gz")
        said = "is a broken symbolic link"
    code = ("import common as C, types\nfrom data import datasets\n"
            "a = types.SimpleNamespace(data='folder', data_root=%r, train_data=None,"
            " train_root=None, seed=0)\nC.main_guard(lambda argv: datasets.load_dataset(a))"
            % str(root))
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    named = root / "test" / "normal" / "n1.nii.gz" if case == "broken_link" else root
    assert str(named) in lines[0]
    assert said in lines[0]


# ---- one cache build under torchrun --------------------------------------------------------------

def _two_ranks_build(rank, runs, cache_dir, out):
    """In each of two gloo processes, for each (name, cases) of `runs`: slice_stack, counting how
    many NIfTI files this process reads, and write what it got to out/<name>-rank<rank>.json."""
    import hashlib

    import torch.distributed as dist
    calls = []
    read = datasets.read_nifti
    datasets.read_nifti = lambda path, what="image": calls.append(path) or read(path, what)
    for name, cases in runs:
        calls.clear()
        try:
            S = datasets.slice_stack(cases, size=(16, 16), n_slices=4, cache_dir=cache_dir)
            res = {"calls": len(calls), "x": hashlib.sha1(np.asarray(S.x).tobytes()).hexdigest(),
                   "z": S.z.tolist(), "slabs": getattr(S, "slabs", None), "error": None}
        except C.UserError as e:
            res = {"calls": len(calls), "error": str(e)}
        dist.barrier()
        Path(out, f"{name}-rank{rank}.json").write_text(json.dumps(res))


def _gloo_worker(rank, fn, init_file, args):
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def _spawn2(tmp_path, fn, *args, timeout=180):
    """fn(rank, *args) in two gloo processes; a hang (a process waiting forever) fails the test."""
    import torch.multiprocessing as mp
    init = tmp_path / f"pg{len(list(tmp_path.iterdir()))}"      # a fresh rendezvous file per call
    ctx = mp.spawn(_gloo_worker, args=(fn, str(init), args), nprocs=2, join=False)
    import time
    end = time.time() + timeout
    while not ctx.join(timeout=5):
        if time.time() > end:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two processes did not finish: one is waiting for the other")


def test_cache_is_built_once_under_two_processes(trees, tmp_path):
    cases = load("ixi", trees["ixi"]).train[:3]
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti file")
    broken = [datasets._with(cases[0], image=str(bad))]
    out = tmp_path / "out"
    out.mkdir()
    runs = [("ok", cases), ("broken", broken)]
    _spawn2(tmp_path, _two_ranks_build, runs, str(tmp_path / "cache"), str(out))
    r0, r1 = (json.loads((out / f"ok-rank{r}.json").read_text()) for r in (0, 1))
    assert r0["calls"] == 3 and r1["calls"] == 0               # rank 0 built it, rank 1 opened it
    assert r0["error"] is None and all(r0[k] == r1[k] for k in ("x", "z", "slabs"))
    assert len(list((tmp_path / "cache").iterdir())) == 1   # one cache, no temp of the failed one
    # a build that fails on process 0 fails on both (rank 1 tries itself), neither waits forever
    for r in (0, 1):
        res = json.loads((out / f"broken-rank{r}.json").read_text())
        assert "cannot read image" in res["error"] and res["calls"] == 1


# ---- the slab of a raw head with a neck (OASIS-3 is not skull-stripped) --------------------------

@pytest.fixture(scope="module")
def necks(tmp_path_factory):
    """Two raw T1w heads with neck and shoulders (tests/fixtures.neck_head): 2x2x1.5 mm down to the
    shoulders, and 1.6x1.6x1.2 mm with less neck; -> [(Case, levels)]."""
    base = tmp_path_factory.mktemp("necks")
    out = []
    for name, kw in (("a", {}), ("b", dict(spacing=(1.6, 1.6, 1.2), fov_mm=(180, 210, 240)))):
        path, levels = F.make_neck_head(base / f"sub-{name}_T1w.nii.gz", **kw)
        case = datasets.Case(id=name, subject=name, group=f"g{name}", label=0, image=str(path))
        out.append((case, levels))
    return out


def _covered(slab, levels):
    """Fraction of each structure's axial extent [lo, hi] (mm) inside the slab's slices."""
    half = slab["slice_mm"] / 2
    a, b = slab["z_mm"][0] - half, slab["z_mm"][1] + half
    return {k: max(0.0, min(hi + half, b) - max(lo - half, a)) / (hi - lo + 2 * half)
            for k, (lo, hi) in levels.items()}


def test_slab_of_a_head_with_neck_covers_hippocampus_amygdala_ventricles(necks, tmp_path):
    cases = [c for c, _ in necks]
    # MADGAN's 51 mm: 34 slices of 1.5 mm, 42 of 1.2 mm
    S = {c.id: datasets.slice_stack([c], size=(32, 32), n_slices=n, cache_dir=tmp_path / "cache")
         for c, n in zip(cases, (34, 42))}
    for c, levels in necks:
        slab = S[c.id].slabs[c.id]
        assert slab["rule"] == "vertex" and slab["vertex_in_fov"]
        assert slab["vertex_z_mm"] == pytest.approx(F.NECK_HEAD_TOP_MM, abs=2.0)
        cover = _covered(slab, levels)
        assert min(cover.values()) >= 0.9, (slab, cover)
        # the old rule, a fraction of the head mask's extent, is pulled down into the neck
        old = datasets.slice_stack([c], size=(32, 32), n_slices=slab["n"], slab="brain",
                                   cache_dir=tmp_path / "cache").slabs[c.id]
        assert min(_covered(old, levels).values()) <= 0.5 and np.mean(old["z_mm"]) < -20, old
    # the same anatomy at another voxel size and neck coverage: the same slab in millimetres
    a, b = (S[c.id].slabs[c.id]["z_mm"] for c in cases)
    assert abs(np.mean(a) - np.mean(b)) <= 1.5 and abs((a[1] - a[0]) - (b[1] - b[0])) <= 1.5


def test_slab_record_follows_the_affine_and_survives_the_cache(necks, tmp_path):
    import nibabel as nib
    c, _ = necks[0]
    kw = dict(size=(32, 32), n_slices=10, step=2, cache_dir=tmp_path / "cache")
    S = datasets.slice_stack([c], **kw)
    s = S.slabs["a"]
    assert (s["first"], s["last"]) == (int(S.z.min()), int(S.z.max()))
    assert s["last"] - s["first"] == 18
    aff = nib.load(c.image).affine
    assert s["z_mm"] == pytest.approx([aff[2, 2] * k + aff[2, 3] for k in (s["first"], s["last"])])
    assert datasets.slice_stack([c], **kw).slabs == S.slabs            # read back from meta.json
    json.dumps(S.slabs)                                                  # goes to results.json
    # a brain mask beside the image keeps the brain-extent rule (the phantom's)
    img = nib.load(c.image)
    bm = Path(c.image).with_name("sub-a_T1w_brainmask.nii.gz")
    nib.save(nib.Nifti1Image((np.asarray(img.dataobj) > 500).astype(np.uint8), img.affine), str(bm))
    withmask = datasets.Case(id="m", subject="a", group="g", label=0, image=c.image,
                             brainmask=str(bm))
    assert datasets.slice_stack([withmask], **kw).slabs["m"]["rule"] == "brain"


def test_plot_slabs_one_scan_per_group(necks, tmp_path):
    from PIL import Image
    cases = [c for c, _ in necks]
    extra = datasets.Case(id="a2", subject="a", group="ga", label=0, image=cases[0].image)
    S = datasets.slice_stack(cases + [extra], size=(32, 32), n_slices=20,
                             cache_dir=tmp_path / "cache")
    drawn = datasets.plot_slabs(S.cases, S.slabs, tmp_path / "slabs.png")
    assert drawn == ["a", "b"]                       # the first scan of each group
    w, h = Image.open(tmp_path / "slabs.png").size
    assert w > h > 100
    assert datasets.plot_slabs(S.cases, {}, tmp_path / "none.png") == []
    assert not (tmp_path / "none.png").exists()


def test_non_square_size_keeps_the_aspect_ratio(tmp_path):
    """A 44 x 60 (LR x AP) slice to size (64, 44): padded to 44 x 64 first, as MADGAN zero-pads
    176 x 240 to 176 x 256, so a disc stays round (padded to a square: 0.69 as wide as tall)."""
    x, y = np.meshgrid(np.arange(44) - 21.5, np.arange(60) - 29.5, indexing="ij")
    disc = ((x ** 2 + y ** 2) < 15 ** 2).astype(np.float32)
    F.save(tmp_path / "d.nii.gz", np.repeat((disc * (500 + 10 * y))[:, :, None], 6, 2))
    c = datasets.Case(id="d", subject="d", group="g", label=0, image=str(tmp_path / "d.nii.gz"))
    S = datasets.slice_stack([c], size=(64, 44), n_slices=4, crop=False, strip=False,
                             cache_dir=tmp_path / "cache")
    disc = np.asarray(S.brain[0]) > 0                     # the auto mask of the disc, resized
    tall, wide = disc.any(1).sum(), disc.any(0).sum()
    assert S.x.shape[1:] == (64, 44) and abs(tall - wide) <= 1, (tall, wide)
    # the paper's case is zero-padding alone; a square target pads to a square, as before
    a = np.random.default_rng(0).random((3, 240, 176))
    assert datasets._pad_to_aspect(a, 0, (256, 176)).shape == (3, 256, 176)
    assert np.array_equal(datasets._pad_to_aspect(a, -1, (64, 64)), datasets.pad_to_square(a, -1))


def test_volume_shorter_than_the_slab_is_skipped_not_padded(tmp_path):
    for name, nz in (("short", 5), ("long", 12)):
        img, _, _ = F.head(seed=3, shape=(24, 28, nz))
        F.save(tmp_path / f"{name}.nii.gz", img)
    cases = [datasets.Case(id=n, subject=n, group="g", label=0, image=str(tmp_path / f"{n}.nii.gz"))
             for n in ("short", "long")]
    S = datasets.slice_stack(cases, size=(16, 16), n_slices=8, cache_dir=tmp_path / "cache")
    assert [c.id for c in S.cases] == ["long"] and len(S) == 8 and len(set(S.z.tolist())) == 8
    assert "5 axial slices, fewer than the 8" in S.skipped["short"] and "short" not in S.slabs
    with pytest.raises(C.UserError, match=r"every scan of the .* set is too short.*short: 5 axial"):
        datasets.slice_stack(cases[:1], size=(16, 16), n_slices=8, cache_dir=tmp_path / "cache")


# ---- data the normalisation does not fit ---------------------------------------------------------

def test_mri_through_the_ct_window_is_an_error(trees, tmp_path):
    ct = dict(norm="ct", cache_dir=tmp_path / "c")
    # with brain masks (MSLUB): every brain voxel is above 100 "HU" and clips to +1
    ms = load("mslub", trees["mslub"], contrast="flair").test[:3]
    with pytest.raises(C.UserError, match=r"3 of 3 scans of the test set do not look like CT in "
                                          r"Hounsfield units under the CT window \[-20, 100\] HU: "
                                          r"patient\d+ \(brain std .*% at -1/\+1.*MRI volumes.*"
                                          r"--data ctich"):
        datasets.slice_stack(ms, size=(16, 16), n_slices=4, desc="test", drop_anomalous=False, **ct)
    # without (IXI): the HU skull strip finds something, but an MRI has no air at -1000 HU
    ixi = load("ixi", trees["ixi"]).train[:4]
    with pytest.raises(C.UserError, match=r"4 of 4 scans of the train set do not look like CT.*no "
                                          r"voxel below -200 HU, so no air"):
        datasets.slice_stack(ixi, size=(16, 16), n_slices=4, desc="train", **ct)
    with pytest.raises(C.UserError, match=r"do not look like CT in Hounsfield units"):
        datasets.volume_stack(ixi, size=(8, 8, 8), **ct)
    S = datasets.slice_stack(ixi, size=(16, 16), n_slices=4, cache_dir=tmp_path / "c")   # MRI: fine
    assert min(v["brain_std"] for v in S.stats.values()) > 0.1      # tissue median rule: healthy tissue spans about a third of [-1, 1]
    meta = json.loads(next((tmp_path / "c").glob("slices-*/meta.json")).read_text())
    assert {"brain_std", "saturated", "raw_min"} <= set(meta["cases"][0])   # recorded in the cache
    # real CT passes
    h = load("ctich", trees["ctich"], contrast="ct")
    assert len(datasets.slice_stack(h.train[:2], size=(16, 16), n_slices=4, **ct)) == 8
