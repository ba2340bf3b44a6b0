"""Sudoku with a recurrent relational network: more message-passing iterations at test time solve harder puzzles.

Each of the 81 cells is a node linked to its 20 peers (same row, column or box). A node starts from the embedding of
its given digit (0 = blank) plus a learned position; every iteration it sums messages from its peers and updates its
state with a GRU cell that re-reads the input embedding ("recall"), then predicts a digit. As in RRN (Palm et al.
2018) the loss is the cross-entropy after EVERY iteration, so a model trained for `--train_iters` iterations can be
run for more. The answer after k iterations is the plain argmax: no masking, search or retries. Each training step
starts from a state 0..train_iters-1 iterations deep, reached without gradient (progressive loss, Bansal et al.
2022). That alone does not stop overthinking: the state never settles, and run 4x longer than --iters, puzzles it
had solved come undone (CPU scale below, --settle 0, seeds 0 / 1: 13.3 / 43.9 points lost from 32 to 128 iterations).
So the loss also penalises one extra iteration after the last trained one for moving the state (--settle): the
answer becomes a fixed point, the state's move per iteration decays instead of growing, and more iterations stop
hurting.

Speed: the message MLP's first layer on (h_i, h_j) is split into per-node projections A h_i + B h_j, so only
relu(A h_i + B h_j) is per edge; its second layer is linear, so it is applied after the (layer-normalised) sum over
peers and folded into the GRU's input gates; the input's share of the gates is constant over iterations and
computed once. The sum over peers needs no gather either (sudoku_data.peer_relu_sum): it sums over each cell's row,
column and box, dense 9x9 tables of pairs built from reshapes, and subtracts what they count twice. Compiled, each
table is one fused reduction in the forward and in the backward, so no (B, 81, 20, m) edge tensor is stored and
no scatter-add into B h_j's gradient runs (a gather over the 1,620 edges needs both). Per node and iteration that
is 5 m d + 3 d^2 multiply-adds (d = --width, m = --msg_width) plus 34 m pair terms: 12 MFLOP per puzzle-iteration
at width 96, about 1.4 GFLOP per training puzzle at 32 iterations (1.15 with backward, +16% for the progressive
loss's 15.5 forward-only iterations on average, +3% for --settle), i.e. 21 TFLOP/s at the 15k puzzles/s target, a
few % of an H100's bf16 peak: the cost is memory traffic, which is
why the cell is compiled on CUDA and runs under bf16 autocast; there is no host sync per step except on log steps.

Evaluation: RRN's test set (--eval_set validation to choose settings), solved rate (all 81 cells right) per givens
count 17..34 after every iteration 1..--iters; an overthinking check at 4x --iters on a subset; adaptive compute (a
puzzle halts as soon as its argmax is a valid grid that keeps the givens); movie.gif of a hard puzzle;
`--ckpt PATH --puzzles FILE` solves your own.

Headline (trained with 32 iterations, evaluated with 64):
    python sudoku_gnn.py --iters 64
GPU result: not yet measured.
CPU-scale version (trained on easy puzzles, 30-34 givens; width 32, 8 iterations), 1 thread:
    python sudoku_gnn.py --device cpu --width 32 --msg_width 32 --min_givens 30 --train_iters 8 --iters 32 \\
        --steps 1500 --batch_size 32 --lr 1e-2 --warmup 50 --curriculum 0.3 --n_test 20 --n_overthink 20 \\
        --eval_every 250
    CPU result, the default --settle 1 (seeds 0 / 1, one thread each, side by side, 289 / 289 s of training on a
    shared 2-core x86 machine; 20 test puzzles per givens count): RRN test puzzles with 30-34 givens solved 96.0% /
    96.0% at 32 iterations, all givens 51.4% / 52.5% (0% with 17 givens); at 128 iterations the overall rate is 5.8 /
    3.9 points HIGHER. Adaptive halting solves 51.7% / 52.8% using 21.5 / 21.2 iterations on average. --settle was
    chosen on RRN validation puzzles among 0, 0.1, 0.3, 1 and 3 (README): 1 solves the most at 128 and 256
    iterations and gives back nothing from 64 to 256 on either seed. The earlier default 0.3 gave 95.0% / 94.0% and
    54.4% / 49.7% (+3.6 / +2.2 points at 128); --settle 0 53.9% / 47.8% (13.3 / 43.9 points LOWER at 128). CPU
    results depend on the machine, the thread count and the order of float sums (README).
    Tried and not kept (with the gather): Muon (as in grokking_mod97.py, with momentum 0.95 and update RMS 0.35 lr) on
    the three input-gate, message and GRU weight matrices, AdamW for the rest: 52.8% / 43.1% overall, 30-34 givens
    97.0% / 94.0% (with --steps 750 it was ahead: 50.3 / 50.0% vs AdamW's 46.4 / 46.1%).
    Equal training wall-clock against sudoku_deq.py with these flags: README, "sudoku_deq.py".
"""
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import (StopAfterStep, autocast, device_name, eval_config, load_checkpoint, load_weights, log_progress,
                    maybe_compile, parse_config, peak_mem_gb, pick_device, pick_dtype, plot_acc_vs_iters,
                    resume_checkpoint, rng_state, save_checkpoint, set_generator_state, set_rng_state, set_seed, sync,
                    write_results)
from sudoku_data import (EVAL_SETS, RRN_VAL, groups_to_device, is_valid_grid, load_test_set, peer_relu_sum,
                         read_puzzles, sample_batch, train_pool)


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
    # training
    train_iters: int = 32  # iterations with gradient, loss after every one
    progressive: bool = True  # first run 0..train_iters-1 iterations without gradient, then train from that state
    settle: float = 1.0  # weight of the fixed-point penalty: mean over nodes of ||cell(h_T) - h_T||^2
    steps: int = 30000  # 15.4M puzzles: about 17 min at the 15k puzzles/s target
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 500  # linear warm-up steps, then cosine decay to lr/10
    seed: int = 0
    # evaluation
    iters: int = 64  # maximum iterations at test; the solved rate is reported after every one
    eval_set: str = field(default="test", metadata={"choices": tuple(EVAL_SETS)})  # choose settings on validation
    n_test: int = 0  # evaluation puzzles per givens count; 0 = all
    n_overthink: int = 200  # puzzles per givens count for the check at 4x --iters; 0 = skip it
    eval_every: int = 1000  # log loss and the validation solved rate every this many steps; 0 = only at the end
    puzzles: str = ""  # with --ckpt: solve the puzzles in this file instead of the test set
    # system
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = True
    out_dir: str = "out/sudoku_gnn"
    resume: bool = False
    ckpt: str = ""  # evaluate this checkpoint instead of training

    def __post_init__(self):
        if not 17 <= self.min_givens <= self.max_givens <= 81:
            raise ValueError(f"need 17 <= --min_givens <= --max_givens <= 81, got {self.min_givens}, {self.max_givens}")
        if not 0 <= self.curriculum <= 1:
            raise ValueError(f"--curriculum must be in [0, 1], got {self.curriculum}")
        if self.msg_width < 1 or self.warmup < 0 or self.n_overthink < 0 or self.settle < 0:
            raise ValueError("--msg_width must be >= 1, --warmup, --n_overthink and --settle >= 0")
        if self.puzzles and not self.ckpt:
            raise ValueError("--puzzles needs --ckpt (a trained model to solve them with)")


EVAL_FLAGS = ("iters", "eval_set", "n_test", "n_overthink", "eval_every", "puzzles", "device", "dtype", "compile",
              "out_dir", "ckpt")
EVAL_BATCH = 2048  # puzzles per evaluation forward
ITER_CHUNK = 16  # iterations per evaluation call; the state is carried between calls
VAL_N = 50  # validation puzzles per givens count for the --eval_every log
PLOT_GROUPS = ("17", "20", "23", "26", "30", "34")


# ---------------------------------------------------------------- model

class Cell(nn.Module):
    """One iteration: messages over the 20 peers, summed, then a GRU update whose input is (messages, givens)."""

    def __init__(self, cfg):
        super().__init__()
        d, m = cfg.width, cfg.msg_width
        self.m = m
        self.from_h = nn.Linear(d, 2 * m + 3 * d)  # A h_i, B h_j (first message layer, split) and the GRU's h gates
        self.norm = nn.LayerNorm(m)  # the sum over 20 peers varies a lot in scale; normalised it learns far faster
        self.from_msg = nn.Linear(m, 3 * d, bias=False)  # second message layer folded into the GRU's input gates

    def forward(self, h, x_gates):  # h (B, 81, d), x_gates (B, 81, 3d)
        a, b, h_gates = self.from_h(h).split([self.m, self.m, 3 * h.shape[-1]], -1)
        gates = x_gates + self.from_msg(self.norm(peer_relu_sum(a, b)))  # (B, 81, 3d)
        r_x, z_x, n_x = gates.chunk(3, -1)
        r_h, z_h, n_h = h_gates.chunk(3, -1)
        r, z = torch.sigmoid(r_x + r_h), torch.sigmoid(z_x + z_h)
        n = torch.tanh(n_x + r * n_h)
        return (1 - z) * n + z * h  # a convex mix of tanh values: the state stays in (-1, 1) however long it runs


class RRN(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.width
        self.digit = nn.Embedding(10, d)  # 0 = blank
        self.pos = nn.Parameter(torch.randn(81, d) * 0.1) if cfg.pos else None
        self.x_gates = nn.Linear(d, 3 * d)  # input recall: the same projection every iteration, so made once
        self.cell = Cell(cfg)
        self.head = nn.Linear(d, 9)

    def forward(self, quiz, iters, h=None):
        """quiz (B, 81) 0..9 -> logits after each of `iters` iterations (iters, B, 81, 9), and the state h."""
        x = self.digit(quiz) + (self.pos if self.pos is not None else 0)  # (B, 81, d)
        x_gates = self.x_gates(x)  # (B, 81, 3d)
        h = torch.tanh(x) if h is None else h
        logits = []
        for _ in range(iters):
            h = self.cell(h, x_gates)
            logits.append(self.head(h))
        return torch.stack(logits), h


def loss_fn(logits, sol):  # logits (T, B, 81, 9), sol (B, 81) 1..9: mean over iterations, puzzles and cells
    return F.cross_entropy(logits.float().flatten(0, 2), (sol - 1).expand(len(logits), -1, -1).flatten())


def train_loss(model, quiz, sol, skip, cfg):
    """The loss after each of cfg.train_iters iterations, from a state `skip` iterations deep, plus --settle."""
    h = None
    if skip:  # train from a state deep in the trajectory, so later iterations must stay correct
        with torch.no_grad():
            h = model(quiz, skip)[1]
    logits, h = model(quiz, cfg.train_iters, h)  # (T, B, 81, 9)
    loss = loss_fn(logits, sol)
    if cfg.settle:  # one more iteration should leave the final state where it is: a fixed point
        moved = model(quiz, 1, h)[1].float() - h.float()  # (B, 81, d)
        loss = loss + cfg.settle * moved.pow(2).sum(-1).mean()
    return loss


# ---------------------------------------------------------------- evaluation

def keeps_givens(quiz, grid):  # (B, 81) each -> (B,) bool
    return ((quiz == 0) | (grid == quiz)).all(1)


@torch.no_grad()
def sweep(model, quiz, sol, iters, dtype):
    """Run `iters` iterations on quiz (N, 81). -> correct (iters, N) bool (None without sol), the adaptive answer
    (N, 81): the first argmax that is a valid grid keeping the givens (else the last one), and its iteration (N,)."""
    n, dev = len(quiz), quiz.device
    correct = torch.zeros(iters, n, dtype=torch.bool, device=dev)
    answer, used = torch.zeros_like(quiz), torch.full((n,), iters, device=dev)
    for i in range(0, n, EVAL_BATCH):
        q = quiz[i:i + EVAL_BATCH]
        done, h = torch.zeros(len(q), dtype=torch.bool, device=dev), None
        for t0 in range(0, iters, ITER_CHUNK):
            k = min(ITER_CHUNK, iters - t0)
            with autocast(dev, dtype):
                logits, h = model(q, k, h)
            pred = logits.argmax(-1) + 1  # (k, b, 81) digits 1..9
            if sol is not None:
                correct[t0:t0 + k, i:i + EVAL_BATCH] = (pred == sol[i:i + EVAL_BATCH]).all(-1)
            for t in range(k):
                new = ~done & is_valid_grid(pred[t]) & keeps_givens(q, pred[t])
                answer[i:i + EVAL_BATCH][new], used[i:i + EVAL_BATCH][new] = pred[t][new], t0 + t + 1
                done |= new
        answer[i:i + EVAL_BATCH][~done] = pred[-1][~done]
    return (correct if sol is not None else None), answer, used


def evaluate(model, test, iters, dtype):
    """Solved rate after each iteration 1..iters per givens count and overall, plus adaptive-compute numbers."""
    acc, solved, adaptive, used = {}, [], [], []
    for g, (quiz, sol) in test.items():
        correct, answer, n_used = sweep(model, quiz, sol, iters, dtype)
        acc[str(g)] = correct.float().mean(1).tolist()
        solved.append(correct)
        adaptive.append((answer == sol).all(1))
        used.append(n_used)
    acc["all"] = torch.cat(solved, 1).float().mean(1).tolist()
    adaptive = {"solved_all": torch.cat(adaptive).float().mean().item(),
                "mean_iters": torch.cat(used).float().mean().item()}
    return acc, solved, adaptive


def solve_file(model, cfg, device, dtype):
    """--puzzles FILE: print each solution, whether it is valid / keeps the givens / matches, iterations used."""
    quiz_np, sol_np = read_puzzles(cfg.puzzles)
    quiz = torch.from_numpy(quiz_np).long().to(device)
    sol = torch.from_numpy(sol_np).long().to(device) if sol_np is not None else None
    _, answer, used = sweep(model, quiz, sol, cfg.iters, dtype)
    valid, keeps = is_valid_grid(answer), keeps_givens(quiz, answer)
    ok = valid & keeps if sol is None else (answer == sol).all(1)
    lines = []
    for i in range(len(quiz)):
        grid = "".join(map(str, answer[i].tolist()))
        match = "" if sol is None else f" matches={bool(ok[i])}"
        print(f"{i + 1}: {grid} valid={bool(valid[i])} keeps_givens={bool(keeps[i])}{match} iters={int(used[i])}")
        lines.append(grid + "\n")
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, "solutions.txt"), "w") as f:
        f.writelines(lines)
    n_ok = int(ok.sum())
    print(f"solved {n_ok}/{len(quiz)}")
    return {"solved": n_ok, "n": len(quiz), "mean_iters": used.float().mean().item()}


# ---------------------------------------------------------------- pictures

@torch.no_grad()
def make_movie(path, model, quiz, sol, iters, dtype):
    """One puzzle over the iterations: blank cells show the argmax digit, red (unsure) -> green (sure); givens black.
    Returns how many blank cells, once sure (p > 0.9), later changed their digit: the 'sure stays sure' check."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.animation import FuncAnimation, PillowWriter
    with autocast(quiz.device, dtype):
        logits, _ = model(quiz[None], iters)
    conf, digit = logits[:, 0].float().softmax(-1).max(-1)  # (iters, 81) each
    conf, digit, q, s = conf.cpu(), (digit + 1).cpu(), quiz.cpu(), sol.cpu()
    sure = (conf > 0.9).cummax(0).values  # once sure ...
    flipped = int((sure & (digit != digit[-1]) & (q == 0)).any(0).sum())  # ... but not on the final digit
    fig, ax = plt.subplots(figsize=(4, 4.4))
    ax.set(xlim=(0, 9), ylim=(9, 0), xticks=[], yticks=[])
    for k in range(10):
        ax.axhline(k, color="black", lw=2 if k % 3 == 0 else 0.4)
        ax.axvline(k, color="black", lw=2 if k % 3 == 0 else 0.4)
    cmap = matplotlib.colors.LinearSegmentedColormap.from_list("conf", ["#d62728", "#ff9900", "#2ca02c"])
    texts = [ax.text(c % 9 + 0.5, c // 9 + 0.55, str(int(q[c])) if q[c] else "", ha="center", va="center",
                     fontsize=13, color="black", fontweight="bold") for c in range(81)]

    def draw(t):
        for c in range(81):
            if not q[c]:
                texts[c].set_text(str(int(digit[t, c])))
                texts[c].set_color(cmap(float((conf[t, c] - 1 / 9) * 9 / 8)))
        right = int(((digit[t] == s) & (q == 0)).sum())
        ax.set_title(f"iteration {t + 1}: {right}/{int((q == 0).sum())} blanks right", fontsize=10)
        return texts

    FuncAnimation(fig, draw, frames=iters).save(path, writer=PillowWriter(fps=4))
    plt.close(fig)
    return flipped


def hardest_solved(correct):
    """correct (iters, N) -> index of the puzzle that is solved at the end but settles latest (0 if none is)."""
    settled = correct.flip(0).cumprod(0).sum(0)  # iterations at the end during which it stays solved
    return int(torch.where(correct[-1], settled, len(correct) + 1).argmin()) if correct[-1].any() else 0


# ---------------------------------------------------------------- main

def main(cfg):
    saved = None
    if cfg.ckpt:
        saved = load_checkpoint(cfg.ckpt, Config, EVAL_FLAGS)
        cfg = eval_config(Config, saved["config"], cfg, EVAL_FLAGS)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    set_seed(cfg.seed)
    model = RRN(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    data_gen = torch.Generator(device=device).manual_seed(cfg.seed)
    host_gen = torch.Generator().manual_seed(cfg.seed)  # --progressive depths, drawn without a device sync
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    step, time_before, results, val_log = 0, 0.0, {}, []
    state = resume_checkpoint(ckpt_path, Config, cfg, EVAL_FLAGS) if cfg.resume and not cfg.ckpt else saved
    if state is not None:
        load_weights(model, state["model"])
        results = state["results"]
        if not cfg.ckpt:
            opt.load_state_dict(state["optimizer"])
            step, time_before, val_log = state["step"], state["train_time_s"], state["val_log"]
            set_generator_state(data_gen, state["data_rng"])
            set_generator_state(host_gen, state["host_rng"])
            set_rng_state(state["rng"])
    # compile the hot step, not the loop over iterations; wrapping forward keeps the state_dict keys unchanged
    model.cell.forward = maybe_compile(model.cell.forward, cfg.compile, device)
    print(f"{sum(p.numel() for p in model.parameters())} parameters, width {cfg.width}, "
          f"train_iters {cfg.train_iters}, givens {cfg.min_givens}-{cfg.max_givens}")
    if cfg.puzzles:
        model.eval()
        return solve_file(model, cfg, device, dtype)

    def snapshot(elapsed):
        return {"model": model.state_dict(), "optimizer": opt.state_dict(), "config": asdict(cfg), "step": step,
                "results": results, "rng": rng_state(), "data_rng": data_gen.get_state(),
                "host_rng": host_gen.get_state(), "val_log": val_log,
                "train_time_s": time_before + elapsed}

    if not cfg.ckpt:
        pool_quiz, pool_sol = (torch.from_numpy(a).to(device) for a in train_pool())
        val = groups_to_device(load_test_set(RRN_VAL, min(VAL_N, cfg.n_test or VAL_N)), 0, device)  # --n_test caps it
    sync(device)
    t0, start, eval_s = time.time(), step, 0.0
    if not cfg.ckpt:
        bar = tqdm(range(step, cfg.steps), initial=step, total=cfg.steps, file=sys.stdout, disable=None)
        with StopAfterStep() as stop:
            for i in bar:
                if stop.requested:  # the last step is whole: stop here
                    break
                frac = max(0.0, (i - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
                for g in opt.param_groups:
                    g["lr"] = cfg.lr * min(1.0, (i + 1) / max(1, cfg.warmup)) * (0.55 + 0.45 * math.cos(math.pi * frac))
                # curriculum: start on easy puzzles, let the fewest givens fall to min_givens over the first steps
                ramp = min(1.0, i / max(1.0, cfg.curriculum * cfg.steps))
                lo = round(cfg.max_givens - ramp * (cfg.max_givens - cfg.min_givens))
                quiz, sol = sample_batch(pool_quiz, pool_sol, cfg.batch_size, data_gen, lo, cfg.max_givens)
                skip = int(torch.randint(cfg.train_iters, (1,), generator=host_gen)) if cfg.progressive else 0
                with autocast(device, dtype):
                    loss = train_loss(model, quiz, sol, skip, cfg)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                step = i + 1
                if cfg.eval_every and step % cfg.eval_every == 0 or step == cfg.steps:
                    sync(device)  # a log step: the only place the loop waits for the device
                    t_eval = time.time()
                    speed = (step - start) * cfg.batch_size / (t_eval - t0 - eval_s)
                    model.eval()
                    val_acc = evaluate(model, val, cfg.train_iters, dtype)[0]["all"][-1]
                    model.train()
                    val_log.append([step, loss.item(), val_acc])
                    save_checkpoint(ckpt_path, snapshot(time.time() - t0))  # a crash loses at most eval_every steps
                    eval_s += time.time() - t_eval
                    log_progress(bar, step, loss=f"{loss.item():.4f}", val_solved=f"{val_acc:.3f}", givens=f">={lo}",
                                 samples_per_s=f"{speed:.0f}")
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
    test_np = load_test_set(EVAL_SETS[cfg.eval_set])
    test = groups_to_device(test_np, cfg.n_test, device)
    acc, solved, adaptive = evaluate(model, test, cfg.iters, dtype)
    over_acc = None  # the same model run 4x longer on a subset: does the answer survive the extra iterations?
    if cfg.n_overthink:
        over_acc = evaluate(model, groups_to_device(test_np, cfg.n_overthink, device), 4 * cfg.iters, dtype)[0]["all"]
    groups = list(test)
    mid = [solved[k][-1] for k, g in enumerate(groups) if 30 <= g <= 34]
    headline = {"solved_17_at_iters": acc["17"][-1] if "17" in acc else None,
                "solved_30_34_at_iters": torch.cat(mid).float().mean().item() if mid else None,
                "solved_all_at_iters": acc["all"][-1],
                "drop_to_4x_iters": over_acc and over_acc[cfg.iters - 1] - over_acc[-1],  # > 0: it overthinks
                "adaptive_solved_all": adaptive["solved_all"], "adaptive_mean_iters": adaptive["mean_iters"],
                "samples_per_s": samples_per_s}
    # the movie: the fewest givens at which some puzzle gets solved, and of those the one that settles last
    gi = next((j for j, c in enumerate(solved) if c[-1].any()), 0)
    hard_group, k = groups[gi], hardest_solved(solved[gi])
    os.makedirs(cfg.out_dir, exist_ok=True)
    flipped = make_movie(os.path.join(cfg.out_dir, "movie.gif"), model, test[hard_group][0][k],
                         test[hard_group][1][k], cfg.iters, dtype)
    results = {"script": "sudoku_gnn", "config": asdict(cfg), "train_iters": cfg.train_iters, "iters": cfg.iters,
               "acc": acc, "headline": headline, "overthink": {"n_per_givens": cfg.n_overthink, "all": over_acc},
               "movie": {"givens": hard_group, "puzzle": k, "sure_cells_that_changed": flipped},
               "val_log": val_log, "train_time_s": train_time, "samples_per_s": samples_per_s,
               "peak_mem_gb": peak_mem_gb(device), "device": device_name(device), "torch": str(torch.__version__),
               "seed": cfg.seed}
    write_results(cfg.out_dir, results)
    if not cfg.ckpt:
        save_checkpoint(ckpt_path, snapshot(elapsed))
    plot_acc_vs_iters(os.path.join(cfg.out_dir, "acc_vs_iters.png"),
                      {f"{g} givens": acc[g] for g in PLOT_GROUPS if g in acc} | {"all": acc["all"]},
                      cfg.train_iters, f"sudoku RRN, width {cfg.width}, RRN {cfg.eval_set} set", ylabel="solved rate")
    fmt = lambda v, spec=".3f": "n/a" if v is None else format(v, spec)
    print(f"final: solved at {cfg.iters} iters: 17 givens {fmt(headline['solved_17_at_iters'])} | 30-34 "
          f"{fmt(headline['solved_30_34_at_iters'])} | all {fmt(headline['solved_all_at_iters'])} | drop to "
          f"{4 * cfg.iters} iters {fmt(headline['drop_to_4x_iters'])} | adaptive {adaptive['solved_all']:.3f} at "
          f"{adaptive['mean_iters']:.1f} iters | train {train_time:.0f} s, {fmt(samples_per_s, '.0f')} puzzles/s")
    return results


if __name__ == "__main__":
    main(parse_config(Config))
