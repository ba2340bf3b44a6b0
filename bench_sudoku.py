"""Training throughput and peak memory of the sudoku models, measured in one process on one device, as ratios.

Machines are shared and absolute speeds drift, so every number here comes with a baseline timed in the same run: a
naive recurrent relational network (the Palm et al. 2018 update as it is usually first written: a message MLP on the
concatenated (h_i, h_j) of each of the 1,620 directed edges, summed into each node with index_add, an LSTM update
that re-reads the input, the loss after every iteration), eager and compiled, against one real training step of
sudoku_gnn.py (with its progressive depth and --settle iteration), of sudoku_deq.py (forward solve, implicit
backward, spectral penalty) and of learned_adjacency.py (a step of its first phase, which learns the graph: its
--n_graphs draws per puzzle, each scored by one iteration, the GNN trained on one, without the forward-only
iterations of the progressive loss that every sudoku_gnn step runs; its later steps train a fresh GNN on the frozen
graph, about a sudoku_gnn step) at the same width, iterations and batch. The baseline is lighter than RRN
itself (a 2-layer message MLP, no input MLP), so the ratios understate the gain; they measure sudoku_gnn's whole
design against it: the factorised message with its gather-free peer sum, the compiled cell, and a GRU with a
normalised message sum in place of the LSTM (plus its progressive and --settle iterations, which the baseline does
not pay for). Each model runs --warmup untimed steps (torch.compile happens there), then --steps timed ones on
batches from the training sampler. The eager baseline runs at batch 64, the compiled one at --batch_size, like the
other models. Writes out/bench_sudoku/results.json after every model (a failed one is recorded and the rest still
run): puzzles/s, ms per step, the peak memory of the timed steps and what was resident before them (CUDA), and the
ratios sudoku_gnn / naive (sudoku_gnn's target: >= 15k puzzles/s at width 96 and 32 iterations), sudoku_deq /
sudoku_gnn in speed and peak memory (sudoku_deq's target: <= 25%), and learned_adjacency / sudoku_gnn in speed (both
default to 30,000 steps, learned_adjacency's first 30% learning the graph; its training-time target is <= 3x
sudoku_gnn's).

    python bench_sudoku.py                              # CUDA: width 96, 32 iterations, batch 512 (naive eager 64)
    python bench_sudoku.py --device cpu --width 32 --msg_width 32 --train_iters 8 --batch_size 32 --naive_batch 32
GPU result (one H200, torch 2.11, bf16; the GPU shared with a training run, so absolute speeds are lower bounds;
measured when sudoku_gnn and sudoku_deq summed their messages with a gather over the 1,620 edges): the first
command gave the naive RRN 1,040 puzzles/s eager and 3,883 compiled, sudoku_gnn 6,721 (6.46x / 1.73x; the 15k
target is not met) and sudoku_deq 0.52x sudoku_gnn's speed at 0.41x its peak memory (1.73 vs 4.26 GB). The
gather-free sum they use now (sudoku_data.peer_relu_sum, with its written-out backward) and learned_adjacency are not
measured on a GPU yet.
CPU result (one thread of a shared 2-core x86 machine, torch 2.13, fp32, eager; two runs each, the two commands side
by side; peak memory is CUDA only): the second command gives the naive RRN 75 puzzles/s, sudoku_gnn 158-185
(2.12-2.48x) and sudoku_deq 0.44-0.48x sudoku_gnn's speed. At width 96 and 32 iterations sudoku_gnn runs at
3.28-3.69x the naive RRN and sudoku_deq at 0.78-0.86x sudoku_gnn:
    python bench_sudoku.py --device cpu --batch_size 8 --naive_batch 8 --warmup 1 --steps 4
learned_adjacency, added later (one more run of each command, side by side; the other ratios within or near the
ranges above): 0.61x sudoku_gnn's speed with the second command, where the draws' bookkeeping outweighs the small GNN,
and 1.15x with the third, where the GNN dominates and its step skips sudoku_gnn's progressive iterations.
"""
import gc
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

import learned_adjacency
import sudoku_deq
import sudoku_gnn
from common import (autocast, device_name, maybe_compile, parse_config, peak_mem_gb, pick_device, pick_dtype, set_seed,
                    sync, write_results)
from sudoku_data import peer_index, sample_batch, train_pool


@dataclass
class Config:
    # models
    width: int = 96  # node state size, all models
    msg_width: int = 96  # hidden units of every message MLP
    train_iters: int = 32  # iterations unrolled (naive, gnn) or solver iterations (deq) per training step
    # batches
    batch_size: int = 512  # sudoku_gnn, sudoku_deq and learned_adjacency (their default)
    naive_batch: int = 64  # the naive RRN, eager (compiled, CUDA only, it runs at --batch_size)
    # timing
    warmup: int = 10  # untimed steps per model first
    steps: int = 30  # timed steps per model
    seed: int = 0
    # system
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = True
    out_dir: str = "out/bench_sudoku"

    def __post_init__(self):
        if min(self.msg_width, self.naive_batch) < 1 or self.warmup < 0:
            raise ValueError("--msg_width and --naive_batch must be >= 1, --warmup >= 0")


class NaiveRRN(nn.Module):
    """The baseline: every edge's message from the concatenated pair, no shared work between edges."""

    def __init__(self, d, m):
        super().__init__()
        self.digit = nn.Embedding(10, d)
        self.pos = nn.Parameter(torch.randn(81, d) * 0.1)
        self.message = nn.Sequential(nn.Linear(2 * d, m), nn.ReLU(), nn.Linear(m, d))
        self.lstm = nn.LSTMCell(2 * d, d)
        self.head = nn.Linear(d, 9)
        peers = peer_index()  # (81, 20)
        self.register_buffer("src", peers.flatten(), persistent=False)  # (1620,) sender of each edge
        self.register_buffer("dst", torch.arange(81).repeat_interleave(peers.shape[1]), persistent=False)

    def messages(self, h):  # h (B, 81, d) -> (B, 81, d): each node's sum over its 20 peers
        m = self.message(torch.cat([h[:, self.dst], h[:, self.src]], -1))  # (B, 1620, d)
        return torch.zeros_like(h).index_add_(1, self.dst, m.to(h.dtype))

    def step(self, h, c, x):  # one iteration on (B * 81, d) states
        msg = self.messages(h.view(x.shape)).flatten(0, 1)
        return self.lstm(torch.cat([x.flatten(0, 1), msg], -1), (h, c))

    def forward(self, quiz, iters, step):  # step: self.step, or a compiled copy -> logits (iters, B, 81, 9)
        x = self.digit(quiz) + self.pos  # (B, 81, d)
        h = c = torch.zeros(x.shape[0] * 81, x.shape[-1], device=x.device)
        logits = []
        for _ in range(iters):
            h, c = step(h, c, x)
            logits.append(self.head(h).view(*quiz.shape, 9))
        return torch.stack(logits)


def measure(step, cfg, batch, device):
    """Time cfg.steps calls of step() after cfg.warmup untimed ones. -> puzzles/s, ms per step and, on CUDA, the
    peak memory of the timed steps and what was resident before them (weights, optimizer state, the pool)."""
    for _ in range(cfg.warmup):
        step()
    sync(device)
    resident = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device) / 1e9
    t0 = time.time()
    for _ in range(cfg.steps):
        step()
    sync(device)
    seconds = time.time() - t0
    return {"batch": batch, "puzzles_per_s": cfg.steps * batch / seconds, "step_ms": 1000 * seconds / cfg.steps,
            "peak_mem_gb": peak_mem_gb(device), "resident_gb": resident}


def trainer(model, loss_of, batch, pool, gen, device, dtype):
    """-> a closure running one optimizer step of `model` on a fresh batch of 17-34-givens puzzles."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        quiz, sol = sample_batch(*pool, batch, gen, 17, 34)
        with autocast(device, dtype):
            loss = loss_of(quiz, sol)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return step


def main(cfg):
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    set_seed(cfg.seed)
    pool = tuple(torch.from_numpy(a).to(device) for a in train_pool())
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    host_gen = torch.Generator().manual_seed(cfg.seed)  # sudoku_gnn's progressive depths, as in its training loop
    shared = dict(width=cfg.width, msg_width=cfg.msg_width, train_iters=cfg.train_iters, batch_size=cfg.batch_size,
                  compile=cfg.compile, device=cfg.device, dtype=cfg.dtype)
    gnn_cfg, deq_cfg = sudoku_gnn.Config(**shared), sudoku_deq.Config(**shared)
    la_cfg = learned_adjacency.Config(**shared)

    def naive_step(batch, compiled):
        model = NaiveRRN(cfg.width, cfg.msg_width).to(device)
        fast_step = maybe_compile(model.step, compiled, device)

        def loss_of(quiz, sol):
            return sudoku_gnn.loss_fn(model(quiz, cfg.train_iters, fast_step), sol)
        return trainer(model, loss_of, batch, pool, gen, device, dtype)

    def gnn_step(batch):
        model = sudoku_gnn.RRN(gnn_cfg).to(device)
        model.cell.forward = maybe_compile(model.cell.forward, cfg.compile, device)  # as sudoku_gnn.py does

        def loss_of(quiz, sol):  # one real training step: a progressive depth 0..train_iters-1, then --settle
            skip = int(torch.randint(cfg.train_iters, (1,), generator=host_gen))
            return sudoku_gnn.train_loss(model, quiz, sol, skip, gnn_cfg)
        return trainer(model, loss_of, batch, pool, gen, device, dtype)

    def deq_step(batch):
        model = sudoku_deq.DEQ(deq_cfg).to(device)
        fast_cell = maybe_compile(model.cell, cfg.compile, device)

        def loss_of(quiz, sol):  # forward solve, implicit backward, spectral penalty: its default step
            return sudoku_deq.train_loss(model, quiz, sol, deq_cfg, gen, fast_cell)[0]
        return trainer(model, loss_of, batch, pool, gen, device, dtype)

    def la_step(batch):
        model = learned_adjacency.Model(la_cfg).to(device)
        model.gnn.cell.forward = maybe_compile(model.gnn.cell.forward, cfg.compile, device)  # as its script does

        def loss_of(quiz, sol):  # the GNN on one draw, every draw scored, the sampler's surrogate and bonus
            return learned_adjacency.train_loss(model, quiz, sol, la_cfg, gen)[0]
        return trainer(model, loss_of, batch, pool, gen, device, dtype)

    arms = [("naive_eager", lambda b: naive_step(b, False), cfg.naive_batch), ("sudoku_gnn", gnn_step, cfg.batch_size),
            ("sudoku_deq", deq_step, cfg.batch_size), ("learned_adjacency", la_step, cfg.batch_size)]
    if cfg.compile and device.type == "cuda":
        arms.append(("naive_compiled", lambda b: naive_step(b, True), cfg.batch_size))
    print(f"device {device_name(device)}, {dtype}, width {cfg.width}, {cfg.train_iters} iterations")
    fmt = lambda v, unit="x": "n/a" if v is None else f"{v:.2f}{unit}"
    results = {"script": "bench_sudoku", "config": asdict(cfg), "models": {}, "ratios": {},
               "device": device_name(device), "torch": str(torch.__version__), "seed": cfg.seed}
    for name, build, batch in arms:
        try:
            m = measure(build(batch), cfg, batch, device)
            print(f"{name:17s} batch {batch:4d}: {m['puzzles_per_s']:8.0f} puzzles/s, {m['step_ms']:7.1f} ms/step, "
                  f"peak memory {fmt(m['peak_mem_gb'], ' GB')}")
        except RuntimeError as e:  # out of memory (a subclass), a compiler error: keep the other models' numbers
            m = {"batch": batch, "error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"}
            print(f"{name:17s} batch {batch:4d}: failed, {m['error']}")
        results["models"][name] = m
        write_results(cfg.out_dir, results)  # after every model: a later failure or a kill keeps these
        gc.collect()  # the compiled forward assigned onto sudoku_gnn's cell keeps its model in a reference cycle
        if device.type == "cuda":
            torch.cuda.empty_cache()
    speed = {k: m.get("puzzles_per_s") for k, m in results["models"].items()}
    mem = {k: m.get("peak_mem_gb") for k, m in results["models"].items()}
    ratio = lambda a, b: a / b if a and b else None
    results["ratios"] = ratios = {
        "gnn_vs_naive_eager": ratio(speed["sudoku_gnn"], speed["naive_eager"]),
        "gnn_vs_naive_compiled": ratio(speed["sudoku_gnn"], speed.get("naive_compiled")),  # both at --batch_size
        "deq_vs_gnn_speed": ratio(speed["sudoku_deq"], speed["sudoku_gnn"]),
        "deq_vs_gnn_peak_mem": ratio(mem["sudoku_deq"], mem["sudoku_gnn"]),
        "la_vs_gnn_speed": ratio(speed["learned_adjacency"], speed["sudoku_gnn"])}
    write_results(cfg.out_dir, results)
    print(f"final: sudoku_gnn {fmt(speed['sudoku_gnn'], ' puzzles/s')} = {fmt(ratios['gnn_vs_naive_eager'])} naive "
          f"eager, {fmt(ratios['gnn_vs_naive_compiled'])} naive compiled | sudoku_deq speed "
          f"{fmt(ratios['deq_vs_gnn_speed'])}, peak memory {fmt(ratios['deq_vs_gnn_peak_mem'])} sudoku_gnn's | "
          f"learned_adjacency speed {fmt(ratios['la_vs_gnn_speed'])}")
    return results


if __name__ == "__main__":
    main(parse_config(Config))
