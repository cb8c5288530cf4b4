"""benchmark.py: seeds aggregated on fake run directories against hand-computed numbers, like-for-like
baselines from scores.csv columns, paired differences pooled over seeds, fidelity verdicts, the GPU
check on a CPU, and the fallback volume baselines."""
import csv
import importlib
import os
import json
import types

import numpy as np
import pytest

import benchmark as B
import common as C

NORMAL = [0.0, 1.0, 2.0, 3.0]
# anomalous scores per seed: AUROC vs the 4 normals = 16/16, 8/16, 12/16
ANOM = {0: [10.0, 11.0, 12.0, 13.0], 1: [10.0, 11.0, -1.0, -2.0], 2: [10.0, 11.0, 12.0, -1.0]}


def fake_rows(seed, columns=True):
    rows = [{"id": f"n{i}", "group": "normal", "label": 0, "score": s} for i, s in enumerate(NORMAL)]
    rows += [{"id": f"a{i}", "group": "atrophy_1", "label": 1, "score": s} for i, s in enumerate(ANOM[seed])]
    if columns:
        for r in rows:
            r["baseline_intensity"] = r["score"]          # the same ranking: difference 0
            r["baseline_zscore"] = -r["score"]            # the reversed ranking: AUROC 1 - method's
    return rows


def write_run(out, rows, unit="scan", **extra):
    out.mkdir(parents=True)
    with open(out / "scores.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    res = {"method": "madgan", "unit": unit, **C.evaluate(rows), "timing": {"train_s": 1.0, "score_s_per_sample": 0.1},
           "memory": {"rss_mb": 100.0}, **extra}
    (out / "results.json").write_text(json.dumps(res))
    return out


def test_seeds_are_aggregated_as_mean_sd_next_to_each_runs_interval(tmp_path):
    runs = [B.read_run(write_run(tmp_path / f"s{s}", fake_rows(s))) for s in range(3)]
    e = B.collect("madgan", runs)
    t = e["table"]["atrophy_1"]
    assert t["auroc"] == pytest.approx([1.0, 0.5, 0.75])
    m, sd, n = B.mean_sd(t["auroc"])
    assert (m, sd, n) == (pytest.approx(0.75), pytest.approx(0.25), 3)          # sd with ddof 1
    assert t["auroc_ci"][0] == [1.0, 1.0] and len(t["auroc_ci"]) == 3
    cell = B.fmt_seeds(t["auroc"], t["auroc_ci"])
    assert cell.startswith("0.75 ± 0.25 [1.00, 1.00] [") and cell.count("[") == 3
    # like for like: the baselines from the scores.csv columns, and method - baseline pooled over seeds
    assert e["like_for_like"]
    assert e["baselines"]["zscore"]["atrophy_1"]["auroc"] == pytest.approx([0.0, 0.5, 0.25])
    dz = e["vs_baseline"]["zscore"]["atrophy_1"]
    assert dz["per_seed"] == pytest.approx([1.0, 0.0, 0.5]) and dz["diff"] == pytest.approx(0.5)
    di = e["vs_baseline"]["intensity"]["atrophy_1"]
    assert di["diff"] == 0 and di["ci"] == [0.0, 0.0] and not di["resolved"]
    a = types.SimpleNamespace(seeds=3, preset="smoke", out=str(tmp_path / "res"), device="cpu", jobs=1,
                              no_readme=True)
    md = B.write_report(a, ["madgan"], {"madgan": e}, {}, total=6.0)
    assert "| madgan (scan) | 0.75 ± 0.25 [1.00, 1.00]" in md
    assert "baseline zscore (scan, like-for-like with madgan) | 0.25 ± 0.25" in md
    assert "| madgan (scan) − zscore | +0.50 [" in md
    for f in ("benchmark.md", "benchmark.json", "benchmark.png"):
        assert (tmp_path / "res" / f).stat().st_size > 0


def test_without_baseline_columns_the_fallback_is_labelled_not_like_for_like(tmp_path):
    runs = [B.read_run(write_run(tmp_path / f"s{s}", fake_rows(s, columns=False))) for s in range(2)]
    e = B.collect("madgan", runs)
    assert not e["like_for_like"] and e["baselines"] == {} and e["vs_baseline"] == {}
    fb = {"t1": {"zscore": {"table": B.seed_table([{"atrophy_1": {"auroc": 0.6, "auroc_ci": [0.4, 0.8],
                                                                 "auprc": 0.5, "auprc_ci": [0.3, 0.7]}}]),
                            "rows0": fake_rows(0, columns=False)}}}
    a = types.SimpleNamespace(seeds=2, preset="smoke", out=str(tmp_path / "res"), device="cpu", jobs=1,
                              no_readme=True)
    md = B.write_report(a, ["madgan"], {"madgan": e}, fb, total=1.0)
    assert "baseline zscore (t1, not like-for-like (64³ volume)) | 0.60 [0.40, 0.80]" in md
    assert "method − baseline" not in md


def test_pooled_difference_of_one_seed_is_common_paired_difference():
    rng = np.random.default_rng(3)
    case = np.repeat([f"c{i}" for i in range(12)], 3)                 # 3 correlated units per case
    g = np.where(np.arange(36) < 18, "normal", "tumor")
    y = (g == "tumor").astype(int)
    a, b = rng.normal(size=36) + y, rng.normal(size=36) + 0.3 * y
    ref = C.paired_difference(y, a, b, case, g, n_boot=500, seed=0)
    got = B.pooled_difference([((y, a, case, g), (y, b, case, g))], n_boot=500, seed=0)
    assert got["diff"] == pytest.approx(ref["diff"]) and got["ci"] == pytest.approx(ref["ci"])
    assert got["per_seed_ci"][0] == pytest.approx(ref["ci"]) and got["n_cases"] == 12


def test_spread_separates_seed_noise_from_test_set_size():
    # the same difference in two seeds: no seed noise; se 0.05 against a mean of 0.01 with 40 cases
    # needs 40 * (1.96 * 0.05 / 0.01)^2 = 3841.6 -> 3842 cases
    s = B.spread([0.01, 0.01], [[-0.09, 0.11]] * 2, [0.05, 0.05], n_cases=40)
    assert s["sd_seeds"] == 0 and s["se_cases"] == pytest.approx(0.05) and s["cases_to_resolve"] == 3842
    noisy = B.spread([0.2, -0.2], [[0.1, 0.3], [-0.3, -0.1]], [0.05, 0.05], n_cases=40)
    assert noisy["sd_seeds"] > noisy["se_cases"] and noisy["cases_to_resolve"] is None   # more seeds
    assert B.spread([0.3], [[0.2, 0.4]], [0.05], n_cases=40)["cases_to_resolve"] is None  # resolved
    # the cell: an extrapolation past 10x the test set only says the difference is about zero
    assert B.fmt_need(3842, 40) == "> 10× now (Δ ≈ 0; now 40)" and B.fmt_need(123, 110) == "~123 (now 110)"


def test_verdicts():
    assert B.verdict([0.01, 0.2]) == "holds" and B.verdict([-0.2, -0.01]) == "reversed"
    assert B.verdict([-0.1, 0.1]) == "not resolved" and B.verdict(None) == "not resolved"
    assert B.verdict([0.01, 0.2], direction=-1) == "reversed"
    assert B.row_verdict(["holds", "holds"]) == "holds"
    assert B.row_verdict(["holds", "not resolved"]) == "not resolved"
    assert B.row_verdict(["holds", "reversed"]) == "reversed" and B.row_verdict([]) == "not run"
    d = B.pooled_from_intervals([0.10, 0.20], [[0.0, 0.2], [0.1, 0.3]])
    assert d["diff"] == pytest.approx(0.15) and d["ci"] == pytest.approx([0.15 - 0.1, 0.15 + 0.1])


def _ra_rows(seed, n=10):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(2 * n):
        lab = int(i >= n)
        rows.append({"id": f"c{i}/z0", "case": f"c{i}", "group": "atrophy_1" if lab else "normal", "label": lab,
                     "score": 5.0 * lab + rng.normal(),                    # Eq. 5: clearly separates
                     "s_wo_eq": rng.normal(),                               # w/o eq: chance
                     "s_wo_pl": -5.0 * lab + rng.normal()})                 # w/o PL: reversed
    return rows


def test_fidelity_verdicts_from_fake_runs(tmp_path):
    loaded = {("ra", s): B.read_run(write_run(tmp_path / f"ra{s}", _ra_rows(s), unit="slice")) for s in range(3)}
    row = B.evaluate_row("ra_ablations", loaded)
    (eq, pl) = row["comparisons"]
    assert eq["verdict"] == "holds" and eq["diff"]["n_seeds"] == 3 and eq["diff"]["ci"][0] > 0
    assert pl["verdict"] == "holds"                 # score - reversed score: the paper's direction
    assert row["verdict"] == "holds"
    # the atrophy row needs the lead's baseline_intensity column: without it, 'not run' and why
    r2 = B.evaluate_row("ra_atrophy_vs_intensity", loaded)
    assert r2["verdict"] == "not run" and "baseline_intensity" in r2["comparisons"][0]["missing"]
    # across runs, joined by id: a worse SI-VAE -> RA − SI-VAE holds; swapped -> reversed
    worse = {("sivae", s): B.read_run(write_run(tmp_path / f"si{s}", [{**r, "score": r["s_wo_eq"]}
                                                                      for r in _ra_rows(s)], unit="slice"))
             for s in range(3)}
    assert B.evaluate_row("ra_vs_sivae", {**loaded, **worse})["verdict"] == "holds"
    swapped = {("ra", s): worse[("sivae", s)] for s in range(3)} | {("sivae", s): loaded[("ra", s)] for s in range(3)}
    assert B.evaluate_row("ra_vs_sivae", swapped)["verdict"] == "reversed"
    # madgan: AUC rises with stage = one score, two groups against the same normal scans
    rows = [{"id": f"n{i}", "group": "normal", "label": 0, "score": float(i)} for i in range(8)]
    rows += [{"id": f"a1_{i}", "group": "atrophy_1", "label": 1, "score": float(i)} for i in range(8)]
    rows += [{"id": f"a2_{i}", "group": "atrophy_2", "label": 1, "score": 20.0 + i} for i in range(8)]
    rows += [{"id": f"a3_{i}", "group": "atrophy_3", "label": 1, "score": 30.0 + i} for i in range(8)]
    st = B.evaluate_row("madgan_stage", {("madgan", 0): B.read_run(write_run(tmp_path / "mg", rows))})
    d21, d32 = st["comparisons"]
    assert d21["diff"]["diff"] == pytest.approx(1.0 - 0.5) and d21["verdict"] == "holds"
    assert d32["diff"]["diff"] == 0 and d32["verdict"] == "not resolved" and st["verdict"] == "not resolved"
    # 3D - 2D comes from the 2D run's results.json (its volume scores are not in scores.csv)
    f2d = write_run(tmp_path / "f2d", fake_rows(0), compare_3d_vs_2d={"3d_minus_2d_volume_auroc": {
        "all": {"diff": 0.2, "ci": [0.1, 0.3]}}})
    r3 = B.evaluate_row("f3d_3d_vs_2d", {("f2d", 0): B.read_run(f2d), ("f3d", 0): B.read_run(f2d)})
    assert r3["verdict"] == "holds" and r3["comparisons"][0]["diff"]["diff"] == pytest.approx(0.2)


def test_every_fidelity_run_parses_with_its_scripts_own_flags(tmp_path):
    """Each RUNS entry's flags are the script's (its parser accepts them); the columns are named in code."""
    for name, (script, flags) in B.RUNS.items():
        mod = importlib.import_module(script)
        fl = [str(tmp_path) if f.startswith("{") else f for f in flags]
        args = mod.parse_args(["--preset", "smoke", "--out", str(tmp_path / name), *fl])
        assert args.preset == "smoke"
    src = {m: open(f"{m}.py").read() for m in B.METHODS}
    for spec in B.FIDELITY.values():
        for c in spec["comparisons"]:
            for run, col in [c[k] for k in ("a", "b") if k in c]:
                if col not in ("score", *B.BASELINE_COLUMNS):
                    assert f'"{col}"' in src[B.RUNS[run][0]], (run, col)


def test_fidelity_dry_run_writes_the_template_with_commands(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)      # runs/benchmark is relative: no earlier runs of this checkout count
    rows = B.run_fidelity(B.parse(["--fidelity", "--dry-run", "--out", str(tmp_path)]))
    md = (tmp_path / "fidelity.md").read_text()
    assert len(rows) == len(B.FIDELITY) and "template: nothing has been run yet" in md
    assert "python madgan.py --preset quick --seed 0 --device cpu --out runs/benchmark/quick/madgan__l1-weight-0__s0 " \
           "--l1-weight 0" in md
    assert "--dims 2 --compare-3d runs/benchmark/quick/fanogan3d__default__s0" in md


def test_one_row_keeps_the_other_rows_of_the_table(tmp_path):
    loaded = {("ra", s): B.read_run(write_run(tmp_path / f"ra{s}", _ra_rows(s), unit="slice")) for s in range(3)}
    earlier = {"args": {"preset": "quick", "seeds": 3}, "rows": [B.evaluate_row("ra_ablations", loaded)]}
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "fidelity.json").write_text(json.dumps(earlier))
    a = B.parse(["--fidelity", "--dry-run", "--row", "madgan_l1", "--out", str(tmp_path / "res"),
                 "--runs", str(tmp_path / "none")])
    assert [r["name"] for r in B.merge_rows(a, [B.evaluate_row("madgan_l1", {})])] == ["madgan_l1", "ra_ablations"]
    a.seeds = 1                                                      # another setting: the old rows are not mixed in
    assert [r["name"] for r in B.merge_rows(a, [B.evaluate_row("madgan_l1", {})])] == ["madgan_l1"]


def test_gpu_check_on_cpu_writes_gpu_md(tmp_path):
    """The GPU check's whole path on a CPU at smoke size, for madgan (its fastest script here): amp,
    float32, --resume, --checkpoint; gpu.md has every field. (fanogan3d's three phases: see README.)"""
    B.gpu_check(B.parse(["--gpu-check", "--device", "cpu", "--preset", "smoke", "--steps", "3", "--test-cases",
                         "2", "--only", "madgan", "--out", str(tmp_path / "res"), "--runs", str(tmp_path / "runs")]))
    md = (tmp_path / "res" / "gpu.md").read_text()
    info = json.loads((tmp_path / "res" / "gpu.json").read_text())
    m = info["scripts"][0]
    assert m["errors"] == {}, m["errors"]
    assert set(m["steps_per_s"]["amp"]) == {"train"} and m["steps_per_s"]["fp32"]["train"] > 0
    assert m["steps_per_s"]["resume"]["train"] > 0                  # 3 -> 5 steps after --resume
    assert m["checkpoint_mb"] > 0 and m["checkpoint_write_s"] is not None and m["score_s_per_unit"] > 0
    assert m["unit"] == "scan" and m["planned_steps"]["train"] > 0 and m["projected_h_1gpu"] is not None
    assert m["projected_h_4gpu"] == pytest.approx(m["projected_h_1gpu"] / 4, abs=0.01)
    for field in ("GPU: **none (cpu)**", "torch ", "steps/s amp", "peak CUDA MB", "last.pt MB", "score s / unit",
                  "projected h, 1 GPU", "4 GPUs", "## Exact commands", "--resume", "--checkpoint", "--amp",
                  "--max-test-cases 2"):
        assert field in md, field


def test_zscore_baseline_separates_severe_atrophy_and_intensity_map_is_the_image():
    out = B.baselines("t1", "smoke", seed=0)
    assert set(out) == {"intensity", "zscore"}
    z = out["zscore"]
    # enlarged ventricles and sulci are far from the healthy mean image: stage 3 is found well above
    # chance. Not near-perfectly: since phantom 2.0 the stages are shifts of a healthy population
    # that varies (brain age) on unregistered heads (pose +-10 deg / +-8 mm), the mean and SD come
    # from 8 training subjects and the smoke set has 4 vs 4 cases (AUROC in steps of 1/16; 0.81 now)
    assert z["groups"]["atrophy_3"]["auroc"] >= 0.75
    rows = z["rows"]
    assert {r["label"] for r in rows} == {0, 1} and all(np.isfinite(r["score"]) for r in rows)
    # the intensity baseline's volume score is a brain-intensity percentile of an image in [0, 1]
    assert all(0.0 <= r["score"] <= 1.0 for r in out["intensity"]["rows"])


def test_readme_tables_are_replaced_between_the_markers_only(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{B.README_START}\nold numbers\n{B.README_END}\nafter\n")
    B.update_readme(readme, ["# title", "", "## T1: AUROC (AUPRC)", "| a | b |"])
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("after\n") and "old numbers" not in text
    assert "#### T1: AUROC (AUPRC)" in text and "| a | b |" in text and "results/benchmark.png" in text
    B.update_readme(readme, ["# title", "", "para", "", "## T1: AUROC", "| auroc |", "", "## T1: AUPRC",
                             "| auprc |", "", "## Cost", "| cost |"])
    text = readme.read_text()
    assert "| auroc |" in text and "| cost |" in text and "| auprc |" not in text and B.README_NOTE in text
    assert text.index("para") < text.index(B.README_NOTE) < text.index("#### T1: AUROC")


def test_fidelity_table_goes_between_its_own_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{B.README_START}\nbench\n{B.README_END}\nb\n{B.FIDELITY_START}\nOLD-TABLE\n"
                      f"{B.FIDELITY_END}\nc\n")
    B.update_fidelity_readme(readme, ["cmd", "", "| row | verdict |", "| x | holds |"])
    text = readme.read_text()
    assert "OLD-TABLE" not in text and "bench" in text and text.endswith("c\n") and "| x | holds |" in text
    assert text.index(B.FIDELITY_START) < text.index("results/fidelity.png") < text.index(B.FIDELITY_END)


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


def test_gpu_check_commands_of_all_five_scripts_parse_at_the_paper_preset(tmp_path):
    """Every command --gpu-check would run on the GPU is accepted by its script's parser (paper preset);
    the resume and score runs point at the previous run's last.pt."""
    a = B.parse(["--gpu-check", "--device", "cpu", "--runs", str(tmp_path)])
    assert a.preset == "paper" and a.steps == 200 and a.test_cases == 4
    for m in B.METHODS:
        plan = B.gpu_plan(m, a, tmp_path)
        assert [p for p, _, _ in plan] == ["amp", "fp32", "resume", "score"]
        for phase, out, cmd in plan:
            argv = cmd[2:]
            for flag in ("--resume", "--checkpoint"):      # the checkpoint exists once the earlier run ran
                if flag in argv:
                    ck = tmp_path / "ck.pt"
                    ck.write_bytes(b"")
                    assert argv[argv.index(flag) + 1].endswith("last.pt")
                    argv[argv.index(flag) + 1] = str(ck)
            args = importlib.import_module(m).parse_args(argv)
            assert args.preset == "paper" and args.max_test_cases == 4
            assert args.amp == (phase != "fp32")


def test_profile_run_times_the_run_without_changing_it(tmp_path):
    """`benchmark.py --profile-run SCRIPT ARGS` (how the benchmark runs every script): the same scores
    as `python SCRIPT.py ARGS`, and a profile.json whose clocks add up: every train_step counted, the
    training loop at least as long as the train steps inside it, MADGAN's mid-training Fig. 8 point
    counted as evaluation during training, the script's own command in config.json."""
    import subprocess
    import sys
    repo = B.REPO
    common = ["--preset", "smoke", "--seed", "0", "--device", "cpu", "--eval-every", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for out, cmd in ((tmp_path / "plain", [sys.executable, "madgan.py"]),
                     (tmp_path / "profiled", [sys.executable, "benchmark.py", "--profile-run", "madgan"])):
        p = subprocess.run([*cmd, *common, "--out", str(out)], cwd=repo, capture_output=True, text=True,
                           env=env)
        assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "plain" / "scores.csv").read_bytes() == (tmp_path / "profiled" / "scores.csv").read_bytes()
    assert not (tmp_path / "plain" / "profile.json").exists()
    prof = json.loads((tmp_path / "profiled" / "profile.json").read_text())
    assert prof["calls"]["train_step"] == 4                        # SMOKE: steps=4
    assert prof["calls"]["eval_in_training"] == 2      # step 2: test and validation scans; 0, 4 outside
    assert prof["seconds"]["train_step"] <= prof["train_loop_s"] + 1e-3 and prof["loop_per_train_step"] >= 1.0
    assert 0 < prof["setup_s"] < prof["wall_s"] and prof["peak_rss_mb"] > 50
    assert prof["seconds"]["report"] > 0 and prof["calls"]["figures"] >= 3
    config = json.loads((tmp_path / "profiled" / "config.json").read_text())
    assert config["command"].startswith("madgan.py --preset smoke")


def test_mechanisms_tabulate_the_copy_probe_and_gradient_ratio_of_finished_runs(tmp_path):
    """--mechanisms reads each AnoVAEGAN variant's copy probe and gradient ratio from its results.json,
    mean ± sd over the seeds that ran; rows without runs are left out, nothing is trained."""
    kept = lambda v: {"2": {"mean": v}, "4": {"mean": v + 0.1}}   # noqa: E731
    for s, v in enumerate((0.6, 0.7)):
        write_run(B.run_dir(tmp_path, "quick", *B.RUNS["baur_sAE"], s), fake_rows(s),
                  copy_probe={"kept": kept(v)})
    write_run(B.run_dir(tmp_path, "quick", *B.RUNS["baur_AnoVAEGAN"], 0), fake_rows(0),
              copy_probe={"kept": kept(0.1)}, grad_ratio={"median": 3.0})
    a = B.parse(["--mechanisms", "--runs", str(tmp_path), "--out", str(tmp_path / "res"), "--seeds", "2"])
    md = B.run_mechanisms(a)
    assert "| sAE | 2 | 65% ± 7 | 75% ± 7 | – |" in md
    assert "| AnoVAEGAN | 1 | 10% | 20% | 3.0 (3.0) |" in md
    assert "dAE |" not in md and "f3d_encoder_out" not in md      # no runs: no rows, no encoder section
    assert "madgan_stage" not in md
    fig8 = [{"step": 0, "auroc": {"atrophy_3": 0.7}}, {"step": 10, "auroc": {"atrophy_3": 0.6}}]
    write_run(B.run_dir(tmp_path, "quick", *B.RUNS["madgan"], 1), fake_rows(1), auc_over_steps=fig8)
    md = B.run_mechanisms(a)
    assert "| madgan | 1 | nan → nan | nan → nan | 0.70 → 0.60 |" in md and "by -0.10 on average" in md
    assert (tmp_path / "res" / "mechanism_madgan_steps.png").is_file()
    assert (tmp_path / "res" / "mechanism_copy_probe.png").is_file()
    means = [np.mean([r["score"] for r in fake_rows(1) if r["group"] == g]) for g in ("normal", "atrophy_3")]
    assert f"| {means[0]:.4g} / {means[1]:.4g} |" in md
    # AnoGAN: A = 0.9 R + 0.1 D with D = R: rho(A, R) = 1 and lambda*D / A = 0.1
    R = np.arange(1.0, 21.0)
    rows = [{"id": f"p{i}", "group": "normal" if i < 10 else "tumor", "label": int(i >= 10), "case": f"c{i}",
             "score": R[i], "R": R[i], "D": R[i], "A_hat": R[i], "D_hat": 0.0} for i in range(20)]
    d = write_run(B.run_dir(tmp_path, "quick", *B.RUNS["anogan_ganr"], 0), rows)
    (d / "config.json").write_text(json.dumps({"args": {"lam": 0.1}}))
    md = B.run_mechanisms(a)
    assert "| 0 | 0.1 | 1.000 | 1.000 | 0.100 | 0.0000 |" in md
    assert (tmp_path / "res" / "mechanism_anogan_scores.png").is_file()
    assert (tmp_path / "res" / "mechanisms.md").read_text() == md
    # RA vs SI-VAE: the same slice ranking gives rho 1; the reversed ranking on the normal slices -1
    rows = fake_rows(0, columns=False)
    write_run(B.run_dir(tmp_path, "quick", *B.RUNS["ra"], 0), rows)
    flipped = [dict(r, score=-r["score"]) if r["label"] == 0 else r for r in rows]
    write_run(B.run_dir(tmp_path, "quick", *B.RUNS["sivae"], 0), flipped)
    md = B.run_mechanisms(a)
    n_anom = sum(r["label"] for r in rows)
    assert f"| 0 | {len(rows)} | " in md and "| 1.000 | -1.000 |" in md and n_anom > 2
    assert (tmp_path / "res" / "mechanism_ra_sivae.png").is_file()
