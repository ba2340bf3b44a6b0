"""Sudoku without the rules: a transformer samples each cell's neighbours, a recurrent GNN reasons over them.

sudoku_gnn.py hand-codes the graph (each cell talks to its 20 row/column/box peers). Here the model sees only the 81
cell tokens (digit embedding + learned position) and must find the graph itself. A small transformer over the 81
positions gives, from its top attention head, for every cell i probabilities p(j | i) over the 80 other cells; K
neighbours per cell are SAMPLED without replacement (Gumbel-top-k) and handed to a recurrent GNN of sudoku_gnn's
family (loss after every iteration, so it can run longer at test time). Sampling is not differentiable, so the
sampler learns from the surrogate loss of stochastic computation graphs (Schulman et al. 2015): sum_i log q(S_i) *
stopgrad(r_i - b_i), q the probability of the ordered draw (unbiased for the set too), a PER-CELL reward r_i =
-(cell i's cross-entropy after the GNN's FIRST iteration, which depends on cell i's own draw alone: the per-cell
estimator is unbiased), a baseline b_i (none | EMA per cell | RLOO = mean reward of the other --n_graphs draws of
the same puzzle, each scored without gradient; the GNN trains on the first) and an entropy bonus. The row/column/box
structure appears nowhere in the model or the loss (precision/recall against the true peers is a metric only), and
the augmentation (relabelled digits, rows/columns shuffled within bands/stacks, transposes) maps the graph to itself.

Two phases. While the sampler learns (the first --graph_steps of the steps) the GNN is its reward model: it reads
digits only, so an edge is worth what the sampler made it, and the transformer reads positions only (the sudoku
graph is the same for every puzzle: one table per step). Then the graph is frozen at its top-K, and a FRESH GNN with
a position embedding, sudoku_gnn's progressive loss and settle penalty (--refine) and its own lr schedule trains on
it: sudoku_gnn's run on a learned graph, with no draws left to pay for. Solving needs the graph right for every cell
(a GNN trained on 96.5%-right graphs solved nothing), and the reward model, shaped by wrong graphs and without those
aids, solves far less than a fresh GNN on the same right graph.

Why the sampler learns (the runs behind each choice: docs/learned_adjacency.md): at uniform sampling a neighbour's
digit says little (cell i's digit with chance 8/80, any other 9/80), so the reward starts near zero. The head reads
the position embeddings directly, beside its path through the transformer (which starts at zero); the mean message
is layer-normalised; the bonus, the mean entropy of the K conditionals a draw picked from, grows its weight while
the draws' entropy is below --entropy_target (2 nats; 20 equal peers in any order: ln(20!)/20 = 2.12).

Headline (512 puzzles per step, 4 draws each; 9,000 steps learn the graph, 21,000 train the fresh GNN; 64 iters):
    python learned_adjacency.py --iters 64    # GPU result: not yet measured
CPU-scale version (easy puzzles, 40-50 givens, small GNN; 6 draws per puzzle; 2,100 + 4,900 steps), 1 thread:
    python learned_adjacency.py --device cpu --width 32 --msg_width 32 --min_givens 40 --max_givens 50 \\
        --curriculum 0 --train_iters 4 --iters 32 --steps 7000 --batch_size 16 --warmup 20 --lr 1e-2 --n_test 10 \\
        --eval_every 700 --var_draws 8 --n_graphs 6 --seed S
CPU result (seeds 0-5, two runs at a time; 628-662 s): top-K precision 100.0% on all six at the freeze; on 900 RRN
test puzzles per seed 31.2% solved after 32 iterations, 97% of sudoku_gnn's with the same flags (32.1%; trained in
260-275 s, 2.4x less time); 34.5% after 64 (96%). Every run: docs/learned_adjacency.md.
"""
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import (StopAfterStep, autocast, device_name, eval_config, fp32, load_checkpoint, load_weights,
                    maybe_compile, parse_config, peak_mem_gb, pick_device, pick_dtype, plot_acc_vs_iters,
                    resume_checkpoint, rng_state, save_checkpoint, set_generator_state, set_rng_state, set_seed, sync,
                    write_results)
from sudoku_data import EVAL_SETS, RRN_VAL, groups_to_device, load_test_set, peer_index, sample_batch, train_pool

BASELINES = ("none", "ema", "rloo")


@dataclass
class Config:
    # data
    min_givens: int = 17  # training puzzles have U[min_givens, max_givens] givens
    max_givens: int = 34
    curriculum: float = 0.2  # fraction of steps over which the lowest givens count falls from max to min_givens
    # model
    width: int = 96  # GNN node state size d
    msg_width: int = 96  # hidden units of the message MLP on each edge
    k: int = 20  # neighbours sampled per cell (the true graph has 20 peers)
    sampler_width: int = 64  # transformer width of the graph sampler
    sampler_layers: int = 2  # transformer layers before the top attention head
    sampler_reads: str = field(default="positions", metadata={"choices": ("positions", "cells")})  # see docstring
    # training
    train_iters: int = 32  # GNN iterations with gradient, loss after every one
    steps: int = 30000
    batch_size: int = 512  # puzzles per step, as in sudoku_gnn
    n_graphs: int = 4  # graphs drawn per puzzle to score the sampler (RLOO needs >= 2)
    lr: float = 2e-3  # GNN learning rate
    sampler_lr: float = 1e-2  # graph sampler learning rate (surrogate loss only); 1e-2 learned at CPU scale
    sampler_decay: bool = False  # cosine-decay the sampler's lr like the GNN's; off: constant after the warm-up
    weight_decay: float = 0.01
    warmup: int = 500  # linear warm-up steps, then cosine decay to lr/10
    baseline: str = field(default="rloo", metadata={"choices": BASELINES})
    ema_decay: float = 0.99  # for --baseline ema: per-cell running mean of the reward
    entropy: float = 3e-2  # least weight of the bonus: mean entropy of the K draws' conditionals (see docstring)
    entropy_target: float = 2.0  # nats, 0 = off: while the draws' entropy is below it, the bonus weight grows
    reward_iters: int = 1  # reward: -(cell i's cross-entropy) over the first this-many iterations (> 1: biased)
    graph_steps: float = 0.3  # first fraction of steps: the sampler learns; then a fresh GNN trains on its top-K graph
    refine: float = 0.7  # last fraction of steps: GNN loss from a state 0..train_iters-1 iterations deep + --settle
    settle: float = 0.3  # weight of sudoku_gnn's fixed-point penalty in those steps: mean of ||cell(h_T) - h_T||^2
    seed: int = 0
    # evaluation
    iters: int = 64  # maximum GNN iterations at test; the solved rate is reported after every one
    eval_set: str = field(default="test", metadata={"choices": tuple(EVAL_SETS)})  # choose settings on validation
    n_test: int = 0  # evaluation puzzles per givens count; 0 = all
    test_graph: str = field(default="topk", metadata={"choices": ("sampled", "topk")})  # graph used at test time
    eval_every: int = 1000  # log validation solved rate, precision and gradient variance; 0 = only at the end
    var_draws: int = 16  # repeated graph draws for the gradient-variance measurement
    # system
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = True
    out_dir: str = "out/learned_adjacency"
    resume: bool = False
    ckpt: str = ""  # evaluate this checkpoint instead of training

    def __post_init__(self):
        if not 17 <= self.min_givens <= self.max_givens <= 81:
            raise ValueError(f"need 17 <= --min_givens <= --max_givens <= 81, got {self.min_givens}, {self.max_givens}")
        if not 1 <= self.k <= 79:
            raise ValueError(f"--k must be in 1..79 (80 would be the full graph), got {self.k}")
        if self.n_graphs < 2 or self.var_draws < 2:
            raise ValueError("--n_graphs and --var_draws must be >= 2 (leave-one-out and variance need two draws)")
        if min(self.msg_width, self.sampler_width, self.sampler_layers) < 1 or self.sampler_width % 4:
            raise ValueError("--msg_width, --sampler_layers >= 1; --sampler_width a positive multiple of 4 (heads)")
        if not 1 <= self.reward_iters <= self.train_iters:
            raise ValueError(f"--reward_iters must be in 1..--train_iters, got {self.reward_iters}")
        if min(self.warmup, self.entropy, self.entropy_target, self.sampler_lr, self.settle) < 0:
            raise ValueError("--warmup, --entropy, --entropy_target, --sampler_lr, --settle must be >= 0")
        fractions = (self.curriculum, self.refine, self.graph_steps)
        if not (0 <= self.ema_decay < 1 and 0 <= min(fractions) and max(fractions) <= 1 and self.graph_steps > 0):
            raise ValueError("--ema_decay must be in [0, 1); --curriculum, --refine in [0, 1]; --graph_steps in (0, 1]")


EVAL_FLAGS = ("iters", "eval_set", "n_test", "test_graph", "var_draws", "device", "dtype", "compile", "out_dir", "ckpt")
EVAL_BATCH = 1024  # puzzles per evaluation forward
ITER_CHUNK = 16  # GNN iterations per evaluation call; the state is carried between calls
VAL_N = 50  # validation puzzles per givens count for the --eval_every log
VAR_N = 64  # validation puzzles in the fixed batch of the gradient-variance measurement
EVAL_SEED = 1234  # test-time graph draws do not depend on --seed, so every run is scored on the same draws
PLOT_GROUPS = ("17", "20", "23", "26", "30", "34")
HALT_STABLE = 6  # adaptive compute: stop once the answer is unchanged for this many iterations (chosen on validation)
ENTROPY_GAIN_RATE = 0.01  # change of log(bonus weight) per step per nat below --entropy_target: e-fold in 100 steps
NEG = -1e9  # log-probability of a cell choosing itself: finite, so p log p and logsumexp stay NaN-free


# ---------------------------------------------------------------- graph sampler

class GraphSampler(nn.Module):
    """Transformer over the 81 positions (and digits with --sampler_reads cells); top head: log p(j | i), j != i."""

    def __init__(self, cfg):
        super().__init__()
        w = cfg.sampler_width
        self.digit = nn.Embedding(10, w) if cfg.sampler_reads == "cells" else None
        self.pos = nn.Parameter(torch.randn(81, w))  # unit scale: the logits are bilinear in it, a small start is slow
        layer = nn.TransformerEncoderLayer(w, 4, 4 * w, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, cfg.sampler_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(w)
        self.qk = nn.Linear(w, 2 * w)
        self.qk_pos = nn.Linear(w, 2 * w, bias=False)  # the head also reads the positions directly: see forward
        nn.init.zeros_(self.qk.weight), nn.init.zeros_(self.qk.bias)  # the path through the body starts silent
        self.register_buffer("reward_ema", torch.zeros(81))  # per-cell baseline for --baseline ema
        self.register_buffer("entropy_log_gain", torch.zeros(()))  # bonus weight = --entropy * e^this, this >= 0

    def forward(self, quiz):  # quiz (B, 81) -> log p (B, 81, 81), rows sum to 1 over j != i
        # positions only: the same graph for every puzzle, one (1, 81, 81) table expanded over the batch
        x = self.pos[None] if self.digit is None else self.digit(quiz) + self.pos
        h = self.norm(self.body(x))  # (1 or B, 81, w)
        # the position term holds the 81 x 81 table from step one; fp32, as bf16 rounds 100-nat logits by whole nats
        with fp32(quiz.device):
            q, k = (self.qk(h.float()) + self.qk_pos(self.pos)).chunk(2, -1)
            logits = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])  # (1 or B, 81, 81)
        eye = torch.eye(81, dtype=torch.bool, device=quiz.device)
        return logits.masked_fill(eye, NEG).log_softmax(-1).expand(len(quiz), -1, -1)


def gumbel_topk(logp, k, generator):
    """K cells without replacement per row: the top-k of log p + Gumbel noise, in the order sequential sampling
    would draw them. logp (..., N) -> indices (..., k)."""
    u = torch.rand(logp.shape, generator=generator, device=logp.device).clamp_min(1e-20)
    return (logp - torch.log(-torch.log(u))).topk(k, -1).indices


def ordered_draw(logp, idx):
    """log q of ordered draws without replacement, and the mean entropy of the k conditionals each picked from.
    Draw t picks from p renormalised over the cells not drawn before t. Their mass R_t is (mass never drawn) + (mass
    drawn at t or later): two sums of positive terms, so it never cancels to 0 when p is peaked. log q = sum_t
    [log p(s_t) - log R_t]; with M_t the same split sum of -p log p, draw t's entropy is log R_t + M_t / R_t.
    logp (..., N) or broadcastable to it (one table for many draws), idx (..., k) -> log q (...), entropy (scalar)."""
    def log_left(terms):  # log of the sum of exp(terms) over the cells not yet drawn, at each draw t: (..., k)
        terms = terms.expand(*idx.shape[:-1], terms.shape[-1])
        return torch.logaddexp(terms.scatter(-1, idx, NEG).logsumexp(-1, keepdim=True),
                               terms.gather(-1, idx).flip(-1).logcumsumexp(-1).flip(-1))
    log_r = log_left(logp)
    log_m = log_left(logp + (-logp).clamp_min(1e-30).log())  # log(-p log p), before the expansion over the draws
    logq = (logp.expand(*idx.shape[:-1], logp.shape[-1]).gather(-1, idx) - log_r).sum(-1)
    return logq, (log_r + (log_m - log_r).exp()).mean()


def surrogate(logq, reward, baseline, ema=None):
    """Score-function surrogate whose gradient estimates grad E[r]: -(r - b) log q, averaged.
    logq, reward (G, B, 81) for G graphs per puzzle; the baseline never depends on the graph it is used with."""
    if baseline == "rloo":
        b = (reward.sum(0, keepdim=True) - reward) / (len(reward) - 1)  # mean of the OTHER graphs of this puzzle
    else:
        b = ema if baseline == "ema" else torch.zeros_like(reward)
    return -((reward - b).detach() * logq).mean()


# ---------------------------------------------------------------- reasoner: recurrent GNN on the sampled graph

class Cell(nn.Module):
    """One iteration: messages from the K sampled neighbours, averaged, then a GRU update with input recall."""

    def __init__(self, cfg):
        super().__init__()
        d, m = cfg.width, cfg.msg_width
        self.m = m
        self.from_h = nn.Linear(d, 2 * m + 3 * d)  # A h_i, B h_j (first message layer, split) and the GRU's h gates
        # the mean over K neighbours is much the same digit histogram for every cell; normalised, its differences show
        self.norm = nn.LayerNorm(m)
        self.from_msg = nn.Linear(m, 3 * d, bias=False)  # second message layer folded into the GRU's input gates

    def forward(self, h, x_gates, nbrs):  # h (B, 81, d), x_gates (B, 81, 3d), nbrs (B, 81, K)
        a, b, h_gates = self.from_h(h).split([self.m, self.m, 3 * h.shape[-1]], -1)
        rows = torch.arange(len(h), device=h.device)[:, None, None]
        edges = F.relu(a.unsqueeze(2) + b[rows, nbrs])  # (B, 81, K, m): projected before the gather, like sudoku_gnn
        gates = x_gates + self.from_msg(self.norm(edges.mean(2)))  # (B, 81, 3d)
        r_x, z_x, n_x = gates.chunk(3, -1)
        r_h, z_h, n_h = h_gates.chunk(3, -1)
        r, z = torch.sigmoid(r_x + r_h), torch.sigmoid(z_x + z_h)
        return (1 - z) * torch.tanh(n_x + r * n_h) + z * h  # stays in (-1, 1) however long it runs


class GNN(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.width
        # digits only while the sampler learns (an edge is worth what the sampler made it); positions once frozen
        self.digit = nn.Embedding(10, d)  # 0 = blank
        self.pos = nn.Parameter(torch.zeros(81, d))  # times pos_on = 0: no effect, and no gradient, before that
        self.register_buffer("pos_on", torch.zeros(()))
        self.x_gates = nn.Linear(d, 3 * d)  # input recall: the same projection every iteration, so made once
        self.cell = Cell(cfg)
        self.head = nn.Linear(d, 9)

    def forward(self, quiz, nbrs, iters, h=None):
        """quiz (B, 81), nbrs (B, 81, K) -> logits after each of `iters` iterations (iters, B, 81, 9), state h."""
        x = self.digit(quiz) + self.pos_on * self.pos  # (B, 81, d)
        x_gates = self.x_gates(x)
        h = torch.tanh(x) if h is None else h
        logits = []
        for _ in range(iters):
            h = self.cell(h, x_gates, nbrs)
            logits.append(self.head(h))
        return torch.stack(logits), h


class Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.sampler, self.gnn = GraphSampler(cfg), GNN(cfg)


def cell_losses(logits, sol):  # logits (T, B, 81, 9), sol (B, 81) 1..9 -> cross-entropy (T, B, 81)
    target = (sol - 1).expand(len(logits), -1, -1)
    return F.cross_entropy(logits.float().flatten(0, 2), target.flatten(), reduction="none").view(target.shape)


def gnn_loss(gnn, quiz, sol, nbrs, cfg, skip=0, settle=0.0):
    """sudoku_gnn's training loss on the graphs nbrs: cross-entropy after each of train_iters iterations from a state
    `skip` iterations deep (reached without gradient), plus `settle` x the move of one more iteration."""
    with torch.no_grad():
        h = gnn(quiz, nbrs, skip)[1] if skip else None
    logits, h = gnn(quiz, nbrs, cfg.train_iters, h)
    loss = cell_losses(logits, sol).mean()
    if settle:  # one more iteration should leave the final state where it is: a fixed point
        loss = loss + settle * (gnn(quiz, nbrs, 1, h)[1].float() - h.float()).pow(2).sum(-1).mean()
    return loss


def score_draws(model, quiz, sol, cfg, gen):
    """n_graphs graphs drawn per puzzle, each scored by the GNN's first reward_iters iterations without gradient ->
    the draws (G, B, 81, K), their log q and per-cell reward (G, B, 81), the draws' entropy."""
    logp = model.sampler(quiz)  # (B, 81, 81)
    G = cfg.n_graphs
    nbrs = gumbel_topk(logp.detach().expand(G, -1, -1, -1), cfg.k, gen)  # (G, B, 81, K)
    logq, entropy = ordered_draw(logp, nbrs)  # (G, B, 81), scalar
    with torch.no_grad():
        ce = cell_losses(model.gnn(quiz.repeat(G, 1), nbrs.flatten(0, 1), cfg.reward_iters)[0], sol.repeat(G, 1))
    return nbrs, logq, -ce.mean(0).view(logq.shape), entropy


def train_loss(model, quiz, sol, cfg, gen, skip=0, settle=0.0, learn_graph=True):
    """A step's loss: the GNN's on the first draw, the sampler's surrogate, minus the entropy bonus -> it, the GNN's
    loss, and the reward (G, B, 81) and draws' entropy that update the EMA baseline and the bonus weight after the
    step. learn_graph False (the frozen graph): the GNN's loss on the top-K graph, no draws, reward None."""
    if not learn_graph:
        with torch.no_grad():
            graph = model.sampler(quiz).topk(cfg.k, -1).indices
        loss_gnn = gnn_loss(model.gnn, quiz, sol, graph, cfg, skip, settle)
        return loss_gnn, loss_gnn, None, None
    nbrs, logq, reward, entropy = score_draws(model, quiz, sol, cfg, gen)
    loss_gnn = gnn_loss(model.gnn, quiz, sol, nbrs[0], cfg, skip, settle)
    bonus = cfg.entropy * model.sampler.entropy_log_gain.exp() * entropy
    return loss_gnn + surrogate(logq, reward, cfg.baseline, model.sampler.reward_ema) - bonus, loss_gnn, reward, entropy


# ---------------------------------------------------------------- metrics

def true_adjacency(peers):  # peers (N, deg) -> (N, N) bool; only ever used to score a graph, never to build one
    return torch.zeros(len(peers), len(peers), dtype=torch.bool, device=peers.device).scatter_(1, peers, True)


def adjacency_scores(nbrs, adj):
    """nbrs (B, N, K) chosen neighbours, adj (N, N) true graph -> precision, recall per graph (B,) each:
    the fraction of chosen edges that are true, the fraction of each node's true neighbours that were chosen."""
    hits = adj[torch.arange(len(adj), device=adj.device)[:, None], nbrs]  # (B, N, K)
    return hits.float().mean((1, 2)), (hits.sum(-1) / adj.sum(1)).mean(1)


def pick_graph(model, quiz, cfg, gen):  # (B, 81) -> nbrs (B, 81, K), and log p (B, 81, 81)
    logp = model.sampler(quiz)
    return (gumbel_topk(logp, cfg.k, gen) if cfg.test_graph == "sampled" else logp.topk(cfg.k, -1).indices), logp


def halting_iteration(pred, n=HALT_STABLE):
    """pred (T, N, 81) argmax after each iteration -> (N,) index of the first iteration whose answer has not changed
    over the n iterations before it (T - 1 if none): adaptive compute that needs no sudoku rules."""
    same = (pred[1:] == pred[:-1]).all(-1).T  # (N, T - 1): iteration t + 1 repeats iteration t
    stable = F.pad(same, (0, n)).unfold(1, n, 1).all(-1)  # (N, T): iteration t + n ends n repeats in a row
    return torch.where(stable.any(1), stable.float().argmax(1) + n, len(pred) - 1)


@torch.no_grad()
def evaluate(model, test, iters, cfg, adj, dtype):
    """Solved rate (all 81 cells right) after each iteration 1..iters per givens count and overall, the adaptive
    answer's solved rate and mean iterations (halting_iteration), the test graphs' precision/recall against the true
    peers, and the mean p(j | i) over all test puzzles (81, 81)."""
    dev = adj.device
    gen = torch.Generator(device=dev).manual_seed(EVAL_SEED)
    acc, solved, halted, used, prec, rec = {}, [], [], [], [], []
    mean_p = torch.zeros(81, 81, device=dev)
    for g, (quiz, sol) in test.items():
        correct = torch.zeros(iters, len(quiz), dtype=torch.bool, device=dev)
        for i in range(0, len(quiz), EVAL_BATCH):
            q, s, h, pred = quiz[i:i + EVAL_BATCH], sol[i:i + EVAL_BATCH], None, []
            with autocast(dev, dtype):
                nbrs, logp = pick_graph(model, q, cfg, gen)
            precision, recall = adjacency_scores(nbrs, adj)
            prec.append(precision), rec.append(recall)
            mean_p += logp.float().exp().sum(0)
            for t0 in range(0, iters, ITER_CHUNK):
                with autocast(dev, dtype):
                    logits, h = model.gnn(q, nbrs, min(ITER_CHUNK, iters - t0), h)
                pred.append((logits.argmax(-1) + 1).to(torch.uint8))
            pred = torch.cat(pred)  # (iters, b, 81)
            correct[:, i:i + EVAL_BATCH] = (pred == s).all(-1)
            stop = halting_iteration(pred)
            halted.append(correct[stop, torch.arange(i, i + len(q), device=dev)])
            used.append(stop + 1)
        acc[str(g)] = correct.float().mean(1).tolist()
        solved.append(correct)
    acc["all"] = torch.cat(solved, 1).float().mean(1).tolist()
    adaptive = {"solved_all": torch.cat(halted).float().mean().item(),
                "mean_iters": torch.cat(used).float().mean().item()}
    prec, rec = torch.cat(prec), torch.cat(rec)
    return acc, adaptive, prec.mean().item(), rec.mean().item(), (mean_p / len(prec)).cpu()


def grad_variance(model, quiz, sol, cfg, draws, dtype):
    """Trace of the covariance of the sampler's surrogate gradient over `draws` graph draws on one fixed batch, per
    baseline, every baseline on the SAME draws (a fixed seed), so the differences come from the baseline alone."""
    params = [p for p in model.sampler.parameters() if p.requires_grad]
    gen = torch.Generator(device=quiz.device).manual_seed(EVAL_SEED)
    grads = {b: [] for b in BASELINES}
    for _ in range(draws):
        with autocast(quiz.device, dtype):
            _, logq, reward, _ = score_draws(model, quiz, sol, cfg, gen)
        for b in BASELINES:
            g = torch.autograd.grad(surrogate(logq, reward, b, model.sampler.reward_ema), params, retain_graph=True)
            grads[b].append(torch.cat([x.flatten() for x in g]))
    return {b: torch.stack(v).var(0).sum().item() for b, v in grads.items()}


# ---------------------------------------------------------------- pictures

def plot_adjacency(path, log, mean_p, adj, k, frozen_at):
    """Left: precision/recall over training. Middle: gradient variance per baseline (once the graph is frozen, the
    fresh GNN scores the draws). Right: the learned mean p(j | i) beside the true peers (row i: cell i's choices)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 4, figsize=(17, 4))
    steps = [e["step"] for e in log]
    for key, label in (("precision", "precision (sampled)"), ("recall", "recall (sampled)"),
                       ("precision_topk", "precision (top-K)")):
        ax[0].plot(steps, [e[key] for e in log], label=label)
    ax[0].axhline(0.25, color="gray", linestyle="--", label="uniform: 25%")
    ax[0].set(xlabel="step", ylabel="vs the true 20 peers", ylim=(0, 1.02), title=f"learned graph, K = {k}")
    for b in BASELINES:
        ax[1].plot(steps, [e["grad_var"][b] for e in log], label=f"baseline {b}")
    ax[1].set(xlabel="step", ylabel="trace Cov(sampler gradient)", yscale="log", title="gradient variance")
    for a, image, title in ((ax[2], mean_p, "learned mean p(j | i)"), (ax[3], adj.cpu(), "true peers (never seen)")):
        a.imshow(image.float().numpy(), cmap="viridis")
        a.set(title=title, xlabel="j", ylabel="i")
    for a in ax[:2] if frozen_at < steps[-1] else ():
        a.axvline(frozen_at, color="black", linestyle=":", label="graph frozen")
    ax[0].legend(fontsize=8), ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main

def main(cfg):
    saved = None
    if cfg.ckpt:
        saved = load_checkpoint(cfg.ckpt, Config, EVAL_FLAGS)
        cfg = eval_config(Config, saved["config"], cfg, EVAL_FLAGS)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    torch.backends.mha.set_fastpath_enabled(False)  # torch 2.4: the sampler's fused eval path fails under CPU autocast
    set_seed(cfg.seed)
    model = Model(cfg).to(device)
    opt = torch.optim.AdamW([{"params": model.gnn.parameters(), "lr": cfg.lr, "base_lr": cfg.lr, "decay": True},
                             {"params": model.sampler.parameters(), "lr": cfg.sampler_lr, "base_lr": cfg.sampler_lr,
                              "decay": cfg.sampler_decay}], weight_decay=cfg.weight_decay)
    data_gen = torch.Generator(device=device).manual_seed(cfg.seed)
    host_gen = torch.Generator().manual_seed(cfg.seed)  # --refine's start depths, drawn without a device sync
    graph_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)  # its own stream: data stays comparable
    adj = true_adjacency(peer_index().to(device))
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    step, time_before, val_log = 0, 0.0, []
    frozen_at = max(1, round(cfg.graph_steps * cfg.steps))  # --graph_steps: the first step on the frozen graph
    state = resume_checkpoint(ckpt_path, Config, cfg, EVAL_FLAGS) if cfg.resume and not cfg.ckpt else saved
    if state is not None:
        load_weights(model, state["model"])
        # it froze there (kept by a resume to more --steps), or, if a resume's budget puts the freeze behind it, now
        frozen_at = state["frozen_at"] if state["frozen_at"] < state["step"] else max(frozen_at, state["step"])
        if not cfg.ckpt:
            opt.load_state_dict(state["optimizer"])
            step, time_before, val_log = state["step"], state["train_time_s"], state["val_log"]
            for gen, key in ((data_gen, "data_rng"), (graph_gen, "graph_rng"), (host_gen, "host_rng")):
                set_generator_state(gen, state[key])
            set_rng_state(state["rng"])
    # compile the hot step (run train_iters times); wrapping forward keeps the state_dict keys unchanged
    model.gnn.cell.forward = maybe_compile(model.gnn.cell.forward, cfg.compile, device)
    n_gnn, n_sampler = (sum(p.numel() for p in m.parameters()) for m in (model.gnn, model.sampler))
    print(f"GNN {n_gnn} parameters (width {cfg.width}), sampler {n_sampler} parameters; K = {cfg.k}, baseline "
          f"{cfg.baseline}, {cfg.batch_size} puzzles x {cfg.n_graphs} graphs, givens {cfg.min_givens}-{cfg.max_givens}")
    # validation puzzles, each topped up to the training givens (one fixed draw), so the log follows what is being
    # learned, easy puzzles included; --n_test caps their number
    val = groups_to_device(load_test_set(RRN_VAL, VAL_N), min(VAL_N, cfg.n_test or VAL_N), device)
    val_gen = torch.Generator(device=device).manual_seed(EVAL_SEED)
    quiz, sol = (torch.cat(t) for t in zip(*val.values()))
    quiz, sol = sample_batch(quiz, sol, len(quiz), val_gen, cfg.min_givens, cfg.max_givens, each_once=True)
    val, var_batch = {"val": (quiz, sol)}, (quiz[:VAR_N], sol[:VAR_N])

    def snapshot(elapsed, results=None):
        return {"model": model.state_dict(), "optimizer": opt.state_dict(), "config": asdict(cfg), "step": step,
                "results": results, "rng": rng_state(), "data_rng": data_gen.get_state(),
                "graph_rng": graph_gen.get_state(), "host_rng": host_gen.get_state(), "val_log": val_log,
                "train_time_s": time_before + elapsed, "frozen_at": frozen_at}

    def val_stats():
        """Validation solved rate at train_iters, precision/recall of sampled and top-K graphs, gradient variance."""
        model.eval()
        stats = {}
        for mode, tag in (("topk", "_topk"), ("sampled", "")):
            acc, _, stats["precision" + tag], stats["recall" + tag], _ = evaluate(
                model, val, cfg.train_iters, replace(cfg, test_graph=mode), adj, dtype)
            stats[f"val_solved_{mode}"] = acc["all"][-1]
        stats["grad_var"] = grad_variance(model, *var_batch, cfg, cfg.var_draws, dtype)
        model.train()
        return stats

    if not cfg.ckpt:
        pool_quiz, pool_sol = (torch.from_numpy(a).to(device) for a in train_pool())
        if step == 0 and cfg.eval_every:
            val_log.append({"step": 0, "loss": None} | val_stats())
    sync(device)
    t0, start, eval_s = time.time(), step, 0.0
    if not cfg.ckpt:
        bar = tqdm(range(step, cfg.steps), initial=step, total=cfg.steps, file=sys.stdout, disable=None)
        with StopAfterStep() as stop:
            for i in bar:
                if stop.requested:  # the last step is whole: stop here
                    break
                learn_graph = i < frozen_at  # after: no draws, the sampler stays as it is
                if i == frozen_at:  # a fresh GNN (new weights and optimizer state, positions on) on the top-K graph
                    model.gnn.load_state_dict(GNN(cfg).state_dict() | {"pos_on": torch.ones(())})
                    for p in model.gnn.parameters():
                        opt.state.pop(p, None)
                t, span = (i, cfg.steps) if learn_graph else (i - frozen_at, cfg.steps - frozen_at)  # fresh GNN: own lr
                frac = max(0.0, (t - cfg.warmup) / max(1, span - cfg.warmup))
                warm = min(1.0, (t + 1) / max(1, cfg.warmup))
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * warm * (0.55 + 0.45 * math.cos(math.pi * frac) if g["decay"] else 1.0)
                # curriculum: easy puzzles first, where a given peer is an immediate, visible reward for an edge
                ramp = min(1.0, i / max(1.0, cfg.curriculum * cfg.steps))
                lo = round(cfg.max_givens - ramp * (cfg.max_givens - cfg.min_givens))
                quiz, sol = sample_batch(pool_quiz, pool_sol, cfg.batch_size, data_gen, lo, cfg.max_givens)
                # --refine: once the graph is learned, train the GNN to keep its answer however long it runs
                refining = i >= cfg.steps - round(cfg.refine * cfg.steps)
                skip = int(torch.randint(cfg.train_iters, (1,), generator=host_gen)) if refining else 0
                with autocast(device, dtype):
                    loss, loss_gnn, reward, entropy = train_loss(model, quiz, sol, cfg, graph_gen, skip,
                                                                 cfg.settle * refining, learn_graph)
                ema, log_gain = model.sampler.reward_ema, model.sampler.entropy_log_gain
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.gnn.parameters(), 1.0)
                opt.step()  # AdamW skips the sampler once it has no gradient: no weight decay on a frozen graph
                if learn_graph:  # after use, so b never sees its own draw; the bonus weight is a floor, not a set point
                    ema.lerp_(reward.mean((0, 1)), 1 - cfg.ema_decay)
                    log_gain.add_(ENTROPY_GAIN_RATE * (cfg.entropy_target - entropy.detach())).clamp_(min=0)
                step = i + 1
                if cfg.eval_every and step % cfg.eval_every == 0 or step == cfg.steps:
                    sync(device)  # a log step: the only place the loop waits for the device
                    t_eval = time.time()
                    speed = (step - start) * cfg.batch_size / (t_eval - t0 - eval_s)
                    val_log.append({"step": step, "loss": loss_gnn.item()} | val_stats())
                    save_checkpoint(ckpt_path, snapshot(time.time() - t0))  # a crash loses at most eval_every steps
                    eval_s += time.time() - t_eval
                    e, mode = val_log[-1], "sampled" if learn_graph else "topk"  # the graphs it trains on
                    bar.write(f"step {step}: loss {e['loss']:.4f} | precision sampled {e['precision']:.3f} top-K "
                              f"{e['precision_topk']:.3f} | val solved ({mode}) {e['val_solved_' + mode]:.3f} | "
                              "grad var " + " ".join(f"{b} {v:.3g}" for b, v in e["grad_var"].items()) + (
                                  f" | draw entropy {entropy.item():.2f} weight "
                                  f"{cfg.entropy * log_gain.exp().item():.3g}" if learn_graph else " | graph frozen")
                              + f" | givens >={lo} | {speed:.0f} puzzles/s")
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
    acc, adaptive, precision, recall, mean_p = evaluate(model, test, cfg.iters, cfg, adj, dtype)
    grad_var = grad_variance(model, *var_batch, cfg, cfg.var_draws, dtype)
    headline = {"adjacency_precision": precision, "adjacency_recall": recall,
                "solved_17_at_iters": acc["17"][-1] if "17" in acc else None, "solved_all_at_iters": acc["all"][-1],
                "best_solved_all": max(acc["all"]), "adaptive_solved_all": adaptive["solved_all"],
                "adaptive_mean_iters": adaptive["mean_iters"], "samples_per_s": samples_per_s} | {
                f"grad_var_{b}": v for b, v in grad_var.items()}
    results = {"script": "learned_adjacency", "config": asdict(cfg), "train_iters": cfg.train_iters,
               "iters": cfg.iters, "acc": acc, "headline": headline, "test_graph": cfg.test_graph,
               "val_log": val_log, "train_time_s": train_time, "samples_per_s": samples_per_s,
               "peak_mem_gb": peak_mem_gb(device), "device": device_name(device), "torch": str(torch.__version__),
               "seed": cfg.seed}
    write_results(cfg.out_dir, results)
    if not cfg.ckpt:
        save_checkpoint(ckpt_path, snapshot(elapsed, results))
    plot_acc_vs_iters(os.path.join(cfg.out_dir, "acc_vs_iters.png"),
                      {f"{g} givens": acc[g] for g in PLOT_GROUPS if g in acc} | {"all": acc["all"]},
                      cfg.train_iters, f"{cfg.test_graph} graph, K = {cfg.k}, RRN {cfg.eval_set}", ylabel="solved rate")
    if val_log:
        plot_adjacency(os.path.join(cfg.out_dir, "adjacency.png"), val_log, mean_p, adj, cfg.k, frozen_at)
    fmt = lambda v, spec=".3f": "n/a" if v is None else format(v, spec)
    print(f"final: {cfg.test_graph} graph precision {precision:.3f} recall {recall:.3f} | solved at {cfg.iters} iters: "
          f"17 givens {fmt(headline['solved_17_at_iters'])} | all {acc['all'][-1]:.3f} | adaptive "
          f"{adaptive['solved_all']:.3f} at {adaptive['mean_iters']:.1f} iters | train {train_time:.0f} s, "
          f"{fmt(samples_per_s, '.0f')} puzzles/s")
    return results


if __name__ == "__main__":
    main(parse_config(Config))
