"""benchmark.py: the two baselines on the smoke phantom, and the report it writes."""
import types

import numpy as np

import benchmark as B


def test_zscore_baseline_separates_severe_atrophy_and_intensity_map_is_the_image():
    out = B.baselines("t1", "smoke", seed=0)
    assert set(out) == {"intensity", "zscore"}
    z = out["zscore"]
    # enlarged ventricles and sulci are far from the healthy mean image: stage 3 is found
    assert z["groups"]["atrophy_3"]["auroc"] >= 0.9
    rows = z["rows"]
    assert {r["label"] for r in rows} == {0, 1} and all(np.isfinite(r["score"]) for r in rows)
    # the intensity baseline's volume score is a brain-intensity percentile of an image in [0, 1]
    assert all(0.0 <= r["score"] <= 1.0 for r in out["intensity"]["rows"])


def test_report_has_one_table_per_contrast_and_mean_std_over_seeds(tmp_path):
    table = {("madgan (scan)", "atrophy_1"): {"auroc": [0.8, 0.9], "auprc": [0.7, 0.7], "dice": [None, None]},
             ("baseline zscore (t1, volume)", "atrophy_1"): {"auroc": [0.5, 0.5], "auprc": [0.6, 0.6],
                                                             "dice": [0.1, 0.3]},
             ("fanogan3d (volume)", "hemorrhage"): {"auroc": [0.7, 0.7], "auprc": [0.8, 0.8], "dice": [None, None]}}
    costs = {"madgan (scan)": {"train_s": [10.0, 12.0], "score": [0.01, 0.01], "rss": [500, 520]}}
    rows = [{"id": str(i), "group": "normal" if i < 4 else "atrophy_1", "label": int(i >= 4), "score": i}
            for i in range(8)]
    a = types.SimpleNamespace(seeds=2, preset="smoke", out=str(tmp_path))
    B.write_report(a, ["madgan"], table, costs, {"madgan (scan)": rows}, total=60.0)
    md = (tmp_path / "benchmark.md").read_text()
    assert "## T1: AUROC (AUPRC)" in md and "## CT: AUROC (AUPRC)" in md and "FLAIR" not in md
    assert "0.85 ± 0.05 (0.70 ± 0.00)" in md                           # mean ± std over the two seeds
    assert "0.200 ± 0.100" in md                                         # the baseline's Dice
    assert (tmp_path / "benchmark.png").stat().st_size > 0 and (tmp_path / "benchmark.json").is_file()


def test_readme_tables_are_replaced_between_the_markers_only(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{B.README_START}\nold numbers\n{B.README_END}\nafter\n")
    B.update_readme(readme, ["# title", "", "## T1: AUROC (AUPRC)", "| a | b |"])
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("after\n") and "old numbers" not in text
    assert "#### T1: AUROC (AUPRC)" in text and "| a | b |" in text and "results/benchmark.png" in text


def test_max_test_cases_keeps_the_first_n_of_each_label():
    """--max-test-cases N (common.add_contract_args, applied in datasets.load_dataset): both labels stay."""
    import common as C
    from data import datasets
    p = C.add_contract_args(C.ArgumentParser(), "x")
    a = p.parse_args(["--preset", "smoke", "--max-test-cases", "2"])
    assert a.max_test_cases == 2 and p.parse_args([]).max_test_cases == 0
    full = datasets.load_dataset(p.parse_args(["--preset", "smoke"]), contrast="t1")
    cut = datasets.load_dataset(a, contrast="t1")
    want = [c.id for c in full.test if c.label == 0][:2] + [c.id for c in full.test if c.label == 1][:2]
    assert [c.id for c in cut.test] == want and [c.id for c in cut.train] == [c.id for c in full.train]
