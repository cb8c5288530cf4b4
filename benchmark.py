"""All five methods side by side on the synthetic phantom, against two simple baselines.

    python benchmark.py --seeds 1          # every script with --preset quick, then the baselines
    python benchmark.py --seeds 3          # mean ± std over seeds 0, 1, 2
    python benchmark.py --only madgan anogan --preset smoke   # a subset, e.g. to try it out

Writes results/benchmark.md (method × group AUROC, AUPRC, Dice where defined, train time, score time
per sample, peak memory), results/benchmark.json and results/benchmark.png (ROC curves per method).
The README embeds the table and the figure.

The baselines keep the deep methods honest (Meissen et al. 2022 showed that thresholding FLAIR
intensities rivals published deep methods). Both are computed per volume on the same test sets
as the scripts, and trained (where they need training) on the same healthy volumes:
  (a) `intensity`: the normalised image itself is the anomaly map; the volume score is the 99th
      percentile of brain intensities (hyperintense anomalies) -- and, for hypointense or atrophic
      changes, nothing better: a baseline is a baseline;
  (b) `zscore`: voxel-wise |x - mean| / std against the healthy training volumes (after cropping to the
      brain and resizing to 64³ so that volumes roughly align); the volume score is the 99th percentile
      of the z-map inside the brain.
Their maps are thresholded at the 98th percentile of the map on healthy validation volumes for Dice.
"""
from __future__ import annotations

import json
import os
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


def parse():
    p = C.ArgumentParser(description=__doc__)
    p.add_argument("--seeds", type=int, default=1, help="repeat every run with seeds 0..N-1 (default 1)")
    p.add_argument("--preset", default="quick", choices=["smoke", "quick", "paper"])
    p.add_argument("--only", nargs="*", default=None, choices=list(METHODS), help="run only these scripts")
    p.add_argument("--out", default="results", help="where benchmark.md/png/json go (default results/)")
    p.add_argument("--runs", default="runs/benchmark", help="run directories of the scripts")
    p.add_argument("--skip-existing", action="store_true", help="reuse a finished run directory")
    p.add_argument("--no-readme", action="store_true",
                   help="do not copy the tables into README.md (done by default for --preset quick into results/)")
    return p.parse_args()


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

REUSED = []   # (method, train + score seconds) of the runs --skip-existing took from an earlier invocation


def run_script(method, preset, seed, runs, skip_existing):
    out = Path(runs) / f"{method}__{preset}__{seed}"
    if skip_existing and (out / "results.json").is_file():
        r = json.loads((out / "results.json").read_text())
        REUSED.append((method, r.get("timing", {}).get("train_s", 0) + r.get("timing", {}).get("score_s", 0)))
        return r, out
    cmd = [sys.executable, f"{method}.py", "--preset", preset, "--seed", str(seed), "--out", str(out), "--device", "cpu"]
    print("$ " + " ".join(cmd), flush=True)
    t = time.time()
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if p.returncode != 0:
        print(f"  {method} failed after {time.time() - t:.0f}s: {p.stderr.strip().splitlines()[-1:]}", flush=True)
        return None, out
    r = json.loads((out / "results.json").read_text())
    print(f"  {method}: AUROC {r['metrics']['auroc']:.3f} in {time.time() - t:.0f}s", flush=True)
    return r, out


def _dice_of(res, group):
    """Per-case Dice at the method's healthy-data threshold, where the script reports one
    (anovaegan.py: results["dice"][group]["mean"]); None elsewhere."""
    g = res.get("groups", {}).get(group, {})
    for k in ("dice", "dice_mean"):
        if isinstance(g.get(k), (int, float)):
            return g[k]
    d = res.get("dice", {})
    if isinstance(d, dict) and isinstance(d.get(group), dict) and isinstance(d[group].get("mean"), (int, float)):
        return d[group]["mean"]
    return None


def _fmt(vals, digits=3):
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and np.isnan(v))]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{np.mean(vals):.{digits}f} ± {np.std(vals):.{digits}f}"


def main():
    a = parse()
    methods = a.only or list(METHODS)
    t_all = time.time()
    table = {}     # (method, group) -> dict of lists
    costs = {}     # method -> dict of lists
    roc = {}       # method -> {group: (y, s)} for the first seed
    for seed in range(a.seeds):
        for m in methods:
            r, out = run_script(m, a.preset, seed, a.runs, a.skip_existing)
            if r is None:
                continue
            key = f"{m} ({r['unit']})"
            for g, v in r["groups"].items():
                if "auroc" not in v:
                    continue
                e = table.setdefault((key, g), {"auroc": [], "auprc": [], "dice": []})
                e["auroc"].append(v["auroc"])
                e["auprc"].append(v["auprc"])
                e["dice"].append(_dice_of(r, g))
            c = costs.setdefault(key, {"train_s": [], "score": [], "rss": []})
            c["train_s"].append(r["timing"].get("train_s"))
            c["score"].append(r["timing"].get("score_s_per_sample"))
            c["rss"].append(r.get("memory", {}).get("rss_mb"))
            if seed == 0 and (out / "scores.csv").is_file():
                import csv
                rows = list(csv.DictReader(open(out / "scores.csv")))
                roc[key] = rows
        for contrast in sorted({METHODS[m] for m in methods}):
            for name, ev in baselines(contrast, a.preset, seed).items():
                key = f"baseline {name} ({contrast}, volume)"
                for g, v in ev["groups"].items():
                    if "auroc" not in v:
                        continue
                    e = table.setdefault((key, g), {"auroc": [], "auprc": [], "dice": []})
                    e["auroc"].append(v["auroc"])
                    e["auprc"].append(v["auprc"])
                    e["dice"].append(v.get("dice"))
                c = costs.setdefault(key, {"train_s": [], "score": [], "rss": []})
                c["train_s"].append(ev["timing"]["train_s"])
                c["score"].append(ev["timing"]["score_s_per_sample"])
                c["rss"].append(None)
                if seed == 0:
                    roc[key] = ev["rows"]
    total = time.time() - t_all
    write_report(a, methods, table, costs, roc, total)


def _contrast_of(key):
    """'madgan (scan)' -> 't1'; 'baseline zscore (t1, volume)' -> 't1'."""
    if key.startswith("baseline"):
        return key.split("(")[1].split(",")[0]
    return METHODS[key.split(" ")[0]]


def write_report(a, methods, table, costs, roc, total):
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Benchmark: `python benchmark.py --seeds {a.seeds} --preset {a.preset}`", "",
             f"Synthetic phantom, CPU, {a.seeds} seed(s){' (mean ± std)' if a.seeds > 1 else ''}; "
             f"this invocation {total / 60:.1f} min"
             + (f" ({len(REUSED)} script runs reused from an earlier invocation with --skip-existing, "
                f"{sum(t for _, t in REUSED) / 60:.1f} min of training and scoring)" if REUSED else "")
             + f"; threads per run: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}. Each anomalous group is scored against the normal test group of "
             "the same contrast, at the unit in brackets (patch, slice, volume, scan): units differ between "
             "methods, so compare a method with the baselines of its own contrast first.", ""]
    names = {"t1": "T1", "flair": "FLAIR", "ct": "CT"}
    lines += ["## The papers' headline comparisons, on the phantom", "",
              f"| paper | script | paper's data | phantom stand-in | ours (--preset {a.preset}) | the paper's number |",
              "|---|---|---|---|---|---|"]
    for m in methods:
        key = next((k for k, _ in table if k.split(" ")[0] == m), None)
        if key is None:
            continue
        cite, pdata, groups, metric = HEADLINE[m]
        ours = " / ".join(_fmt(table[(key, g)][metric], 2) if (key, g) in table else "–" for g in groups)
        lines.append(f"| {cite} | `{m}.py` | {pdata} | {names[METHODS[m]]} {PLURAL[key.split('(')[1][:-1]]}: "
                     f"{' / '.join(groups)} | {metric.upper() if metric == 'auroc' else 'Dice'} {ours} | {PAPERS[m]} |")
    lines.append("")
    for contrast in ("t1", "flair", "ct"):
        keys = [k for k in dict.fromkeys(k for k, _ in table) if _contrast_of(k) == contrast]
        if not keys:
            continue
        keys.sort(key=lambda k: (k.startswith("baseline"), k))
        groups = sorted({g for k, g in table if k in keys})
        lines += [f"## {names[contrast]}: AUROC (AUPRC)", "",
                  "| method (unit) | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
        for k in keys:
            cells = [f"{_fmt(table[(k, g)]['auroc'], 2)} ({_fmt(table[(k, g)]['auprc'], 2)})" if (k, g) in table
                     else "–" for g in groups]
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        with_dice = [k for k in keys if any(v is not None for g in groups for v in table.get((k, g), {}).get("dice", []))]
        if with_dice:
            lines += ["", f"Dice per case at a threshold from healthy validation data ({names[contrast]}):", "",
                      "| method (unit) | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
            for k in with_dice:
                lines.append(f"| {k} | " + " | ".join(_fmt(table[(k, g)]["dice"], 3) if (k, g) in table else "–"
                                                      for g in groups) + " |")
        lines.append("")
    lines += ["## Cost (CPU, as run)", "", "| method (unit) | train s | score s / sample | peak RSS MB |",
              "|---|---|---|---|"]
    for k, c in costs.items():
        lines.append(f"| {k} | {_fmt(c['train_s'], 1)} | {_fmt(c['score'], 4)} | {_fmt(c['rss'], 0)} |")
    (out / "benchmark.md").write_text("\n".join(lines) + "\n")
    C.write_json(out / "benchmark.json", {"args": vars(a), "total_s": total,
                                          "table": {f"{k}|{g}": e for (k, g), e in table.items()},
                                          "costs": costs})
    plt = C._plt()
    order = {"t1": 0, "flair": 1, "ct": 2}
    keys = sorted(roc, key=lambda k: (order[_contrast_of(k)], k.startswith("baseline"), k))
    ncol = 4
    nrow = (len(keys) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(4 * ncol, 3.8 * nrow), squeeze=False)
    for ax, k in zip(axes.ravel(), keys):
        rows = roc[k]
        y = np.array([int(r["label"]) for r in rows])
        s = np.array([float(r["score"]) for r in rows])
        g = np.array([r["group"] for r in rows])
        for name in dict.fromkeys(g):
            if y[g == name].max() == 0:
                continue
            sel = (g == name) | (y == 0)
            fpr, tpr, _ = C.roc_points(y[sel], s[sel])
            ax.plot(fpr, tpr, lw=1.5, label=f"{name} {C.auroc(y[sel], s[sel]):.2f}")
        ax.plot([0, 1], [0, 1], "--", color="grey", lw=0.7)
        ax.set_title(k, fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        ax.set(xlim=(0, 1), ylim=(0, 1.01))
    for ax in axes[:, 0]:
        ax.set_ylabel("true positive rate")
    for ax in axes[-1, :]:
        ax.set_xlabel("false positive rate")
    for ax in axes.ravel()[len(keys):]:
        ax.axis("off")
    fig.suptitle("ROC per method and group (normal vs group), synthetic phantom", fontsize=11)
    C._save(fig, out / "benchmark.png")
    print(f"wrote {out / 'benchmark.md'}, {out / 'benchmark.png'} in {total / 60:.1f} min")
    if a.preset == "quick" and Path(a.out).resolve() == (REPO / "results").resolve() and not a.no_readme:
        update_readme(REPO / "README.md", lines)


README_START, README_END = "<!-- benchmark:start -->", "<!-- benchmark:end -->"


def update_readme(path, lines):
    """Copy the tables between the README's benchmark markers, so the README shows what this run produced."""
    text = path.read_text()
    if README_START not in text or README_END not in text:
        print(f"{path}: no {README_START} ... {README_END} markers; README left as it is")
        return
    body = "\n".join(["", *[ln.replace("## ", "#### ", 1) if ln.startswith("## ") else ln for ln in lines[2:]],
                      "![ROC curves per method and group](results/benchmark.png)", ""])
    head, rest = text.split(README_START, 1)
    path.write_text(head + README_START + body + README_END + rest.split(README_END, 1)[1])
    print(f"updated the benchmark tables in {path}")


if __name__ == "__main__":
    C.main_guard(lambda argv: main())
