"""All five methods side by side on the synthetic phantom, with seeds, intervals and baselines;
the papers' claims as a fidelity table; and a prepared GPU check of the paper presets.

    python benchmark.py                                  # 3 seeds x 5 scripts, --preset quick (50 min on 2 cores)
    python benchmark.py --seeds 1 --only madgan --preset smoke     # a subset, to try it out
    python benchmark.py --jobs 2                         # two runs at a time (each with half the threads)
    python benchmark.py --fidelity --list-rows           # the papers' claims, with minutes per row at quick
    python benchmark.py --fidelity --row madgan_l1       # one claim: its runs (3 seeds), paired interval, verdict
    python benchmark.py --fidelity --dry-run             # results/fidelity.md with the commands, nothing run
    python benchmark.py --mechanisms                     # results/mechanisms.md: why verdicts fail (no training)
    python benchmark.py --gpu-check                      # issue 18: every paper preset on one GPU (~10 min)
    python benchmark.py --gpu-check --device cpu --preset smoke --steps 3 --only madgan   # the same on a CPU
    python benchmark.py --score-rate runs/benchmark/quick/reversed_ae__default__s0   # RA's score() alone

Cross-run tables that a script offers live here too, so that the script keeps to its paper:
`anovaegan.py --compare RUN_DIR ...` (Baur et al.'s Table 1 over finished runs, the paper's ranking
statements as paired intervals, Fig. 5 across models) calls `anovaegan_table1` below.

What the tables show (results/benchmark.md, .json, .png; with --preset quick into results/ it also rewrites
README.md between its benchmark markers, AUPRC tables left out; every run's profile.json feeds the cost table):
  * per method x test group: AUROC (and AUPRC) as mean ± sd over seeds (sd with ddof = 1), and next to
    it each run's own 95% interval from results.json (a bootstrap over cases, common.evaluate);
  * baselines. Like for like: where a script's scores.csv has the columns `baseline_intensity` and
    `baseline_zscore` (common.baseline_maps on the method's own arrays, aggregated per unit as the
    method aggregates its map), the baselines are scored from those columns at the method's own unit,
    resolution and region, and the table adds the paired difference method - baseline. Otherwise the
    benchmark falls back to its own volume baselines below, labelled "not like-for-like (64³ volume)",
    and makes no paired comparison (different units);
  * a paired difference is pooled over seeds (`pooled_difference`): the mean over seeds of
    metric(a) - metric(b) on the same units, its 95% interval from one bootstrap that resamples cases
    (stratified by group, the same case draws for every seed, as common.paired_difference does for one
    run) and, with more than one seed, the seeds too. With one seed it equals common.paired_difference.

Fidelity (`--fidelity`, results/fidelity.md): one row per paper claim (FIDELITY below), each with its
runs (script + flags, every flag checked against the script's --help), its comparisons and a verdict:
  holds        the pooled paired 95% interval excludes 0 in the paper's direction (every comparison),
  reversed     it excludes 0 in the other direction (any comparison),
  not resolved otherwise.

The fallback baselines (no baseline columns in scores.csv) are computed per volume on the same test
sets as the scripts, trained on the same healthy volumes:
  (a) `intensity`: the normalised image itself is the anomaly map; the volume score is the 99th
      percentile of brain intensities;
  (b) `zscore`: voxel-wise |x - mean| / std against the healthy training volumes (cropped to the brain,
      resized to 64³); the volume score is the 99th percentile of the z-map inside the brain.
"""
from __future__ import annotations

import concurrent.futures as cf
import csv
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import common as C
from data import datasets

REPO = Path(__file__).resolve().parent
# script -> the phantom contrast it trains on (each script's own choice, see its docstring)
METHODS = {"anogan": "flair", "anovaegan": "flair", "madgan": "t1", "reversed_ae": "t1", "fanogan3d": "ct"}
PAPERS = {  # the papers' own headline numbers, for the README table
    "anogan": "AUC 0.89 (retinal OCT patches, Table 1)",
    "anovaegan": "Dice 0.605 ± 0.193 (MS lesions, FLAIR, Table 1)",
    "madgan": "AUC 0.727 / 0.894 (MCI / late AD, T1, abstract)",
    "reversed_ae": "AUROC 89.4 global pathologies (T1, Table 2a)",
    "fanogan3d": "AUC ~0.75 (TBI head CT, Fig. 4)",
}
PLURAL = {"patch": "patches", "slice": "slices", "volume": "volumes", "scan": "scans"}
# the paper's headline comparison -> the phantom groups that stand in for it (README "The five papers")
HEADLINE = {
    "anogan": ("Schlegl et al., IPMI 2017", "retinal OCT patches", ["ms_lesion", "tumor"], "auroc"),
    "fanogan3d": ("Simarro Viana et al., BrainLes 2020", "TBI head CT volumes", ["hemorrhage"], "auroc"),
    "anovaegan": ("Baur et al., BrainLes 2018", "MS lesions, FLAIR slices", ["ms_lesion", "tumor"], "dice"),
    "madgan": ("Han et al., BMC Bioinformatics 2021", "OASIS-3 T1 scans, CDR 0.5 / 1 / 2",
               ["atrophy_1", "atrophy_2", "atrophy_3"], "auroc"),
    "reversed_ae": ("Bercea et al., MIDL 2023", "T1 slices, global pathologies",
                    ["atrophy_1", "atrophy_2", "atrophy_3", "tumor"], "auroc"),
}
# minutes of one run (train + score) at --preset quick on an idle 2-core CPU, 2 threads, one run at a time:
# the mean of the 3-seed benchmark in README's cost table; --ganr maps every patch twice
MINUTES_QUICK = {"anogan": 3.4, "anovaegan": 1.8, "madgan": 4.6, "reversed_ae": 3.2, "fanogan3d": 3.2}
BASELINE_COLUMNS = ("baseline_intensity", "baseline_zscore")   # the like-for-like columns of scores.csv
N_BOOT = 2 * C.N_BOOT


def parse(argv=None):
    p = C.ArgumentParser(description=__doc__)
    p.add_argument("--seeds", type=int, default=3, help="repeat every run with seeds 0..N-1 (default 3)")
    p.add_argument("--jobs", type=int, default=1, help="independent runs at a time (default 1); each gets "
                   "cores/jobs threads unless OMP_NUM_THREADS is set")
    p.add_argument("--preset", default=None, choices=["smoke", "quick", "paper"],
                   help="the scripts' preset (default quick; paper for --gpu-check)")
    p.add_argument("--only", nargs="*", default=None, choices=list(METHODS), help="run only these scripts")
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda", "mps"],
                   help="the scripts' --device (default cpu; cuda for --gpu-check)")
    p.add_argument("--out", default="results", help="where the .md/.json/.png go (default results/)")
    p.add_argument("--runs", default="runs/benchmark", help="run directories of the scripts")
    p.add_argument("--skip-existing", action="store_true", help="reuse a finished run directory")
    p.add_argument("--no-readme", action="store_true",
                   help="do not copy the tables into README.md (done for --preset quick into results/)")
    f = p.add_argument_group("fidelity (issue 20)")
    f.add_argument("--fidelity", action="store_true", help="the papers' claims: results/fidelity.md")
    f.add_argument("--list-rows", action="store_true", help="list the fidelity rows with minutes at quick")
    f.add_argument("--row", action="append", default=None, metavar="NAME", help="run only this row (repeat); the other rows of an "
                   "earlier fidelity.json in --out stay in the table")
    f.add_argument("--dry-run", action="store_true", help="write fidelity.md with the commands, run nothing")
    f.add_argument("--mechanisms", action="store_true", help="results/mechanisms.md from the finished "
                   "fidelity runs: f-AnoGAN's encoder range, the copy probe, AnoGAN's counterfactual")
    g = p.add_argument_group("GPU check (issue 18)")
    g.add_argument("--gpu-check", action="store_true", help="train/resume/score every paper preset briefly")
    g.add_argument("--steps", type=int, default=200, help="--gpu-check: --amp training steps (default 200); "
                   "the float32 run and the resumed run take a quarter as many more")
    g.add_argument("--test-cases", type=int, default=4,
                   help="--gpu-check: --max-test-cases of every run (default 4 normal + 4 anomalous)")
    a = p.parse_args(argv)
    if a.seeds < 1 or a.jobs < 1 or a.steps < 1 or a.test_cases < 1:
        C.fail("--seeds, --jobs, --steps and --test-cases must be >= 1")
    a.preset = a.preset or ("paper" if a.gpu_check else "quick")
    a.device = a.device or ("cuda" if a.gpu_check else "cpu")
    for name in a.row or []:
        if name not in FIDELITY:
            C.fail(f"--row {name}: no such fidelity row; see --fidelity --list-rows")
    return a


# ---- the baselines ------------------------------------------------------------------------------

def baselines(contrast, preset, seed):
    """Both baselines on the phantom of one contrast: volume-level rows and pixel-level figures."""
    args = type("A", (), dict(data="synthetic", data_root=None, train_data=None, train_root=None,
                              preset=preset, seed=seed))()
    data = datasets.load_dataset(args, contrast=contrast)
    norm = "ct" if contrast == "ct" else "mri"
    size = (32, 32, 32) if preset == "smoke" else (64, 64, 64)
    t0 = time.perf_counter()
    tr = datasets.volume_stack(data.train, size=size, norm=norm, desc="baseline train")
    va = datasets.volume_stack(data.val, size=size, norm=norm, desc="baseline val")
    te = datasets.volume_stack(data.test, size=size, norm=norm, desc="baseline test")
    mu = np.asarray(tr.x).mean(0)
    sd = np.asarray(tr.x).std(0) + 0.05
    train_s = time.perf_counter() - t0
    out = {}
    for name, amap in (("intensity", lambda x: (x + 1) / 2), ("zscore", lambda x: np.abs(x - mu) / sd)):
        t = time.perf_counter()
        maps_te = np.stack([amap(np.asarray(v)) for v in te.x]) * te.brain
        maps_va = np.stack([amap(np.asarray(v)) for v in va.x]) * va.brain
        scores = [float(np.percentile(m[b > 0], 99)) if b.any() else 0.0 for m, b in zip(maps_te, te.brain)]
        thr = C.threshold_from_healthy(maps_va[va.brain > 0], percentile=98)
        rows, dices = [], {}
        for i, c in enumerate(te.cases):
            rows.append({"id": c.id, "group": c.group, "label": c.label, "score": scores[i]})
            if c.label == 1 and te.mask[i].any():
                dices.setdefault(c.group, []).append(C.dice(maps_te[i] > thr, te.mask[i]))
        ev = C.evaluate(rows)
        inside = te.brain > 0
        for g in ev["groups"]:
            sel = np.array([c.group == g for c in te.cases])
            if g in dices:
                ev["groups"][g]["dice"] = float(np.mean(dices[g]))
                ev["groups"][g]["pixel_auroc"] = C.auroc(te.mask[sel][inside[sel]], maps_te[sel][inside[sel]])
        ev["timing"] = {"train_s": train_s, "score_s_per_sample": (time.perf_counter() - t) / len(te.cases)}
        ev["rows"] = rows
        out[name] = ev
    return out


# ---- running the scripts ------------------------------------------------------------------------

def slug(flags):
    """Flags -> a run-directory name: [] -> 'default', ['--sa', '7'] -> 'sa-7'; {placeholders} dropped."""
    parts, skip = [], False
    for i, f in enumerate(flags):
        if skip:
            skip = False
            continue
        if f.startswith("--"):
            nxt = flags[i + 1] if i + 1 < len(flags) else None
            if nxt is not None and nxt.startswith("{"):
                skip = True
                continue
            parts.append(f[2:])
        elif not f.startswith("{"):
            parts.append(re.sub(r"[^A-Za-z0-9.]+", "", f))
    return "-".join(parts) or "default"


def run_dir(runs, preset, method, flags, seed):
    return Path(runs) / preset / f"{method}__{slug(flags)}__s{seed}"


def command(method, flags, preset, seed, out, device, resolve=None):
    """The script's command line; `{name}` in flags -> resolve(name) (the run dir of another run)."""
    fl = [resolve(f[1:-1]) if f.startswith("{") and resolve else f for f in flags]
    return [sys.executable, f"{method}.py", "--preset", preset, "--seed", str(seed), "--device", device,
            "--out", str(out), *fl]


def show(cmd):
    return " ".join(shlex.quote(c) for c in ["python", *cmd[1:]])


def _threads(jobs):
    if "OMP_NUM_THREADS" in os.environ:
        return os.environ["OMP_NUM_THREADS"]
    return str(max(1, (os.cpu_count() or 1) // jobs))


SCRIPTS = tuple(f"{m}.py" for m in METHODS)


def profile_run(script, argv):
    """`python benchmark.py --profile-run SCRIPT ARGS...`: SCRIPT's main(ARGS), as `python SCRIPT.py
    ARGS` runs it, with a clock around its train_step, its score, C.Loop._save (checkpoints), C.report
    (metrics, intervals, run files) and C._save (every figure). Writes <--out>/profile.json: where the
    wall time went, the training loop's seconds per second inside train_step (the networks' forward,
    backward and optimiser steps; the rest of the loop is data, logging, checks, checkpoints and any
    evaluation during training) and the peak RSS. The benchmark runs every script this way."""
    import functools
    import importlib
    import resource

    import torch
    t0 = time.perf_counter()
    mod = importlib.import_module(script)
    spent, state = {}, {"first_step": None, "training": False}

    def sync():
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def timed(owner, name, key):
        f = getattr(owner, name)

        @functools.wraps(f)
        def clocked(*a, **k):
            if key == "loop_init" and state["first_step"] is None:   # data ready, training begins
                state["first_step"] = time.perf_counter() - t0
            k_ = "eval_in_training" if key == "score" and state["training"] else key
            sync()
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                sync()
                s = spent.setdefault(k_, [0.0, 0])
                s[0] += time.perf_counter() - t
                s[1] += 1
        setattr(owner, name, clocked)

    phase = C.Loop.phase

    def clocked_phase(self, *a, **k):       # scoring inside a phase's steps counts as evaluation
        state["training"] = True
        try:
            yield from phase(self, *a, **k)
        finally:
            state["training"] = False
    C.Loop.phase = clocked_phase

    timed(mod, "train_step", "train_step")
    timed(mod, "score", "score")
    timed(C.Loop, "__init__", "loop_init")
    timed(C.Loop, "_save", "checkpoint")
    timed(C, "report", "report")
    timed(C, "_save", "figures")
    sys.argv = [f"{script}.py", *argv]          # config.json's command and --help: the script's own
    try:
        return C.main_guard(mod.main, list(argv))
    finally:
        wall = time.perf_counter() - t0
        out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else None
        res = out / "results.json" if out is not None else None
        loop_s = None
        if res is not None and res.is_file():
            loop_s = json.loads(res.read_text()).get("timing", {}).get("train_s")
        sec = {k: round(v[0], 3) for k, v in spent.items()}
        step_s, ev_s = sec.get("train_step", 0.0), sec.get("eval_in_training", 0.0)
        prof = {"script": script, "argv": list(argv), "wall_s": round(wall, 2),
                "setup_s": round(state["first_step"], 2) if state["first_step"] is not None else None,
                "setup": "from the start to the training loop: imports, data, caches, networks",
                "train_loop_s": loop_s, "seconds": sec, "calls": {k: v[1] for k, v in spent.items()},
                "loop_per_train_step": round(loop_s / step_s, 3) if loop_s and step_s else None,
                "loop_per_train_step_without_eval": round((loop_s - ev_s) / step_s, 3)
                if loop_s and step_s else None,
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "threads": torch.get_num_threads()}
        if out is not None and out.is_dir():
            C.write_json(out / "profile.json", prof)


def run_all(cmds, jobs=1, skip_existing=False):
    """cmds: [(out, cmd)], independent of each other. Runs `jobs` at a time; -> {out: ok}. A finished
    run directory (results.json) is reused with --skip-existing; a failed run prints its last line."""
    env = {**os.environ, "OMP_NUM_THREADS": _threads(jobs), "MKL_NUM_THREADS": _threads(jobs)}

    def one(item):
        out, cmd = item
        if skip_existing and (Path(out) / "results.json").is_file():
            return out, True
        print("$ " + show(cmd), flush=True)
        t = time.time()
        if len(cmd) > 1 and cmd[1] in SCRIPTS:   # the same run, with profile.json (profile_run)
            cmd = [cmd[0], str(REPO / "benchmark.py"), "--profile-run", cmd[1][:-3], *cmd[2:]]
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
        if p.returncode != 0:
            tail = (p.stderr.strip().splitlines() or p.stdout.strip().splitlines() or ["?"])[-1]
            print(f"  failed after {time.time() - t:.0f}s: {out}: {tail}", flush=True)
            return out, False
        print(f"  done in {time.time() - t:.0f}s: {out}", flush=True)
        return out, True

    if jobs == 1:
        return dict(map(one, cmds))
    with cf.ThreadPoolExecutor(jobs) as ex:
        return dict(ex.map(one, cmds))


def read_profile(out):
    """profile.json of a run (written by profile_run), or None."""
    f = Path(out) / "profile.json"
    return json.loads(f.read_text()) if f.is_file() else None


def cost_rows(profiles):
    """The cost table's cells from the runs' profile.json, mean ± sd over seeds."""
    ps = [p for p in profiles if p]
    if not ps:
        return ["–"] * 7
    sec = lambda k: [p["seconds"].get(k, 0.0) for p in ps]                       # noqa: E731
    return [fmt_seeds([p["wall_s"] / 60 for p in ps], digits=2), fmt_seeds([p["setup_s"] or 0 for p in ps], digits=0),
            fmt_seeds([p["train_loop_s"] or 0 for p in ps], digits=0),
            fmt_seeds([p["loop_per_train_step_without_eval"] or float("nan") for p in ps], digits=2)
            + f" ({fmt_seeds(sec('eval_in_training'), digits=0)} s)",
            fmt_seeds(sec("score"), digits=0), fmt_seeds(sec("report"), digits=0) + " / "
            + fmt_seeds(sec("figures"), digits=0), fmt_seeds([p["peak_rss_mb"] for p in ps], digits=0)]


def read_run(out):
    """results.json and the scores.csv rows (dicts of strings) of a finished run, or (None, None)."""
    out = Path(out)
    if not (out / "results.json").is_file() or not (out / "scores.csv").is_file():
        return None, None
    with open(out / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return json.loads((out / "results.json").read_text()), rows


# ---- aggregation over seeds ---------------------------------------------------------------------

def _num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def mean_sd(vals):
    """-> (mean, sd with ddof = 1 (nan for one value), n) of the finite values."""
    v = [float(x) for x in vals if _num(x)]
    if not v:
        return float("nan"), float("nan"), 0
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else float("nan"), len(v)


def group_metrics(res, rows=None, key="score"):
    """{group: {auroc, auroc_ci, auprc, auprc_ci}} of one run: from results.json for the method's own
    score; from the scores.csv column `key` (common.evaluate, the same bootstrap) for a baseline."""
    groups = res["groups"] if key == "score" or rows is None else C.evaluate(rows, key=key)["groups"]
    return {g: {k: v.get(k) for k in ("auroc", "auroc_ci", "auprc", "auprc_ci")}
            for g, v in groups.items() if "auroc" in v}


def seed_table(per_seed):
    """per_seed: [group_metrics of one run] -> {group: {metric: [one value per seed], metric_ci: [...]}}"""
    out = {}
    for gm in per_seed:
        for g, v in gm.items():
            e = out.setdefault(g, {"auroc": [], "auroc_ci": [], "auprc": [], "auprc_ci": []})
            for k in e:
                e[k].append(v.get(k))
    return out


def fmt_seeds(vals, cis=None, digits=2):
    """'0.83 ± 0.04 [0.71, 0.92] [0.75, 0.95]': mean ± sd over seeds, then each run's 95% interval."""
    m, sd, n = mean_sd(vals)
    if n == 0:
        return "–"
    txt = f"{m:.{digits}f}" + (f" ± {sd:.{digits}f}" if n > 1 else "")
    if cis:
        txt += " " + " ".join(f"[{c[0]:.{digits}f}, {c[1]:.{digits}f}]" for c in cis if c and _num(c[0]))
    return txt


def has_baseline_columns(rows):
    return bool(rows) and all(k in rows[0] and rows[0][k] not in ("", None) for k in BASELINE_COLUMNS)


# ---- paired differences pooled over seeds -------------------------------------------------------

def side(rows, key, group, ids=None):
    """(y, s, case, strata) of rows: the units of normal scans and the anomalous units of `group`
    (None: every anomalous unit), restricted to `ids` (the units two runs share)."""
    if ids is not None:
        rows = [r for r in rows if r["id"] in ids]
    y, s, g, c = C._columns(rows, key)
    sel = np.isin(g, C.normal_groups(y, g)) | ((y == 1) & ((g == group) if group else True))
    return y[sel], s[sel], c[sel], g[sel]


def pooled_difference(per_seed, metric="auroc", n_boot=N_BOOT, seed=0, resample_seeds=True):
    """per_seed: [(side_a, side_b)], each side (y, s, case, strata) -> metric(a) - metric(b), mean over
    seeds, with a 95% interval from one bootstrap: the cases (stratified) are drawn once per resample and
    used in every seed and on both sides (a case id names the same scan in every seed), and with
    resample_seeds the seeds are drawn with replacement too. -> {diff, ci, per_seed, a, b, n_seeds,
    resolved}. One seed, two sides on the same units: exactly common.paired_difference."""
    fn = {"auroc": C.weighted_auroc, "auprc": C.weighted_auprc}[metric]
    case_group = {}
    for sa, sb in per_seed:
        for _, _, c, g in (sa, sb):
            case_group.update(zip(c.tolist(), g.tolist()))
    cases = np.array(sorted(case_group))
    Wc = C.case_bootstrap(cases, [case_group[c] for c in cases], n_boot, seed)   # (B, n_cases)
    pos = {c: i for i, c in enumerate(cases)}
    D, pa, pb = np.zeros((n_boot, len(per_seed))), [], []
    for k, sides in enumerate(per_seed):
        vals = []
        for y, s, c, _ in sides:
            W = Wc[:, [pos[x] for x in c.tolist()]]
            vals.append((float(fn(y, s, np.ones((1, len(y))))[0]), fn(y, s, W)))
        (a, wa), (b, wb) = vals
        pa.append(a)
        pb.append(b)
        D[:, k] = wa - wb
    if resample_seeds and len(per_seed) > 1:
        pick = np.random.default_rng(seed + 1).integers(0, len(per_seed), D.shape)
        boot = np.take_along_axis(D, pick, axis=1).mean(1)
    else:
        boot = D.mean(1)
    ci = C.interval(boot)
    diffs = [a - b for a, b in zip(pa, pb)]
    return {"diff": float(np.mean(diffs)), "ci": ci, "per_seed": diffs, "a": float(np.mean(pa)),
            "b": float(np.mean(pb)), "n_seeds": len(per_seed), "resolved": bool(ci[0] > 0 or ci[1] < 0),
            **spread(diffs, [C.interval(D[:, k]) for k in range(len(per_seed))],
                     [float(np.std(D[:, k])) for k in range(len(per_seed))], n_cases=len(cases))}


def spread(diffs, cis, ses, n_cases=None):
    """Where a difference's uncertainty comes from: each seed's own 95% interval over cases, the
    spread of the seeds (sd, ddof = 1: training noise) against the case-sampling error of one seed
    (se: the test set's size), and, where the mean is not resolved, the number of test cases that an
    interval of ±1.96·se would need to exclude the observed mean (an ESTIMATE: se shrinks as 1/√n and
    the seeds' spread is not counted)."""
    sd = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else float("nan")
    se = float(np.mean(ses))
    m = abs(float(np.mean(diffs)))
    need = (int(math.ceil(n_cases * (1.96 * se / m) ** 2))
            if n_cases and m > 0 and 1.96 * se >= m and not sd > se else None)   # sd > se: seeds
    return {"per_seed_ci": cis, "sd_seeds": sd, "se_cases": se, "n_cases": n_cases,
            "cases_to_resolve": need}


def fmt_need(need, n_cases, cap=10):
    """The 'cases to resolve' cell: an estimate past `cap` times today's test set says only that the
    difference is about zero (an extrapolation that far means nothing more)."""
    return f"> {cap}× now (Δ ≈ 0; now {n_cases})" if need > cap * n_cases else f"~{need} (now {n_cases})"


def pooled_from_intervals(diffs, cis):
    """Where a run gives only its paired difference and interval (no rows): the mean difference, and an
    interval mean ± 1.96·mean(se) with se = (hi - lo) / 3.92 per seed -- conservative: it is the interval
    of the mean if the seeds' errors were perfectly correlated (they share the test cases)."""
    d = [x for x in diffs if _num(x)]
    if not d:
        return None
    se = float(np.mean([(c[1] - c[0]) / 3.92 for c in cis]))
    m = float(np.mean(d))
    ci = [m - 1.96 * se, m + 1.96 * se]
    return {"diff": m, "ci": ci, "per_seed": d, "n_seeds": len(d), "resolved": bool(ci[0] > 0 or ci[1] < 0),
            "pooled": "from per-seed intervals (conservative), no rows",
            **spread(d, [list(c) for c in cis], [(c[1] - c[0]) / 3.92 for c in cis])}


def verdict(ci, direction=+1):
    """holds: the 95% interval excludes 0 on the paper's side (direction +1: a > b); reversed: on the
    other side; not resolved: it includes 0 (or there is none)."""
    if ci is None or not all(_num(x) for x in ci):
        return "not resolved"
    lo, hi = (ci[0], ci[1]) if direction > 0 else (-ci[1], -ci[0])
    return "holds" if lo > 0 else "reversed" if hi < 0 else "not resolved"


def row_verdict(verdicts):
    """A claim of several comparisons holds if every one holds, is reversed if any is reversed."""
    if not verdicts:
        return "not run"
    if "reversed" in verdicts:
        return "reversed"
    return "holds" if all(v == "holds" for v in verdicts) else "not resolved"


def fmt_diff(d, digits=3):
    if not d:
        return "–"
    return f"{d['diff']:+.{digits}f} [{d['ci'][0]:+.{digits}f}, {d['ci'][1]:+.{digits}f}]"


# ---- the benchmark: every script, seeds, baselines, paired differences --------------------------

def collect(method, runs_per_seed):
    """runs_per_seed: [(results, rows)] of one script -> the method's and its baselines' entries:
    {"key": 'madgan (scan)', "unit", "table": seed_table, "baselines": {name: seed_table} (like-for-like
    only), "vs_baseline": {name: {group: pooled difference}}, "costs", "rows0"}."""
    runs = [(r, rows) for r, rows in runs_per_seed if r is not None]
    if not runs:
        return None
    unit = runs[0][0]["unit"]
    e = {"key": f"{method} ({unit})", "method": method, "unit": unit, "n_seeds": len(runs),
         "table": seed_table([group_metrics(r) for r, _ in runs]), "baselines": {}, "vs_baseline": {},
         "costs": {"train_s": [r["timing"].get("train_s") for r, _ in runs],
                   "score": [r["timing"].get("score_s_per_sample") for r, _ in runs],
                   "rss": [r.get("memory", {}).get("rss_mb") for r, _ in runs]},
         "rows0": runs[0][1], "like_for_like": all(has_baseline_columns(rows) for _, rows in runs)}
    if e["like_for_like"]:
        for col in BASELINE_COLUMNS:
            name = col.replace("baseline_", "")
            e["baselines"][name] = seed_table([group_metrics(r, rows, col) for r, rows in runs])
            e["vs_baseline"][name] = {
                g: pooled_difference([(side(rows, "score", g), side(rows, col, g)) for _, rows in runs])
                for g in e["table"]}
    return e


def run_benchmark(a):
    methods = a.only or list(METHODS)
    t_all = time.time()
    cmds = [(run_dir(a.runs, a.preset, m, [], s), command(m, [], a.preset, s, run_dir(a.runs, a.preset, m, [], s),
                                                          a.device)) for s in range(a.seeds) for m in methods]
    run_all(cmds, a.jobs, a.skip_existing)
    entries = {}
    for m in methods:
        e = collect(m, [read_run(run_dir(a.runs, a.preset, m, [], s)) for s in range(a.seeds)])
        if e:
            e["profiles"] = [read_profile(run_dir(a.runs, a.preset, m, [], s)) for s in range(a.seeds)]
            entries[m] = e
    fallback = {}   # contrast -> {name: seed_table}: the benchmark's own volume baselines
    need = sorted({METHODS[m] for m, e in entries.items() if not e["like_for_like"]})
    for contrast in need:
        per = {"intensity": [], "zscore": []}
        rows0 = {}
        for s in range(a.seeds):
            for name, ev in baselines(contrast, a.preset, s).items():
                per[name].append({g: v for g, v in ev["groups"].items() if "auroc" in v})
                rows0.setdefault(name, ev["rows"])
        fallback[contrast] = {n: {"table": seed_table(v), "rows0": rows0[n]} for n, v in per.items()}
    total = time.time() - t_all
    return write_report(a, methods, entries, fallback, total)


NAMES = {"t1": "T1", "flair": "FLAIR", "ct": "CT"}


def _table(lines, title, keys_rows, groups, metric):
    lines += [title, "", "| method (unit) | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
    for k, tab in keys_rows:
        lines.append(f"| {k} | " + " | ".join(fmt_seeds(tab[g][metric], tab[g][metric + "_ci"])
                                              if g in tab else "–" for g in groups) + " |")
    lines.append("")


def write_report(a, methods, entries, fallback, total):
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Benchmark: `python benchmark.py --seeds {a.seeds} --preset {a.preset}`", "",
             f"Synthetic phantom, {a.device}, {a.seeds} seed(s) per script; this invocation {total / 60:.1f} min; "
             f"threads per run: OMP_NUM_THREADS={_threads(a.jobs)}, {a.jobs} run(s) at a time. A cell is the "
             "mean ± sd over seeds (ddof 1), then each run's own 95% interval (bootstrap over cases). Each "
             "anomalous group is scored against the units of normal scans of the same contrast, at the unit in "
             "brackets; baselines marked like-for-like are scored from the method's own scores.csv columns "
             "(same units, resolution and region), the others are the benchmark's volume baselines and are "
             "**not like-for-like (64³ volume)**.", ""]
    lines += ["## The papers' headline comparisons, on the phantom", "",
              f"| paper | script | paper's data | phantom stand-in | ours (--preset {a.preset}, mean ± sd) "
              "| the paper's number |", "|---|---|---|---|---|---|"]
    for m in methods:
        if m not in entries:
            continue
        e, (cite, pdata, groups, metric) = entries[m], HEADLINE[m]
        metric = "auroc"   # the paper's Dice (anovaegan) is in each run's results.json["dice"]
        vals = " / ".join(fmt_seeds(e["table"][g][metric]) if g in e["table"] else "–" for g in groups)
        lines.append(f"| {cite} | `{m}.py` | {pdata} | {NAMES[METHODS[m]]} {PLURAL.get(e['unit'], e['unit'])}: "
                     f"{' / '.join(groups)} | AUROC {vals} | {PAPERS[m]} |")
    lines.append("")
    for contrast in ("t1", "flair", "ct"):
        ms = [m for m in methods if m in entries and METHODS[m] == contrast]
        if not ms:
            continue
        keys = []
        for m in ms:
            e = entries[m]
            keys.append((e["key"], e["table"]))
            for name, tab in e["baselines"].items():
                keys.append((f"baseline {name} ({e['unit']}, like-for-like with {m})", tab))
        for name, v in fallback.get(contrast, {}).items():
            keys.append((f"baseline {name} ({contrast}, not like-for-like (64³ volume))", v["table"]))
        groups = sorted({g for _, tab in keys for g in tab})
        for metric in ("auroc", "auprc"):
            _table(lines, f"## {NAMES[contrast]}: {metric.upper()}", keys, groups, metric)
        paired = [(entries[m], name, d) for m in ms for name, d in entries[m]["vs_baseline"].items()]
        if paired:
            lines += [f"Paired AUROC difference method − baseline, pooled over seeds, 95% interval "
                      f"({NAMES[contrast]}; * = the interval excludes 0):", "",
                      "| method − baseline | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
            for e, name, d in paired:
                lines.append(f"| {e['key']} − {name} | " + " | ".join(
                    fmt_diff(d[g], 2) + (" *" if d[g]["resolved"] else "") if g in d else "–"
                    for g in groups) + " |")
            lines.append("")
    lines += [f"## Cost ({a.device}, OMP_NUM_THREADS={_threads(a.jobs)}, {a.jobs} run(s) at a time; mean ± sd over "
              "seeds; each run's profile.json)", "",
              "setup: imports, data and caches, networks. Loop / step: the training loop's seconds per second "
              "inside train_step (the networks' forward, backward and optimiser), evaluation during training "
              "left out (its seconds in brackets). Score: the scoring passes outside the training loop (after it; "
              "MADGAN's step-0 Fig. 8 point and f-AnoGAN's step-2 scores between phases). Report: metrics, "
              "intervals and run files / of which figures (figures the script draws itself count there too).",
              "", "| method (unit) | seeds that ran | wall min | setup s | train loop s | loop / step (eval s) "
              "| score s | report / figures s | score s / sample | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for m in methods:
        if m in entries:
            c, cells = entries[m]["costs"], cost_rows(entries[m].get("profiles", []))
            lines.append(f"| {entries[m]['key']} | {entries[m]['n_seeds']} of {a.seeds} | " + " | ".join(cells[:6])
                         + f" | {fmt_seeds(c['score'], digits=4)} | {cells[6]} |")
    md = "\n".join(lines) + "\n"
    (out / "benchmark.md").write_text(md)
    C.write_json(out / "benchmark.json", {
        "args": vars(a), "total_s": total,
        "methods": {m: {k: v for k, v in e.items() if k != "rows0"} for m, e in entries.items()},
        "fallback_baselines": {c: {n: v["table"] for n, v in d.items()} for c, d in fallback.items()}})
    roc = {}
    for m in methods:
        if m in entries:
            rows = entries[m]["rows0"]
            roc[entries[m]["key"]] = (METHODS[m], rows)
            if entries[m]["like_for_like"]:
                for col in BASELINE_COLUMNS:
                    roc[f"{col} ({m})"] = (METHODS[m], [{**r, "score": r[col]} for r in rows])
    for contrast, d in fallback.items():
        for name, v in d.items():
            roc[f"baseline {name} ({contrast}, 64³ volume)"] = (contrast, v["rows0"])
    plot_rocs(roc, out / "benchmark.png")
    print(md)
    print(f"wrote {out / 'benchmark.md'}, {out / 'benchmark.json'}, {out / 'benchmark.png'} in {total / 60:.1f} min")
    if a.preset == "quick" and out.resolve() == (REPO / "results").resolve() and not a.no_readme:
        update_readme(REPO / "README.md", lines)
    return md


def plot_rocs(roc, path):
    plt = C._plt()
    order = {"t1": 0, "flair": 1, "ct": 2}
    keys = sorted(roc, key=lambda k: (order[roc[k][0]], "baseline" in k, k))
    ncol = 4
    nrow = max((len(keys) + ncol - 1) // ncol, 1)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4 * ncol, 3.8 * nrow), squeeze=False)
    for ax, k in zip(axes.ravel(), keys):
        rows = roc[k][1]
        y = np.array([int(r["label"]) for r in rows])
        s = np.array([float(r["score"]) for r in rows])
        g = np.array([r["group"] for r in rows])
        normal = np.isin(g, C.normal_groups(y, g))
        for name in dict.fromkeys(g):
            pos = (g == name) & (y == 1)
            if not pos.any() or not normal.any():
                continue
            sel = pos | normal
            fpr, tpr, _ = C.roc_points(y[sel], s[sel])
            ax.plot(fpr, tpr, lw=1.5, label=f"{name} {C.auroc(y[sel], s[sel]):.2f}")
        ax.plot([0, 1], [0, 1], "--", color="grey", lw=0.7)
        ax.set_title(k, fontsize=8)
        ax.legend(fontsize=7, loc="lower right")
        ax.set(xlim=(0, 1), ylim=(0, 1.01))
    for ax in axes.ravel()[len(keys):]:
        ax.axis("off")
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.suptitle("ROC per method and group (normal scans vs group), seed 0, synthetic phantom", fontsize=11)
    C._save(fig, path)


# ---- fidelity: do the papers' claims hold on the phantom? (issue 20) -----------------------------
# RUNS: name -> (script, flags); a {name} in flags is that run's directory for the same seed (run first).
# Every flag and scores.csv column below is the script's own (checked against --help and the code):
#   anogan.py      --ganr adds Yeh et al.'s D̂ mapping: columns R, D, A_hat beside score (= A(x), Eq. 6)
#   fanogan3d.py   score_no_finetune (the step-2 score, when --finetune), --dims 2 --compare-3d RUN_DIR
#                  writes results.json compare_3d_vs_2d.3d_minus_2d_volume_auroc.all {diff, ci}
#   anovaegan.py   --model dAE|sAE|dVAE|sVAE|sAE-GAN|AnoVAEGAN, one slice row per id in every model
#   madgan.py      --sa 0|3|7, --l1-weight 0 (w/o l1)
#   reversed_ae.py --no-reverse (the SI-VAE backbone); columns s_wo_eq, s_wo_pl beside score (Eq. 5)
RUNS = {
    "anogan_ganr": ("anogan", ["--ganr"]),
    "f3d": ("fanogan3d", []),
    "f2d": ("fanogan3d", ["--dims", "2", "--compare-3d", "{f3d}"]),
    "f3d_3tanh": ("fanogan3d", ["--encoder-out", "3tanh"]),
    **{f"baur_{m}": ("anovaegan", ["--model", m]) for m in ("dAE", "sAE", "dVAE", "sVAE", "sAE-GAN", "AnoVAEGAN")},
    "madgan": ("madgan", []),
    "madgan_no_l1": ("madgan", ["--l1-weight", "0"]),
    "madgan_sa3": ("madgan", ["--sa", "3"]),
    "madgan_sa7": ("madgan", ["--sa", "7"]),
    "ra": ("reversed_ae", []),
    "sivae": ("reversed_ae", ["--no-reverse"]),
}


def cmp(label, a, b, group=None, group_b=None):
    """A comparison metric(a) - metric(b), the paper saying a > b: a, b = (run, scores.csv column);
    group (group_b for b, default the same) = the anomalous group against the normal scans."""
    return {"label": label, "a": a, "b": b, "group": group, "group_b": group_b or group}


FIDELITY = {
    "anogan_A_vs_R_D": dict(
        paper="AnoGAN (Schlegl et al. 2017)", claim="A(x) (Eq. 6, λ = 0.1) beats the residual R(x) and the "
        "discrimination score D(x) alone", runs=["anogan_ganr"],
        comparisons=[cmp("A − R", ("anogan_ganr", "score"), ("anogan_ganr", "R")),
                     cmp("A − D", ("anogan_ganr", "score"), ("anogan_ganr", "D"))]),
    "anogan_disc": dict(
        paper="AnoGAN (Schlegl et al. 2017)", claim="the feature-matching discrimination loss beats Yeh et "
        "al.'s D̂ (GAN_R; anogan.py has no --disc flag: --ganr maps with L_D̂ and scores Â(x) beside A(x))",
        runs=["anogan_ganr"], comparisons=[cmp("A − Â", ("anogan_ganr", "score"), ("anogan_ganr", "A_hat"))]),
    "f3d_3d_vs_2d": dict(
        paper="3D f-AnoGAN (Simarro Viana et al. 2020)", claim="3D beats 2D, at the same volume unit",
        runs=["f3d", "f2d"], comparisons=[{"label": "3D − 2D (volume AUROC)", "results": (
            "f2d", ["compare_3d_vs_2d", "3d_minus_2d_volume_auroc", "all"])}]),
    "f3d_finetune": dict(
        paper="3D f-AnoGAN (Simarro Viana et al. 2020)", claim="fine-tuning E+G (step 3) beats the encoder "
        "alone (step 2), same step-2 checkpoint", runs=["f3d"],
        comparisons=[cmp("fine-tuned − step 2", ("f3d", "score"), ("f3d", "score_no_finetune"))]),
    "f3d_encoder_out": dict(
        paper="3D f-AnoGAN (Simarro Viana et al. 2020)", claim="not a paper claim (issue 20's lead): E's tanh "
        "(§2) caps z at ±1 while G learnt z ~ N(0, 1); f-AnoGAN's code offers 3·tanh. Direction: 3·tanh > tanh",
        runs=["f3d_3tanh", "f3d"],
        comparisons=[cmp("3·tanh − tanh", ("f3d_3tanh", "score"), ("f3d", "score"))]),
    "baur_spatial": dict(
        paper="Baur et al. 2018", claim="spatial bottlenecks beat dense ones (Table 1)",
        runs=["baur_sAE", "baur_dAE", "baur_sVAE", "baur_dVAE"],
        comparisons=[cmp("sAE − dAE", ("baur_sAE", "score"), ("baur_dAE", "score")),
                     cmp("sVAE − dVAE", ("baur_sVAE", "score"), ("baur_dVAE", "score"))]),
    "baur_ranking": dict(
        paper="Baur et al. 2018", claim="AnoVAEGAN ≥ sVAE ≥ sAE (Table 1)",
        runs=["baur_AnoVAEGAN", "baur_sVAE", "baur_sAE"],
        comparisons=[cmp("AnoVAEGAN − sVAE", ("baur_AnoVAEGAN", "score"), ("baur_sVAE", "score")),
                     cmp("sVAE − sAE", ("baur_sVAE", "score"), ("baur_sAE", "score"))]),
    "baur_adversarial": dict(
        paper="Baur et al. 2018", claim="the adversarial term helps (sAE-GAN vs sAE, AnoVAEGAN vs sVAE)",
        runs=["baur_sAE-GAN", "baur_sAE", "baur_AnoVAEGAN", "baur_sVAE"],
        comparisons=[cmp("sAE-GAN − sAE", ("baur_sAE-GAN", "score"), ("baur_sAE", "score")),
                     cmp("AnoVAEGAN − sVAE", ("baur_AnoVAEGAN", "score"), ("baur_sVAE", "score"))]),
    "madgan_stage": dict(
        paper="MADGAN (Han et al. 2021)", claim="AUC rises with disease stage (Table 1)", runs=["madgan"],
        comparisons=[cmp("atrophy_2 − atrophy_1", ("madgan", "score"), ("madgan", "score"), "atrophy_2", "atrophy_1"),
                     cmp("atrophy_3 − atrophy_2", ("madgan", "score"), ("madgan", "score"), "atrophy_3", "atrophy_2")]),
    "madgan_l1": dict(
        paper="MADGAN (Han et al. 2021)", claim="without the ℓ1 loss it is worse (Table 1)",
        runs=["madgan", "madgan_no_l1"],
        comparisons=[cmp("with − w/o ℓ1", ("madgan", "score"), ("madgan_no_l1", "score"))]),
    "madgan_sa": dict(
        paper="MADGAN (Han et al. 2021)", claim="7-SA beats 3-SA and 0-SA (the abstract's model is 7-SA)",
        runs=["madgan_sa7", "madgan_sa3", "madgan"],
        comparisons=[cmp("7-SA − 3-SA", ("madgan_sa7", "score"), ("madgan_sa3", "score")),
                     cmp("7-SA − 0-SA", ("madgan_sa7", "score"), ("madgan", "score"))]),
    "ra_vs_sivae": dict(
        paper="RA (Bercea et al. 2023)", claim="RA beats its SI-VAE backbone (Table 3, w/o reversed loss)",
        runs=["ra", "sivae"], comparisons=[cmp("RA − SI-VAE", ("ra", "score"), ("sivae", "score"))]),
    "ra_ablations": dict(
        paper="RA (Bercea et al. 2023)", claim="removing histogram equalisation or the perceptual term "
        "each hurts (Table 3)", runs=["ra"],
        comparisons=[cmp("Eq. 5 − w/o eq", ("ra", "score"), ("ra", "s_wo_eq")),
                     cmp("Eq. 5 − w/o PL", ("ra", "score"), ("ra", "s_wo_pl"))]),
    "ra_atrophy_vs_intensity": dict(
        paper="RA (Bercea et al. 2023)", claim="RA finds non-hyperintense global pathology (atrophy) where "
        "intensity thresholding fails (needs scores.csv column baseline_intensity)", runs=["ra"],
        comparisons=[cmp(f"RA − intensity ({g})", ("ra", "score"), ("ra", "baseline_intensity"), g)
                     for g in ("atrophy_1", "atrophy_2", "atrophy_3")]),
}


def row_minutes(name, seeds=1):
    """Minutes of a row's runs at --preset quick (MINUTES_QUICK; --ganr maps twice)."""
    t = 0.0
    for r in FIDELITY[name]["runs"]:
        script, flags = RUNS[r]
        t += MINUTES_QUICK[script] * (1.6 if "--ganr" in flags else 1.0)
    return t * seeds


def _dig(d, path):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def fidelity_commands(names, a):
    """[(run name, seed, out, cmd)] of the rows `names`, in an order that runs a {dependency} first."""
    needed = list(dict.fromkeys(r for n in names for r in FIDELITY[n]["runs"]))
    for r in list(needed):   # a run's dependencies
        for f in RUNS[r][1]:
            if f.startswith("{") and f[1:-1] not in needed:
                needed.insert(0, f[1:-1])
    out = []
    for seed in range(a.seeds):
        for r in needed:
            script, flags = RUNS[r]
            d = run_dir(a.runs, a.preset, script, flags, seed)
            out.append((r, seed, d, command(script, flags, a.preset, seed, d, a.device,
                                            resolve=lambda n, s=seed: str(run_dir(a.runs, a.preset, *RUNS[n], s)))))
    return out


def evaluate_row(name, loaded):
    """loaded: {(run, seed): (results, rows)} -> the row's comparisons with pooled differences, verdict."""
    spec = FIDELITY[name]
    seeds = sorted({s for (_, s) in loaded})
    comps = []
    for c in spec["comparisons"]:
        e = {"label": c["label"]}
        if "results" in c:
            run, path = c["results"]
            got = [_dig(loaded[(run, s)][0], path) for s in seeds if loaded.get((run, s), (None,))[0]]
            got = [g for g in got if isinstance(g, dict) and "diff" in g]
            d = pooled_from_intervals([g["diff"] for g in got], [g["ci"] for g in got]) if got else None
        else:
            per_seed, missing = [], None
            for s in seeds:
                (ra, rows_a), (rb, rows_b) = loaded.get((c["a"][0], s), (None, None)), loaded.get((c["b"][0], s), (None, None))
                if rows_a is None or rows_b is None:
                    continue
                absent = [col for col, rows in ((c["a"][1], rows_a), (c["b"][1], rows_b))
                          if rows[0].get(col) in (None, "")]
                if absent:
                    missing = absent[0]
                    continue
                ids = None if c["a"][0] == c["b"][0] else ({r["id"] for r in rows_a} & {r["id"] for r in rows_b})
                per_seed.append((side(rows_a, c["a"][1], c["group"], ids), side(rows_b, c["b"][1], c["group_b"], ids)))
            d = pooled_difference(per_seed) if per_seed else None
            if missing and not per_seed:
                e["missing"] = f"scores.csv has no column {missing}"
        e["diff"] = d
        e["verdict"] = verdict(d["ci"]) if d else "not run"
        comps.append(e)
    return {"name": name, "paper": spec["paper"], "claim": spec["claim"], "comparisons": comps,
            "verdict": row_verdict([c["verdict"] for c in comps if c["verdict"] != "not run"])
            if any(c["verdict"] != "not run" for c in comps) else "not run"}


def run_fidelity(a):
    names = a.row or list(FIDELITY)
    if a.list_rows:
        for n in FIDELITY:
            spec = FIDELITY[n]
            print(f"{n:26s} {row_minutes(n):5.1f} min/seed at quick ({row_minutes(n, a.seeds):.0f} min for "
                  f"{a.seeds} seeds, runs shared between rows)  {spec['paper']}: {spec['claim']}")
        return None
    cmds = fidelity_commands(names, a)
    if not a.dry_run:
        first = [(d, cmd) for r, s, d, cmd in cmds if not any(f.startswith("{") for f in RUNS[r][1])]
        rest = [(d, cmd) for r, s, d, cmd in cmds if any(f.startswith("{") for f in RUNS[r][1])]
        run_all(first, a.jobs, a.skip_existing)
        run_all(rest, a.jobs, a.skip_existing)
    loaded = {(r, s): read_run(d) for r, s, d, _ in cmds}
    rows = merge_rows(a, [evaluate_row(n, loaded) for n in names])
    return write_fidelity(a, rows, fidelity_commands([r["name"] for r in rows], a))


def merge_rows(a, rows):
    """--row NAME: the rows of an earlier fidelity.json in --out (same preset and seeds) stay in the table;
    the rows just evaluated replace theirs. The order is FIDELITY's."""
    p = Path(a.out) / "fidelity.json"
    if not a.row or not p.is_file():
        return rows
    try:
        old = json.loads(p.read_text())
    except (OSError, ValueError):
        return rows
    if {k: old.get("args", {}).get(k) for k in ("preset", "seeds")} != {"preset": a.preset, "seeds": a.seeds}:
        return rows
    by = {r["name"]: r for r in old.get("rows", []) if r.get("name") in FIDELITY}
    by.update({r["name"]: r for r in rows})
    return [by[n] for n in FIDELITY if n in by]


def write_fidelity(a, rows, cmds):
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ran = any(c["diff"] for r in rows for c in r["comparisons"])
    lines = ["# Do the papers' claims hold on the phantom?", "",
             (f"`python benchmark.py --fidelity --seeds {a.seeds} --preset {a.preset}`"
              + ("" if ran else " — **template: nothing has been run yet**; the verdicts read `not run` until "
                 "this command (or `--row NAME`) fills them")), "",
             "Each comparison is metric(a) − metric(b) (AUROC, every anomalous unit of the group against the units "
             "of normal scans), the mean over seeds with a 95% interval from one bootstrap over cases (the same "
             "cases in every seed and on both sides) and over seeds. Verdict: **holds** if the interval excludes 0 "
             "in the paper's direction, **reversed** if it excludes 0 in the other, else **not resolved**; a row "
             "of several comparisons holds only if each holds.", "",
             "Where the uncertainty comes from (results/fidelity.png shows each seed's own interval): "
             "**sd seeds** is the spread of the per-seed differences (training noise), **se cases** one "
             "seed's bootstrap standard error over the test cases (the test set's size). Where a difference "
             "is not resolved and se dominates, **cases to resolve** estimates how many test cases an "
             "interval of ±1.96·se would need to exclude the observed mean (an estimate: se taken to shrink "
             "as 1/√n, seed noise not counted); where sd dominates, more seeds, not more cases, would "
             "decide it.", "",
             "| row | paper | claim | comparison | per seed | pooled Δ [95% CI] | sd seeds / se cases | "
             "cases to resolve (estimate) | verdict | min/seed at quick |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for i, c in enumerate(r["comparisons"]):
            d = c["diff"]
            per = ", ".join(f"{x:+.3f}" for x in d["per_seed"]) if d else c.get("missing", "–")
            sp = (f"{d['sd_seeds']:.3f} / {d['se_cases']:.3f}" if d and "se_cases" in d else "–")
            need = ("–" if not d or d.get("resolved") else
                    "more seeds (sd > se)" if d.get("sd_seeds", 0) > d.get("se_cases", 1) else
                    fmt_need(d['cases_to_resolve'], d['n_cases']) if d.get("cases_to_resolve") else "–")
            lines.append(f"| {r['name'] if i == 0 else ''} | {r['paper'] if i == 0 else ''} | "
                         f"{r['claim'] if i == 0 else ''} | {c['label']} | {per} | {fmt_diff(d)} | {sp} | "
                         f"{need} | {c['verdict']} | "
                         + (f"{row_minutes(r['name']):.0f}" if i == 0 else "") + " |")
        lines.append(f"| | | | **row verdict** | | | | | **{r['verdict']}** | |")
    lines += ["", "## Commands (seed 0; the other seeds change `--seed` and the `__sN` of `--out`)", ""]
    for r in rows:
        lines += [f"- `{r['name']}` (`python benchmark.py --fidelity --row {r['name']}`):"]
        for run in FIDELITY[r["name"]]["runs"]:
            for rn, s, d, cmd in cmds:
                if rn == run and s == 0:
                    lines.append(f"  - `{show(cmd)}`")
    md = "\n".join(lines) + "\n"
    (out / "fidelity.md").write_text(md)
    if ran:   # the template (nothing run) is the markdown only
        C.write_json(out / "fidelity.json", {"args": vars(a), "rows": rows})
        plot_fidelity(rows, out / "fidelity.png")
        if ({r["name"] for r in rows} == set(FIDELITY) and not a.no_readme and a.preset == "quick"
                and out.resolve() == (REPO / "results").resolve()):   # every row: README's table too
            table = [ln for ln in lines if ln.startswith("|")]
            update_fidelity_readme(REPO / "README.md", [lines[2], "", lines[6], "", *table])
    print(md)
    return rows


def plot_fidelity(rows, path):
    """fidelity.png: per comparison each seed's difference with its own 95% interval over cases (dots)
    and the pooled one (diamond), coloured by verdict: wide per-seed bars = too few test cases; narrow
    bars that disagree = training noise between seeds."""
    comps = [(f"{r['name']}: {c['label']}", c) for r in rows for c in r["comparisons"] if c["diff"]]
    if not comps:
        return
    plt = C._plt()
    colour = {"holds": "tab:green", "reversed": "tab:red", "not resolved": "tab:gray"}
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(comps) + 1.4))
    for k, (label, c) in enumerate(comps[::-1]):
        d, col = c["diff"], colour.get(c["verdict"], "k")
        cis = d.get("per_seed_ci") or [None] * len(d["per_seed"])
        for j, (x, ci) in enumerate(zip(d["per_seed"], cis)):
            yk = k + 0.12 * (j - (len(d["per_seed"]) - 1) / 2) - 0.18
            ax.plot([x], [yk], "o", ms=3, color=col, alpha=0.7)
            if ci:
                ax.plot(ci, [yk, yk], "-", lw=0.8, color=col, alpha=0.6)
        ax.plot(d["ci"], [k + 0.2, k + 0.2], "-", lw=2.2, color=col)
        ax.plot([d["diff"]], [k + 0.2], "D", ms=6, color=col)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(comps)), [lab for lab, _ in comps[::-1]], fontsize=7)
    ax.set_xlabel("AUROC(a) − AUROC(b): the paper says > 0")
    ax.set_title("Fidelity: pooled difference (diamond, 95% CI) and each seed with its own interval "
                 "over cases\ngreen holds, red reversed, grey not resolved", fontsize=9)
    fig.tight_layout()
    C._save(fig, path)


# ---- mechanisms behind the verdicts (issue 20), measured on the finished fidelity runs -------------

def encoder_saturation(run_dir):
    """f3d_encoder_out: z = E(x) of a finished fanogan3d run on its healthy validation volumes and its
    test volumes. -> {bound, at_bound (|z| > 0.99 bound), sd, z of the healthy volumes (for the
    histogram)}: G learnt z ~ N(0, 1), which puts 32% of its values beyond ±1 and 0.3% beyond ±3."""
    import argparse
    import torch
    import fanogan3d as F
    args = argparse.Namespace(**json.loads((Path(run_dir) / "config.json").read_text())["args"])
    args.device, args.checkpoint = "cpu", str(Path(run_dir) / "last.pt")
    nets = F.build(args, torch.device("cpu"))
    C.load_models(args.checkpoint, nets, F.METHOD)
    quiet = type("Q", (), {"log": staticmethod(lambda msg: None)})()
    _, _, S_val, S_test = datasets.ct_or_mri_stacks(args, quiet)
    E, bound = nets["E"].eval(), {"tanh": 1.0, "3tanh": 3.0}.get(args.encoder_out, float("inf"))
    out = {"encoder_out": args.encoder_out, "bound": bound}
    with torch.no_grad():
        for name, S, keep in (("healthy val", S_val, None), ("test normal", S_test, 0),
                              ("test anomalous", S_test, 1)):
            idx = [i for i in range(len(S.x)) if keep is None or S.cases[int(S.case[i])].label == keep]
            z = torch.cat([E(F.get_batch(S.x, idx[i:i + 8], torch.device("cpu")))
                           for i in range(0, len(idx), 8)]).numpy()
            out[name] = {"n": len(idx), "at_bound": float((np.abs(z) > 0.99 * bound).mean()),
                         "sd": float(z.std()), "beyond_1": float((np.abs(z) > 1).mean())}
            if keep is None:
                out["z_healthy"] = z.ravel()
    return out


def run_mechanisms(a):
    """`--mechanisms`: results/mechanisms.md (+ .png) from the fidelity runs that exist: the f-AnoGAN
    encoder's saturation (tanh vs 3·tanh), the AnoVAEGAN copy probe and gradient ratio per model,
    AnoGAN's lesion counterfactual, MADGAN's AUROC over steps and how alike RA and its SI-VAE backbone
    rank the slices, each over the seeds that have run."""
    out, lines = Path(a.out), ["# Mechanisms behind the fidelity verdicts (issue 20)", "",
                               f"`python benchmark.py --mechanisms` (from the finished runs under "
                               f"{a.runs}/{a.preset}; nothing is trained)", ""]
    out.mkdir(parents=True, exist_ok=True)
    seeds = range(a.seeds)
    # 1. f-AnoGAN: does tanh clip the latent code that G learnt as N(0, 1)?
    sat = {}
    for r in ("f3d", "f3d_3tanh"):
        for s in seeds:
            d = run_dir(a.runs, a.preset, *RUNS[r], s)
            if (d / "last.pt").is_file() and (d / "results.json").is_file():
                sat[(r, s)] = encoder_saturation(d)
    if sat:
        lines += ["## f3d_encoder_out: the encoder's output range (healthy validation volumes)", "",
                  "| run | seed | E's output | share of z at the bound (healthy val / test normal / "
                  "test anomalous) | sd of z | share beyond ±1 |", "|---|---|---|---|---|---|"]
        for (r, s), v in sat.items():
            keys = ("healthy val", "test normal", "test anomalous")
            lines.append(f"| {r} | {s} | {v['encoder_out']} (±{v['bound']:g}) | "
                         + " / ".join(f"{100 * v[k]['at_bound']:.1f}%" for k in keys)
                         + f" | {v['healthy val']['sd']:.2f} | {100 * v['healthy val']['beyond_1']:.1f}% |")
        lines += ["", "z ~ N(0, 1), what G was trained on, has sd 1 and 31.7% of its values beyond ±1 "
                  "(0.27% beyond ±3). `mechanism_f3d_encoder.png`: the histograms.", ""]
        plt = C._plt()
        fig, ax = plt.subplots(figsize=(7, 3.6))
        grid = np.linspace(-3.2, 3.2, 161)
        for (r, s), v in sat.items():
            if s == 0:
                ax.hist(np.clip(v["z_healthy"], -3.2, 3.2), bins=grid, density=True, alpha=0.45,
                        label=f"E(x), {v['encoder_out']} (seed 0): {100 * v['healthy val']['at_bound']:.0f}% "
                        f"at ±{v['bound']:g}")
        ax.plot(grid, np.exp(-grid ** 2 / 2) / np.sqrt(2 * np.pi), "k", lw=1.2, label="N(0, 1): G's prior")
        ax.set(xlabel="z (every coordinate, healthy validation volumes)", ylabel="density",
               title="f-AnoGAN: the encoder's codes against the prior G was trained on")
        ax.legend(fontsize=7)
        C._save(fig, out / "mechanism_f3d_encoder.png")
    # 2. AnoVAEGAN: the copy probe and the gradient ratio, per model and seed (from results.json)
    probe = []
    for m in ("dAE", "sAE", "dVAE", "sVAE", "sAE-GAN", "AnoVAEGAN"):
        for s in seeds:
            res, _ = read_run(run_dir(a.runs, a.preset, *RUNS[f"baur_{m}"], s))
            if res and "copy_probe" in res:
                kept = res["copy_probe"]["kept"]
                gr = res.get("grad_ratio", {})
                probe.append((m, s, kept, gr))
    if probe:
        radii = list(probe[0][2])
        lines += ["## baur_spatial, baur_ranking, baur_adversarial: what the models copy, and how hard "
                  "L_adv pulls", "", "Copy probe: the share of a bright disc painted into healthy "
                  "validation slices that the reconstruction keeps (1 = copied: no residual to find). "
                  "Gradient ratio: ‖∇_Dec λ1·L_rec‖ / ‖∇_Dec λ3·L_adv‖ (median over the logged steps; "
                  "1 = both terms pull equally).", "",
                  "| model | seeds | " + " | ".join(f"kept at r = {r} px" for r in radii)
                  + " | gradient ratio (median) |", "|---|---|" + "---|" * len(radii) + "---|"]
        series = {}   # model -> ([(mean, sd) per radius], seeds): the table's cells, drawn below
        for m in dict.fromkeys(p[0] for p in probe):
            ps = [p for p in probe if p[0] == m]
            cells = [mean_sd([p[2][r]["mean"] for p in ps]) for r in radii]
            series[m] = (cells, len(ps))
            grs = [p[3]["median"] for p in ps if p[3]]
            lines.append(f"| {m} | {len(ps)} | " + " | ".join(f"{100 * c[0]:.0f}% ± {100 * c[1]:.0f}"
                                                               if _num(c[1]) else f"{100 * c[0]:.0f}%"
                                                               for c in cells)
                         + (f" | {np.median(grs):.1f} ({', '.join(f'{g:.1f}' for g in grs)})" if grs else " | –")
                         + " |")
        lines += ["", "`mechanism_copy_probe.png`: the same, as curves over the disc's radius. Per run: "
                  "`copy_probe.png` (painted slice, reconstruction, residual) and `losses.png` (the gradient "
                  "ratio over training) in each AnoVAEGAN run folder.", ""]
        plt = C._plt()
        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        for m, (cells, n) in series.items():
            mean, sd = (100 * np.array([c[i] for c in cells], dtype=float) for i in (0, 1))
            ax.errorbar([float(r) for r in radii], mean, yerr=sd if n > 1 else None, marker="o", capsize=3,
                        ls="--" if m.startswith("d") else "-",
                        label=f"{m} ({'dense' if m.startswith('d') else 'spatial'} z, {n} seed(s))")
        ax.set(xlabel="radius of the painted disc (px, 64×64 slice)", ylim=(0, 100),
               ylabel="contrast kept in the reconstruction (%)",
               title="Copy probe: what the reconstruction keeps of an anomaly (mean ± sd over seeds)")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
        C._save(fig, out / "mechanism_copy_probe.png")
    # 3. AnoGAN: a lesion pasted into normal patches moves A(x) by less than anatomy does
    cf = []
    for r in ("anogan_ganr",):
        for s in seeds:
            res, _ = read_run(run_dir(a.runs, a.preset, *RUNS[r], s))
            if res and res.get("counterfactual_lesion"):
                cf.append((s, res["counterfactual_lesion"]))
    if cf:
        groups = [g for g in cf[0][1] if isinstance(cf[0][1][g], dict)]
        lines += ["## anogan_A_vs_R_D: a real lesion pasted into normal patches (counterfactual)", "",
                  "| seed | sd of A over normal patches | " + " | ".join(f"ΔA, {g} [95% CI]" for g in groups)
                  + " | " + " | ".join(f"AUROC pasted vs original, {g}" for g in groups) + " |",
                  "|---|---|" + "---|" * (2 * len(groups))]
        for s, v in cf:
            lines.append(f"| {s} | {v['A_normal_std']:.1f} | "
                         + " | ".join("{:+.1f} [{:+.1f}, {:+.1f}]".format(v[g]["delta_A"]["mean"],
                                                                          *v[g]["delta_A"]["ci"])
                                      for g in groups) + " | "
                         + " | ".join(f"{v[g]['auroc_pasted_vs_original']:.2f}" for g in groups) + " |")
        lines += ["", "Per run: `counterfactual.png`. A lesion moves A(x) by less than A varies between "
                  "normal patches, so the patch sum ranks anatomy before lesions.", ""]
    # 3b. AnoGAN: A(x) = (1 - λ)·R(x) + λ·D(x) ranks the patches as R(x) does
    sc = []
    for s in seeds:
        d = run_dir(a.runs, a.preset, *RUNS["anogan_ganr"], s)
        res, rows = read_run(d)
        if rows and all(k in rows[0] for k in ("R", "D", "A_hat", "D_hat")):
            lam = json.loads((d / "config.json").read_text())["args"]["lam"]
            col = {k: np.array([float(r[k]) for r in rows]) for k in ("score", "R", "D", "A_hat", "D_hat")}
            col["label"] = np.array([int(r["label"]) for r in rows])
            sc.append((s, lam, col))
    if sc:
        from scipy.stats import spearmanr
        lines += ["## anogan_A_vs_R_D, anogan_disc: how much of A(x) is not R(x)", "",
                  "Spearman correlation over all test patches, and the mean share of the λ-weighted "
                  "discrimination term in the score (Eq. 6; Â is GAN_R's with Yeh et al.'s D̂).", "",
                  "| seed | λ | ρ(A, R) | ρ(A, Â) | λ·D / A | λ·D̂ / Â |", "|---|---|---|---|---|---|"]
        for s, lam, c in sc:
            lines.append(f"| {s} | {lam:g} | {spearmanr(c['score'], c['R'])[0]:.3f} | "
                         f"{spearmanr(c['score'], c['A_hat'])[0]:.3f} | "
                         f"{np.mean(lam * c['D'] / c['score']):.3f} | {np.mean(lam * c['D_hat'] / c['A_hat']):.4f} |")
        lines += ["", "`mechanism_anogan_scores.png`: A against R per patch (seed 0). With ρ(A, R) near 1 "
                  "the two scores rank the patches alike, so their AUROCs cannot differ, and λ·D̂ is too "
                  "small for Â to differ from R either.", ""]
        s, lam, c = sc[0]
        plt = C._plt()
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
        for ax, key, name in ((axes[0], "R", "R(x), Eq. 3"), (axes[1], "A_hat", "Â(x), GAN_R")):
            for lab, colr in ((0, "tab:blue"), (1, "tab:red")):
                m = c["label"] == lab
                ax.scatter(c[key][m], c["score"][m], s=2, alpha=0.3, color=colr,
                           label="anomalous patches" if lab else "normal patches")
            ax.set(xlabel=name, ylabel="A(x), Eq. 6", title=f"ρ = {spearmanr(c['score'], c[key])[0]:.3f}")
            ax.legend(fontsize=7, markerscale=4)
        fig.suptitle(f"AnoGAN (seed {s}, λ = {lam:g}): the anomaly score against its residual term", fontsize=10)
        fig.tight_layout()
        C._save(fig, out / "mechanism_anogan_scores.png")
    # 4. MADGAN: how much of its AUROC an untrained generator already has (Fig. 8's step 0)
    stages, mg, curves = ("atrophy_1", "atrophy_2", "atrophy_3"), [], []
    for r in ("madgan", "madgan_no_l1", "madgan_sa3", "madgan_sa7"):
        for s in seeds:
            res, rows = read_run(run_dir(a.runs, a.preset, *RUNS[r], s))
            steps = (res or {}).get("auc_over_steps") or []
            if len(steps) > 1 and steps[0].get("step") == 0:
                mean = {g: np.mean([float(x["score"]) for x in rows if x["group"] == g] or [np.nan])
                        for g in ("normal", "atrophy_3")}
                mg.append((r, s, steps[0]["auroc"], mean, steps[-1]["auroc"]))
                curves.append((r, s, steps))
    if mg:
        lines += ["## madgan_stage, madgan_l1, madgan_sa: what training adds to an untrained generator",
                  "", "Scan AUROC at step 0 (random weights) and after the last step (Fig. 8's curve, "
                  "results.json `auc_over_steps`): atrophy darkens the slab, which raises the ℓ2 "
                  "prediction error of any generator, trained or not.", "",
                  "| run | seed | " + " | ".join(f"{g}: step 0 → end" for g in stages)
                  + " | mean score at the end: normal / atrophy_3 |", "|---|---|" + "---|" * len(stages) + "---|"]
        for r, s, a0, mean, a1 in mg:
            lines.append(f"| {r} | {s} | " + " | ".join(
                f"{a0.get(g, float('nan')):.2f} → {a1.get(g, float('nan')):.2f}" for g in stages)
                + f" | {mean['normal']:.4g} / {mean['atrophy_3']:.4g} |")
        d3 = [a1["atrophy_3"] - a0["atrophy_3"] for _, _, a0, _, a1 in mg
              if "atrophy_3" in a0 and "atrophy_3" in a1]
        if d3:
            lines += ["", f"Training changes the atrophy_3 AUROC by {np.mean(d3):+.2f} on average over "
                      f"these {len(d3)} runs (from {min(d3):+.2f} to {max(d3):+.2f}).", ""]
        lines += ["`mechanism_madgan_steps.png`: atrophy_3's AUROC over the training steps, every run and "
                  "seed.", ""]
        plt = C._plt()
        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        colours = dict(zip(dict.fromkeys(m[0] for m in mg), plt.rcParams["axes.prop_cycle"].by_key()["color"]))
        labelled = set()
        for r, s, steps in curves:
            pts = [(x["step"], x["auroc"]["atrophy_3"]) for x in steps if "atrophy_3" in x.get("auroc", {})]
            if pts:   # one legend entry per run, whichever seed comes first
                ax.plot(*zip(*pts), marker=".", color=colours[r], alpha=0.8,
                        label=None if r in labelled else r)
                labelled.add(r)
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set(xlabel="training step (0 = untrained generator)", ylabel="scan AUROC, atrophy_3 vs normal",
               title="MADGAN: atrophy_3's AUROC over training (one line per seed)")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
        C._save(fig, out / "mechanism_madgan_steps.png")
    # 5. RA vs its SI-VAE backbone: does the reversed loss change which slices score high?
    pairs = []
    for s in seeds:
        (_, ra), (_, si) = (read_run(run_dir(a.runs, a.preset, *RUNS[r], s)) for r in ("ra", "sivae"))
        if ra and si:
            by_id = {x["id"]: float(x["score"]) for x in si}
            both = [(float(x["score"]), by_id[x["id"]], int(x["label"])) for x in ra if x["id"] in by_id]
            if len(both) > 2:
                pairs.append((s, np.array(both)))
    if pairs:
        from scipy.stats import spearmanr
        lines += ["## ra_vs_sivae: do RA and its SI-VAE backbone rank the test slices alike?", "",
                  "Both are scored with the same fixed perceptual network (reversed_ae.py --perceptual "
                  "fixed), so a difference can only come from the trained VAE. Spearman ρ of the two "
                  "models' slice scores (Eq. 5) over the same test slices:", "",
                  "| seed | slices | ρ(RA, SI-VAE) | ρ on anomalous slices | ρ on normal slices |",
                  "|---|---|---|---|---|"]
        for s, p in pairs:
            rho = [spearmanr(p[m, 0], p[m, 1])[0] for m in (np.ones(len(p), bool), p[:, 2] == 1,
                                                             p[:, 2] == 0)]
            lines.append(f"| {s} | {len(p)} | " + " | ".join(f"{v:.3f}" for v in rho) + " |")
        lines += ["", "`mechanism_ra_sivae.png`: RA's slice score against SI-VAE's (seed "
                  f"{pairs[0][0]}).", ""]
        plt = C._plt()
        s, p = pairs[0]
        fig, ax = plt.subplots(figsize=(4.6, 4.2))
        for lab, colr, name in ((1, "tab:red", "anomalous slices"), (0, "tab:blue", "normal slices")):
            m = p[:, 2] == lab
            ax.scatter(p[m, 1], p[m, 0], s=3, alpha=0.4, color=colr, label=name)
        ax.set(xlabel="SI-VAE (--no-reverse) slice score, Eq. 5", ylabel="RA slice score, Eq. 5",
               title=f"RA vs its SI-VAE backbone (seed {s}): ρ = {spearmanr(p[:, 0], p[:, 1])[0]:.3f}")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7, markerscale=4)
        C._save(fig, out / "mechanism_ra_sivae.png")
    md = "\n".join(lines) + "\n"
    (out / "mechanisms.md").write_text(md)
    print(md)
    return md


# ---- Baur et al.'s Table 1 across finished anovaegan.py runs (`anovaegan.py --compare`) --------

def md_table(header, rows):
    """A markdown table: header = [column names], rows = [[cells]]."""
    return "\n".join("| " + " | ".join(map(str, r)) + " |"
                     for r in [header, ["---"] * len(header)] + rows) + "\n"


def load_runs(dirs, method, run):
    """[(dir, results.json, scores.csv rows)] of finished runs of `method` (read_run) for a --compare
    table; folders of an earlier --compare (no results.json, `compare` in config.json) are skipped."""
    out = []
    for d in map(Path, dirs):
        res, rows = read_run(d)
        cfg = d / "config.json"
        if res is None and cfg.is_file() and json.loads(cfg.read_text())["args"].get("compare"):
            run.log(f"skipping {d}: an earlier --compare table, not a training run")
            continue
        if res is None:
            C.fail(f"--compare {d}: no results.json and scores.csv (is it a finished run of {method}.py?)")
        if res.get("method") != method:
            C.fail(f"--compare {d}: results.json is from {res.get('method')!r}, not {method}")
        out.append((d, res, rows))
    return out


# The paper's ranking statements (§4 'Anomaly Detection'), each read as "A beats B"
PAPER_CLAIMS = (
    ("sAE", "dAE", "spatial models significantly outperform the dense ones"),
    ("sVAE", "dVAE", "spatial models significantly outperform the dense ones"),
    ("sVAE", "sAE", "constraining z to a MVN: a marginal improvement"),
    ("AnoVAEGAN", "sVAE", "adversarial training: a marginal improvement; AnoVAEGAN is the best"),
    ("AnoVAEGAN", "sAE-GAN", "the sAE-GAN is worse than its generative counterpart"),
    ("sAE", "sAE-GAN", "the sAE-GAN is worse than the spatial AE with the same bottleneck"),
)


def table1_md(runs, groups):
    """Our Table 1, one row per run: Dice μ ± σ [95% interval of the mean], pixel / slice AUROC."""
    rows = []
    for d, r, _ in runs:
        t = r["table1"]
        dice = ["{mean:.3f} ± {std:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]".format(**r["dice"][g])
                if g in r["dice"] else "–" for g in groups]
        auroc = [" / ".join(f"{r[k][g]['auroc']:.3f}" if "auroc" in r[k].get(g, {}) else "–"
                            for k in ("pixel", "groups")) for g in groups]
        paper = "{:.3f} ± {:.3f}".format(*t["paper"]) if t.get("paper") else "–"
        probe = r.get("copy_probe", {"kept": {}})["kept"]
        copied = " / ".join(f"{100 * v['mean']:.0f}% (r {k})" for k, v in probe.items()) or "–"
        rows.append([t["model"], f"{t['z']} ({t.get('paper_row', '?')})", *dice, *auroc, copied,
                     f"{t['reco_s_per_sample']:.4f}", paper, d.name])
    return md_table(["model", "z (paper row)"] + [f"Dice {g} μ ± σ [95% CI]" for g in groups]
                + [f"pixel / slice AUROC {g}" for g in groups] + ["copy probe: disc kept"]
                + ["reco time [s/slice]", "paper Dice (μ ± σ)", "run"], rows)


def table1_paired(ra, rb, group):
    """A − B on the same test patients: per-case Dice (mean of the paired differences, 95% interval
    over patients) and slice AUROC against normal scans (C.compare_scores, interval over cases)."""
    (_, a, rows_a), (_, b, rows_b) = ra, rb
    da, db = ({p["id"]: p["dice"] for p in r["patients"]
               if p["group"] == group and p["dice"] is not None} for r in (a, b))
    both = sorted(set(da) & set(db))
    if not both:
        return None
    d = C.mean_ci([da[k] - db[k] for k in both])
    auc = C.compare_scores(rows_a, rows_b, group)
    return {"dice_diff": d["mean"], "dice_ci": d["ci"], "n_cases": d["n"],
            "dice_resolved": bool(d["ci"][0] > 0 or d["ci"][1] < 0),
            "auroc_diff": auc["diff"], "auroc_ci": auc["ci"], "auroc_resolved": auc["resolved"]}


def table1_ranking(runs, groups):
    """The paper's ranking statements, each tested as table1_paired() on every pair of runs of its two
    models that share test patients (runs of one data set, preset and seed)."""
    out = []
    for a, b, says in PAPER_CLAIMS:
        for ra in (r for r in runs if r[1]["table1"]["model"] == a):
            for rb in (r for r in runs if r[1]["table1"]["model"] == b):
                for g in groups:
                    p = table1_paired(ra, rb, g)
                    if p is not None:
                        out.append({"a": str(ra[0]), "b": str(rb[0]), "model_a": a, "model_b": b,
                                    "paper": says, "group": g, **p})
    return out


def anovaegan_table1(dirs, run, models, headline_groups, plot_fig5):
    """`anovaegan.py --compare DIR ...`: Table 1 across finished runs of anovaegan.py (table1.md,
    table1.json), the paper's ranking statements as paired differences with 95% intervals over
    patients, and Fig. 5 across models (the script's plot_fig5, on each run's fig5.npz)."""
    order = {m: i for i, m in enumerate(models)}
    runs = sorted(load_runs(dirs, "anovaegan", run),
                  key=lambda t: (order.get(t[1]["table1"]["model"], 99), t[1]["table1"]["z"]))
    groups = [g for g in headline_groups if any(g in r["dice"] for _, r, _ in runs)] or ["all"]
    where = ", ".join(sorted({r["data"] + "/" + r["preset"] for _, r, _ in runs}))
    text = (f"Table 1 (ours, {where}): Dice per test patient at the 98th percentile of healthy "
            f"validation residuals, 95% interval of the mean over patients\n\n"
            + table1_md(runs, groups))
    claims = table1_ranking(runs, groups)
    said = {True: " (resolved)", False: " (not resolved)"}
    if claims:
        text += ("\nThe paper's ranking on the same test patients: A − B with a 95% paired "
                 "interval over patients; resolved = the interval excludes 0\n\n" + md_table(
                     ["A − B", "the paper says", "group", "Δ Dice [95% CI]",
                      "Δ slice AUROC [95% CI]"],
                     [[f"{c['model_a']} ({Path(c['a']).name}) − "
                       f"{c['model_b']} ({Path(c['b']).name})", c["paper"], c["group"],
                       C.fmt_ci(c["dice_diff"], c["dice_ci"]) + said[c["dice_resolved"]],
                       C.fmt_ci(c["auroc_diff"], c["auroc_ci"]) + said[c["auroc_resolved"]]]
                      for c in claims]))
    (run.out / "table1.md").write_text(text)
    C.write_json(run.out / "table1.json", {"runs": [str(d) for d, _, _ in runs], "claims": claims})
    print(text)
    items = [(r["table1"]["model"] + " " + r["table1"]["z"], np.load(d / "fig5.npz"))
             for d, r, _ in runs if (d / "fig5.npz").is_file()]
    if items:
        plot_fig5(items, run.out / "fig5_models.png", "Fig. 5 across models")
    run.log(f"wrote {run.out / 'table1.md'}" + (" and fig5_models.png" if items else ""))


# ---- the GPU check (issue 18): train with --amp, float32, resume, score, on the paper preset -----
# Per script, flags that keep the check short without changing what a training step costs: anogan maps
# fewer validation/training patches and one test slice; madgan skips Fig. 8's AUC-over-steps; reversed_ae
# uses the fixed perceptual network (the `lpips` package and weights are not on a bare GPU machine).
GPU_EXTRA = {
    "anogan": ["--counterfactual", "0", "--nn-ref", "0", "--test-slices", "1", "--val-patches", "64",
               "--train-eval-patches", "64", "--time-single", "2"],
    "anovaegan": [],
    "madgan": ["--eval-every", "0"],
    "reversed_ae": ["--perceptual", "fixed"],
    "fanogan3d": [],
}
F3D_STEPS = {"gan": "gan_steps", "encoder": "enc_steps", "finetune": "ft_steps"}


def preset_value(method, name, preset):
    """A hyperparameter's value under a preset, from the script's own table (HYPER, QUICK, SMOKE)."""
    import importlib
    mod = importlib.import_module(method)
    over = {"quick": getattr(mod, "QUICK", {}), "smoke": getattr(mod, "SMOKE", {})}.get(preset, {})
    return over.get(name, mod.HYPER[name]["default"])


def find_io(obj):
    """The Loop.io_report dict anywhere in results.json (each script files it under its own key)."""
    if isinstance(obj, dict):
        if "phases" in obj and "size_mb" in obj:
            return obj
        for v in obj.values():
            got = find_io(v)
            if got:
                return got
    return None


def phases_of(out):
    """{phase: {steps, seconds, planned_steps}} of a training run: results.json, else last.pt."""
    res = json.loads((Path(out) / "results.json").read_text()) if (Path(out) / "results.json").is_file() else {}
    io = find_io(res)
    if io:
        return io["phases"], io
    if (Path(out) / "last.pt").is_file():
        import torch
        ck = torch.load(Path(out) / "last.pt", map_location="cpu", weights_only=False)
        return ck.get("loop", {}).get("phases", {}), None
    return {}, None


def gpu_plan(method, a, root):
    """[(phase, out, cmd)] of one script: amp, fp32, resume (from amp's last.pt), score (--checkpoint)."""
    n, extra_n = a.steps, max(2, a.steps // 4)
    base = ["--data", "synthetic", "--max-test-cases", str(a.test_cases), *GPU_EXTRA[method]]
    train = []
    amp_max, res_max, fp_max = n, n + extra_n, max(2, a.steps // 4)
    if method == "fanogan3d":   # all three phases: k steps each, stop inside step 3, the resume finishes it
        k = max(1, n // 3)
        train = ["--gan-steps", str(k), "--enc-steps", str(k), "--ft-steps", str(k + extra_n)]
        amp_max, res_max, fp_max = 3 * k, 3 * k + extra_n, 3 * k
    d = {p: Path(root) / method / p for p in ("amp", "fp32", "resume", "score")}

    def cmd(p, flags):
        return command(method, base + flags, a.preset, 0, d[p], a.device)
    return [("amp", d["amp"], cmd("amp", train + ["--amp", "--max-steps", str(amp_max)])),
            ("fp32", d["fp32"], cmd("fp32", train + ["--max-steps", str(fp_max)])),
            ("resume", d["resume"], cmd("resume", train + ["--amp", "--max-steps", str(res_max),
                                                           "--resume", str(d["amp"] / "last.pt")])),
            ("score", d["score"], cmd("score", ["--amp", "--checkpoint", str(d["resume"] / "last.pt")]))]


def _run_timed(cmd):
    t = time.time()
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    err = None
    if p.returncode != 0:
        err = (p.stderr.strip().splitlines() or p.stdout.strip().splitlines() or ["?"])[-1][:300]
    return time.time() - t, err


def measure(method, plan, a):
    """Run the plan of one script; -> its figures (None where a step failed) and errors."""
    m = {"method": method, "errors": {}, "wall_s": {}, "commands": [show(c) for _, _, c in plan]}
    for phase, out, cmd in plan:
        print("$ " + show(cmd), flush=True)
        wall, err = _run_timed(cmd)
        m["wall_s"][phase] = round(wall, 1)
        if err:
            m["errors"][phase] = err
            print(f"  {method} {phase} failed: {err}", flush=True)
    d = {p: o for p, o, _ in plan}
    res = {p: json.loads((d[p] / "results.json").read_text()) if (d[p] / "results.json").is_file() else None
           for p in d}
    ph = {p: phases_of(d[p])[0] for p in ("amp", "fp32", "resume")}
    io = phases_of(d["amp"])[1]
    rate = {}
    for p in ("amp", "fp32"):
        rate[p] = {k: v["steps"] / v["seconds"] for k, v in ph[p].items() if v.get("steps") and v.get("seconds")}
    rate["resume"] = {}
    for k, v in ph["resume"].items():   # the resumed run's phases include the amp run's: the difference
        s0, t0 = ph["amp"].get(k, {}).get("steps", 0), ph["amp"].get(k, {}).get("seconds", 0.0)
        if v.get("steps", 0) > s0 and v.get("seconds", 0) > t0:
            rate["resume"][k] = (v["steps"] - s0) / (v["seconds"] - t0)
    m["steps_per_s"] = rate
    m["cuda_mb"] = {p: (res[p] or {}).get("memory", {}).get("cuda_mb") for p in ("amp", "fp32", "resume", "score")}
    ck = d["amp"] / "last.pt"
    m["checkpoint_mb"] = round(os.path.getsize(ck) / 2 ** 20, 2) if ck.is_file() else None
    m["checkpoint_write_s"] = round(io["write_s"] / io["checkpoints"], 3) if io and io.get("checkpoints") else None
    sc = res["score"] or {}
    m["unit"] = sc.get("unit")
    m["score_s_per_unit"] = sc.get("timing", {}).get("score_s_per_sample")
    planned = {k: v.get("planned_steps") for k, v in (ph["resume"] or ph["amp"]).items()}
    if method == "fanogan3d":
        planned = {k: preset_value(method, F3D_STEPS[k], a.preset) * (k != "finetune" or bool(
            preset_value(method, "finetune", a.preset))) for k in F3D_STEPS}
    m["planned_steps"] = planned
    proj, est = 0.0, []
    mean_rate = np.mean(list(rate["amp"].values())) if rate["amp"] else None
    for k, n in planned.items():
        if not n:
            continue
        r = rate["amp"].get(k) or rate["resume"].get(k)
        if r is None and mean_rate:
            r = mean_rate
            est.append(k)
        proj = None if (proj is None or not r) else proj + n / r
    m["projected_h_1gpu"] = round(proj / 3600, 2) if proj else None
    m["projected_h_4gpu"] = round(proj / 3600 / 4, 2) if proj else None
    m["projected_from_other_phase"] = est
    return m


def gpu_check(a):
    import torch
    methods = a.only or list(METHODS)
    root = Path(a.runs) / "gpu-check"
    dev = a.device
    if dev == "cuda" and not torch.cuda.is_available():
        C.fail("--gpu-check: no CUDA device here; on a CPU use --device cpu --preset smoke --steps 3 (a test "
               "of the check, not a measurement)")
    gpu = torch.cuda.get_device_name(0) if dev == "cuda" else "none (" + dev + ")"
    t0 = time.time()
    out = [measure(m, gpu_plan(m, a, root), a) for m in methods]
    info = {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "device": dev,
            "preset": a.preset, "steps": a.steps, "test_cases": a.test_cases, "total_s": round(time.time() - t0, 1),
            "command": show([sys.executable, "benchmark.py", *sys.argv[1:]]) if sys.argv[0].endswith("benchmark.py")
            else "python benchmark.py --gpu-check", "scripts": out}
    return write_gpu(a, info)


def _f(v, fmt="{:.2f}"):
    return "–" if v is None else fmt.format(v)


def write_gpu(a, info):
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# GPU check of the paper presets (issue 18)", "",
             f"GPU: **{info['gpu']}**; torch {info['torch']} (CUDA {info['cuda']}); device `{info['device']}`; "
             f"preset `{info['preset']}`; {info['steps']} --amp steps per script; test set "
             f"--max-test-cases {info['test_cases']}; all scripts in {info['total_s'] / 60:.1f} min.", "",
             f"Command: `{info['command']}`", "",
             "Per script: a training run with `--amp` (bf16) and `--max-steps`, a short float32 run, `--resume` "
             "from the amp run's last.pt for more steps, then `--checkpoint` scoring of the small test set. "
             "Steps/s per training phase come from Loop's phase accounting (results.json, the Loop.io_report "
             "dict; the resumed run's figure is the difference to the amp run's). The projection is the full "
             "preset's planned steps × the measured amp s/step (training only, no data preparation or scoring; "
             "epoch-based scripts may stop earlier by early stopping); 4 GPUs = ¼ of it, the ideal of "
             "data-parallel torchrun with 4× the global batch.", "",
             "| script | phase | steps/s amp | steps/s fp32 | amp/fp32 | steps/s resumed | planned steps | "
             "peak CUDA MB amp / fp32 | last.pt MB | write s | score s / unit | projected h, 1 GPU | 4 GPUs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in info["scripts"]:
        phases = list(dict.fromkeys([*m["planned_steps"], *m["steps_per_s"]["amp"]])) or ["–"]
        for i, k in enumerate(phases):
            r = {p: m["steps_per_s"][p].get(k) for p in ("amp", "fp32", "resume")}
            ratio = r["amp"] / r["fp32"] if r["amp"] and r["fp32"] else None
            first = i == 0
            est = " (s/step of another phase)" if k in m["projected_from_other_phase"] else ""
            lines.append(
                f"| {m['method'] if first else ''} | {k}{est} | {_f(r['amp'])} | {_f(r['fp32'])} | {_f(ratio)} | "
                f"{_f(r['resume'])} | {m['planned_steps'].get(k, '–')} | "
                + (f"{_f(m['cuda_mb']['amp'], '{:.0f}')} / {_f(m['cuda_mb']['fp32'], '{:.0f}')} | "
                   f"{_f(m['checkpoint_mb'])} | {_f(m['checkpoint_write_s'], '{:.3f}')} | "
                   f"{_f(m['score_s_per_unit'], '{:.4f}')} ({m['unit'] or '–'}) | "
                   f"{_f(m['projected_h_1gpu'])} ({_f(m['projected_h_1gpu'] and m['projected_h_1gpu'] / 24)} d) | "
                   f"{_f(m['projected_h_4gpu'])} |" if first else "| | | | | | |"))
    errs = [(m["method"], p, e) for m in info["scripts"] for p, e in m["errors"].items()]
    lines += ["", "## Failures", ""] + ([f"- `{m}` {p}: `{e}`" for m, p, e in errs] or ["none"])
    lines += ["", "## Exact commands", ""]
    for m in info["scripts"]:
        lines += [f"- {m['method']} (wall s: " + ", ".join(f"{k} {v}" for k, v in m["wall_s"].items()) + ")"]
        lines += [f"  - `{c}`" for c in m["commands"]]
    md = "\n".join(lines) + "\n"
    (out / "gpu.md").write_text(md)
    C.write_json(out / "gpu.json", info)
    print(md)
    return info


README_START, README_END = "<!-- benchmark:start -->", "<!-- benchmark:end -->"


README_NOTE = ("The AUPRC tables are in results/benchmark.md. The baselines do not depend on the seed (the phantom "
               "and the healthy reference are fixed), hence their ± 0.00 over seeds.")


def update_readme(path, lines):
    """Copy the tables between the README's benchmark markers, so the README shows what this run produced
    (the AUPRC tables stay in results/benchmark.md)."""
    text = path.read_text()
    if README_START not in text or README_END not in text:
        print(f"{path}: no {README_START} ... {README_END} markers; README left as it is")
        return
    kept, skip = [], False
    for ln in lines[2:]:
        if ln.startswith("## "):
            skip = ln.rstrip().endswith(": AUPRC")
        if not skip:
            kept.append(ln.replace("## ", "#### ", 1) if ln.startswith("## ") else ln)
    kept = kept[:2] + [README_NOTE, ""] + kept[2:]     # after the first paragraph
    body = "\n".join(["", *kept, "![ROC curves per method and group](results/benchmark.png)", ""])
    head, rest = text.split(README_START, 1)
    path.write_text(head + README_START + body + README_END + rest.split(README_END, 1)[1])
    print(f"updated the benchmark tables in {path}")


FIDELITY_START, FIDELITY_END = "<!-- fidelity:start -->", "<!-- fidelity:end -->"


def update_fidelity_readme(path, lines):
    """The fidelity table (all rows) between the README's fidelity markers, with results/fidelity.png."""
    text = path.read_text()
    if FIDELITY_START not in text or FIDELITY_END not in text:
        print(f"{path}: no {FIDELITY_START} ... {FIDELITY_END} markers; README left as it is")
        return
    body = "\n".join(["", *lines, "", "![Each fidelity comparison, per seed and pooled](results/fidelity.png)",
                      ""])
    head, rest = text.split(FIDELITY_START, 1)
    path.write_text(head + FIDELITY_START + body + FIDELITY_END + rest.split(FIDELITY_END, 1)[1])
    print(f"updated the fidelity table in {path}")


def ra_score_rate(run_dir, repeat=3):
    """`--score-rate RUN_DIR`: slices per second of reversed_ae.score() alone (pseudo-healthy pass, two
    CLAHE per slice, perceptual maps) on the test slices of a finished reversed_ae run, with the batched
    CLAHE (C.equalize_adapthist) and with scikit-image's, one image at a time; the maps must be equal."""
    import torch
    import reversed_ae as R
    from skimage import exposure
    cfg = Path(run_dir) / "config.json"
    if not cfg.is_file() or not (Path(run_dir) / "last.pt").is_file():
        C.fail(f"--score-rate {run_dir}: not a finished reversed_ae run (config.json, last.pt)")
    args = R.parse_args(["--preset", json.loads(cfg.read_text()).get("preset", "quick"),
                         "--checkpoint", str(Path(run_dir) / "last.pt"), "--device", "cpu"])
    model = R.SoftIntroVAE(channels=args.channel_list, z_dim=args.z_dim, image_size=args.image_size)
    ck = C.load_models(args.checkpoint, {"ra": model}, R.METHOD)
    model.load_state_dict(((ck.get("loop") or {}).get("early_stopping") or {}).get("weights")
                          or model.state_dict())
    data = datasets.load_dataset(args, contrast="t1")
    x = np.asarray(datasets.slice_stack(data.test, n_slices=args.test_slices, desc="test", norm="mri",
                                        size=(args.image_size,) * 2, center=0.5,
                                        cache_dir=args.cache_dir).x)
    per, dev, batched = R.perceptual_distance(args, model, torch.device("cpu")), torch.device("cpu"), R.clahe
    one_by_one = lambda im, clip_limit=0.01: np.stack([exposure.equalize_adapthist(  # noqa: E731
        np.clip(i, 0, 1).astype(np.float64), clip_limit=clip_limit) for i in im]).astype(np.float32)
    out = {}
    for name, fn in (("skimage, one image at a time", one_by_one), ("batched", batched)):
        R.clahe = fn
        R.score(model, per, x[:64], args, dev)                       # warm-up
        best = math.inf
        for _ in range(repeat):
            t = time.perf_counter()
            _, terms = R.score(model, per, x, args, dev)
            best = min(best, time.perf_counter() - t)
        out[name] = (len(x) / best, terms["res_eq"])
        print(f"reversed_ae score() with {name} CLAHE: {len(x)} slices in {best:.2f} s, "
              f"{len(x) / best:.0f} slices/s ({torch.get_num_threads()} threads)")
    R.clahe = batched
    same = np.array_equal(*[v[1] for v in out.values()])
    print(f"maps equal: {same}")
    return same


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--score-rate"]:
        if len(argv) != 2:
            C.fail("--score-rate needs one run directory of reversed_ae.py")
        return ra_score_rate(argv[1])
    if argv[:1] == ["--profile-run"]:
        if len(argv) < 2 or argv[1] not in METHODS:
            C.fail(f"--profile-run needs one of {', '.join(METHODS)}, then the script's arguments")
        return profile_run(argv[1], argv[2:])
    a = parse(argv)
    if a.gpu_check:
        return gpu_check(a)
    if a.mechanisms:
        return run_mechanisms(a)
    if a.fidelity or a.list_rows or a.row:
        return run_fidelity(a)
    return run_benchmark(a)


if __name__ == "__main__":
    C.main_guard(lambda argv: main(argv))
