"""Each script reads as its paper (the reading redesign): the method first, plumbing out of the way.

Measured on the source text of every method script:
  * the module docstring is at most 60 lines; `main` at most 60 lines; no function over 80 lines;
  * no line over 100 characters;
  * at least 55% of the script's non-blank lines are method: the sections whose banner title starts
    with Hyperparameters, Networks, Losses, Anomaly score or Training (banners are
    `# ====...` / `# Title` / `# ====...`); the docstring, scoring/evaluation, main and the appendix
    of paper figures count against it;
  * the same entry points in all five: parse_args, train_step, train, score, main.
`python tests/test_reading.py` prints the table (lines, method share, longest function, main, common
names used) for the closing note."""
import ast
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["anogan", "fanogan3d", "anovaegan", "madgan", "reversed_ae"]
METHOD_SECTIONS = ("hyperparameters", "networks", "losses", "anomaly score", "training")
ENTRY_POINTS = ("parse_args", "train_step", "train", "score", "main")


def sections(src):
    """{banner title: non-blank lines under it}; lines before the first banner are 'preamble'."""
    lines = src.splitlines()
    banner = re.compile(r"^# ={20,}\s*$")
    counts, cur, skip = {}, "preamble", 0
    for k, line in enumerate(lines):
        if (banner.match(line) and k + 2 < len(lines) and banner.match(lines[k + 2])
                and lines[k + 1].startswith("# ")):
            cur, skip = lines[k + 1][2:].strip(), 3
        if skip:
            skip -= 1
            continue
        if line.strip():
            counts[cur] = counts.get(cur, 0) + 1
    return counts


def measure(name):
    src = (REPO / f"{name}.py").read_text()
    tree = ast.parse(src)
    c = sections(src)
    total = sum(c.values())
    method = sum(v for k, v in c.items() if k.lower().startswith(METHOD_SECTIONS))
    funcs = {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(tree)
             if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    longest = max(funcs.items(), key=lambda kv: kv[1])
    top = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    doc = ast.get_docstring(tree, clean=False) or ""
    return dict(lines=len(src.splitlines()), nonblank=total, method_share=method / max(total, 1),
                longest=longest, main=funcs.get("main", 0), doc_lines=len(doc.splitlines()),
                long_lines=[i + 1 for i, l in enumerate(src.splitlines()) if len(l) > 100],
                common_names=len(set(re.findall(r"\bC\.([A-Za-z_]\w*)", src))),
                missing=[e for e in ENTRY_POINTS if e not in top])


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_reads_as_its_paper(name):
    m = measure(name)
    assert m["doc_lines"] <= 60, f"{name}: docstring {m['doc_lines']} lines"
    assert m["main"] <= 60, f"{name}: main() {m['main']} lines"
    assert m["longest"][1] <= 80, f"{name}: {m['longest'][0]}() {m['longest'][1]} lines"
    assert not m["long_lines"], f"{name}: lines over 100 characters: {m['long_lines'][:10]}"
    assert not m["missing"], f"{name}: missing entry points {m['missing']}"


# Issue 19's target is 55% method in every script, and every script reaches it. Each keeps at least
# the share it has (a ratchet: moving plumbing back into a script fails this test); raise a floor when
# a script improves.
METHOD_SHARE_GOAL = 0.55
METHOD_SHARE_FLOOR = {"anogan": 0.55, "fanogan3d": 0.55, "anovaegan": 0.55, "madgan": 0.55,
                      "reversed_ae": 0.57}


@pytest.mark.parametrize("name", SCRIPTS)
def test_method_share_does_not_fall(name):
    share = measure(name)["method_share"]
    assert share >= min(METHOD_SHARE_FLOOR[name], METHOD_SHARE_GOAL), f"{name}: method share {share:.1%}"


if __name__ == "__main__":
    print("| script | lines | method share | longest function | main | common names | lines > 100 |")
    print("|---|---|---|---|---|---|---|")
    for s in (sys.argv[1:] or SCRIPTS):
        m = measure(s)
        print(f"| {s}.py | {m['lines']} | {m['method_share']:.0%} | {m['longest'][0]} {m['longest'][1]} | "
              f"{m['main']} | {m['common_names']} | {len(m['long_lines'])} |")
