"""Sudoku as a deep-equilibrium model: solve h = f(h, x) with a root finder, train with the implicit gradient.

The cell f is one message-passing iteration of the sudoku_gnn.py family (a message MLP over each cell's 20 peers
whose first layer is split into per-node projections A h_i + B h_j, summed without a gather, then a GRU update that
re-reads the input). Instead of unrolling it and back-propagating through every iteration, the forward pass finds
the fixed point h* with Anderson acceleration (or plain iteration) without an autograd graph, and the backward
pass solves the adjoint fixed point g = g df/dh + dL/dh* with the same solver (implicit function theorem; Bai et
al. 2019). One graph of f at h* serves both the parameters' gradient and the adjoint's vector-Jacobian products,
and the stabiliser below works on --stab_batch puzzles of the batch, so training memory does not grow with the
number of iterations: the peak of one training step of 8 puzzles at the default width (penalty on 1 of them, the
default's share) is 14.7 MB with 8 or 32 solver iterations alike, against 29.9 / 98.9 MB for sudoku_gnn's unrolled
step at 8 / 32 iterations (15% at 32; eager, CPU; tests/test_sudoku_deq.py). A phantom gradient (a few damped
steps of f from h* with autograd; Geng et al. 2021) is the cheaper alternative behind --backward phantom. The
loss is taken at the fixed point only (there is no unrolled trajectory to put one on), and test-time compute is
simply more solver iterations.

DEQs can train well and then suddenly collapse when the fixed point stops being attracting (the spectral radius
of df/dh grows past 1). So the training log tracks the relative residual |f(h) - h| / |f(h)| of the forward
and of the adjoint solve (the gradient is the implicit one only as far as the latter converges), the iterations
needed to reach 1e-3 and a power-iteration estimate of the spectral radius of df/dh at h*. The stabiliser on by
default penalises that radius above --rho_target: --power_steps power steps find the dominant direction u, and
|u^T df/dh| goes into the loss, computed on the first --stab_batch puzzles of each (random) batch in a graph of
their own, so its memory and time do not grow with the batch; the log's radius comes from the last 64 puzzles,
which it did not touch (at batches of 128 or more). The target sits well below 1 because the top of this
spectrum is a cluster of near-equal eigenvalues, so a short power iteration reads low: with 5 steps and a target
of 0.9 it read 0.87 where 100 steps read 1.00, the penalty hardly fired and the radius stayed at 1.00-1.03.
--stabiliser jacobian is the Frobenius-norm penalty of Bai et al. 2021 and --stabiliser none the ablation. A
damped update h <- (1-a) h + a f(h) would not help (it moves an eigenvalue l to 1 - a + a l, still above 1 for a
real l > 1), and a contraction by construction would have to bound every weight on the h path and keep the GRU's
update gate z off 1 (df/dh contains diag(z)), far more than keeping the radius under 1 where the fixed points are.
A non-finite loss or weight (checked every CHECK_EVERY = 100 steps and at log steps, so as not to wait for the
device every step) rolls the model back to the last good state, up to 100 steps back, and halves the learning rate;
after 3 such recoveries the run stops with a message, and ckpt.pt keeps the last log step's save, if any.
Test-time compute: the RRN test solved rate (and share of blank cells right) after k = 1..--iters solver
iterations, per givens count 17..34 (--eval_set validation to choose settings).

Headline (32 solver iterations in training, 64 at test):
    python sudoku_deq.py --iters 64
GPU result: not yet measured.
CPU-scale stability study (easy puzzles, small model), 1 thread, seeds 0 and 1:
    python sudoku_deq.py --device cpu --width 32 --msg_width 32 --min_givens 34 --max_givens 45 --train_iters 12 \\
        --iters 24 --steps 400 --batch_size 32 --lr 3e-3 --warmup 30 --n_test 20 --eval_every 50 \\
        --seed S [--stabiliser X]
    CPU result (shared 2-core machine): the default holds the spectral radius on the training batch at 0.82-0.87
    (max 0.91 / 0.92; 100 power steps), --stabiliser none lets it reach 1.14-1.19 (seed 0); blank cells right on
    the RRN test after 24 and 64 iterations 51.9%, 51.9% / 52.8%, 52.8% vs 33.8%, 27.6% / 32.6%, 26.9% (without the
    stabiliser more iterations lose cells). At 3x the steps, seeds 0-2: no collapse, radius <= 0.96 at every logged
    step. No RRN test puzzle is solved at this scale.
    At sudoku_gnn's CPU flags and its training wall-clock the default solves nothing (0.0% where the GNN solves
    98.0% of 30-34 givens and 55.0% of all); --stab_weight 1 --lr 1e-2 solves 49-52% / 16% (3 seeds) with the
    radius at 1.02-1.05, held at 1 rather than under it, and 52-72% / 17-24% with --stab_batch 8 (the penalty on a
    quarter of each batch of 32: 1.5x the steps in the same time). Why: sudoku_gnn's own solutions sit at spectral
    radius 0.99 where it solves them and above 1 on harder puzzles, and this cell trained unrolled, then solved as a
    DEQ, reaches 89.0% / 43.9% at radius 1.17: what the unrolled net learns at this scale is barely attracting, and
    holding the radius at 0.8 rules it out. Every run, ablation and not-kept idea: README, "sudoku_deq.py".
"""
import itertools
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import (StopAfterStep, autocast, device_name, eval_config, fp32, load_checkpoint, load_weights,
                    log_progress, maybe_compile, parse_config, peak_mem_gb, pick_device, pick_dtype, plot_acc_vs_iters,
                    resume_checkpoint, rng_state, save_checkpoint, set_generator_state, set_rng_state, set_seed, sync,
                    write_results)
from sudoku_data import EVAL_SETS, RRN_VAL, groups_to_device, load_test_set, peer_relu_sum, sample_batch, train_pool


@dataclass
class Config:
    # data
    min_givens: int = 17  # training puzzles have U[min_givens, max_givens] givens
    max_givens: int = 34
    curriculum: float = 0.2  # fraction of steps over which the lowest givens count falls from max to min_givens
    # model
    width: int = 96  # node state size d
    msg_width: int = 96  # hidden units of the message MLP on each edge
    pos: bool = True  # learned position embedding added to the digit embedding
    # solver
    solver: str = field(default="anderson", metadata={"choices": ("anderson", "plain")})
    anderson_m: int = 5  # Anderson mixes the last m iterates
    tol: float = 0.0  # training solves stop once every relative residual is below this; 0 = the full budget
    backward: str = field(default="implicit", metadata={"choices": ("implicit", "phantom")})
    phantom_steps: int = 5  # --backward phantom: damped steps of f with autograd from the fixed point
    # stabiliser: a penalty on df/dh at h*; "none" is the ablation
    stabiliser: str = field(default="spectral", metadata={"choices": ("spectral", "jacobian", "none")})
    stab_weight: float = 10.0  # weight of the penalty in the loss
    rho_target: float = 0.8  # --stabiliser spectral: penalise the spectral radius above this
    power_steps: int = 20  # --stabiliser spectral: power-iteration steps that find the direction to penalise
    stab_batch: int = 64  # the penalty is computed on this many puzzles of each batch (its own small graph)
    # training
    train_iters: int = 32  # solver iterations in training, forward and adjoint
    steps: int = 30000
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 500  # linear warm-up steps, then cosine decay to lr/10
    seed: int = 0
    # evaluation
    iters: int = 64  # solver iterations at test; the solved rate is reported after every one
    eval_set: str = field(default="test", metadata={"choices": tuple(EVAL_SETS)})  # choose settings on validation
    n_test: int = 0  # evaluation puzzles per givens count; 0 = all
    eval_every: int = 1000  # log loss, validation solved rate and the stability numbers; 0 = only at the end
    # system
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = True
    out_dir: str = "out/sudoku_deq"
    resume: bool = False
    ckpt: str = ""  # evaluate this checkpoint instead of training

    def __post_init__(self):
        if not 17 <= self.min_givens <= self.max_givens <= 81:
            raise ValueError(f"need 17 <= --min_givens <= --max_givens <= 81, got {self.min_givens}, {self.max_givens}")
        if not 0 <= self.curriculum <= 1:
            raise ValueError(f"--curriculum must be in [0, 1], got {self.curriculum}")
        if min(self.msg_width, self.anderson_m, self.phantom_steps, self.power_steps, self.stab_batch) < 1:
            raise ValueError("--msg_width, --anderson_m, --phantom_steps, --power_steps and --stab_batch must be >= 1")
        if min(self.tol, self.stab_weight, self.rho_target, self.warmup) < 0:
            raise ValueError("--tol, --stab_weight, --rho_target and --warmup must be >= 0")


EVAL_FLAGS = ("iters", "eval_set", "n_test", "solver", "anderson_m", "device", "dtype", "compile", "out_dir", "ckpt")
EVAL_BATCH = 1024  # puzzles per evaluation solve (Anderson keeps 2m states of each)
VAL_N = 50  # validation puzzles per givens count for the --eval_every log
SPEC_N = 64  # puzzles in each logged spectral-radius estimate
LOG_TOL = 1e-3  # "solver iterations" in the log = iterations until the relative residual is below this
PHANTOM_TAU = 0.5  # damping of the phantom-gradient steps
CHECK_EVERY = 100  # steps between the finiteness checks (each waits for the device once)
MAX_RECOVERIES = 3
PLOT_GROUPS = ("17", "20", "23", "26", "30", "34")


# ---------------------------------------------------------------- root finder and implicit backward

def iterates(f, x, method="anderson", m=5, lam=1e-4):
    """Yields (x_k, f(x_k)) for k = 1, 2, ...  Plain iteration: x_{k+1} = f(x_k). Anderson: x_{k+1} = sum_i a_i
    f(x_i) over the last m iterates, with weights a (summing to 1) that make the mixed residual
    sum_i a_i (f(x_i) - x_i) smallest: a = H^-1 1 / (1^T H^-1 1), H = G G^T + ridge (G = stacked residuals).
    The last m values of f and residuals live in two fixed buffers, the newest overwriting the oldest (the mix
    does not depend on their order): no stacking copies in every iteration."""
    shape = x.shape
    x = x.float().flatten(1)  # (B, N): each puzzle is its own fixed-point problem, mixed with its own weights
    fs = gs = None
    for k in itertools.count():
        fx = f(x.view(shape)).float().flatten(1)  # fp32: the mixing solves a small linear system
        yield x.view(shape), fx.view(shape)
        if method == "plain":
            x = fx
            continue
        if fs is None:
            fs, gs = torch.empty(2, len(x), m, x.shape[1], device=x.device)  # (B, m, N) each
        fs[:, k % m], gs[:, k % m] = fx, fx - x
        n = min(k + 1, m)
        with fp32(x.device):  # a bf16 mix would stall the residual near 1e-3
            g = gs[:, :n]  # (B, n, N)
            h = g @ g.transpose(1, 2)  # (B, n, n)
            ridge = lam * h.diagonal(dim1=1, dim2=2).mean(1) + 1e-10  # relative, so it fits any residual scale
            h = h + ridge[:, None, None] * torch.eye(n, device=x.device)
            a = torch.linalg.solve_ex(h, torch.ones_like(h[..., :1]))[0]  # _ex: no error check, no GPU wait
            x = (a / a.sum(1, keepdim=True)).transpose(1, 2).bmm(fs[:, :n]).squeeze(1)


def rel_residual(x, fx):  # -> (B,) |f(x) - x| / |f(x)| per puzzle
    return (fx - x).flatten(1).norm(dim=1) / (fx.flatten(1).norm(dim=1) + 1e-8)


def solve(f, x0, max_iter, method, m, tol=0.0):
    """Run the root finder without autograd. -> the last f(x) (the fixed-point estimate) and the relative residual
    after every iteration (k, B). tol > 0 stops early, at the price of waiting for the device every iteration."""
    res = []
    with torch.no_grad():
        for k, (x, fx) in enumerate(iterates(f, x0, method, m), 1):
            res.append(rel_residual(x, fx))
            if k == max_iter or tol > 0 and res[-1].max() < tol:
                return fx, torch.stack(res)


def equilibrium(f, h0, cfg, f_fast=None):
    """The DEQ layer: h* = f(h*) found without a graph, returned with a gradient to f's parameters, the residual
    history (k, B), and a list into which the backward pass puts the adjoint solve's last relative residual (B,):
    how close the gradient is to the implicit one (empty with the phantom gradient). f_fast (e.g. a compiled f)
    serves the graph-free forward solve."""
    h_star, res = solve(f_fast or f, h0, cfg.train_iters, cfg.solver, cfg.anderson_m, cfg.tol)
    adjoint_res = []
    if cfg.backward == "phantom":  # a few damped steps with autograd stand in for (I - df/dh)^-1
        h = h_star
        for _ in range(cfg.phantom_steps):
            h = (1 - PHANTOM_TAU) * h + PHANTOM_TAU * f(h)
        return h, res, adjoint_res
    h_in = h_star.requires_grad_()
    h = f(h_in)  # one step with autograd: the parameters' gradient is g df/dtheta at h*

    def adjoint(grad):  # dL/dh -> g solving g = g df/dh + dL/dh (implicit function theorem)
        def step(g):  # a vector-Jacobian product through the same graph, before the backward frees it
            return torch.autograd.grad(h, h_in, g.to(h.dtype), retain_graph=True)[0] + grad
        g, g_res = solve(step, grad, cfg.train_iters, cfg.solver, cfg.anderson_m, cfg.tol)
        adjoint_res.append(g_res[-1])
        return g.to(grad.dtype)

    out = h.view_as(h)  # the hook goes on a view: on h itself the products above would call it again
    out.register_hook(adjoint)
    return out, res, adjoint_res


def jacobian_penalty(f, h_star, generator):
    """Hutchinson estimate of |df/dh|_F^2 / dim at h*: E|v^T J|^2 for v ~ N(0, I). Keeps the map contractive on
    average, which pulls the spectral radius down without constraining the weights."""
    h = h_star.detach().requires_grad_()
    v = torch.randn(h.shape, generator=generator, device=h.device)
    vj = torch.autograd.grad(f(h), h, v.to(h.dtype), create_graph=True)[0]
    return vj.float().pow(2).sum() / v.numel()


def unit(v):  # each puzzle's vector scaled to norm 1
    return v / v.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *[1] * (v.dim() - 1))


def spectral_penalty(f, h_star, generator, target, n_iter):
    """(|u^T J| - target)_+^2, mean over puzzles, with u from n_iter power-iteration steps on v -> v^T J (no graph):
    u is close to J's dominant left eigenvector, where |u^T J| = |largest eigenvalue|. Only that direction is
    pushed, so the rest of the Jacobian (e.g. GRU gates near 1 that keep a cell's digit) is left alone. The top of
    the cell's spectrum is a cluster of near-equal eigenvalues, so a short power iteration lands on a mix of them
    and reads low: the target sits below 1 by more than that shortfall."""
    h = h_star.detach().requires_grad_()
    fh = f(h)
    u = torch.randn(h.shape, generator=generator, device=h.device)
    for _ in range(n_iter):
        u = torch.autograd.grad(fh, h, unit(u).to(fh.dtype), retain_graph=True)[0]
    uj = torch.autograd.grad(fh, h, unit(u).to(fh.dtype), create_graph=True)[0]
    return F.relu(uj.float().flatten(1).norm(dim=1) - target).pow(2).mean()


def spectral_radius(f, h_star, n_iter=100, seed=0):
    """Power iteration on v -> v^T df/dh at h*, per puzzle: the geometric-mean growth of |v| over the last half of
    the iterations estimates the largest |eigenvalue| (a complex pair makes single ratios oscillate). It reads low
    where the top of the spectrum is a cluster: at width 16, against the exact eigenvalues, 100 steps read 0.892 /
    0.901 / 1.011 for 0.906 / 0.905 / 1.023 (30 steps: 0.872 / 0.872 / 0.994). -> (B,)"""
    gen = torch.Generator(device=h_star.device).manual_seed(seed)  # its own stream: logging leaves training alone
    with torch.enable_grad():
        h = h_star.detach().float().requires_grad_()
        fh = f(h).float()
        v, logs = torch.randn(h.shape, generator=gen, device=h.device), []
        for _ in range(n_iter):
            v = torch.autograd.grad(fh, h, unit(v), retain_graph=True)[0]
            logs.append(v.flatten(1).norm(dim=1).clamp_min(1e-30).log())
    return torch.stack(logs[n_iter // 2:]).mean(0).exp().detach()


# ---------------------------------------------------------------- model

class Cell(nn.Module):
    """f(h, x): messages over the 20 peers, averaged, then a GRU update whose input is (messages, givens)."""

    def __init__(self, cfg):
        super().__init__()
        d, m = cfg.width, cfg.msg_width
        self.m = m
        self.from_h = nn.Linear(d, 2 * m + 3 * d)  # A h_i, B h_j (first message layer, split) and the GRU's h gates
        self.from_msg = nn.Linear(m, 3 * d, bias=False)  # second message layer folded into the GRU's input gates

    def forward(self, h, x_gates):  # h (B, 81, d), x_gates (B, 81, 3d)
        a, b, h_gates = self.from_h(h).split([self.m, self.m, 3 * h.shape[-1]], -1)
        gates = x_gates + self.from_msg(peer_relu_sum(a, b) / 20)  # (B, 81, 3d): the mean message
        r_x, z_x, n_x = gates.chunk(3, -1)
        r_h, z_h, n_h = h_gates.chunk(3, -1)
        r, z = torch.sigmoid(r_x + r_h), torch.sigmoid(z_x + z_h)
        n = torch.tanh(n_x + r * n_h)
        return (1 - z) * n + z * h  # a convex mix of tanh values: f maps into (-1, 1), so a fixed point exists


class DEQ(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.width
        self.digit = nn.Embedding(10, d)  # 0 = blank
        self.pos = nn.Parameter(torch.randn(81, d) * 0.1) if cfg.pos else None
        self.x_gates = nn.Linear(d, 3 * d)  # input injection: the same projection at every call of f
        self.cell = Cell(cfg)
        self.head = nn.Linear(d, 9)

    def inject(self, quiz):  # (B, 81) 0..9 -> (B, 81, 3d)
        return self.x_gates(self.digit(quiz) + (self.pos if self.pos is not None else 0))

    def f(self, x_gates, cell=None):  # h -> f(h, x); `cell` may be a compiled self.cell
        cell = self.cell if cell is None else cell  # not `cell or ...`: a compiled module has no truth value
        return lambda h: cell(h, x_gates)

    @torch.no_grad()
    def forward(self, quiz, iters, method="anderson", m=5, cell=None):
        """quiz (B, 81) -> logits after each of `iters` solver iterations (iters, B, 81, 9), the relative residual
        after each (iters, B) and the last state (B, 81, d)."""
        x_gates = self.inject(quiz)
        h0 = torch.zeros(*quiz.shape, x_gates.shape[-1] // 3, device=quiz.device)
        logits, res = [], []
        for _, (x, fx) in zip(range(iters), iterates(self.f(x_gates, cell), h0, method, m)):
            logits.append(self.head(fx))
            res.append(rel_residual(x, fx))
        return torch.stack(logits), torch.stack(res), fx


def loss_fn(logits, sol):  # logits (B, 81, 9) at the fixed point, sol (B, 81) 1..9
    return F.cross_entropy(logits.float().flatten(0, 1), (sol - 1).flatten())


def train_loss(model, quiz, sol, cfg, generator, fast_cell):
    """-> (total loss, cross-entropy, residual history (k, B), h* and its injection for the stability log, and the
    list that the backward pass fills with the adjoint's residual)."""
    x_gates = model.inject(quiz)  # (B, 81, 3d)
    h0 = torch.zeros(*quiz.shape, cfg.width, device=quiz.device)
    h, res, adjoint_res = equilibrium(model.f(x_gates), h0, cfg, f_fast=model.f(x_gates, fast_cell))
    ce = loss_fn(model.head(h), sol)
    loss = ce
    f_sub, h_sub = model.f(x_gates[:cfg.stab_batch]), h[:cfg.stab_batch]  # a random subset: batches are random
    if cfg.stabiliser == "jacobian":
        loss = ce + cfg.stab_weight * jacobian_penalty(f_sub, h_sub, generator)
    elif cfg.stabiliser == "spectral":
        loss = ce + cfg.stab_weight * spectral_penalty(f_sub, h_sub, generator, cfg.rho_target, cfg.power_steps)
    return loss, ce.detach(), res, h.detach(), x_gates.detach(), adjoint_res


# ---------------------------------------------------------------- evaluation

def evaluate(model, test, cfg, iters, dtype, cell=None, radius=True):
    """Solved rate after each solver iteration 1..iters per givens count and overall; mean residual per iteration;
    spectral radius at the final state of the first SPEC_N puzzles of the first group (the fewest givens; None
    without `radius`); share of blank cells right after each iteration (it moves long before puzzles are solved)."""
    acc, solved, res, first, cells, blanks = {}, [], [], None, 0, 0
    for g, (quiz, sol) in test.items():
        correct = []
        for i in range(0, len(quiz), EVAL_BATCH):
            with autocast(quiz.device, dtype):
                logits, r, h = model(quiz[i:i + EVAL_BATCH], iters, cfg.solver, cfg.anderson_m, cell)
            right = logits.argmax(-1) + 1 == sol[i:i + EVAL_BATCH]  # (iters, b, 81)
            correct.append(right.all(-1))  # (iters, b)
            blank = quiz[i:i + EVAL_BATCH] == 0
            cells, blanks = cells + (right & blank).sum((1, 2)), blanks + blank.sum()
            res.append(r)
            first = first or (quiz[i:i + SPEC_N], h[:SPEC_N])
        correct = torch.cat(correct, 1)  # (iters, N)
        acc[str(g)] = correct.float().mean(1).tolist()
        solved.append(correct)
    acc["all"] = torch.cat(solved, 1).float().mean(1).tolist()
    rho = None
    if radius:
        with autocast(first[0].device, dtype):
            rho = spectral_radius(model.f(model.inject(first[0])), first[1])
    return acc, solved, torch.cat(res, 1).mean(1).tolist(), rho, (cells / blanks).tolist()


def plot_stability(path, log, title):
    """Validation solved rate, relative residual and spectral radius of df/dh over training."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    axes[0].plot(log["step"], log["val_solved"], label="validation puzzles solved")
    axes[0].plot(log["step"], log["train_cell_acc"], label="training blank cells right")
    axes[0].set(ylabel="accuracy at train_iters", ylim=(-0.02, 1.02))
    axes[0].legend(fontsize=8)
    axes[1].semilogy(log["step"], log["residual"], label="forward")
    axes[1].semilogy(log["step"], log["adjoint_residual"], label="adjoint (backward)")
    axes[1].set(ylabel="relative residual after train_iters")
    axes[2].plot(log["step"], log["spectral_radius"], label="mean")
    axes[2].plot(log["step"], log["spectral_radius_max"], label="max")
    axes[2].axhline(1.0, color="gray", linestyle="--")
    axes[2].set(ylabel="spectral radius of df/dh at h*")
    for ax in axes:
        ax.set(xlabel="step")
    axes[1].legend(fontsize=8), axes[2].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- main

def all_finite(tensors):
    return bool(torch.stack([t.float().isfinite().all() for t in tensors]).all())


def main(cfg):
    saved = None
    if cfg.ckpt:
        saved = load_checkpoint(cfg.ckpt, Config, EVAL_FLAGS)
        cfg = eval_config(Config, saved["config"], cfg, EVAL_FLAGS)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    set_seed(cfg.seed)
    model = DEQ(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    data_gen = torch.Generator(device=device).manual_seed(cfg.seed)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    step, time_before, lr_scale, recoveries = 0, 0.0, 1.0, 0
    log = {k: [] for k in ("step", "loss", "train_cell_acc", "val_solved", "residual", "solver_iters",
                           "spectral_radius", "spectral_radius_max", "lr_scale", "adjoint_residual")}
    may_change = [f for f in EVAL_FLAGS if f not in ("solver", "anderson_m")]  # those two also drive training
    state = resume_checkpoint(ckpt_path, Config, cfg, may_change) if cfg.resume and not cfg.ckpt else saved
    if state is not None:
        load_weights(model, state["model"])
        log, recoveries = state["log"], state["recoveries"]  # --ckpt reports them too
        log.setdefault("adjoint_residual", [math.nan] * len(log["step"]))  # not logged before this version
        if not cfg.ckpt:
            opt.load_state_dict(state["optimizer"])
            step, time_before, lr_scale = state["step"], state["train_time_s"], state["lr_scale"]
            set_generator_state(data_gen, state["data_rng"])
            set_rng_state(state["rng"])
    fast_cell = maybe_compile(model.cell, cfg.compile, device)  # graph-free solves only: no double backward
    print(f"{sum(p.numel() for p in model.parameters())} parameters, width {cfg.width}, solver {cfg.solver}, "
          f"backward {cfg.backward}, stabiliser {cfg.stabiliser}, givens {cfg.min_givens}-{cfg.max_givens}")

    def snapshot(elapsed):
        return {"model": model.state_dict(), "optimizer": opt.state_dict(), "config": asdict(cfg), "step": step,
                "results": {}, "rng": rng_state(), "data_rng": data_gen.get_state(), "log": log,
                "lr_scale": lr_scale, "recoveries": recoveries, "train_time_s": time_before + elapsed}

    def copy_state():  # in memory, on the device: the state to roll back to after a non-finite step
        return {k: v.clone() for k, v in model.state_dict().items()}, {
            "state": {p: {k: v.clone() for k, v in s.items()} for p, s in opt.state_dict()["state"].items()},
            "param_groups": opt.state_dict()["param_groups"]}

    if not cfg.ckpt:
        pool_quiz, pool_sol = (torch.from_numpy(a).to(device) for a in train_pool())
        val = groups_to_device(load_test_set(RRN_VAL, min(VAL_N, cfg.n_test or VAL_N)), 0, device)  # --n_test caps it
    sync(device)
    t0, start, eval_s, train_peak, good = time.time(), step, 0.0, 0.0, copy_state()
    if not cfg.ckpt:
        bar = tqdm(range(step, cfg.steps), initial=step, total=cfg.steps, file=sys.stdout, disable=None)
        with StopAfterStep() as stop:
            for i in bar:
                if stop.requested:  # the last step is whole: stop here
                    break
                frac = max(0.0, (i - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
                for g in opt.param_groups:
                    g["lr"] = lr_scale * cfg.lr * min(1.0, (i + 1) / max(1, cfg.warmup)) * (
                        0.55 + 0.45 * math.cos(math.pi * frac))
                # curriculum: start on easy puzzles, let the fewest givens fall to min_givens over the first steps
                ramp = min(1.0, i / max(1.0, cfg.curriculum * cfg.steps))
                lo = round(cfg.max_givens - ramp * (cfg.max_givens - cfg.min_givens))
                quiz, sol = sample_batch(pool_quiz, pool_sol, cfg.batch_size, data_gen, lo, cfg.max_givens)
                with autocast(device, dtype):
                    loss, ce, res, h_star, x_gates, adjoint_res = train_loss(model, quiz, sol, cfg, data_gen,
                                                                             fast_cell)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                step = i + 1
                is_log = cfg.eval_every and step % cfg.eval_every == 0 or step == cfg.steps
                if not (is_log or step % CHECK_EVERY == 0 or stop.requested):
                    continue
                # a check step (and before an interrupt's checkpoint): the only place the loop waits for the device
                if not all_finite([loss] + list(model.parameters())):
                    recoveries += 1
                    if recoveries > MAX_RECOVERIES:
                        print(f"stopped: non-finite loss or weights at step {step} after {MAX_RECOVERIES} "
                              f"recoveries (lr now x{lr_scale:g}); {ckpt_path} keeps the last log step's save, if any")
                        sys.exit(1)
                    model.load_state_dict(good[0])
                    opt.load_state_dict(good[1])
                    good = copy_state()  # the optimizer now shares good's tensors, and its steps update them in place
                    lr_scale /= 2
                    print(f"step {step}: non-finite loss or weights; rolled back to the last good state, "
                          f"lr x{lr_scale:g}")
                    continue
                good = copy_state()
                if not is_log:
                    continue
                sync(device)
                t_eval = time.time()
                train_peak = max(train_peak, peak_mem_gb(device) or 0.0)
                speed = (step - start) * cfg.batch_size / (t_eval - t0 - eval_s)
                model.eval()
                with autocast(device, dtype):
                    rho = spectral_radius(model.f(x_gates[-SPEC_N:]), h_star[-SPEC_N:])  # unpenalised at batches >= 128
                val_acc = evaluate(model, val, cfg, cfg.train_iters, dtype, fast_cell, radius=False)[0]["all"][-1]
                with torch.no_grad():  # blank cells right at h*: moves long before whole puzzles are solved
                    cell_acc = ((model.head(h_star).argmax(-1) + 1 == sol) & (quiz == 0)).sum() / (quiz == 0).sum()
                model.train()
                iters_to_tol = ((res >= LOG_TOL).sum(0) + 1).clamp(max=len(res)).float().mean()
                adjoint = adjoint_res[-1].mean() if adjoint_res else math.nan  # the phantom gradient solves none
                for k, v in zip(log, (step, ce, cell_acc, val_acc, res[-1].mean(), iters_to_tol, rho.mean(), rho.max(),
                                      lr_scale, adjoint)):
                    log[k].append(float(v))
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)  # the next reading covers training steps only
                save_checkpoint(ckpt_path, snapshot(time.time() - t0))  # a crash loses at most eval_every steps
                eval_s += time.time() - t_eval
                log_progress(bar, step, loss=f"{ce.item():.4f}", val_solved=f"{val_acc:.3f}",
                             res=f"{log['residual'][-1]:.1e}", adjoint_res=f"{log['adjoint_residual'][-1]:.1e}",
                             rho=f"{log['spectral_radius'][-1]:.2f}", samples_per_s=f"{speed:.0f}")
            bar.close()
            save_checkpoint(ckpt_path, snapshot(time.time() - t0))  # before evaluating: a kill then keeps the training
        if stop.requested:
            print(f"interrupted: checkpoint at step {step} saved to {ckpt_path}")
            sys.exit(130)
    sync(device)
    elapsed = time.time() - t0
    train_time = time_before + elapsed if not cfg.ckpt else state["train_time_s"]
    samples_per_s = (step - start) * cfg.batch_size / max(elapsed - eval_s, 1e-9) if not cfg.ckpt else None

    model.eval()
    test = groups_to_device(load_test_set(EVAL_SETS[cfg.eval_set]), cfg.n_test, device)
    acc, solved, res_curve, rho, cell_acc = evaluate(model, test, cfg, cfg.iters, dtype, fast_cell)
    mid = [solved[k][-1] for k, g in enumerate(test) if 30 <= g <= 34]
    headline = {"solved_17_at_iters": acc["17"][-1] if "17" in acc else None,
                "solved_30_34_at_iters": torch.cat(mid).float().mean().item() if mid else None,
                "solved_all_at_iters": acc["all"][-1],
                "drop_from_best": max(acc["all"]) - acc["all"][-1],  # > 0: more iterations lost puzzles
                "cells_right_at_iters": cell_acc[-1], "cells_drop_from_best": max(cell_acc) - cell_acc[-1],
                "spectral_radius": rho.mean().item(), "spectral_radius_max": rho.max().item(),
                "residual": res_curve[-1], "residual_at_train_iters": res_curve[min(cfg.train_iters, cfg.iters) - 1],
                "train_peak_mem_gb": train_peak if device.type == "cuda" and not cfg.ckpt else None,
                "recoveries": recoveries, "samples_per_s": samples_per_s}
    results = {"script": "sudoku_deq", "config": asdict(cfg), "train_iters": cfg.train_iters, "iters": cfg.iters,
               "acc": acc, "headline": headline, "cell_acc": cell_acc, "residual_vs_iters": res_curve, "train_log": log,
               "train_time_s": train_time, "samples_per_s": samples_per_s, "peak_mem_gb": peak_mem_gb(device),
               "device": device_name(device), "torch": str(torch.__version__), "seed": cfg.seed}
    write_results(cfg.out_dir, results)
    if not cfg.ckpt:
        save_checkpoint(ckpt_path, snapshot(elapsed) | {"results": results})
    plot_acc_vs_iters(os.path.join(cfg.out_dir, "acc_vs_iters.png"),
                      {f"{g} givens": acc[g] for g in PLOT_GROUPS if g in acc} | {"all": acc["all"]},
                      cfg.train_iters, f"sudoku DEQ ({cfg.solver}), width {cfg.width}, RRN {cfg.eval_set} set",
                      ylabel="solved rate")
    if log["step"]:
        plot_stability(os.path.join(cfg.out_dir, "stability.png"), log,
                       f"sudoku DEQ on {device_name(device)}, width {cfg.width}, stabiliser {cfg.stabiliser}")
    fmt = lambda v, spec=".3f": "n/a" if v is None else format(v, spec)
    print(f"final: solved at {cfg.iters} iters: 17 givens {fmt(headline['solved_17_at_iters'])} | 30-34 "
          f"{fmt(headline['solved_30_34_at_iters'])} | all {fmt(headline['solved_all_at_iters'])} | blank cells right "
          f"{cell_acc[-1]:.3f} | residual "
          f"{headline['residual']:.1e} | spectral radius {headline['spectral_radius']:.3f} (max "
          f"{headline['spectral_radius_max']:.3f}) | recoveries {recoveries} | train {train_time:.0f} s, "
          f"{fmt(samples_per_s, '.0f')} puzzles/s")
    return results


if __name__ == "__main__":
    main(parse_config(Config))
