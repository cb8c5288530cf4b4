"""common.py: metrics against scikit-learn and hand-computed cases, windowing, caches, the folder
loader and its bad inputs, run plumbing."""
import json
import subprocess
import sys
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from sklearn import metrics as skm

import common as C
from data import datasets

REPO = Path(__file__).resolve().parents[1]


# ---- metrics ------------------------------------------------------------------------------------

def test_auroc_auprc_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = rng.normal(size=200) + y
    assert C.auroc(y, s) == pytest.approx(skm.roc_auc_score(y, s))
    assert C.auprc(y, s) == pytest.approx(skm.average_precision_score(y, s))
    assert np.isnan(C.auroc(np.zeros(5), np.arange(5)))


def test_auroc_hand_computed():
    # pairs (pos, neg): 0.8>0.1, 0.8>0.4, 0.35>0.1, 0.35<0.4 -> 3/4
    assert C.auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)


def test_youden_operating_point_by_hand():
    y = [0, 0, 0, 1, 1, 1]
    s = [0.1, 0.2, 0.7, 0.6, 0.8, 0.9]
    op = C.youden(y, s)
    # threshold 0.6: TP 3, FP 1 -> sens 1, spec 2/3, J = 2/3 (threshold 0.8: sens 2/3, spec 1, J 2/3 too;
    # sklearn's curve visits 0.8 first so argmax keeps it)
    assert op["youden_j"] == pytest.approx(2 / 3)
    assert op["sensitivity"] + op["specificity"] - 1 == pytest.approx(2 / 3)
    assert op["accuracy"] == pytest.approx(5 / 6)


def test_fpr_at_95_tpr():
    y = np.array([0] * 10 + [1] * 20)
    s = np.concatenate([np.arange(10), np.arange(5, 25)]).astype(float)
    # 95% TPR needs the threshold at the 2nd-lowest positive (6): negatives >= 6 are 6,7,8,9 -> 0.4
    assert C.fpr_at_tpr(y, s, 0.95) == pytest.approx(0.4)


def test_dice_cases():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert C.dice(a, b) == 1.0
    a[0, :2] = True
    b[0, 1:3] = True
    assert C.dice(a, b) == pytest.approx(2 * 1 / 4)


def test_threshold_from_healthy_percentile_and_fpr():
    v = np.arange(101, dtype=float)
    assert C.threshold_from_healthy(v, percentile=98) == pytest.approx(98.0)
    assert C.threshold_from_healthy(v, fpr=0.05) == pytest.approx(95.0)
    with pytest.raises(ValueError):
        C.threshold_from_healthy(v)


def test_oracle_best_dice_finds_perfect_threshold():
    gt = np.zeros(100, bool)
    gt[90:] = True
    s = np.arange(100, dtype=float)
    d, t = C.oracle_best_dice(s, gt)
    assert d == pytest.approx(1.0) and 89 < t <= 90


def test_aggregate_mean_max():
    assert C.aggregate([1, 3, 10, 20], ["a", "a", "b", "b"], "mean") == {"a": 2.0, "b": 15.0}
    assert C.aggregate([1, 3, 10, 20], ["a", "a", "b", "b"], "max") == {"a": 3.0, "b": 20.0}


def test_postprocess_3d_known_answer():
    r = np.zeros((12, 12, 12), np.float32)
    r[3:7, 3:7, 3:7] = 1.0            # a 4^3 blob survives a 3^3 median filter
    r[9, 9, 9] = 1.0                  # a single hot voxel is removed by the median filter
    brain = np.ones_like(r, np.uint8)
    f = C.postprocess_3d(r, brain, median=3, erode=0)
    assert f[9, 9, 9] == 0 and f[4, 4, 4] == 1
    seg = C.postprocess_3d(r, brain, median=3, erode=0, threshold=0.5, min_size=6)
    # a 3^3 median keeps a voxel of the cube when >= 14 of its 27 neighbours are in the cube: the
    # 8 corners (8/27) and the 24 edge voxels (12/27) go, faces (18/27) and the core stay: 64 - 32
    assert seg.sum() == 32
    # a component smaller than min_size is dropped
    seg2 = C.postprocess_3d(r, brain, median=1, erode=0, threshold=0.5, min_size=6)
    assert not seg2[9, 9, 9] and seg2[4, 4, 4]
    # outside the eroded brain mask everything is zero
    brain[:, :, :5] = 0
    f = C.postprocess_3d(r, brain, median=1, erode=1)
    assert f[:, :, :6].sum() == 0


def test_evaluate_groups_against_normal_only():
    rows = ([{"group": "normal", "label": 0, "score": s} for s in (0.1, 0.2, 0.3)]
            + [{"group": "a", "label": 1, "score": s} for s in (0.9, 0.8)]
            + [{"group": "b", "label": 1, "score": s} for s in (0.15, 0.25)])
    ev = C.evaluate(rows)
    assert ev["groups"]["a"]["auroc"] == pytest.approx(1.0)
    assert ev["groups"]["b"]["auroc"] == pytest.approx(skm.roc_auc_score([0, 0, 0, 1, 1], [.1, .2, .3, .15, .25]))
    assert ev["groups"]["normal"] == {"n": 3, "n_cases": 3, "score_mean": pytest.approx(0.2),
                                      "score_std": pytest.approx(np.std([.1, .2, .3]))}
    y = [r["label"] for r in rows]
    s = [r["score"] for r in rows]
    assert ev["metrics"]["auroc"] == pytest.approx(skm.roc_auc_score(y, s))


# ---- windowing ----------------------------------------------------------------------------------

def test_ct_window_values():
    out = datasets.ct_window(np.array([-1000, -20, 40, 100, 1500]), -20, 100)
    np.testing.assert_allclose(out, [-1, -1, 0, 1, 1])


def test_normalize_mri_percentiles():
    img = np.arange(100, dtype=np.float32).reshape(10, 10, 1)
    out = datasets.normalize_mri(img, None, rule="percentile", lo_pct=0, hi_pct=100)  # voxels > min: 1..99 -> [-1, 1]
    assert out.min() == -1 and out.max() == 1 and out[0, 5, 0] == pytest.approx(-1 + 2 * 4 / 98)


def test_normalize_mri_tissue_rule_by_hand():
    # brain voxels: 90 at 100 (tissue), 10 at 1000 (a bright lesion, outside [m/2, 2m]) -> m = 100
    img = np.r_[np.full(90, 100.0), np.full(10, 1000.0), np.zeros(20)].astype(np.float32)
    brain = (np.arange(120) < 100).astype(np.uint8)
    assert datasets.tissue_median(img, brain) == 100.0
    out = datasets.normalize_mri(img, brain)                       # 2 clip(I / 300, 0, 1) - 1
    np.testing.assert_allclose(out[[0, 95, 110]], [2 * 100 / 300 - 1, 1.0, -1.0], atol=1e-6)


def _painted(contrast, rule, index):
    """A phantom tumour with oedema (its voxels inside its mask) pasted into a normal scan ->
    the median |change| of the normalised untouched brain voxels, in [-1, 1] units."""
    from data import phantom
    n, t = phantom.make_case(contrast, "normal", index), phantom.make_case(contrast, "tumor", index)
    brain = n["brain"] > 0
    lesion = (t["mask"] > 0) & brain
    img = n["image"].astype(np.float32)
    painted = np.where(lesion, t["image"], img).astype(np.float32)
    a, b = datasets.normalize_mri(img, brain, rule=rule), datasets.normalize_mri(painted, brain, rule=rule)
    return float(np.median(np.abs(a - b)[brain & ~lesion])), int(lesion.sum())


@pytest.mark.parametrize("contrast", ["t1", "t2", "flair"])
def test_a_painted_tumour_does_not_move_the_rest_of_the_scan(contrast):
    for index in range(2):
        moved, n = _painted(contrast, "tissue", index)
        assert n > 1000 and moved < 0.02, (contrast, index, moved)
    if contrast == "flair":      # the earlier rule (brain 1st/99th percentiles) did move it
        assert _painted(contrast, "percentile", 0)[0] > 0.1


@pytest.mark.parametrize("contrast", ["t2", "flair"])
def test_hyperintense_anomalies_keep_their_contrast_below_the_ceiling(contrast):
    from data import phantom
    groups = [g for g in phantom.GROUPS[contrast] if g in ("ms_lesion", "tumor")]
    assert len(groups) == 2
    for g in groups:
        for index in range(2):
            c = phantom.make_case(contrast, g, index, return_labels=True)
            x = datasets.normalize_mri(c["image"].astype(np.float32), c["brain"] > 0)
            lesion = x[c["mask"] > 0]
            assert (lesion < 1.0).mean() >= 0.95, (g, index)
            if g == "ms_lesion":          # T2/FLAIR-hyperintense by definition (the tumour's
                # solid part is not): brighter than the white matter it sits in
                wm = (c["labels"] == phantom.WM) & (c["mask"] == 0)
                assert np.median(lesion) > np.median(x[wm]) + 0.05


def test_axial_stack_orientation():
    v = np.zeros((3, 4, 5))          # X, Y, Z
    v[2, 3, 1] = 1                    # right-most X, most anterior Y, 2nd slice
    a = datasets.axial_stack(v)              # (Z, Y, X), anterior up
    assert a.shape == (5, 4, 3)
    assert a[1, 0, 2] == 1


def test_resize_and_pad():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    p = datasets.pad_to_square(a, -1)
    assert p.shape == (3, 3) and (p[2] == -1).all()
    assert datasets.resize(np.ones((2, 8, 8)), (4, 4)).shape == (2, 4, 4)


def test_patches_inside_brain():
    brain = np.zeros((3, 32, 32), np.uint8)
    brain[:, 8:24, 8:24] = 1
    x = brain.astype(np.float32)
    idx, top, left = C.random_patches(x, brain, size=8, n=20, rng=np.random.default_rng(0), min_brain=1.0)
    P = C.extract_patches(x, idx, top, left, 8)
    assert P.shape == (20, 8, 8) and (P == 1).all()
    assert all(brain[0, t:t + 8, l:l + 8].all() for t, l in C.grid_patches(brain[0], 8, 4, min_brain=1.0))


def test_augment_identity_and_range():
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    same = C.augment_2d(x, rot_deg=0, translate=0, scale=(1, 1), hflip=0)
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)
    flipped = C.augment_2d(x, rot_deg=0, translate=0, scale=(1, 1), hflip=1.0)
    torch.testing.assert_close(flipped, x.flip(-1), atol=1e-5, rtol=0)


# ---- the folder loader and bad inputs -----------------------------------------------------------

def _blob(shape=(24, 28, 20), value=100.0, seed=0):
    rng = np.random.default_rng(seed)
    xx, yy, zz = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    b = (xx ** 2 + yy ** 2 + zz ** 2) < 0.7
    x = np.where(b, value + rng.normal(0, 3, shape), 0).astype(np.float32)
    return x, b.astype(np.uint8)


def make_folder(root, n_train=4, n_test=2):
    for split, n in (("train", n_train), ("test/normal", n_test), ("test/lesion", n_test)):
        d = root / split
        d.mkdir(parents=True)
        for i in range(n):
            name = f"{split.replace('/', '-')}{i}"
            x, b = _blob(seed=hash(name) % 1000)
            m = np.zeros_like(b)
            if "lesion" in split:
                m[10:14, 12:16, 8:12] = 1
                x[m > 0] = 200
            nib.save(nib.Nifti1Image(x, np.eye(4)), d / f"{name}.nii.gz")
            nib.save(nib.Nifti1Image(b, np.eye(4)), d / f"{name}_brainmask.nii.gz")
            if split.startswith("test"):
                nib.save(nib.Nifti1Image(m, np.eye(4)), d / f"{name}_mask.nii.gz")
    return root


def _args(root, **kw):
    kw = {"data": "folder", "data_root": str(root), "train_data": None, "train_root": None, "seed": 0,
          "preset": "quick", **kw}
    return types.SimpleNamespace(**kw)


def test_folder_loader_groups_labels_and_val_split(tmp_path):
    s = datasets.load_dataset(_args(make_folder(tmp_path / "d")))
    assert len(s.train) == 3 and len(s.val) == 1          # 10% of subjects (at least one) -> val
    assert {(c.group, c.label) for c in s.test} == {("normal", 0), ("lesion", 1)}
    assert all(c.brainmask for c in s.test) and all(c.mask for c in s.test)
    S = datasets.slice_stack(s.test, size=(16, 16), n_slices=4, cache_dir=tmp_path / "cache")
    assert S.x.shape == (16, 16, 16) and S.x.min() >= -1 and S.x.max() <= 1
    lesion_rows = [i for i in range(len(S)) if S.cases[S.case[i]].group == "lesion"]
    assert S.mask[lesion_rows].sum() > 0 and S.mask[[i for i in range(len(S)) if i not in lesion_rows]].sum() == 0
    # the cache is reused: same files, same arrays
    S2 = datasets.slice_stack(s.test, size=(16, 16), n_slices=4, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(np.asarray(S.x), np.asarray(S2.x))
    V = datasets.volume_stack(s.test, size=(8, 8, 8), norm="mri", cache_dir=tmp_path / "cache")
    assert V.x.shape == (4, 8, 8, 8)


def test_bad_inputs_give_user_errors(tmp_path):
    with pytest.raises(C.UserError, match="does not exist"):
        datasets.load_dataset(_args(tmp_path / "missing"))
    root = make_folder(tmp_path / "d")
    # corrupt file
    bad = root / "test" / "normal" / "test-normal0.nii.gz"
    bad.write_bytes(b"not a nifti")
    case = [c for c in datasets.load_dataset(_args(root)).test if c.image == str(bad)][0]
    with pytest.raises(C.UserError, match="cannot read image .*test-normal0"):
        datasets.read_case(case)
    # NaNs
    x, _ = _blob()
    x[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(x, np.eye(4)), bad)
    with pytest.raises(C.UserError, match="NaN"):
        datasets.read_case(case)
    # mask shape mismatch
    nib.save(nib.Nifti1Image(_blob()[0], np.eye(4)), bad)
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), np.eye(4)), root / "test/normal/test-normal0_mask.nii.gz")
    with pytest.raises(C.UserError, match="has shape"):
        datasets.read_case(case)


def test_main_guard_prints_one_error_line():
    code = "import common as C\nC.main_guard(lambda argv: C.fail('--data-root x: missing'))"
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == ["error: --data-root x: missing"]


def test_parse_args_preset_and_explicit_override(tmp_path):
    hyper = {"lam": C.hp(0.1, "lambda", 0, 1)}
    presets = {"smoke": {"lam": 0.5}, "quick": {}}
    assert C.parse_args(["--preset", "smoke"], hyper, presets, method="m").lam == 0.5
    assert C.parse_args(["--preset", "paper"], hyper, presets, method="m").lam == 0.1
    a = C.parse_args(["--preset", "smoke", "--lam", "0.2"], hyper, presets, method="m")
    assert a.lam == 0.2 and a.out.startswith("runs/m__synthetic__0__")
    with pytest.raises(C.UserError, match="no such checkpoint"):
        C.parse_args(["--checkpoint", str(tmp_path / "nope.pt")], hyper, presets, method="m")
    with pytest.raises(C.UserError, match="--lam must be in"):
        C.parse_args(["--lam", "2"], hyper, presets, method="m")


def test_checkpoint_atomic_roundtrip(tmp_path):
    path = tmp_path / "last.pt"
    C.save_checkpoint(path, {"step": 3, "w": torch.ones(2)})
    assert C.load_checkpoint(path)["step"] == 3
    assert not list(tmp_path.glob(".*tmp*"))
    (tmp_path / "broken.pt").write_bytes(b"xx")
    with pytest.raises(C.UserError, match="cannot be read"):
        C.load_checkpoint(tmp_path / "broken.pt")


def test_report_writes_contract_files(tmp_path):
    args = _args(tmp_path, preset="smoke")
    args.out = str(tmp_path / "run")
    run = C.Run(out=Path(args.out), device=torch.device("cpu"), method="m", t0=0)
    run.out.mkdir()
    rows = [{"id": f"n{i}", "group": "normal", "label": 0, "score": i / 10} for i in range(5)]
    rows += [{"id": f"a{i}", "group": "lesion", "label": 1, "score": 1 + i} for i in range(5)]
    res = C.report(run, args, "volume", rows, {"train_s": 1.0, "score_s": 0.5})
    assert res["metrics"]["auroc"] == 1.0
    for f in ("results.json", "scores.csv", "roc.png", "scores.png"):
        assert (run.out / f).stat().st_size > 0
    assert json.loads((run.out / "results.json").read_text())["groups"]["lesion"]["n"] == 5
    assert (run.out / "scores.csv").read_text().splitlines()[0] == "id,group,label,score"


def test_report_refuses_a_test_set_without_normal_units(tmp_path):
    args = _args(tmp_path, preset="smoke")
    run = C.Run(out=tmp_path / "run", device=torch.device("cpu"), method="m", t0=0)
    run.out.mkdir()
    rows = [{"id": f"a{i}", "group": "lesion", "label": 1, "score": float(i)} for i in range(3)]
    with pytest.raises(C.UserError, match="no normal"):
        C.report(run, args, "slice", rows, {"train_s": 1.0})
    assert not (run.out / "results.json").exists()


@pytest.mark.parametrize("shape", [(64, 64), (61, 75), (16, 24), (128, 128), (256, 200)])
@pytest.mark.parametrize("clip", [0.01, 0.05, 0.0])
def test_batched_clahe_equals_skimage_bit_for_bit(shape, clip):
    """C.equalize_adapthist (all images' tiles clipped together) == skimage's, image by image: noise,
    few grey levels, a constant image, a dark image, a half-background one (the phantom's case) and
    one of constant blocks (large tiles with one bin: the even spread and the stride-1 hand-out)."""
    from skimage import exposure
    rng = np.random.default_rng(1)
    x = rng.random((6,) + shape)
    x[1] = np.round(x[1] * 4) / 4
    x[2] = 0.5
    x[3] *= 0.1
    x[4] = np.clip(rng.normal(0.3, 0.1, shape), 0, 1)
    x[4][: shape[0] // 2] = 0
    x[5] = np.kron(rng.random((8, 8)), np.ones((shape[0] // 8 + 1, shape[1] // 8 + 1)))[: shape[0], : shape[1]]
    got = C.equalize_adapthist(x, clip_limit=clip)
    want = np.stack([exposure.equalize_adapthist(i, clip_limit=clip) for i in x])
    assert got.dtype == want.dtype and np.array_equal(got, want)
