"""Several processes with torchrun + DistributedDataParallel, on CPU with the gloo backend.

The in-process tests start two real gloo processes (torch.multiprocessing) and check what DDP must
guarantee for the training loops: the processes see disjoint data (C.Batches, shared by every script), and the
averaged gradient equals a single-process step on the same global batch (madgan.py, fanogan3d.py). The subprocess tests run
the scripts the way a user does, `torchrun --nproc_per_node=2 X.py`, and load the checkpoint in a
single process (and a single-process checkpoint under torchrun).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import common as C
import fanogan3d as F
import madgan as M

REPO = Path(__file__).resolve().parents[1]
WORLD = 2


def _spawn(fn, tmp_path, *args):
    """Run fn(rank, *args) in WORLD gloo processes; an assertion in any of them fails the test."""
    mp.spawn(_worker, args=(fn, str(tmp_path / "pg"), args), nprocs=WORLD, join=True)


def _worker(rank, fn, init_file, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def _gather(obj):
    out = [None] * WORLD
    dist.all_gather_object(out, obj)
    return out


# ---- the data each process sees ---------------------------------------------------------------------

def _disjoint(rank, n, batch):
    """C.Batches (every script's minibatches): each process takes its own rows of one global batch."""
    assert C.ddp_world() == WORLD and C.ddp_rank() == rank
    b = C.Batches(n, batch, seed=3)
    assert b.global_batch == batch * WORLD and b.steps_per_epoch == n // (batch * WORLD)
    for it in range(2 * b.steps_per_epoch + 1):                        # over an epoch boundary
        epoch, pos = divmod(it, b.steps_per_epoch)
        glob = np.random.default_rng([3, 0, epoch]).permutation(n)[pos * batch * WORLD:(pos + 1) * batch * WORLD]
        both = _gather(next(b).tolist())
        assert len(both[0]) == len(both[1]) == batch and set(both[0]).isdisjoint(both[1])
        assert sorted(both[0] + both[1]) == sorted(glob.tolist())


def test_two_processes_see_disjoint_data(tmp_path):
    _spawn(_disjoint, tmp_path, 40, 4)


# ---- the averaged gradient equals one process on the whole batch --------------------------------------

def _grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def _madgan_step(rank):
    """The critic loss of madgan.py (Wasserstein + GP) and the generator's l1 term, under DDP."""
    torch.manual_seed(0)
    G = M.Generator(k_in=3, k_out=3, base=4, sa_at=(), dropout=0.5).eval()   # eval: no dropout, BN running stats
    D = M.Critic(k_in=3, k_out=3, base=4, sa_at=())
    G1, D1 = M.Generator(k_in=3, k_out=3, base=4, sa_at=(), dropout=0.5).eval(), M.Critic(k_in=3, k_out=3, base=4, sa_at=())
    G1.load_state_dict(G.state_dict())
    D1.load_state_dict(D.state_dict())
    torch.manual_seed(rank + 10)                                      # different init must be overwritten
    for p in list(G.parameters()) + list(D.parameters()):
        p.data.add_(0.01 * rank)
    G_, D_ = C.ddp_wrap(G, torch.device("cpu")), C.ddp_wrap(D, torch.device("cpu"))  # broadcasts rank 0's weights
    g = torch.Generator().manual_seed(1)
    cond, real, fake = (torch.rand(8, 3, 32, 32, generator=g) * 2 - 1 for _ in range(3))
    eps = torch.rand(8, 1, 1, 1, generator=g)
    idx = C.shard(torch.arange(8))

    def critic(Dm, i):
        return M.critic_loss(Dm(cond[i], real[i]), Dm(cond[i], fake[i])) + 10 * M.gradient_penalty(
            Dm, cond[i], real[i], fake[i], eps=eps[i])

    critic(D_, idx).backward()
    critic(D1, torch.arange(8)).backward()
    for a, b in zip(_grads(D), _grads(D1)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    M.l1_loss(real[idx], G_(cond[idx])).backward()
    M.l1_loss(real, G1(cond)).backward()
    for a, b in zip(_grads(G), _grads(G1)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _fanogan_step(rank):
    """fanogan3d.py's Eq. (2) critic loss under DDP, and the encoder loss Eq. (6) of step 2."""
    torch.manual_seed(0)
    kw = dict(size=16, width=4, dims=3)
    D, D1 = F.Critic(**kw), F.Critic(**kw)
    E, E1 = F.Encoder(latent_dim=8, **kw).eval(), F.Encoder(latent_dim=8, **kw).eval()
    G = F.Generator(latent_dim=8, **kw).eval()
    D1.load_state_dict(D.state_dict())
    E1.load_state_dict(E.state_dict())
    D_, E_ = C.ddp_wrap(D, torch.device("cpu")), C.ddp_wrap(E, torch.device("cpu"))
    g = torch.Generator().manual_seed(2)
    x, x_tilde = (torch.rand(4, 1, 16, 16, 16, generator=g) * 2 - 1 for _ in range(2))
    eps = torch.rand(4, 1, 1, 1, 1, generator=g)
    idx = C.shard(torch.arange(4))

    def critic(Dm, i):
        return F.critic_wasserstein_loss(Dm(x[i]), Dm(x_tilde[i])) + 10 * F.gradient_penalty(Dm, x[i], x_tilde[i], eps=eps[i])

    critic(D_, idx).backward()
    critic(D1, torch.arange(4)).backward()
    for a, b in zip(_grads(D), _grads(D1)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    F.set_trainable(G, False)
    F.set_trainable(D, False)

    def enc(Em, i):
        rec = G(Em(x[i]))
        return F.encoder_loss(x[i], rec, D.features(x[i]), D.features(rec), 1.0).mean()

    enc(E_, idx).backward()
    enc(E1, torch.arange(4)).backward()
    for a, b in zip(_grads(E), _grads(E1)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_madgan_gradient_average_equals_single_process_step(tmp_path):
    _spawn(_madgan_step, tmp_path)


def test_fanogan3d_gradient_average_equals_single_process_step(tmp_path):
    _spawn(_fanogan_step, tmp_path)


# ---- torchrun, as a user types it -------------------------------------------------------------------

def _torchrun(script, out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", script,
           "--preset", "smoke", "--device", "cpu", "--out", str(out), *extra]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    return p


def _contract(out):
    sys.path.insert(0, str(REPO.parent / "shared"))
    import check_contract
    res = check_contract.check(str(out))
    assert (res if isinstance(res, list) else res[0]) == []


def test_torchrun_madgan_writes_once_and_checkpoints_cross_over(tmp_path):
    out = tmp_path / "ddp"
    p = _torchrun("madgan.py", out)
    _contract(out)
    log = p.stdout + p.stderr
    assert log.count("wrote ") == 1 and log.count("AUROC ") == 1, log[-2000:]   # process 0 alone reports
    assert "x 2 processes = 8" in log                                            # effective batch 4 x 2
    assert json.loads((out / "config.json").read_text())["world_size"] == WORLD
    r = json.loads((out / "results.json").read_text())
    assert r["world_size"] == WORLD and r["effective_batch_size"] == 8
    assert [e["step"] for e in r["auc_over_steps"]] == [0, 2, 4]               # Fig. 8 via C.on_main
    assert not list(out.glob(".*tmp*"))                                          # no temp file left behind
    # the torchrun checkpoint scores in a single process, to the same AUROC
    r1 = M.main(["--preset", "smoke", "--out", str(tmp_path / "single"), "--checkpoint", str(out / "last.pt")])
    assert r1["metrics"]["auroc"] == pytest.approx(r["metrics"]["auroc"])
    # and a single-process checkpoint (stopped after 2 steps) finishes under torchrun
    M.main(["--preset", "smoke", "--out", str(tmp_path / "half"), "--max-steps", "2"])
    _torchrun("madgan.py", tmp_path / "resumed", "--resume", str(tmp_path / "half" / "last.pt"))
    assert C.load_checkpoint(tmp_path / "resumed" / "last.pt")["loop"]["total_steps"] == 4


def test_torchrun_fanogan3d_runs_and_scores_in_one_process(tmp_path):
    out = tmp_path / "ddp"
    p = _torchrun("fanogan3d.py", out)
    _contract(out)
    assert (p.stdout + p.stderr).count("wrote ") == 1
    r = json.loads((out / "results.json").read_text())
    assert r["world_size"] == WORLD and r["effective_batch_size"] == 2 * json.loads(
        (out / "config.json").read_text())["args"]["batch_size"]
    r1 = F.main(["--preset", "smoke", "--out", str(tmp_path / "single"), "--checkpoint", str(out / "last.pt")])
    assert r1["metrics"]["auroc"] == pytest.approx(r["metrics"]["auroc"])
