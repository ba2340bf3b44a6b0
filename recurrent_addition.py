"""Add 1,000-digit numbers after training on sums of at most 20 digits, by running a recurrent block for longer.

A weight-tied block (local self-attention over the digit columns + MLP) is applied again and again; every
iteration it re-reads the input ("recall", Bansal et al. 2022) and its state is layer-normalised, so one
iteration is the same bounded, length-independent step at every length. Attention only sees +-`--window`
columns with a learned relative bias (no absolute positions), so nothing caps the length: a carry simply needs
more iterations to travel further. Anchors: McLeish et al. 2024 (looped transformer + Abacus embeddings, up to
99% at 100 digits after a GPU-day), Cho et al. 2024 (position coupling, 30 -> 200 digits).

Encoding (fixed and the same for every model here): columnar and least-significant-digit aligned. Column i holds
digit i of a and digit i of b (token 10 = "no digit"; the operands may have leading zeros), plus one extra column
for the final carry; the model predicts every digit of the sum at once (not autoregressively). Inputs are digit
tokens only. With random digits a carry rarely travels more than 2-3 columns, so `--long_carry` of the training
rows, and half of every test set, are forced long carries: a run of columns summing to 9 above a column that
does (or, half the time, does not) produce a carry, e.g. 99...9 + 1.

Training: loss at every one of `--train_iters` iterations; with `--progressive` (default) every step first runs
a random 0..train_iters-1 iterations without gradient and trains from the state they reach, so the block must
be correct from any state on its way, i.e. learn a step whose fixed point is the answer instead of a fixed depth.
Baselines: `--no-recall`, and `--model feedforward` (train_iters untied blocks: the FLOPs of the recurrent
model's gradient iterations, without the progressive warm-up; after its last block its prediction stays fixed).
Evaluation: exact match (all n+1 digits) per test length after every iteration 1..iters; the headline gives it
at `--iters`, the iterations needed to come within 1 point of the curve's best, and the accuracy at 4x those
iterations (overthinking check). Default sizes: with window 1 a carry moves one column per iteration, so
1,000 digits need about 1,000 iterations and `--iters` 4400 covers 4x that.

Headline (trained <=20 digits, tested 20..1,000 digits; --ckpt evaluates a checkpoint on other lengths):
    python recurrent_addition.py
GPU result (one H200, torch 2.11, bf16 autocast): 649 s of training (3,442 steps, then --resume on a fresh
machine; two compiles included); the log's 20-digit check (256 sums, then of the test set; now a validation set
of its own seed) was exact from step 1,500. The final checkpoint,
evaluated on the CPU with --ckpt: 1.000 at 100 digits (200 sums; 96 iterations needed, 1.000 at 4x) and at 1,000
digits, half long-carry (50 sums; 1.000 from iteration 901 to 1,300). The default evaluation itself (1,000 sums
per length, 4,400 iterations) has not run on a GPU yet.
CPU-scale version (train <=6 digits, test 8-32 digits; 1 thread of a shared 2-core machine, seed 0):
    python recurrent_addition.py --device cpu --train_digits 6 --test_digits 8,16,32 --width 64 --window 1 \\
        --train_iters 12 --iters 96 --steps 2000 --batch_size 64 --n_test 200 --lr 2e-3 --eval_every 100
    CPU result: exact match 1.000 at 8, 16 and 32 digits (200 examples each, half long-carry), reached after
    10, 17 and 35 iterations, still 1.000 at iteration 96 (past 4x the need at 8 and 16 digits); 257 s of
    training. The same checkpoint with --test_digits 64,128 --iters 400: 1.000 at 64 digits (57 iterations
    needed) and at 128 digits (136 needed), unchanged up to iteration 400. At 4x the need, longer:
    --test_digits 256 --iters 1100: 1.000 (257 needed, 1.000 at 4x = 1,028); --test_digits 512 --n_test 100
    --iters 2200: 1.000 (528 needed, 1.000 at 2,112). --test_digits 1000 --n_test 100 --iters 1300 (18 min of
    evaluation): 1.000 at 1,000 digits, half long-carry (0.64 after 8 iterations, 0.75 after 64, 0.97 after 1,000,
    0.99 after 1,044 = needed, 1.000 from 1,100 to 1,300; the first 20 rows with --iters 4400: 1,006 needed, 1.000
    from there to 4,400; curves in assets/recurrent_addition_cpu_train6_test*.png). Baselines, same flags:
    --model feedforward 0.985 / 0.890 / 0.835 at 8 / 16 / 32 digits (flat after its 12 blocks);
    --no-recall peaks at 0.375 / 0.115 / 0.040 near iteration 16 and falls to 0.000 by 96 (it overthinks).
CPU, trained on <=20 digits like the headline (the headline's model at width 64, 2,000 steps of batch 64):
    python recurrent_addition.py --device cpu --train_digits 20 --test_digits 20,50,100 --width 64 --window 1 \\
        --train_iters 24 --iters 200 --steps 2000 --batch_size 64 --n_test 200 --lr 2e-3 --eval_every 200
    CPU result (seed 0, 672 s of training): exact match 1.000 at 20, 50 and 100 digits, needing 19, 50 and 95
    iterations; --test_digits 100,200 --iters 800: 1.000 at 200 digits (191 needed) and 1.000 at 4x the need at
    100 and 200 digits; --test_digits 1000 --n_test 100 --iters 1300: 1.000 at 1,000 digits, half long-carry
    (0.60 after 64 iterations, 0.99 after 965 = needed, 1.000 from 1,043 to 1,300; assets/
    recurrent_addition_cpu_train20_test1000.png); its first 20 rows with --iters 4400: 1.000 from iteration 968 to
    4,400. Seed 1 (675 s): 1.000 at 20, 50 and 100 digits (21, 50 and 96 needed) and at 1,000 digits (from 961 on).
    Baselines, same flags (seed 0): --model feedforward 1.000 / 0.900 / 0.805 at 20 / 50 / 100 digits (flat after
    its 24 blocks; 763 s); --no-recall did not learn at all at this depth (0.16 of the digits right after any
    iteration, no sum exact; 809 s).
    CUDA runs may differ slightly.
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

PAD = 10  # input token for "this operand has no digit in this column"
EVAL_POSITIONS = 1 << 17  # rows * columns per evaluation chunk, bounds memory at 1,000 digits
ITER_CHUNK = 32  # iterations per evaluation call; the state is carried between calls


@dataclass
class Config:
    # data
    train_digits: int = 20  # operand lengths are uniform in 1..train_digits, independently for a and b
    long_carry: float = 0.3  # share of training rows with a forced long carry chain
    test_digits: str = "20,50,100,200,500,1000"  # comma-separated test lengths (both operands this long)
    # model
    model: str = field(default="recurrent", metadata={"choices": ("recurrent", "feedforward")})  # baseline
    width: int = 128  # state size per column
    heads: int = 4  # attention heads
    window: int = 1  # each column attends to columns i-window..i+window
    recall: bool = True  # re-inject the input every iteration
    # training
    train_iters: int = 32  # iterations with gradient, loss at every one (>= train_digits + 1 at window 1)
    progressive: bool = True  # first run 0..train_iters-1 iterations without gradient (recurrent model only)
    steps: int = 4000  # 649 s on one H200; the 20-digit check is exact from step 1,500 (docstring)
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 200  # linear warm-up steps, then cosine decay to lr/10
    seed: int = 0
    # evaluation
    iters: int = 4400  # maximum iterations at test; accuracy is reported after every one
    n_test: int = 1000  # examples per test length (alternating random / long-carry); 0 = all
    eval_every: int = 500  # log loss and a quick validation accuracy every this many steps; 0 = only at the end
    # system
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = True
    out_dir: str = "out/recurrent_addition"
    resume: bool = False
    ckpt: str = ""  # evaluate this checkpoint instead of training

    def __post_init__(self):
        if self.train_digits < 1 or self.window < 1 or self.heads < 1 or self.warmup < 0:
            raise ValueError("--train_digits, --window and --heads must be >= 1, --warmup >= 0")
        if self.width % self.heads:
            raise ValueError(f"--width {self.width} must be a multiple of --heads {self.heads}")
        if not 0 <= self.long_carry <= 1:
            raise ValueError(f"--long_carry must be in [0, 1], got {self.long_carry}")
        test_lengths(self.test_digits)


EVAL_FLAGS = ("iters", "n_test", "eval_every", "device", "dtype", "compile", "out_dir", "ckpt")
TEST_SIZE = 1000  # examples generated per test length; --n_test takes the first ones
TEST_SEED = 1234  # test sets do not depend on --seed
VAL_SEED = 4321  # the training log's check: fresh sums of the shortest test length, not the test set's


def test_lengths(text):
    try:
        lengths = [int(s) for s in text.split(",")]
    except ValueError:
        raise ValueError(f"--test_digits must be comma-separated integers, got {text!r}") from None
    if not lengths or min(lengths) < 1 or len(set(lengths)) != len(lengths):
        raise ValueError(f"--test_digits must list distinct lengths >= 1, got {text!r}")
    return lengths


# ---------------------------------------------------------------- data

def add_columns(va, vb):
    """Digits of a + b from the column digits (B, L) each, least significant first, without a Python loop."""
    s = va + vb  # (B, L) column sums 0..18
    pos = torch.arange(s.shape[1], device=s.device)
    # the carry out of column i is decided by the highest column j <= i whose sum is not 9
    last = torch.where(s != 9, pos, -1).cummax(1).values  # (B, L)
    carry_out = (last >= 0) & (s.gather(1, last.clamp(min=0)) >= 10)
    carry_in = F.pad(carry_out[:, :-1], (1, 0))
    return (s + carry_in) % 10


def make_batch(n_rows, lo, hi, cols, long_carry, g):
    """Rows (ta, tb, y), each (B, cols): operand lengths uniform in lo..hi; rows flagged in `long_carry` (B,) get
    a run of 9-sum columns above a column that generates a carry (or, half the time, surely does not)."""
    dev = long_carry.device
    rand = lambda *shape: torch.rand(*shape, generator=g, device=dev)
    digits = lambda *shape: torch.randint(0, 10, shape, generator=g, device=dev)
    la = torch.randint(lo, hi + 1, (n_rows,), generator=g, device=dev)
    lb = torch.randint(lo, hi + 1, (n_rows,), generator=g, device=dev)
    da, db = digits(n_rows, cols), digits(n_rows, cols)  # (B, cols)
    pos = torch.arange(cols, device=dev)
    has_a, has_b = pos < la[:, None], pos < lb[:, None]
    short, long = torch.minimum(la, lb), torch.maximum(la, lb)
    start = (rand(n_rows) * short).long()  # in both operands, so it can generate a carry
    end = torch.where(rand(n_rows) < 0.5, long - 1, start + (rand(n_rows) * (long - start)).long())
    run = long_carry[:, None] & (pos > start[:, None]) & (pos <= end[:, None])  # (B, cols)
    # nine-sum columns: a digit and its complement, or a lone 9 where the other operand has ended
    u = digits(n_rows, cols)
    da = torch.where(run, torch.where(has_b, u, 9), da)
    db = torch.where(run, torch.where(has_a, 9 - u, 9), db)
    gen = long_carry[:, None] & (pos == start[:, None])
    carry = rand(n_rows, 1) < 0.5
    ga = (rand(n_rows, cols) * 9).long() + 1  # 1..9
    gb = 10 - ga + (rand(n_rows, cols) * ga).long()  # ga + gb in 10..18: a carry
    na = (rand(n_rows, cols) * 9).long()  # 0..8
    nb = (rand(n_rows, cols) * (9 - na)).long()  # na + nb in 0..8: no carry
    da = torch.where(gen, torch.where(carry, ga, na), da)
    db = torch.where(gen, torch.where(carry, gb, nb), db)
    y = add_columns(torch.where(has_a, da, 0), torch.where(has_b, db, 0))
    return torch.where(has_a, da, PAD), torch.where(has_b, db, PAD), y


def to_int(tokens):
    """Python integer from one row of column tokens, least significant first (PAD counts as no digit)."""
    return int("".join(str(int(t)) for t in reversed(tokens.tolist()) if t != PAD) or "0")


def make_test_sets(lengths, device, seed=TEST_SEED):
    """n digits + n digits, alternating random / long-carry rows, fixed seed; labels checked with Python ints."""
    sets = {}
    for n in lengths:
        g = torch.Generator().manual_seed(seed + n)
        ta, tb, y = make_batch(TEST_SIZE, n, n, n + 1, torch.arange(TEST_SIZE) % 2 == 1, g)
        for i in range(TEST_SIZE):
            if to_int(ta[i]) + to_int(tb[i]) != int("".join(map(str, reversed(y[i].tolist())))):
                raise RuntimeError(f"test label {i} at {n} digits disagrees with Python integers")
        sets[n] = (ta.to(device), tb.to(device), y.to(device))
    return sets


# ---------------------------------------------------------------- model

class Block(nn.Module):
    """One iteration: mix state with the input, local attention over columns, MLP, layer-normalised state."""

    def __init__(self, cfg):
        super().__init__()
        d, self.heads, self.window = cfg.width, cfg.heads, cfg.window
        self.recall = cfg.recall
        self.mix = nn.Linear(2 * d if cfg.recall else d, d)
        self.ln1, self.ln2, self.ln_out = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.kv, self.proj = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)
        self.rel_bias = nn.Parameter(torch.zeros(cfg.heads, 2 * cfg.window + 1))  # one score per head and offset
        self.edge = nn.Parameter(torch.zeros(d))  # what a column sees beyond either end of the number
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def attend(self, h):  # (B, L, d)
        B, L, d = h.shape
        w, H = self.window, self.heads
        edge = self.edge.to(h.dtype).expand(B, w, d)
        k, v = self.kv(torch.cat([edge, h, edge], 1)).chunk(2, -1)  # (B, L+2w, d) each
        # unfold: a view with the 2w+1 neighbours of every column, so the cost is linear in L
        k = k.unfold(1, 2 * w + 1, 1).reshape(B, L, H, d // H, 2 * w + 1)
        v = v.unfold(1, 2 * w + 1, 1).reshape(B, L, H, d // H, 2 * w + 1)
        q = self.q(h).view(B, L, H, d // H)
        att = torch.einsum("blhc,blhcw->blhw", q, k) * (d // H) ** -0.5 + self.rel_bias  # (B, L, H, 2w+1)
        out = torch.einsum("blhw,blhcw->blhc", att.softmax(-1), v)  # (B, L, H, d/H)
        return self.proj(out.reshape(B, L, d))

    def forward(self, x, e):  # state x, input embedding e: (B, L, d)
        h = self.mix(torch.cat([x, e], -1) if self.recall else x)
        h = h + self.attend(self.ln1(h))
        h = h + self.mlp(self.ln2(h))
        return self.ln_out(h)  # the state stays bounded however long it runs


class Adder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.recurrent = cfg.model == "recurrent"
        self.embed_a, self.embed_b = nn.Embedding(11, cfg.width), nn.Embedding(11, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(1 if self.recurrent else cfg.train_iters))
        self.head = nn.Linear(cfg.width, 10)

    def forward(self, ta, tb, iters, state=None, t0=0):
        """Logits after each of iterations t0+1..t0+iters, (iters, B, L, 10), and the state to continue from."""
        e = self.embed_a(ta) + self.embed_b(tb)  # (B, L, d)
        x = e.clone() if state is None else state  # never e itself: aliased inputs would compile the block once more
        logits = []
        for t in range(t0, t0 + iters):
            if self.recurrent:
                x = self.blocks[0](x, e)
            elif t < len(self.blocks):  # the feedforward stack has no more layers: its answer stays
                x = self.blocks[t](x, e)
            logits.append(self.head(x))
        return torch.stack(logits), x


def loss_fn(logits, y):  # logits (T, B, L, 10), y (B, L): mean over iterations, rows and columns
    return F.cross_entropy(logits.float().flatten(0, 2), y.expand(len(logits), -1, -1).flatten())


@torch.no_grad()
def evaluate(model, test, iters, n_test, device, dtype):
    """Exact-match accuracy (every digit of the sum right) after each iteration 1..iters, per test length."""
    acc = {}
    for n, (ta, tb, y) in test.items():
        rows = min(n_test or len(y), len(y))
        correct = torch.zeros(iters, device=device)
        step = max(1, EVAL_POSITIONS // (n + 1))
        for i in range(0, rows, step):
            a, b, t = ta[i:min(i + step, rows)], tb[i:min(i + step, rows)], y[i:min(i + step, rows)]
            state = None
            for t0 in range(0, iters, ITER_CHUNK):
                k = min(ITER_CHUNK, iters - t0)
                with autocast(device, dtype):
                    logits, state = model(a, b, k, state, t0)
                correct[t0:t0 + k] += (logits.argmax(-1) == t).all(-1).sum(-1)
        acc[str(n)] = (correct / rows).tolist()
    return acc


def headline_numbers(acc, iters):
    """Per length: exact match at --iters, iterations needed (first within 1 point of the best; None if no sum is
    ever exact), and at 4x those."""
    out, drops = {}, []
    for n, curve in acc.items():
        best = max(curve)
        needed = next(k + 1 for k, a in enumerate(curve) if a >= best - 0.01) if best > 0 else None
        out[f"exact_{n}"] = curve[-1]
        out[f"iters_needed_{n}"] = needed
        out[f"exact_{n}_at_4x"] = curve[4 * needed - 1] if needed and 4 * needed <= iters else None
        if needed and 4 * needed <= iters:
            drops.append(curve[needed - 1] - curve[4 * needed - 1])
    out["max_drop_at_4x"] = max(drops) if drops else None  # > 0 means it overthinks
    return out


# ---------------------------------------------------------------- main

def main(cfg):
    saved = None
    if cfg.ckpt:
        saved = load_checkpoint(cfg.ckpt, Config, EVAL_FLAGS)
        # the checkpoint's own test lengths unless --test_digits names others
        lengths = ("test_digits",) if cfg.test_digits != Config.test_digits else ()
        cfg = eval_config(Config, saved["config"], cfg, EVAL_FLAGS + lengths)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    set_seed(cfg.seed)
    model = Adder(cfg).to(device)
    test = make_test_sets(test_lengths(cfg.test_digits), device)
    print(f"{sum(p.numel() for p in model.parameters())} parameters, {cfg.model}, recall={cfg.recall}; "
          f"train <= {cfg.train_digits} digits, test {cfg.test_digits} digits")
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    data_gen = torch.Generator(device=device).manual_seed(cfg.seed)  # training batches
    host_gen = torch.Generator().manual_seed(cfg.seed)  # progressive-loss depths, drawn without a device sync
    step, time_before, results = 0, 0.0, {}

    resumable = (*EVAL_FLAGS, "test_digits")  # the test lengths are read only after training (and by the log)
    state = resume_checkpoint(ckpt_path, Config, cfg, resumable) if cfg.resume and not cfg.ckpt else saved
    if state is not None:
        load_weights(model, state["model"])
        results = state["results"]
        if not cfg.ckpt:
            opt.load_state_dict(state["optimizer"])
            step, time_before = state["step"], state["train_time_s"]
            set_generator_state(data_gen, state["data_rng"])
            set_generator_state(host_gen, state["host_rng"])
            set_rng_state(state["rng"])
    for block in model.blocks:  # compile the hot step, not the loop over iterations
        block.forward = maybe_compile(block.forward, cfg.compile, device)

    def snapshot(elapsed):
        return {"model": model.state_dict(), "optimizer": opt.state_dict(), "config": asdict(cfg), "step": step,
                "results": results, "rng": rng_state(), "data_rng": data_gen.get_state(),
                "host_rng": host_gen.get_state(), "train_time_s": time_before + elapsed}

    first = min(test)
    val = make_test_sets([first], device, VAL_SEED) if not cfg.ckpt else None
    sync(device)
    t0, start = time.time(), step
    if not cfg.ckpt:
        bar = tqdm(range(step, cfg.steps), initial=step, total=cfg.steps, file=sys.stdout, disable=None)
        with StopAfterStep() as stop:
            for i in bar:
                if stop.requested:  # the last step is whole: stop here
                    break
                frac = max(0.0, (i - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
                for g in opt.param_groups:
                    g["lr"] = cfg.lr * min(1.0, (i + 1) / max(1, cfg.warmup)) * (0.55 + 0.45 * math.cos(math.pi * frac))
                lc = torch.rand(cfg.batch_size, generator=data_gen, device=device) < cfg.long_carry
                ta, tb, y = make_batch(cfg.batch_size, 1, cfg.train_digits, cfg.train_digits + 1, lc, data_gen)
                with autocast(device, dtype):
                    x = None
                    skip = int(torch.randint(cfg.train_iters, (1,), generator=host_gen))
                    if cfg.progressive and model.recurrent and skip:
                        with torch.no_grad():
                            x = model(ta, tb, skip)[1]
                    logits = model(ta, tb, cfg.train_iters, x)[0]  # (T, B, L, 10)
                    loss = loss_fn(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                step = i + 1
                if cfg.eval_every and step % cfg.eval_every == 0 or step == cfg.steps:
                    exact = (logits[-1].argmax(-1) == y).all(-1).float().mean().item()
                    quick = evaluate(model, val, 2 * cfg.train_iters, 256, device, dtype)
                    log_progress(bar, step, loss=f"{loss.item():.4f}", train_exact=f"{exact:.3f}",
                                 **{f"val{first}": f"{quick[str(first)][-1]:.3f}"},
                                 samples_per_s=f"{(step - start) * cfg.batch_size / (time.time() - t0):.0f}")
                    save_checkpoint(ckpt_path, snapshot(time.time() - t0))  # a crash loses at most eval_every steps
            bar.close()
            save_checkpoint(ckpt_path, snapshot(time.time() - t0))  # before evaluating: a kill then keeps the training
        if stop.requested:
            print(f"interrupted: checkpoint at step {step} saved to {ckpt_path}")
            sys.exit(130)
    sync(device)
    elapsed = time.time() - t0
    train_time = time_before + elapsed if not cfg.ckpt else state["train_time_s"]
    samples_per_s = (step - start) * cfg.batch_size / max(elapsed, 1e-9) if not cfg.ckpt else None

    model.eval()
    acc = evaluate(model, test, cfg.iters, cfg.n_test, device, dtype)
    headline = headline_numbers(acc, cfg.iters)
    results = {"script": "recurrent_addition", "config": asdict(cfg), "train_iters": cfg.train_iters,
               "iters": cfg.iters, "acc": acc, "headline": headline, "train_time_s": train_time,
               "samples_per_s": samples_per_s, "peak_mem_gb": peak_mem_gb(device), "device": device_name(device),
               "torch": str(torch.__version__), "seed": cfg.seed}
    write_results(cfg.out_dir, results)
    if not cfg.ckpt:
        save_checkpoint(ckpt_path, snapshot(elapsed))
    plot_acc_vs_iters(os.path.join(cfg.out_dir, "acc_vs_iters.png"), {f"{n} digits": c for n, c in acc.items()},
                      cfg.train_iters, f"addition, trained on <= {cfg.train_digits} digits ({cfg.model})",
                      ylabel="exact match")
    parts = [f"exact_{n} {headline[f'exact_{n}']:.3f} (needs {headline[f'iters_needed_{n}']})" for n in acc]
    print(f"final: {' | '.join(parts)} | max drop at 4x {headline['max_drop_at_4x']} | train {train_time:.0f} s")
    return results


if __name__ == "__main__":
    main(parse_config(Config))
