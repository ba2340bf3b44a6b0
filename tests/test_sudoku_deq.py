"""sudoku_deq.py: the implicit gradient is the true gradient of the fixed point, Anderson beats plain iteration,
the stability estimates match exact values, and a non-finite step rolls back or stops without a broken checkpoint."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import sudoku_deq as sq
import sudoku_gnn as sg
from common import parse_config

TINY = ["--device", "cpu", "--width", "16", "--msg_width", "16", "--train_iters", "3", "--iters", "3",
        "--batch_size", "8", "--n_test", "1", "--lr", "1e-2", "--warmup", "1"]


def contractive_map(seed, d=12, batch=3, norm=0.6):
    """f(h) = tanh(h W + x) with |W|_2 = norm < 1: a contraction with parameters W and x."""
    torch.manual_seed(seed)
    w = torch.randn(d, d)
    w = (norm * w / torch.linalg.matrix_norm(w, 2)).requires_grad_()
    x = torch.randn(batch, d, requires_grad=True)
    return (lambda h: torch.tanh(h @ w + x)), (w, x), torch.randn(batch, d)


def grad_of_fixed_point(f, params, c, backward, iters=60):
    """-> dL/dtheta for L = <h*, c>, and the adjoint solve's relative residual per row (None for phantom)."""
    cfg = sq.Config(train_iters=iters, backward=backward, device="cpu")
    h, _, adjoint_res = sq.equilibrium(f, torch.zeros_like(c), cfg)
    grad = torch.cat([g.flatten() for g in torch.autograd.grad((h * c).sum(), params)])
    return grad, adjoint_res[-1] if adjoint_res else None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_implicit_gradient_matches_unrolled_autograd(seed):
    """dL/dtheta from the adjoint solve equals autograd through 300 unrolled steps (0.6^300: exactly converged);
    the phantom gradient is a close but inexact approximation."""
    f, params, c = contractive_map(seed)
    h = torch.zeros_like(c)
    for _ in range(300):
        h = f(h)
    exact = torch.cat([g.flatten() for g in torch.autograd.grad((h * c).sum(), params)])
    implicit, adjoint_res = grad_of_fixed_point(f, params, c, "implicit")
    assert (implicit - exact).norm() / exact.norm() < 1e-5
    assert adjoint_res.shape == (len(c),) and adjoint_res.max() < 1e-6  # the logged residual says it converged
    # cut to 3 solver iterations, the gradient is off, and the adjoint residual shows it
    truncated, truncated_res = grad_of_fixed_point(f, params, c, "implicit", iters=3)
    assert (truncated - exact).norm() / exact.norm() > 1e-4 and truncated_res.min() > 1e-4
    phantom, phantom_res = grad_of_fixed_point(f, params, c, "phantom")
    assert phantom_res is None
    assert torch.cosine_similarity(phantom, exact, 0) > 0.95
    assert (phantom - exact).norm() / exact.norm() > 1e-3  # it really is a different (cheaper) estimate


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_anderson_needs_fewer_iterations_than_plain(seed):
    """On a slowly contracting map (spectral radius 0.95) Anderson reaches residual 1e-5 in well under 70% of the
    plain iterations, and both really get there."""
    torch.manual_seed(seed)
    w = torch.randn(40, 40)
    w = 0.95 * w / torch.linalg.eigvals(w).abs().max()
    x = 0.1 * torch.randn(4, 40)
    f = lambda h: torch.tanh(h @ w + x)
    n = {}
    for method in ("anderson", "plain"):
        h, res = sq.solve(f, torch.zeros(4, 40), 2000, method, 5, tol=1e-5)
        assert res[-1].max() < 1e-5 and (f(h) - h).norm() / h.norm() < 1e-4
        n[method] = len(res)
    assert n["anderson"] < 0.7 * n["plain"], n


def test_anderson_mixes_in_fp32_under_bf16_autocast():
    """Training solves under bf16 autocast on CUDA; the mixing's least-squares system must still be fp32, or its
    rounding (not the map) limits the residual. The map itself runs in fp32 here, so 1e-5 is reachable."""
    torch.manual_seed(0)
    w = torch.randn(40, 40)
    w, x = 0.95 * w / torch.linalg.eigvals(w).abs().max(), 0.1 * torch.randn(4, 40)

    def f(h):
        with torch.autocast("cpu", enabled=False):
            return torch.tanh(h.float() @ w + x)

    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 mixing: the residual stalls at 1e-3 to 1e-2
        h, res = sq.solve(f, torch.zeros(4, 40), 500, "anderson", 5, tol=1e-5)
    assert res[-1].max() < 1e-5 and h.dtype == torch.float32


def test_spectral_radius_matches_eigenvalues():
    """Power iteration on v^T J recovers max |eigenvalue| of a linear map: one with a known dominant real
    eigenvalue 0.9, and a random non-normal one whose largest eigenvalues are a complex pair."""
    torch.manual_seed(0)
    q = torch.randn(30, 30)
    j = q @ torch.diag(torch.cat([torch.tensor([0.9]), 0.5 * torch.rand(29)])) @ torch.linalg.inv(q)
    est = sq.spectral_radius(lambda h: h @ j.T, torch.zeros(3, 30))
    assert torch.allclose(est, torch.full((3,), 0.9), rtol=0.01), est
    j = 0.8 * torch.randn(30, 30) / 30 ** 0.5
    est = sq.spectral_radius(lambda h: h @ j.T, torch.zeros(3, 30), n_iter=200)
    assert torch.allclose(est, torch.linalg.eigvals(j).abs().max().expand(3), rtol=0.03), est


def test_jacobian_penalty_estimates_frobenius_norm():
    """For f(h) = h W^T the penalty's expectation is |W|_F^2 / dim (per puzzle); averaged over many draws."""
    torch.manual_seed(0)
    w = torch.randn(20, 20) * 0.3
    gen = torch.Generator().manual_seed(1)
    draws = [sq.jacobian_penalty(lambda h: h @ w.T, torch.zeros(50, 20), gen).item() for _ in range(40)]
    exact = (w ** 2).sum().item() / 20
    assert abs(sum(draws) / len(draws) - exact) < 0.05 * exact


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spectral_penalty_hits_the_largest_eigenvalue(seed):
    """For a linear map with dominant eigenvalue 1.2 (the rest <= 0.5) the penalty is (|u^T J| - 0.9)^2 with
    |u^T J| within 3% of 1.2 after 5 power steps (1% after 10 when J is far from normal); its gradient
    pushes that eigenvalue and hardly any other; a map with dominant eigenvalue 0.8 is (almost) not penalised."""
    gen = torch.Generator().manual_seed(seed)
    rest = 0.5 * torch.rand(29, generator=gen)
    near_normal = torch.linalg.qr(torch.randn(30, 30, generator=gen))[0] * (1 + torch.rand(30, generator=gen))
    for q, n_iter, rtol in ((near_normal, 5, 0.03), (torch.randn(30, 30, generator=gen), 10, 0.01)):
        for rho in (1.2, 0.8):
            lam = torch.cat([torch.tensor([rho]), rest]).requires_grad_()
            j = q @ torch.diag(lam) @ torch.linalg.inv(q)
            penalty = sq.spectral_penalty(lambda h: h @ j.T, torch.zeros(4, 30), gen, 0.9, n_iter)
            if rho < 1:
                assert penalty.item() < 0.03 ** 2, penalty
                continue
            assert abs(penalty.item() ** 0.5 + 0.9 - rho) < rtol * rho, penalty
            grad = torch.autograd.grad(penalty, lam)[0]
            assert grad[0] > 0.3 and grad[1:].abs().max() < 0.2 * grad[0], grad


def test_spectral_penalty_pulls_the_cell_radius_below_one():
    """The stabiliser's defining property on the real cell: with its candidate weights scaled up, the radius of
    df/dh at the fixed point is 1.2-1.4; a few optimiser steps on the default penalty alone bring it under 1 as
    measured by the 100-step power iteration, with the fixed point re-solved after every step."""
    torch.manual_seed(0)
    cfg = sq.Config(width=16, msg_width=16, device="cpu")
    model = sq.DEQ(cfg)
    with torch.no_grad():
        model.cell.from_h.weight[-cfg.width:].mul_(6)  # rows of the GRU candidate's h gate
    f = model.f(model.inject(torch.randint(0, 10, (4, 81))).detach())
    fixed_point = lambda: sq.solve(f, torch.zeros(4, 81, cfg.width), 40, "anderson", 5)[0]
    assert sq.spectral_radius(f, fixed_point(), n_iter=100).min() > 1.15
    opt = torch.optim.Adam(model.cell.parameters(), lr=2e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(15):
        loss = sq.spectral_penalty(f, fixed_point(), gen, cfg.rho_target, cfg.power_steps)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert sq.spectral_radius(f, fixed_point(), n_iter=100).max() < 0.95


class LiveMemory(TorchDispatchMode):
    """Bytes of tensor storage created while active and still alive; `peak`: the most at any moment. Storages
    freed before an op are dropped before its outputs are counted, so a reused address is counted anew."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for ptr in [p for p, (ref, _) in self.live.items() if torch.UntypedStorage._expired(ref)]:
            self.now -= self.live.pop(ptr)[1]
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.live:
                storage = t.untyped_storage()
                self.live[storage.data_ptr()] = storage._weak_ref(), storage.nbytes()
                self.now += storage.nbytes()
        self.peak = max(self.peak, self.now)
        return out


def peak_mb(loss_fn):  # peak memory of one training step: loss_fn() and its backward (weights not counted)
    with LiveMemory() as mem:
        loss_fn().backward()
    return mem.peak / 2 ** 20


def test_training_memory_does_not_grow_with_iterations():
    """At the default width, with the penalty on 1 of 8 puzzles (the default's share: 64 of 512), the peak memory
    of the DEQ's training step is the same with 8 or 32 solver iterations (the solve builds no graph), while
    sudoku_gnn's unrolled step needs over 3x more at 32 than at 8 iterations, and at 32 the DEQ needs under a
    quarter of it (the target for peak memory is <= 25%)."""
    torch.manual_seed(0)
    quiz, sol = torch.randint(0, 10, (8, 81)), torch.randint(1, 10, (8, 81))
    deq, gnn = {}, {}
    for iters in (8, 32):
        cfg = sq.Config(train_iters=iters, stab_batch=1, device="cpu")
        model, gen = sq.DEQ(cfg), torch.Generator().manual_seed(0)
        deq[iters] = peak_mb(lambda: sq.train_loss(model, quiz, sol, cfg, gen, None)[0])
        cfg = sg.Config(train_iters=iters, device="cpu")
        rrn = sg.RRN(cfg)
        gnn[iters] = peak_mb(lambda: sg.loss_fn(rrn(quiz, cfg.train_iters)[0], sol))
    print(f"training step peak memory, 8 puzzles: DEQ {deq[8]:.2f} / {deq[32]:.2f} MB, GNN {gnn[8]:.2f} / "
          f"{gnn[32]:.2f} MB at 8 / 32 iterations")
    assert deq[32] < 1.05 * deq[8]
    assert gnn[32] > 3 * gnn[8]
    assert deq[32] < 0.25 * gnn[32]


def test_stabiliser_sees_only_its_subset_of_the_batch():
    """--stab_batch k: the penalty is a function of the first k puzzles alone (other puzzles in the rest of the
    batch leave it unchanged), and the memory it adds to a training step shrinks with k."""
    torch.manual_seed(0)
    quiz, sol = torch.randint(0, 10, (8, 81)), torch.randint(1, 10, (8, 81))
    other = torch.cat([quiz[:2], torch.randint(0, 10, (6, 81))])
    cfg = sq.Config(width=16, msg_width=16, train_iters=6, stab_batch=2, rho_target=0.0, device="cpu")  # > 0
    model = sq.DEQ(cfg)

    def penalty(q):
        loss, ce = sq.train_loss(model, q, sol, cfg, torch.Generator().manual_seed(0), None)[:2]
        return (loss - ce).item()
    assert penalty(quiz) > 0 and penalty(quiz) == pytest.approx(penalty(other), rel=1e-5)
    mb = {}
    for k in (8, 1):
        cfg.stab_batch = k
        mb[k] = peak_mb(lambda: sq.train_loss(model, quiz, sol, cfg, torch.Generator().manual_seed(0), None)[0])
    none = sq.Config(**{**vars(cfg), "stabiliser": "none"})
    base = peak_mb(lambda: sq.train_loss(model, quiz, sol, none, None, None)[0])
    assert mb[1] - base < 0.25 * (mb[8] - base), (base, mb)


def nan_loss_on(calls, monkeypatch):
    """Make the training loss NaN on the given call numbers (1-based) of loss_fn; None = every call."""
    real, count = sq.loss_fn, [0]

    def loss_fn(logits, sol):
        count[0] += 1
        loss = real(logits, sol)
        return loss * float("nan") if calls is None or count[0] in calls else loss
    monkeypatch.setattr(sq, "loss_fn", loss_fn)


def test_nan_step_rolls_back_and_halves_lr(tmp_path, monkeypatch, capsys):
    nan_loss_on({3}, monkeypatch)
    # a batch larger than SPEC_N: the logged spectral radius uses the last SPEC_N puzzles of it
    results = sq.main(parse_config(sq.Config, TINY + ["--steps", "8", "--eval_every", "2", "--batch_size", "72",
                                                      "--out_dir", str(tmp_path)]))
    assert "rolled back" in capsys.readouterr().out
    assert results["headline"]["recoveries"] == 1
    assert len(results["cell_acc"]) == 3 and all(0 <= a <= 1 for a in results["cell_acc"])
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["lr_scale"] == 0.5 and ckpt["step"] == 8
    assert all(v.isfinite().all() for v in ckpt["model"].values())
    assert ckpt["log"]["step"] == [2.0, 6.0, 8.0]  # step 4 found the NaN and was rolled back, not logged
    assert all(v == v for v in ckpt["log"]["loss"])


def test_persistent_nan_stops_and_keeps_checkpoint(tmp_path, monkeypatch, capsys):
    sq.main(parse_config(sq.Config, TINY + ["--steps", "2", "--eval_every", "0", "--out_dir", str(tmp_path)]))
    before = (tmp_path / "ckpt.pt").read_bytes()
    nan_loss_on(None, monkeypatch)
    with pytest.raises(SystemExit) as e:
        sq.main(parse_config(sq.Config, TINY + ["--steps", "20", "--eval_every", "1", "--resume", "--out_dir",
                                                str(tmp_path)]))
    assert e.value.code == 1
    out = capsys.readouterr().out
    assert out.count("rolled back") == sq.MAX_RECOVERIES and "stopped: non-finite" in out
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    # the solver drives training too: a resume may not switch it (an evaluation with --ckpt may)
    with pytest.raises(SystemExit) as e:
        sq.main(parse_config(sq.Config, TINY + ["--steps", "4", "--solver", "plain", "--resume", "--out_dir",
                                                str(tmp_path)]))
    assert e.value.code == 2 and "--solver plain" in capsys.readouterr().err


def test_forward_converges_and_wrong_checkpoint_exits_2(tmp_path, capsys):
    """The untrained cell is contractive: the residual falls over the solver iterations; weights that do not fit
    the saved config are a one-line error."""
    torch.manual_seed(0)
    model = sq.DEQ(sq.Config(width=16, msg_width=16, device="cpu")).eval()
    quiz = torch.randint(0, 10, (4, 81))
    _, res, _ = model(quiz, 20)
    assert (res[-1] < 1e-3 * res[0]).all(), res[:, 0]
    sq.main(parse_config(sq.Config, TINY + ["--steps", "1", "--eval_every", "0", "--out_dir", str(tmp_path)]))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    ckpt["config"]["width"] = 24
    torch.save(ckpt, tmp_path / "wrong.pt")
    with pytest.raises(SystemExit) as e:
        sq.main(parse_config(sq.Config, ["--ckpt", str(tmp_path / "wrong.pt"), "--device", "cpu",
                                         "--out_dir", str(tmp_path / "o")]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error:") and "do not fit" in err, err
