"""The shared plumbing every script trains and reports with (common.py): intervals over cases, clean
negatives, paired differences, the resumable minibatch sampler, the training Loop (resume = an
uninterrupted run, checkpoint budget, --max-steps, NaN stop, Ctrl-C, learning rate on resume, RNG states
from another device) and the hyperparameter tables that generate each script's command line."""
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import pytest
import sklearn.metrics as skm
import torch

import common as C

REPO = Path(__file__).resolve().parents[1]


# ---- metrics: weighted AUROC / AP, the case bootstrap, clean negatives, paired differences -------------

def test_weighted_auroc_and_ap_equal_scikit_learn_with_ties_and_weights():
    rng = np.random.default_rng(1)
    checked = 0
    for _ in range(300):
        n = int(rng.integers(3, 50))
        y = rng.integers(0, 2, n)
        s = np.round(rng.normal(size=n), int(rng.integers(0, 3)))       # rounding makes ties
        w = rng.integers(0, 4, n).astype(float)
        if len(set(y[w > 0])) < 2:
            continue
        assert C.weighted_auroc(y, s, w[None])[0] == pytest.approx(skm.roc_auc_score(y, s, sample_weight=w))
        assert C.weighted_auprc(y, s, w[None])[0] == pytest.approx(
            skm.average_precision_score(y, s, sample_weight=w))
        checked += 1
    assert checked > 200


def test_case_bootstrap_resamples_whole_cases_within_their_group():
    case = np.array(["a", "a", "a", "b", "c", "c", "d", "e"])
    group = np.array(["normal"] * 6 + ["tumor"] * 2)
    W = C.case_bootstrap(case, group, n_boot=500, seed=3)
    assert W.shape == (500, 8)
    assert (W[:, 0] == W[:, 1]).all() and (W[:, 1] == W[:, 2]).all()    # units of one case move together
    assert (W[:, 4] == W[:, 5]).all()
    per_case = np.stack([W[:, 0], W[:, 3], W[:, 4]], 1)                  # normal cases a, b, c: 3 draws
    assert (per_case.sum(1) == 3).all() and (W[:, 6] + W[:, 7] == 2).all()
    assert len({tuple(r) for r in W.tolist()}) > 20                        # and they do vary


def test_evaluate_negatives_from_normal_scans_and_the_same_scan_variant():
    # normal scans: low scores; a tumour scan's lesion-free units score HIGH (the whole scan is shifted)
    rows = [dict(id=f"n{i}/u{k}", case=f"n{i}", group="normal", label=0, score=0.1 * k)
            for i in range(4) for k in range(3)]
    rows += [dict(id=f"t{i}/u{k}", case=f"t{i}", group="tumor", label=int(k == 0), score=1.0 + 0.1 * k)
             for i in range(4) for k in range(3)]
    ev = C.evaluate(rows)
    y = np.array([r["label"] for r in rows])
    s = np.array([r["score"] for r in rows])
    g = np.array([r["group"] for r in rows])
    clean = (g == "normal") | (y == 1)
    assert ev["groups"]["tumor"]["auroc"] == pytest.approx(skm.roc_auc_score(y[clean], s[clean])) == 1.0
    same = g == "tumor"
    assert ev["groups_same_scan"]["tumor"]["auroc"] == pytest.approx(skm.roc_auc_score(y[same], s[same])) == 0.0
    assert ev["groups"]["tumor"]["n_anomalous"] == 4 and ev["groups"]["tumor"]["n_cases"] == 4
    lo, hi = ev["groups"]["tumor"]["auroc_ci"]
    assert lo <= 1.0 <= hi and "normal" in ev["negatives"]


def test_intervals_shrink_with_more_cases_and_cover_the_estimate():
    rng = np.random.default_rng(0)

    def rows(n):
        return ([dict(id=f"n{i}", group="normal", label=0, score=rng.normal()) for i in range(n)]
                + [dict(id=f"a{i}", group="a", label=1, score=rng.normal(1.0)) for i in range(n)])
    small, large = C.evaluate(rows(20))["groups"]["a"], C.evaluate(rows(400))["groups"]["a"]
    w = lambda e: e["auroc_ci"][1] - e["auroc_ci"][0]                      # noqa: E731
    assert small["auroc_ci"][0] <= small["auroc"] <= small["auroc_ci"][1]
    assert w(large) < 0.4 * w(small)                                        # ~ 1/sqrt(n)


def test_paired_difference_resolves_a_real_gap_and_not_noise():
    rng = np.random.default_rng(0)
    n = 150
    y = np.r_[np.zeros(n), np.ones(n)].astype(int)
    case = np.arange(2 * n).astype(str)
    strata = np.where(y == 1, "a", "normal")
    good = y * 1.5 + rng.normal(size=2 * n)
    worse = y * 0.5 + rng.normal(size=2 * n)
    d = C.paired_difference(y, good, worse, case, strata, n_boot=500)
    assert d["resolved"] and d["ci"][0] > 0 and d["diff"] == pytest.approx(d["a"] - d["b"])
    same = C.paired_difference(y, good, good + 1e-9 * rng.normal(size=2 * n), case, strata, n_boot=200)
    assert not same["resolved"] and abs(same["diff"]) < 1e-3


def test_mean_ci_of_per_case_values():
    r = C.mean_ci([0.2, 0.4, 0.6, 0.8], n_boot=400)
    assert r["mean"] == pytest.approx(0.5) and r["ci"][0] < 0.5 < r["ci"][1] and r["n"] == 4


# ---- the minibatch sampler ------------------------------------------------------------------------

def test_batches_cover_each_row_once_per_epoch_and_resume_exactly():
    b = C.Batches(23, 5, seed=4)                      # drop_last: 4 batches of 5 per epoch
    assert b.steps_per_epoch == 4
    first = [next(b) for _ in range(4)]
    assert b.epoch_done and len(set(np.concatenate(first).tolist())) == 20
    for _ in range(3):
        next(b)
    st = b.state_dict()
    rest = [next(b).tolist() for _ in range(6)]
    b2 = C.Batches(23, 5, seed=4)
    b2.load_state_dict(st)
    assert [next(b2).tolist() for _ in range(6)] == rest
    assert C.Batches(23, 5, seed=5).__next__().tolist() != first[0].tolist()
    keep = C.Batches(23, 5, seed=4, drop_last=False)
    assert keep.steps_per_epoch == 5 and len([next(keep) for _ in range(5)][-1]) == 3


# ---- the Loop: a toy script on it ------------------------------------------------------------------

HYPER = dict(steps=C.hp(12, "steps of phase 1", lo=0), steps2=C.hp(6, "steps of phase 2", lo=0),
             lr=C.hp(0.05, "Adam lr", lo=0, hi=1), batch_size=C.hp(4, "batch", lo=1),
             width=C.hp(8, "hidden units", lo=1), sleep=C.hp(0.0, "seconds per step (tests)", lo=0),
             nan_at=C.hp(0, "make the loss NaN at this step (tests)", lo=0))


def toy_main(argv=None):
    """Two phases on a tiny net, with dropout and noise so that every random stream matters."""
    args = C.parse_args(argv, HYPER, {"quick": {}, "smoke": {}}, method="toy", doc="toy")
    run = C.start_run(args, "toy")
    X = torch.from_numpy(np.random.default_rng(0).normal(size=(37, 3)).astype(np.float32))
    net = torch.nn.Sequential(torch.nn.Linear(3, args.width), torch.nn.Dropout(0.3), torch.nn.Linear(args.width, 1))
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    b1, b2 = C.Batches(len(X), args.batch_size, args.seed), C.Batches(len(X), 3, args.seed, stream=1)
    loop = C.Loop(run, args, {"net": net}, {"net": opt}, batches={"p1": b1, "p2": b2})
    for phase, n, b in (("p1", args.steps, b1), ("p2", args.steps2, b2)):
        for step in loop.phase(phase, n):
            x = X[next(b)]
            loss = (net(x + 0.1 * torch.randn_like(x)) ** 2).mean()
            if args.nan_at and loop.state["total_steps"] + 1 == args.nan_at:
                loss = loss * float("nan")
            opt.zero_grad()
            loss.backward()
            opt.step()
            loop.log({"loss": loss})
            time.sleep(args.sleep)
    loop.close()
    out = net.eval()(X).detach().numpy().ravel()
    np.save(run.out / "out.npy", out)
    return loop, out


@pytest.mark.parametrize("stop", [5, 12, 15])      # inside phase 1, at its end, inside phase 2
def test_loop_resume_equals_the_uninterrupted_run(tmp_path, stop):
    _, full = toy_main(["--out", str(tmp_path / "full")])
    loop_b, _ = toy_main(["--out", str(tmp_path / "b"), "--max-steps", str(stop)])
    assert loop_b.stopped_early and loop_b.state["total_steps"] == stop
    loop_c, resumed = toy_main(["--out", str(tmp_path / "c"), "--resume", str(tmp_path / "b" / "last.pt")])
    np.testing.assert_array_equal(resumed, full)
    assert loop_c.state["total_steps"] == 18 and loop_c.state["done"] == ["p1", "p2"]
    assert [s for s, _ in loop_c.history["loss"]][-1] == 6


def test_loop_checkpoints_every_n_steps_and_at_phase_ends(tmp_path):
    loop, _ = toy_main(["--out", str(tmp_path / "r"), "--ckpt-every", "5"])
    # total steps 5, 10, 15 + the end of p1 (12) and of p2 (18); close() saves once more
    assert len(loop.write_s) == 6 and (tmp_path / "r" / "last.pt").is_file()
    assert not list((tmp_path / "r").glob(".last.pt.tmp*"))


def test_time_budget_keeps_checkpoint_io_under_two_percent(tmp_path, monkeypatch):
    """A paper-scale run simulated with a fake clock: 3,000 steps of 20 s, a 2 GB last.pt taking 25 s."""
    clock = {"t": 1000.0}
    fake = types.SimpleNamespace(time=lambda: clock["t"], perf_counter=lambda: clock["t"], sleep=lambda s: None)
    monkeypatch.setattr(C, "time", fake)

    def fake_save(path, state):
        clock["t"] += 25.0
        return 25.0
    monkeypatch.setattr(C, "save_checkpoint", fake_save)
    args = C.parse_args(["--out", str(tmp_path / "sim")], HYPER, {"quick": {}}, method="toy", doc="toy")
    run = C.Run(out=tmp_path / "sim", device=torch.device("cpu"), method="toy", t0=0.0)
    (tmp_path / "sim").mkdir()
    loop = C.Loop(run, args, {}, {})
    for _ in loop.phase("train", 3000):
        clock["t"] += 20.0
        loop.log({"loss": 1.0})
    loop.close()
    io = loop.io_report()
    # every 10 min (1250 s with the 50x rule: 25 s x 50) -> 60,000 s / 1250 s = 48 writes, + phase end + close
    assert 40 <= io["checkpoints"] <= 52 and io["share_of_train"] <= 0.021


def test_nan_loss_stops_with_one_error_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(C.UserError, match=r"diverged in p1 at step 7 \(loss = nan\).*last good checkpoint"):
        toy_main(["--out", str(tmp_path / "r"), "--ckpt-every", "3", "--nan-at", "7"])
    ck = C.load_checkpoint(tmp_path / "r" / "last.pt", "toy")
    assert ck["loop"]["total_steps"] == 6


def test_resume_with_a_new_learning_rate_applies_it_and_says_so(tmp_path, capsys):
    toy_main(["--out", str(tmp_path / "b"), "--max-steps", "4"])
    loop, _ = toy_main(["--out", str(tmp_path / "c"), "--resume", str(tmp_path / "b" / "last.pt"), "--lr", "0.01"])
    assert loop.optims["net"].param_groups[0]["lr"] == 0.01
    assert "learning rate 0.05 -> 0.01" in capsys.readouterr().out


def test_resume_of_another_scripts_checkpoint_is_one_clear_error(tmp_path):
    toy_main(["--out", str(tmp_path / "b"), "--max-steps", "2"])
    ck = C.load_checkpoint(tmp_path / "b" / "last.pt")
    ck["method"] = "madgan"
    torch.save(ck, tmp_path / "other.pt")
    with pytest.raises(C.UserError, match=r"not a last.pt of toy.py \(it is one of madgan.py\)"):
        toy_main(["--out", str(tmp_path / "c"), "--resume", str(tmp_path / "other.pt")])
    with pytest.raises(C.UserError, match="other network settings"):
        toy_main(["--out", str(tmp_path / "d"), "--resume", str(tmp_path / "b" / "last.pt"), "--width", "5"])


def test_rng_states_saved_on_another_device_restore_as_cpu_byte_tensors(tmp_path, monkeypatch):
    """On a GPU, torch.load(map_location=cuda) put the CUDA RNG states on the GPU and
    torch.cuda.set_rng_state refused them ("RNG state must be a torch.ByteTensor"). Now checkpoints load
    to the CPU and every state is handed over as a CPU uint8 tensor."""
    seen = {}
    monkeypatch.setattr(torch.load, "__call__", torch.load)        # (keep torch.load itself)
    real_load = torch.load

    def spy_load(*a, **kw):
        seen["map_location"] = kw.get("map_location")
        return real_load(*a, **kw)
    monkeypatch.setattr(torch, "load", spy_load)

    def fake_set(state, device=0):
        assert isinstance(state, torch.Tensor) and state.device.type == "cpu" and state.dtype == torch.uint8
        seen.setdefault("cuda", []).append(device)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", fake_set)
    st = {"python": __import__("random").getstate(), "numpy": np.random.get_state(),
          "torch": torch.get_rng_state().to(torch.int64),                  # not a ByteTensor
          "cuda": [torch.zeros(16, dtype=torch.int64) for _ in range(3)]}   # 3 saved GPUs, 2 here
    torch.save({"method": "toy", "models": {}, "rng": st}, tmp_path / "ck.pt")
    ck = C.load_checkpoint(tmp_path / "ck.pt", "toy")
    C.set_rng_state(ck["rng"])
    assert seen == {"map_location": "cpu", "cuda": [0, 1]}


def test_ctrl_c_saves_and_the_resumed_run_is_exact(tmp_path):
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(REPO / 'tests')!r})
        import common as C, test_loop as T
        C.main_guard(lambda argv: T.toy_main(sys.argv[1:]))
    """)
    full = tmp_path / "full"
    subprocess.run([sys.executable, "-c", code, "--out", str(full)], check=True, capture_output=True, timeout=120)
    out = tmp_path / "int"
    p = subprocess.Popen([sys.executable, "-c", code, "--out", str(out), "--sleep", "0.3", "--ckpt-every", "1"],
                         stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (out / "last.pt").is_file() and time.time() - t0 < 60:   # the loop is running
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert f"resume with --resume {out / 'last.pt'}" in err and "<out>" not in err
    ck = C.load_checkpoint(out / "last.pt", "toy")
    assert 0 < ck["loop"]["total_steps"] < 18
    subprocess.run([sys.executable, "-c", code, "--out", str(tmp_path / "res"), "--resume", str(out / "last.pt")],
                   check=True, capture_output=True, timeout=120)
    np.testing.assert_array_equal(np.load(tmp_path / "res" / "out.npy"), np.load(full / "out.npy"))


# ---- hyperparameter tables -> the command line ---------------------------------------------------------

def test_parse_args_from_one_declaration_per_hyperparameter(tmp_path):
    hyper = dict(size=C.hp([256, 176], "slice size, §2", lo=16), lr=C.hp(2e-4, "Adam lr, §3", lo=0, hi=1),
                 steps=C.hp(1000, "steps", lo=0), finetune=C.hp(True, "step 3"))
    presets = {"quick": dict(size=[64, 64], steps=10), "smoke": dict(size=[32, 32], steps=2)}
    parse = lambda *a: C.parse_args(["--out", str(tmp_path), *a], hyper, presets, method="x", doc="x")  # noqa
    q = parse()
    assert (q.size, q.steps, q.lr, q.finetune, q.preset) == ([64, 64], 10, 2e-4, True, "quick")
    p = parse("--preset", "paper", "--no-finetune", "--steps", "7")
    assert (p.size, p.steps, p.finetune) == ([256, 176], 7, False)
    for bad, msg in ((["--lr", "nan"], "--lr must be a finite number"), (["--lr", "2"], r"--lr must be in \[0, 1\]"),
                     (["--size", "8", "64"], r"--size must be in \[16"), (["--seed", "-1"], "--seed must be in"),
                     (["--seed", str(2 ** 32)], "--seed must be in"), (["--max-steps", "-3"], "--max-steps")):
        with pytest.raises(C.UserError, match=msg):
            parse(*bad)


# ---- report: no silently meaningless result ------------------------------------------------------------

def _run(tmp_path):
    (tmp_path / "run").mkdir(exist_ok=True)
    return C.Run(out=tmp_path / "run", device=torch.device("cpu"), method="toy", t0=time.time())


def test_report_refuses_identical_or_nan_scores(tmp_path):
    args = types.SimpleNamespace(data="synthetic", preset="smoke", seed=0)
    rows = [dict(id=f"c{i}", group="normal" if i < 4 else "tumor", label=int(i >= 4), score=1.78e-10)
            for i in range(8)]
    with pytest.raises(C.UserError, match="all 8 test scores are identical"):
        C.report(_run(tmp_path), args, "volume", rows, {})
    rows[0]["score"] = float("nan")
    with pytest.raises(C.UserError, match="NaN or infinite"):
        C.report(_run(tmp_path), args, "volume", rows, {})
    assert not (tmp_path / "run" / "results.json").exists()
    for i, r in enumerate(rows):
        r["score"] = float(i)
    res = C.report(_run(tmp_path), args, "volume", rows, {"train_s": 1.0}, val_scores=[0.5, 1.5, 2.5])
    assert res["metrics"]["auroc"] == 1.0 and res["operating_point"]["threshold"] == pytest.approx(2.4)
    for f in ("results.json", "scores.csv", "roc.png", "scores.png"):
        assert (tmp_path / "run" / f).is_file()


def test_a_run_stopped_by_bad_input_leaves_no_run_folder(tmp_path):
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(REPO)!r})
        import common as C, types
        def main(argv):
            a = types.SimpleNamespace(out={str(tmp_path / 'run')!r}, seed=0, device='cpu', preset='quick', data='x')
            C.start_run(a, 'toy')
            C.fail('--data-root x: missing')
        C.main_guard(main)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == "error: --data-root x: missing"
    assert not (tmp_path / "run").exists()


def test_an_unwritable_out_folder_is_one_error(tmp_path, monkeypatch):
    """A read-only or immutable --out (root can write into a chmod 500 folder, so the refusal is simulated)."""
    ro = tmp_path / "ro"
    ro.mkdir()

    def refuse(self, *a, **kw):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(Path, "write_text", refuse)
    a = types.SimpleNamespace(out=str(ro), seed=0, device="cpu", preset="quick", data="x")
    with pytest.raises(C.UserError, match=r"--out .*ro: cannot write the run directory \(Permission denied\)"):
        C.start_run(a, "toy")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(C.UserError, match="is a file, not a folder"):
        C.start_run(types.SimpleNamespace(out=str(tmp_path / "file"), seed=0, device="cpu", preset="q", data="x"),
                    "toy")


# ---- torchrun: a NaN on one process stops all of them ------------------------------------------------

def _nan_worker(rank, init_file, out):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        args = types.SimpleNamespace(resume=None, max_steps=None, ckpt_every=0, ckpt_minutes=10.0)
        run = C.Run(out=Path(out), device=torch.device("cpu"), method="toy", t0=time.time())
        loop = C.Loop(run, args, {}, {})
        try:
            for step in loop.phase("train", 10):
                loop.log({"loss": float("nan") if (rank == 1 and step == 3) else 1.0})
            raise AssertionError("no stop")
        except C.UserError as e:
            assert "diverged in train at step 3" in str(e), str(e)
            assert ("another process" in str(e)) == (rank == 0)
    finally:
        dist.destroy_process_group()


def test_a_nan_on_one_process_stops_every_process_at_the_same_step(tmp_path):
    import torch.multiprocessing as mp
    (tmp_path / "run").mkdir()
    mp.spawn(_nan_worker, args=(str(tmp_path / "pg"), str(tmp_path / "run")), nprocs=2, join=True)
