"""Shortest paths between US cities: does a recurrent top block, run for more iterations at test time, beat a
non-recurrent transformer trained with the same FLOPs?

Cities within 70 km great-circle distance are linked (largest connected component of the 4,134 US cities with
population >= 10,000: 2,257 cities, 70,794 links, shortest paths up to 60 hops). Given a goal and a start city, the
model writes the shortest path city by city. Cities are learned token embeddings only: no coordinates or distances
reach the model, and a linear probe (ridge, 5-fold CV R^2) asks whether the embeddings learned where the cities are
anyway. The recurrent model is `n_layers` blocks followed by one weight-tied block applied `train_iters` times,
with the next-city loss after every application; at test time we decode greedily with that block applied k =
1..iters times. `--arch deep|wide` trains the non-recurrent baselines; training FLOPs are counted analytically and
printed, and `--flop_budget F` sets the steps so that any two runs cost the same. Two held-out splits: `pairs`
(random pairs, never trained on in either direction) and `sources` (start cities that never start or end a training
path, headline), each with a validation twin drawn the same way from other pairs and other cities (a `sources` path
never ends at the other split's start cities): the training log reads validation `sources`, and `--eval_set
validation` evaluates on validation instead of test, for choosing settings.

  python recurrent_shortest_path.py                        # headline: US map, recurrent, one GPU
  python recurrent_shortest_path.py --arch deep --flop_budget F   # F = train_flops printed by the run above

GPU result: not yet measured.

Neighbour queries: the first hop from an unseen start city is where `sources` paths fail (validation, without the
queries: teacher-forced next-hop accuracy 0.38 in the start slot, 0.994 for the same cities mid-path, where the
previous city does the work; 92% of failed paths go wrong on hop one). So each batch also holds `neighbour_frac` x
batch_size sequences [NEIGHBOUR, c] for random cities c, held-out ones included, whose target is uniform over c's
links: the map alone, no goal and no pair. Both arms get them, and their FLOPs are counted. The default, 2, has
the best mean over seeds 0 and 1 on validation start cities, against 1 and 4, for recurrent and wide (CPU; README).

CPU (one thread on a shared 2-core machine; every arm trained with the same --flop_budget F, seeds 0-2). Plane map,
300 cities -> 287 in the largest component, longest path 26 hops:
  OMP_NUM_THREADS=1 python recurrent_shortest_path.py --map plane --n_cities 300 --max_hops 32 --width 64 \\
      --batch_size 64 --lr 2e-3 --iters 8 --n_test 100 --eval_every 500 --device cpu --flop_budget F \\
      --seed S [--arch deep|wide]
  Held-out start cities reached within 5% of optimal (test), median of 3 seeds, at F = 5.27e12 (948 / 1,104 / 985
  steps): recurrent 0.737 at k = 8 (0.760 at k = 4 = train_iters), deep (6 blocks) 0.836, wide (3 blocks of width 96)
  0.828; with each arm's lr chosen on validation (recurrent 8e-3, deep and wide 4e-3) 0.832, 0.840 and 0.874. A
  non-recurrent arm has the best median at each of three budgets and wide beats recurrent in all 9 seed-budget pairs;
  the embeddings of every arm place the cities (probe R^2 0.82-0.92), but recurrent accuracy falls from k = 4 to 8 in
  7 of 9 runs, and on a map with paths of up to 36 hops its >= 30-hop paths are worse at k = 16 than at k = 4 (best
  at k = 1) and behind deep and wide. At these scales the hard part is the first hop from a start city never trained
  on: map knowledge that more parameters hold and more iterations do not create. Every run: README;
  assets/recurrent_shortest_path_cpu.png (recurrent, F = 5.27e12, seed 0) and
  assets/recurrent_shortest_path_cpu_long.png (long paths, recurrent, seed 0).
"""
import csv
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import (StopAfterStep, autocast, device_name, eval_config, load_checkpoint, load_weights, log_progress,
                    maybe_compile, parse_config, peak_mem_gb, pick_device, pick_dtype, plot_acc_vs_iters,
                    resume_checkpoint, rng_state, save_checkpoint, set_generator_state, set_rng_state, set_seed, sync,
                    user_error, write_results)

DEFAULT_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "uscities.csv")
BUCKETS = ((1, 9, "1-9"), (10, 19, "10-19"), (20, 29, "20-29"), (30, 10**6, "30+"))  # optimal hops per group
POOL = 500  # fixed held-out pairs per split and bucket; --n_test takes the first N of each
EARTH_KM = 6371.0


@dataclass
class Config:
    # data
    map: str = field(default="us", metadata={"choices": ("us", "plane")})  # real cities or uniform unit square
    cities_csv: str = ""  # any CSV with lat,lng columns (default: data/uscities.csv); --map us only
    link_km: float = 70.0  # us map: cities closer than this are linked
    n_cities: int = 300  # plane map: number of cities
    degree: float = 8.0  # plane map: link radius chosen for this mean degree
    max_hops: int = 64  # longer shortest paths are dropped (the US map's longest is 60 hops)
    holdout_frac: float = 0.1  # share of cities held out as `sources` test start cities; as many for validation
    data_seed: int = 0  # map, held-out cities and held-out pairs; independent of --seed
    # model
    arch: str = field(default="recurrent", metadata={"choices": ("recurrent", "deep", "wide")})
    width: int = 256  # hidden size (wide: starting point, grown until the FLOPs match the recurrent model)
    n_layers: int = 2  # untied blocks below the recurrent block
    n_heads: int = 4
    # training
    train_iters: int = 4  # applications of the tied block in training, loss after each
    neighbour_frac: float = 2.0  # neighbour queries per training path in each batch (0 = off)
    steps: int = 20000
    flop_budget: float = 0.0  # > 0: steps = flop_budget / training FLOPs per step
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    seed: int = 0
    eval_every: int = 1000  # log teacher-forced next-hop accuracy every N steps (0 = off)
    # evaluation
    iters: int = 16  # tied-block applications at test time; metrics after each k = 1..iters
    eval_set: str = field(default="test", metadata={"choices": ("test", "validation")})  # choose settings on validation
    n_test: int = 0  # first N pairs of each split and bucket (0 = all: up to POOL)
    # system
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = True
    out_dir: str = "out/recurrent_shortest_path"
    resume: bool = False
    ckpt: str = ""

    def __post_init__(self):
        if self.link_km <= 0 or self.degree <= 0:
            raise ValueError("--link_km and --degree must be > 0")
        if self.n_cities < 4:
            raise ValueError(f"--n_cities must be >= 4, got {self.n_cities}")
        if self.max_hops < 2:
            raise ValueError(f"--max_hops must be >= 2, got {self.max_hops}")
        if not 0 < self.holdout_frac <= 0.25:
            raise ValueError(f"--holdout_frac must be in (0, 0.25], got {self.holdout_frac}")
        if self.n_layers < 0 or self.n_heads < 1 or self.width % self.n_heads:
            raise ValueError("--n_layers must be >= 0, --n_heads >= 1 and --width a multiple of --n_heads")
        if self.cities_csv and self.map != "us":
            raise ValueError("--cities_csv needs --map us (the plane map draws its own cities)")
        if self.flop_budget < 0:
            raise ValueError(f"--flop_budget must be >= 0, got {self.flop_budget}")
        if self.neighbour_frac < 0:
            raise ValueError(f"--neighbour_frac must be >= 0, got {self.neighbour_frac}")
        if not 0 <= self.n_test <= POOL:
            raise ValueError(f"--n_test must be in [0, {POOL}], got {self.n_test}")


EVAL_FLAGS = ("iters", "eval_set", "n_test", "device", "dtype", "compile", "out_dir", "ckpt")


# ---------------------------------------------------------------------------------------------------------------
# the map: cities, links, shortest paths, splits

def haversine(lat1, lng1, lat2, lng2):
    """Great-circle distance in km between points given in degrees (numpy broadcasting)."""
    lat1, lng1, lat2, lng2 = (np.radians(v) for v in (lat1, lng1, lat2, lng2))
    a = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lng2 - lng1) / 2) ** 2
    return 2 * EARTH_KM * np.arcsin(np.sqrt(np.clip(a, 0, 1)))


def read_cities(path):
    """(n, 2) array of (lat, lng) from a CSV with lat and lng columns; anything else is a user error."""
    if not os.path.isfile(path):
        user_error(f"cities file {path} does not exist")
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        coords = np.array([[float(r["lat"]), float(r["lng"])] for r in rows], dtype=np.float64)
    except (KeyError, ValueError, TypeError, UnicodeDecodeError, csv.Error):
        user_error(f"cities file {path} needs numeric lat and lng columns on every row")
    if len(coords) < 4 or not np.isfinite(coords).all() or np.abs(coords[:, 0]).max() > 90 or \
            np.abs(coords[:, 1]).max() > 180:
        user_error(f"cities file {path} needs >= 4 rows with finite lat in [-90, 90] and lng in [-180, 180]")
    return coords


def city_map(cfg):
    """Coordinates (n, 2), pairwise distance (n, n) and link radius, before keeping the largest component."""
    if cfg.map == "plane":
        gen = torch.Generator().manual_seed(cfg.data_seed)
        xy = torch.rand(cfg.n_cities, 2, generator=gen, dtype=torch.float64).numpy()
        dist = np.sqrt(((xy[:, None] - xy[None]) ** 2).sum(-1))
        # mean degree ~ (n - 1) * pi * r^2, ignoring the border
        return xy, dist, math.sqrt(cfg.degree / (math.pi * (cfg.n_cities - 1)))
    ll = read_cities(cfg.cities_csv or DEFAULT_CSV)
    return ll, haversine(ll[:, None, 0], ll[:, None, 1], ll[None, :, 0], ll[None, :, 1]), cfg.link_km


def largest_component(adj):
    """Indices of the largest connected component of a boolean adjacency matrix (breadth-first search)."""
    seen, best = np.zeros(len(adj), bool), np.zeros(0, int)
    for root in range(len(adj)):
        if seen[root]:
            continue
        comp, frontier = [root], [root]
        seen[root] = True
        while frontier:
            new = np.nonzero(adj[frontier].any(0) & ~seen)[0]
            seen[new] = True
            comp.extend(new.tolist())
            frontier = new.tolist()
        if len(comp) > len(best):
            best = np.sort(np.array(comp))
    return best


def dijkstra(weight):
    """Dijkstra from every source at once on a dense (n, n) weight matrix (inf = no link); each round settles the
    nearest unsettled city of every source, so n rounds of O(n^2) tensor work replace n heap-based runs (the US map
    has ~63 links per city, and this runs on the GPU). Returns distance, predecessor and hop count, all (n, n)."""
    n, dev = len(weight), weight.device
    rows = torch.arange(n, device=dev)
    dist = torch.full((n, n), math.inf, device=dev, dtype=weight.dtype)
    dist[rows, rows] = 0
    pred = rows[:, None].expand(n, n).clone()  # pred[s, v]: the city before v on the path s -> v
    hops = torch.zeros(n, n, dtype=torch.long, device=dev)
    done = torch.zeros(n, n, dtype=torch.bool, device=dev)
    for _ in range(n):
        u = dist.masked_fill(done, math.inf).argmin(1)  # (n,) nearest unsettled city of each source
        done[rows, u] = True
        cand = dist[rows, u][:, None] + weight[u]  # (n, n) through u
        better = (cand < dist) & ~done
        dist = torch.where(better, cand, dist)
        pred = torch.where(better, u[:, None], pred)
        hops = torch.where(better, hops[rows, u][:, None] + 1, hops)
    return dist, pred, hops


class Graph:
    """Everything the experiment knows about the map, as tensors on `device`."""

    def __init__(self, cfg, device):
        coords, dist, radius = city_map(cfg)
        adj = (dist < radius) & ~np.eye(len(dist), dtype=bool)
        keep = largest_component(adj)
        self.coords = coords[keep]  # (n, 2) lat/lng or x/y: for the probe only, never seen by the model
        self.n = n = len(keep)
        self.geo = torch.tensor(dist[np.ix_(keep, keep)], dtype=torch.float32, device=device)  # (n, n)
        self.adj = torch.tensor(adj[np.ix_(keep, keep)], device=device)  # (n, n)
        self.sp, pred, self.hops = dijkstra(torch.where(self.adj, self.geo, math.inf))  # (n, n) each
        # next hop from s towards t = predecessor of s on the path t -> s (links are symmetric)
        self.next_hop = pred.T.contiguous()  # (n, n)
        # held-out start cities: the first m of a random order for test, the next m for validation
        gen = torch.Generator().manual_seed(cfg.data_seed)
        m, order = max(1, round(cfg.holdout_frac * n)), torch.randperm(n, generator=gen)
        hops, held = self.hops.cpu(), torch.zeros(2, n, dtype=torch.bool)  # (test, validation) x city
        held[0, order[:m]] = held[1, order[m:2 * m]] = True
        ok, any_held = (hops >= 1) & (hops <= cfg.max_hops), held.any(0)  # ok also drops s == t
        train_ok = ok & ~any_held[:, None] & ~any_held[None]
        self.splits = {}
        for name, starts, other in zip(("test", "validation"), held, held.flip(0)):
            # `sources` ends at a training city or at one of its own start cities, never at the other split's: the
            # two mirror each other, and no validation pair is the reverse of a test pair. `pairs` draws from a
            # holdout_frac share of the eligible pairs, so small maps keep most for training
            split = {"sources": self._pool(ok & starts[:, None], gen, hops, 1.0, goals=~other),
                     "pairs": self._pool(train_ok, gen, hops, cfg.holdout_frac)}
            s, t = split["pairs"][:2]
            train_ok[s, t] = train_ok[t, s] = False  # no held-out pair in either direction
            self.splits[name] = split
        self.train_pairs = torch.nonzero(train_ok.flatten()).squeeze(1).to(device)  # flat s * n + t
        self.held = any_held.to(device)  # never starts or ends a training path
        if not len(self.train_pairs) or not all(len(v[0]) for d in self.splits.values() for v in d.values()):
            user_error(f"the map's largest connected component (size {n}) leaves no training or no held-out pairs: "
                       f"link more cities (--degree, --link_km) or use more of them")
        print(f"map: {cfg.map}, {n} cities in the largest component, {int(self.adj.sum()) // 2} links, "
              f"longest path {int(hops.max())} hops, {len(self.train_pairs)} training pairs")

    def _pool(self, mask, gen, hops, share, goals=None):
        """Up to POOL random pairs per bucket of optimal hops, in a fixed order: (s, t, bucket) tensors. `goals`
        (n,) keeps only pairs ending there, filtered after the draw, so the draws after it do not depend on it."""
        flat = torch.nonzero(mask.flatten()).squeeze(1)
        flat = flat[torch.randperm(len(flat), generator=gen)][:max(1, round(share * len(flat)))]
        if goals is not None:
            flat = flat[goals[flat % self.n]]
        h = hops.flatten()[flat]
        picked = [(flat[(h >= lo) & (h <= hi)][:POOL], b) for b, (lo, hi, _) in enumerate(BUCKETS)]
        flat = torch.cat([p for p, _ in picked])
        bucket = torch.cat([torch.full((len(p),), b) for p, b in picked])
        return flat // self.n, flat % self.n, bucket

    def paths(self, s, t, length):
        """Teacher-forcing sequences: x = [goal, start, c1, ...] (B, length), y = next city or -1 past the goal."""
        cols = [t, s]
        for _ in range(length - 2):
            cols.append(self.next_hop[cols[-1], t])
        x = torch.stack(cols, 1)  # (B, length)
        y = torch.cat([x[:, 2:], t[:, None]], 1)  # (B, length - 1) the city after each position 1..
        arrived = torch.arange(1, length, device=s.device)[None] > self.hops[s, t][:, None]
        return x, torch.cat([torch.full_like(t[:, None], -1), y.masked_fill(arrived, -1)], 1)

    def neighbour_queries(self, c):
        """x = [NEIGHBOUR, c] (Q, 2), where token n stands where a goal would, and the target (Q, n): uniform over
        c's links. A held-out city otherwise never sits in the start slot, and its first hop is where `sources`
        paths failed; these queries train that slot for every city with the map alone, no goal and no pair."""
        adj = self.adj[c].float()
        return torch.stack([torch.full_like(c, self.n), c], 1), adj / adj.sum(1, keepdim=True)


# ---------------------------------------------------------------------------------------------------------------
# model

class Block(nn.Module):
    def __init__(self, d, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, h):  # (B, T, d)
        B, T, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(B, T, 3, self.n_heads, d // self.n_heads).transpose(1, 3).unbind(2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, heads, T, d / heads)
        h = h + self.proj(a.transpose(1, 2).reshape(B, T, d))
        return h + self.mlp(self.ln2(h))


def model_shape(cfg, n_cities):
    """(width, untied blocks, whether a tied block follows) for each architecture."""
    if cfg.arch == "recurrent":
        return cfg.width, cfg.n_layers, True
    if cfg.arch == "deep":
        return cfg.width, cfg.n_layers + cfg.train_iters, False
    # wide: n_layers + 1 blocks, width grown in steps of 8 per head while a step costs at most what recurrent costs
    T, d = cfg.max_hops + 1, cfg.width
    target = flops_per_token(cfg.width, cfg.n_layers + cfg.train_iters, cfg.train_iters, T, n_cities)
    while flops_per_token(d + 8 * cfg.n_heads, cfg.n_layers + 1, 1, T, n_cities) <= target:
        d += 8 * cfg.n_heads
    return d, cfg.n_layers + 1, False


def flops_per_token(d, blocks, heads, T, V):
    """Forward matmul FLOPs per token: per block 24 d^2 (qkv, proj, 4x MLP) + 4 T d (scores and values, full T);
    the output head 2 d V each time it is evaluated (the recurrent model evaluates it after every iteration)."""
    return blocks * (24 * d * d + 4 * T * d) + heads * 2 * d * V


def neighbour_batch(cfg):  # neighbour queries per training step
    return round(cfg.neighbour_frac * cfg.batch_size)


def train_step_flops(cfg, n_cities):
    """FLOPs of one training step: forward + backward (3x the forward: each product also gives the gradients of its
    input and of its weight) over batch_size paths of max_hops + 1 tokens and the neighbour queries' 2 tokens."""
    d, n_blocks, tied = model_shape(cfg, n_cities)

    def fwd(length):  # forward FLOPs per token of a training sequence of this length
        return flops_per_token(d, n_blocks + tied * cfg.train_iters, cfg.train_iters if tied else 1, length, n_cities)
    T = cfg.max_hops + 1
    return 3 * (fwd(T) * cfg.batch_size * T + fwd(2) * neighbour_batch(cfg) * 2)


class PathModel(nn.Module):
    def __init__(self, cfg, n_cities):
        super().__init__()
        d, n_blocks, self.recurrent = model_shape(cfg, n_cities)
        self.n_cities = n_cities
        self.tok = nn.Embedding(n_cities + 1, d)  # the only way cities enter (+1: the neighbour-query token)
        self.pos = nn.Parameter(torch.zeros(cfg.max_hops + 1, d))
        self.blocks = nn.ModuleList(Block(d, cfg.n_heads) for _ in range(n_blocks))
        self.core = Block(d, cfg.n_heads) if self.recurrent else None
        self.ln_in, self.ln_f = nn.LayerNorm(d), nn.LayerNorm(d)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, x, iters, last_only=False):
        """x: (B, T) city ids. Returns logits (B, T, n_cities) after each tied-block application 1..iters
        (only the last if last_only); the non-recurrent models return one."""
        h = self.tok(x) + self.pos[:x.shape[1]]  # (B, T, d)
        for blk in self.blocks:
            h = blk(h)
        if not self.recurrent:
            return [self.head(h)]
        e, out = h, []
        for k in range(iters):
            # re-normalised state plus the input at every step keeps long unrolls bounded and anchored to the query
            h = self.core(self.ln_in(h) + e)
            if not last_only or k == iters - 1:
                out.append(self.head(h))
        return out

    def head(self, h):
        return self.ln_f(h) @ self.tok.weight[:self.n_cities].T  # tied output embedding: (B, T, n_cities)


# ---------------------------------------------------------------------------------------------------------------
# evaluation: greedy decoding and the probe

@torch.no_grad()
def decode(model, graph, s, t, k, max_hops, device, dtype):
    """Greedy paths from s to t with k tied-block applications, at most max_hops hops; a wrong hop does not stop
    a path, so valid_hops counts every hop written. Causal attention means the prefix alone gives the next city,
    and only unfinished pairs are fed, so each step costs what is still running. Returns per pair: hops, valid
    hops, whether it arrived with every hop a link, and its length."""
    B = len(s)
    x = torch.stack([t, s], 1)  # (B, 2)
    cur, done, bad = s.clone(), torch.zeros(B, dtype=torch.bool, device=device), torch.zeros_like(t, dtype=torch.bool)
    n_hops, n_valid, length = (torch.zeros(B, device=device) for _ in range(3))
    for _ in range(max_hops):
        run = torch.nonzero(~done).squeeze(1)  # (R,) pairs still on their way
        if len(run) == 0:
            break
        with autocast(device, dtype):
            nxt = model(x[run], k, last_only=True)[-1][:, -1].argmax(-1)  # (R,)
        link = graph.adj[cur[run], nxt]
        n_hops[run] += 1
        n_valid[run] += link.float()
        bad[run] |= ~link
        length[run] += graph.geo[cur[run], nxt]
        cur[run] = nxt
        done[run] = nxt == t[run]
        x = torch.cat([x, cur[:, None]], 1)
    return n_hops, n_valid, done & ~bad, length


def evaluate(model, graph, cfg, device, dtype):
    """Path metrics after each k = 1..iters for both splits and every bucket of optimal hops. Non-recurrent models
    have no iterations to vary: they are decoded once and their value is repeated over k."""
    model.eval()
    acc = {}
    ks = range(1, cfg.iters + 1) if model.recurrent else [cfg.iters]
    for split, (s, t, bucket) in graph.splits[cfg.eval_set].items():
        rank = torch.cat([torch.arange(int((bucket == b).sum())) for b in range(len(BUCKETS))])
        keep = rank < (cfg.n_test or POOL)  # first n_test of each bucket
        s, t, bucket = s[keep].to(device), t[keep].to(device), bucket[keep]
        opt = graph.sp[s, t]
        curves = {}
        for k in ks:
            n_hops, n_valid, arrived, length = decode(model, graph, s, t, k, cfg.max_hops, device, dtype)
            within = (arrived & (length <= 1.05 * opt)).cpu()
            exact = (arrived & (length <= opt * (1 + 1e-4))).cpu()  # float32 path sums: relative tolerance
            row = {f"valid_hops_{split}": (n_valid.sum() / n_hops.sum()).item(),
                   f"reach_{split}": arrived.float().mean().item(),
                   f"reach_1.05_{split}": within.float().mean().item(),
                   f"optimal_{split}": exact.float().mean().item()}
            for b, (_, _, label) in enumerate(BUCKETS):
                if (bucket == b).any():
                    row[f"reach_1.05_{split}_{label}"] = within[bucket == b].float().mean().item()
            for key, v in row.items():
                curves.setdefault(key, []).append(v)
        acc.update({key: v if model.recurrent else v * cfg.iters for key, v in curves.items()})
    model.train()
    return acc


def probe_r2(emb, target, folds=5, alpha=1.0):
    """Ridge regression from embeddings (n, d) to coordinates (n, m), fold-wise standardised; the R^2 of the
    held-out predictions, pooled over folds and averaged over the m outputs."""
    emb, target = np.asarray(emb, np.float64), np.asarray(target, np.float64)
    order = torch.randperm(len(emb), generator=torch.Generator().manual_seed(0)).numpy()
    pred = np.zeros_like(target)
    for fold in np.array_split(order, folds):
        train = np.setdiff1d(order, fold)
        mu, sd = emb[train].mean(0), emb[train].std(0) + 1e-8
        X, Xf, ym = (emb[train] - mu) / sd, (emb[fold] - mu) / sd, target[train].mean(0)
        w = np.linalg.solve(X.T @ X + alpha * np.eye(X.shape[1]), X.T @ (target[train] - ym))
        pred[fold] = Xf @ w + ym
    sse, sst = ((target - pred) ** 2).sum(0), ((target - target.mean(0)) ** 2).sum(0)
    return float(np.mean(1 - sse / sst))


# ---------------------------------------------------------------------------------------------------------------
# main

def main(cfg):
    if cfg.ckpt:
        ckpt = load_checkpoint(cfg.ckpt, Config, EVAL_FLAGS)
        cfg = eval_config(Config, ckpt["config"], cfg, EVAL_FLAGS)
    set_seed(cfg.seed)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    graph = Graph(cfg, device)
    model = PathModel(cfg, graph.n).to(device)
    T, n_nb = cfg.max_hops + 1, neighbour_batch(cfg)
    d, n_blocks, _ = model_shape(cfg, graph.n)
    step_flops = train_step_flops(cfg, graph.n)
    steps = max(1, round(cfg.flop_budget / step_flops)) if cfg.flop_budget else cfg.steps
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {cfg.arch}, width {d}, {n_blocks} untied blocks{' + 1 tied' if model.recurrent else ''}, "
          f"{n_params / 1e6:.2f}M parameters; training FLOPs {step_flops * steps:.3e} ({steps} steps)")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    step, train_time, ckpt_path = 0, 0.0, os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.ckpt or cfg.resume:
        if cfg.resume and not cfg.ckpt:
            ckpt = resume_checkpoint(ckpt_path, Config, cfg, (*EVAL_FLAGS, "flop_budget"))  # sets the steps
        if "eval_set" not in ckpt["config"]:  # saved before validation cities were held out of training
            user_error(f"checkpoint {cfg.ckpt or ckpt_path} predates the validation split (its validation cities "
                       f"were training cities): train it again")
        load_weights(model, ckpt["model"])
        step, train_time = ckpt["step"], ckpt["train_time_s"]  # --ckpt: what it was trained for, maybe interrupted
        if cfg.resume and not cfg.ckpt:
            opt.load_state_dict(ckpt["optimizer"])
            set_rng_state(ckpt["rng"])
            set_generator_state(gen, ckpt["data_rng"])

    def checkpoint(train_time_s, results=None):
        save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "config": asdict(cfg),
                                    "step": step, "results": results, "rng": rng_state(),
                                    "data_rng": gen.get_state(), "train_time_s": train_time_s})

    fast = maybe_compile(model, cfg.compile, device)
    k_train = cfg.train_iters if model.recurrent else 1
    warmup = max(1, steps // 20)
    # teacher-forced log set: every (len // 512)-th validation `sources` pair, 512 to 1,023 over all buckets
    tf_s, tf_t = (v[::max(1, len(v) // 512)].to(device) for v in graph.splits["validation"]["sources"][:2])
    tf_x, tf_y = graph.paths(tf_s, tf_t, T)  # (N, T) each
    if not cfg.ckpt and step < steps:
        sync(device)
        t0, start_step = time.time(), step
        bar = tqdm(total=steps, initial=step, desc="train", file=sys.stdout, mininterval=2, disable=None)
        with StopAfterStep() as stop:
            while step < steps and not stop.requested:  # a stop comes between whole steps
                # linear warmup, then cosine decay to 10% of --lr
                frac = max(0.0, (step - warmup) / max(1, steps - warmup))
                for g in opt.param_groups:
                    g["lr"] = cfg.lr * min(1.0, (step + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * frac))
                pick = graph.train_pairs[torch.randint(len(graph.train_pairs), (cfg.batch_size,), generator=gen,
                                                       device=device)]
                x, y = graph.paths(pick // graph.n, pick % graph.n, T)  # (B, T) each
                with autocast(device, dtype):
                    outs = fast(x, cfg.train_iters)
                    loss = sum(F.cross_entropy(o.flatten(0, 1).float(), y.flatten(), ignore_index=-1)
                               for o in outs) / k_train
                    if n_nb:  # the logged loss includes this term, whose floor is log(degree), not 0
                        xq, yq = graph.neighbour_queries(torch.randint(graph.n, (n_nb,), generator=gen,
                                                                       device=device))
                        outs_nb = fast(xq, cfg.train_iters)  # [(n_nb, 2, n)] * k_train
                        loss = loss + sum(F.cross_entropy(o[:, 1].float(), yq) for o in outs_nb) / k_train
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                step += 1
                bar.update(1)
                if cfg.eval_every and (step % cfg.eval_every == 0 or step == steps):
                    with torch.no_grad(), autocast(device, dtype):
                        pred = model(tf_x, cfg.train_iters, last_only=True)[-1].argmax(-1)
                    hop_acc = ((pred == tf_y) & (tf_y >= 0)).sum() / (tf_y >= 0).sum()
                    rate = (step - start_step) * cfg.batch_size / (time.time() - t0)
                    log_progress(bar, step, loss=f"{loss.item():.3f}", val_next_hop_sources=f"{hop_acc.item():.3f}",
                                 samples_per_s=f"{rate:.0f}")
                    checkpoint(train_time + time.time() - t0)  # a crash loses at most eval_every steps
            bar.close()
            sync(device)
            train_time += time.time() - t0
            checkpoint(train_time)  # before evaluating: a kill then keeps the training
        if stop.requested:
            print(f"interrupted at step {step}: checkpoint saved to {ckpt_path}")
            sys.exit(130)

    t_eval = time.time()
    acc = evaluate(model, graph, cfg, device, dtype)
    probe = probe_r2(model.tok.weight[:graph.n].detach().float().cpu().numpy(), graph.coords)

    def at(key, k=cfg.iters):  # None where a bucket has no pairs in the evaluated set
        return acc[key][k - 1] if key in acc else None

    headline = {"valid_hops_sources": at("valid_hops_sources"), "reach_1.05_sources": at("reach_1.05_sources"),
                "reach_1.05_pairs": at("reach_1.05_pairs"), "optimal_sources": at("optimal_sources"),
                "optimal_pairs": at("optimal_pairs"), "reach_1.05_sources_30+": at("reach_1.05_sources_30+"),
                "reach_1.05_sources_at_train_iters": at("reach_1.05_sources", min(cfg.train_iters, cfg.iters)),
                "probe_r2": probe, "train_flops": step_flops * step, "params": n_params}
    results = {"script": "recurrent_shortest_path", "config": asdict(cfg), "train_iters": cfg.train_iters,
               "iters": cfg.iters, "steps": step, "acc": acc, "headline": headline, "train_time_s": train_time,
               "eval_time_s": time.time() - t_eval, "samples_per_s": step * cfg.batch_size / max(train_time, 1e-9),
               "peak_mem_gb": peak_mem_gb(device), "device": device_name(device), "torch": str(torch.__version__),
               "seed": cfg.seed}
    write_results(cfg.out_dir, results)
    if not cfg.ckpt:
        checkpoint(train_time, results)
    curves = {k: acc[k] for k in ("valid_hops_sources", "reach_1.05_sources", "reach_1.05_sources_30+",
                                  "valid_hops_pairs", "reach_1.05_pairs") if k in acc}
    plot_acc_vs_iters(os.path.join(cfg.out_dir, "acc_vs_iters.png"), curves, cfg.train_iters,
                      f"shortest paths, {cfg.map} map, {cfg.arch}, {cfg.eval_set}",
                      ylabel=f"fraction of {cfg.eval_set} pairs / hops")
    print("final: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in headline.items()))
    return results


if __name__ == "__main__":
    main(parse_config(Config))
