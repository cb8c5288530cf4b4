"""Tests of madgan.py: the paper's equations on hand-computed tensors (`pytest -k eq`), the window
indexing, the per-scan score, the row reader, the networks, and smoke runs: one subprocess as a user
types it (checked against ../shared/CONTRACT.md), --sa 3/7, the OASIS-3 fixture, resume after
--max-steps and after a SIGKILL (both byte-equal to the uninterrupted run), --checkpoint, and the
error line for another script's last.pt."""
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import common as C
from data import datasets
import madgan as M

REPO = Path(__file__).resolve().parents[1]


# ---- Eq. (1), Eq. (2): l1 and l2 per window ---------------------------------------------------------

def test_eq1_l1_loss_is_mean_absolute_difference():
    x = torch.tensor([[[[1.0, -1.0], [0.5, 0.0]]]])          # (1, 1, 2, 2)
    x_rec = torch.tensor([[[[0.0, -1.0], [1.0, 1.0]]]])
    # |1-0| + |-1+1| + |0.5-1| + |0-1| = 2.5, over P = 4 pixels
    assert M.l1_loss(x, x_rec).item() == pytest.approx(2.5 / 4)


def test_eq2_l2_per_window_in_unit_intensities():
    x = torch.zeros(2, 3, 2, 2)
    x_rec = torch.zeros(2, 3, 2, 2)
    x_rec[0, 0, 0, 0] = 1.0                                   # one pixel off by 1 in [-1, 1] = 0.5 in [0, 1]
    x_rec[1] = -1.0                                           # every pixel off by 1 -> 0.25 each
    l2 = M.l2_per_window(x, x_rec)
    assert l2.shape == (2,)
    assert l2[0].item() == pytest.approx(0.25 / 12)           # (0.5)^2 / P, P = 3*2*2
    assert l2[1].item() == pytest.approx(0.25)


# ---- WGAN-GP ---------------------------------------------------------------------------------------

def test_eq_wgan_critic_loss_and_label_flip():
    d_real, d_fake = torch.tensor([2.0, 4.0]), torch.tensor([1.0, -1.0])
    assert M.critic_loss(d_real, d_fake).item() == pytest.approx(0.0 - 3.0)        # E[D(fake)] - E[D(real)]
    assert M.critic_loss(d_real, d_fake, flip=True).item() == pytest.approx(3.0)   # roles swapped


def test_eq_generator_loss_adversarial_plus_100_l1():
    d_fake = torch.tensor([1.0, 3.0])
    x, x_rec = torch.zeros(2, 3, 2, 2), torch.full((2, 3, 2, 2), 0.1)
    total, adv, l1 = M.generator_loss(d_fake, x, x_rec, l1_weight=100.0)
    assert adv.item() == pytest.approx(-2.0)
    assert l1.item() == pytest.approx(0.1)
    assert total.item() == pytest.approx(-2.0 + 100 * 0.1)
    assert M.generator_loss(d_fake, x, x_rec, l1_weight=0.0)[0].item() == pytest.approx(-2.0)  # w/o l1


class LinearCritic(torch.nn.Module):
    """D(c, x) = <w, x>: its gradient is w everywhere, so GP = (||w|| - 1)^2 exactly."""

    def __init__(self, w):
        super().__init__()
        self.w = w

    def forward(self, cond, x):
        return (x * self.w).flatten(1).sum(1)


def test_eq_gradient_penalty_known_gradient_norm():
    w = torch.zeros(1, 3, 2, 2)
    w[0, 0, 0, 0], w[0, 2, 1, 1] = 3.0, 4.0                   # ||w|| = 5
    real, fake = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    gp = M.gradient_penalty(LinearCritic(w), None, real, fake)
    assert gp.item() == pytest.approx((5.0 - 1.0) ** 2)


class SquareCritic(torch.nn.Module):
    """D(c, x) = ½||x||²: gradient x, so the per-sample norm is ||x_i||."""

    def forward(self, cond, x):
        return 0.5 * x.pow(2).flatten(1).sum(1)


def test_eq_gradient_penalty_norm_is_per_sample():
    real = torch.zeros(2, 3, 2, 2)
    real[0, 0, 0, 0] = 2.0                                     # ||x_0|| = 2
    real[1, 1, 0, 1], real[1, 2, 1, 0] = 0.3, 0.4              # ||x_1|| = 0.5
    # real == fake, so x^ = x for every ε: GP = ((2-1)^2 + (0.5-1)^2) / 2
    gp = M.gradient_penalty(SquareCritic(), None, real, real.clone())
    assert gp.item() == pytest.approx((1.0 + 0.25) / 2)
    wrong = (real.flatten().norm() - 1) ** 2                   # one norm over the whole batch
    assert abs(gp.item() - wrong.item()) > 0.1


def test_gradient_penalty_is_differentiable_for_the_critic():
    D = M.Critic(base=4)
    cond, real, fake = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    gp = M.gradient_penalty(D, cond, real, fake)
    gp.backward()
    assert D.conv1.weight.grad is not None and D.conv1.weight.grad.abs().sum() > 0


# ---- self-attention and networks -------------------------------------------------------------------

def test_self_attention_matches_sagan_formula():
    torch.manual_seed(0)
    sa = M.SelfAttention(8)
    x = torch.randn(1, 8, 2, 3)
    assert torch.equal(sa(x), x)                               # γ = 0 at initialisation: identity
    with torch.no_grad():
        sa.gamma.fill_(0.7)
    f = sa.f(x).flatten(2)[0]                                  # (1, N)
    g = sa.g(x).flatten(2)[0]
    h = sa.h(x).flatten(2)[0]                                  # (8, N)
    N = 6
    o = torch.zeros(8, N)
    for j in range(N):                                         # o_j = Σ_i β_{j,i} h(x_i)
        s = torch.stack([f[:, i] @ g[:, j] for i in range(N)])
        beta = torch.exp(s) / torch.exp(s).sum()
        o[:, j] = sum(beta[i] * h[:, i] for i in range(N))
    y = x + 0.7 * o.view(1, 8, 2, 3)
    assert torch.allclose(sa(x), y, atol=1e-5)


@pytest.mark.parametrize("sa", [0, 3, 7])
def test_networks_shapes_and_sa_count(sa):
    args = types.SimpleNamespace(sa=sa, k_in=3, k_out=3, base_ch=8, dropout=0.5)
    G, D = M.build_models(args)
    n_sa = sum(isinstance(m, M.SelfAttention) for m in list(G.modules()) + list(D.modules()))
    assert n_sa == sa
    x = torch.rand(2, 3, 48, 32) * 2 - 1                       # non-square, like the paper's 256x176
    y = G(x)
    assert y.shape == (2, 3, 48, 32) and y.abs().max() <= 1
    assert D(x, y).shape == (2,)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in D.modules())


def test_generator_unet_has_two_dropout_layers_and_batchnorm():
    G = M.Generator(base=8, dropout=0.5)
    assert sum(isinstance(m, torch.nn.Dropout) for m in G.modules()) == 2
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in G.modules()) == 7   # 4 enc + 3 dec


# ---- windows and the per-scan score ----------------------------------------------------------------

def fake_stack(lengths, H=4, W=4, seed=0, shuffle=False):
    """An ArraySet of len(lengths) scans with the given slice counts (rows optionally shuffled)."""
    rng = np.random.default_rng(seed)
    case = np.concatenate([np.full(n, i, np.int32) for i, n in enumerate(lengths)])
    z = np.concatenate([np.arange(n, dtype=np.int32) + 10 for n in lengths])
    if shuffle:
        p = rng.permutation(len(case))
        case, z = case[p], z[p]
    x = rng.uniform(-1, 1, (len(case), H, W)).astype(np.float32)
    cases = [datasets.Case(id=f"t/{i}", subject=str(i), group="normal", label=0, image="") for i in range(len(lengths))]
    return datasets.ArraySet(x=x, mask=np.zeros_like(x, np.uint8), brain=np.ones_like(x, np.uint8), case=case, z=z,
                      cases=cases)


def test_window_indexing_first_last_and_no_crossing():
    S = fake_stack([8, 7, 5])                                   # 3 + 2 + 0 windows of 6 slices
    rows, case = M.window_table(S, 3, 3)
    assert rows.shape == (5, 6) and list(case) == [0, 0, 0, 1, 1]
    assert list(rows[0]) == [0, 1, 2, 3, 4, 5]                  # s1..3 -> s4..6 of scan 0
    assert list(rows[2]) == [2, 3, 4, 5, 6, 7]                  # s3..5 -> s6..8: last window of scan 0
    assert list(rows[3]) == [8, 9, 10, 11, 12, 13]              # first window of scan 1
    assert list(rows[4]) == [9, 10, 11, 12, 13, 14]             # last window of scan 1
    for r, c in zip(rows, case):                                # no window crosses two scans
        assert (S.case[r] == c).all()


def test_window_indexing_follows_slice_order_not_row_order():
    S = fake_stack([9, 6], shuffle=True)
    rows, case = M.window_table(S, 3, 3)
    assert len(rows) == 4 + 1
    for r, c in zip(rows, case):
        assert (S.case[r] == c).all()
        assert list(S.z[r]) == list(range(S.z[r][0], S.z[r][0] + 6))   # consecutive slices in order


def test_top_consecutive_mean():
    assert M.top_consecutive_mean([1, 5, 5, 1, 1], 2) == pytest.approx(5.0)
    assert M.top_consecutive_mean([1, 5, 5, 1, 1], 3) == pytest.approx(11 / 3)
    assert M.top_consecutive_mean([1, 2], 10) == pytest.approx(1.5)     # fewer windows than k: all
    assert M.top_consecutive_mean([1, 5, 5, 1, 1], 0) == pytest.approx(2.6)


class ShiftG(torch.nn.Module):
    """A 'generator' that predicts the next 3 slices as copies of the last input slice."""

    def forward(self, cond):
        return cond[:, -1:].repeat(1, 3, 1, 1)


def test_eq2_scan_score_matches_hand_computation():
    S = fake_stack([8, 6], H=2, W=3)
    args = types.SimpleNamespace(k_in=3, k_out=3, eval_batch=2, amp=False, score_windows=0)
    out = M.score(ShiftG(), S, args, torch.device("cpu"), keep=[1])
    x = S.x.astype(np.float64)
    for i, n in enumerate([8, 6]):
        r = S.slices_of(i)
        per_window = [np.mean(((x[r[s + 3: s + 6]] - x[r[s + 2]][None]) / 2) ** 2) for s in range(n - 5)]
        assert out["all"][i] == pytest.approx(np.mean(per_window), rel=1e-6)
        assert out["top"][i] == pytest.approx(np.mean(per_window), rel=1e-6)   # <= 10 windows: all
    assert len(out["losses"]) == 3 + 1 and list(out["n_windows"]) == [3, 1]
    # the figure window of scan 1 (its only window) is kept during the same pass
    assert list(out["kept"]) == [1] and list(out["kept"][1]["rows"]) == list(S.slices_of(1))
    np.testing.assert_array_equal(out["kept"][1]["window"], S.x[S.slices_of(1)])


def test_row_reader_reads_each_run_of_consecutive_rows_once(tmp_path, monkeypatch):
    x = np.random.default_rng(0).normal(size=(20, 3, 4)).astype(np.float32)
    mm = np.memmap(tmp_path / "x.dat", dtype=np.float32, mode="w+", shape=x.shape)
    mm[:] = x
    mm.flush()
    reader = datasets.RowReader(np.memmap(tmp_path / "x.dat", dtype=np.float32, mode="r", shape=x.shape))
    rows = np.array([[5, 6, 7], [7, 8, 2], [15, 3, 2]])         # distinct: 2-3 | 5-8 | 15, unsorted, repeated
    reads, real_open = [], open

    class Spy:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def seek(self, pos):
            self.f.seek(pos)

        def read(self, n):
            reads.append(n // (3 * 4 * 4))                       # rows per read
            return self.f.read(n)
    monkeypatch.setattr("builtins.open", lambda *a, **kw: Spy(real_open(*a, **kw)))
    out = reader(rows)
    monkeypatch.undo()
    assert out.shape == (3, 3, 3, 4) and out.dtype == np.float32
    np.testing.assert_array_equal(out, x[rows])
    assert reads == [2, 4, 1]                                    # one read per run of consecutive rows
    np.testing.assert_array_equal(datasets.RowReader(x)(rows), x[rows])  # a plain array: indexing


def test_group_aucs_normal_is_any_label_0_group():
    groups = ["cdr_0"] * 3 + ["cdr_0.5"] * 2 + ["cdr_2"] * 2
    s = [0.1, 0.2, 0.3, 0.25, 0.35, 0.5, 0.6]
    rows = [dict(id=str(i), group=g, label=int(g != "cdr_0"), score=v) for i, (g, v) in enumerate(zip(groups, s))]
    a = M.group_aucs(rows)
    assert a["cdr_2"] == pytest.approx(1.0)
    assert a["cdr_0.5"] == pytest.approx(C.auroc([0, 0, 0, 1, 1], [0.1, 0.2, 0.3, 0.25, 0.35]))
    assert a["all"] == pytest.approx(C.auroc([0, 0, 0, 1, 1, 1, 1], s))
    assert a["all_stages"] == pytest.approx(a["all"])
    assert M.stage_order(["cdr_2", "cdr_0.5", "cdr_0", "cdr_1"]) == ["cdr_0", "cdr_0.5", "cdr_1", "cdr_2"]


def test_bad_flags_are_user_errors():
    with pytest.raises(C.UserError, match="--image-size 30 30"):
        M.parse_args(["--preset", "smoke", "--image-size", "30", "30"])
    with pytest.raises(C.UserError, match="--n-slices 4 is shorter than one window"):
        M.parse_args(["--preset", "smoke", "--n-slices", "4"])
    with pytest.raises(C.UserError, match="--dropout"):
        M.parse_args(["--preset", "smoke", "--dropout", "1.5"])


# ---- runs: one subprocess as a user types it, the rest in-process on one thread ------------------

@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def one_thread():
    """Byte-equal comparisons with the subprocess runs (OMP_NUM_THREADS=1) need one thread here too."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _argv(out, cache, *extra):
    return ["--preset", "smoke", "--out", str(out), "--cache-dir", str(cache), *extra]


def _subprocess(out, cache, *extra, **kw):
    return subprocess.Popen([sys.executable, "madgan.py", *_argv(out, cache, *extra)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, cache):
    """`python madgan.py --preset smoke`: the reference run of the tests below."""
    out = tmp_path_factory.mktemp("smoke") / "run"
    p = _subprocess(out, cache)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    return out


def _check_run(out, r, sa):
    for f in ["config.json", "results.json", "scores.csv", "last.pt", "roc.png", "scores.png",
              "examples.png", "losses.png", "auc_steps.png", "fig3_slices.png"]:
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert r["method"] == "madgan" and r["unit"] == "scan" and r["sa"] == sa
    assert 0 <= r["metrics"]["auroc"] <= 1
    assert {"atrophy_1", "atrophy_2", "atrophy_3", "normal"} <= set(r["groups"])
    assert {"all windows", "10 consecutive windows"} <= set(r["table1"])
    assert {"atrophy_1", "atrophy_2", "atrophy_3", "all_stages", "all"} <= set(r["table1"]["all windows"])
    assert r["table1"]["all windows"]["atrophy_3"] == pytest.approx(r["groups"]["atrophy_3"]["auroc"])
    assert "healthy validation" in r["operating_point"]["rule"]
    sys.path.insert(0, str(REPO.parent / "shared"))
    import check_contract
    res = check_contract.check(str(out))
    assert (res if isinstance(res, list) else res[0]) == []


def test_smoke_run_as_a_user_types_it(smoke):
    r = json.loads((smoke / "results.json").read_text())
    _check_run(smoke, r, 0)
    assert [e["step"] for e in r["auc_over_steps"]] == [0, 2, 4]          # Fig. 8 from the untrained G
    ck = C.load_checkpoint(smoke / "last.pt", "madgan")
    assert ck["loop"]["total_steps"] == 4 and set(ck["models"]) == set(ck["optims"]) == {"G", "D"}
    assert (smoke / "scores.csv").read_text().splitlines()[0] == (
        "id,group,label,score,score_all_windows,score_top10_windows,n_windows,"
        "baseline_intensity,baseline_zscore")


def test_resume_after_max_steps_equals_the_uninterrupted_run(smoke, cache, tmp_path, one_thread):
    stopped = tmp_path / "stopped"
    M.main(_argv(stopped, cache, "--max-steps", "2"))                      # scores what it has
    assert C.load_checkpoint(stopped / "last.pt", "madgan")["loop"]["total_steps"] == 2
    r = M.main(_argv(tmp_path / "resumed", cache, "--resume", str(stopped / "last.pt")))
    assert (tmp_path / "resumed" / "scores.csv").read_bytes() == (smoke / "scores.csv").read_bytes()
    full = json.loads((smoke / "results.json").read_text())
    assert r["auc_over_steps"] == full["auc_over_steps"]                   # Fig. 8 points 0, 2 (kept), 4


def test_checkpoint_scores_without_training(smoke, cache, tmp_path, one_thread):
    r = M.main(_argv(tmp_path / "scored", cache, "--checkpoint", str(smoke / "last.pt")))
    assert (tmp_path / "scored" / "scores.csv").read_bytes() == (smoke / "scores.csv").read_bytes()
    assert r["timing"]["train_s"] == 0 and [e["step"] for e in r["auc_over_steps"]] == [0, 2, 4]


def test_checkpoint_or_resume_of_another_script_is_one_clear_error(smoke, cache, tmp_path):
    ck = C.load_checkpoint(smoke / "last.pt")
    torch.save({**ck, "method": "anogan"}, tmp_path / "anogan.pt")
    for flag in ("--checkpoint", "--resume"):
        with pytest.raises(C.UserError, match=r"is not a last.pt of madgan.py \(it is one of anogan.py\)") as e:
            M.main(_argv(tmp_path / flag[2:], cache, flag, str(tmp_path / "anogan.pt")))
        assert "\n" not in str(e.value)
        with pytest.raises(C.UserError, match="other network settings") as e:
            M.main(_argv(tmp_path / f"{flag[2:]}_wide", cache, flag, str(smoke / "last.pt"), "--base-ch", "16"))
        assert "\n" not in str(e.value) and len(str(e.value)) < 400


def test_killed_run_resumes_exactly(cache, tmp_path, one_thread):
    """SIGKILL (no chance to save) after the first checkpoint; --resume of it = the uninterrupted run."""
    argv = ("--steps", "20", "--eval-every", "0")
    killed = tmp_path / "killed"
    p = _subprocess(killed, cache, *argv, "--ckpt-every", "1")
    t0 = time.time()
    while not (killed / "last.pt").is_file():
        assert p.poll() is None and time.time() - t0 < 240, p.communicate()[1][-3000:]
        time.sleep(0.02)
    p.kill()
    p.communicate()
    steps = C.load_checkpoint(killed / "last.pt", "madgan")["loop"]["total_steps"]
    assert 0 < steps < 20 and not (killed / "scores.csv").exists()        # killed mid-training
    M.main(_argv(tmp_path / "resumed", cache, *argv, "--resume", str(killed / "last.pt")))
    M.main(_argv(tmp_path / "full", cache, *argv))
    assert (tmp_path / "resumed" / "scores.csv").read_bytes() == (tmp_path / "full" / "scores.csv").read_bytes()


@pytest.mark.parametrize("sa", [3, 7])
def test_smoke_run_self_attention(tmp_path, cache, sa):
    r = M.main(_argv(tmp_path / f"sa{sa}", cache, "--sa", str(sa)))
    _check_run(tmp_path / f"sa{sa}", r, sa)
    assert len(r["sa_modules"]) == sa


def test_smoke_run_oasis3_fixture(tmp_path):
    from tests.fixtures import make_oasis3
    root = make_oasis3(tmp_path / "oasis3")
    out = tmp_path / "oasis_run"
    r = M.main(_argv(out, tmp_path / "cache", "--data", "oasis3", "--data-root", str(root)))
    assert r["unit"] == "scan" and r["data"] == "oasis3"
    assert {"cdr_0", "cdr_0.5", "cdr_1", "cdr_2"} <= set(r["groups"])        # normal = cdr_0 (label 0)
    assert "auroc" not in r["groups"]["cdr_0"] and "auroc" in r["groups"]["cdr_2"]
    assert {"all", "all_stages", "cdr_0.5", "cdr_1", "cdr_2"} <= set(r["table1"]["all windows"])
    rows = (out / "scores.csv").read_text().splitlines()
    assert rows[0].startswith("id,group,label,score")


def test_slice_windows_first_and_last():
    w = M.slice_windows(10, 3, 3)
    assert w[0] == 0 and w[-1] == 4 and len(w) == 5   # last window: inputs 4,5,6 -> targets 7,8,9
    assert len(M.slice_windows(5, 3, 3)) == 0


def test_smoke_reports_baselines_slabs_and_training(smoke):
    """Issue 15.5 (baselines per scored unit), 17.4 (a slab per scored scan, slabs.png), the Loop."""
    from tests.fixtures import check_report_extras
    check_report_extras(smoke)
