"""recurrent_shortest_path.py: the map, Dijkstra, the splits and the probe against independent checks."""
import math
import os

import numpy as np
import pytest
import torch

import recurrent_shortest_path as rsp
from common import parse_config

CPU = torch.device("cpu")


def plane_graph(n, data_seed, **kw):
    return rsp.Graph(rsp.Config(map="plane", n_cities=n, data_seed=data_seed, **kw), CPU)


def floyd_warshall(weight):
    d = weight.copy()
    np.fill_diagonal(d, 0)
    for k in range(len(d)):
        d = np.minimum(d, d[:, k:k + 1] + d[k:k + 1])
    return d


@pytest.mark.parametrize("data_seed", [0, 1, 2])
def test_dijkstra_matches_floyd_warshall(data_seed):
    g = plane_graph(40, data_seed)
    xy = g.coords
    euclid = np.sqrt(((xy[:, None] - xy[None]) ** 2).sum(-1))
    radius = math.sqrt(8.0 / (math.pi * 39))
    assert np.array_equal(g.adj.numpy(), (euclid < radius) & ~np.eye(g.n, dtype=bool))
    fw = floyd_warshall(np.where(g.adj.numpy(), euclid, np.inf))
    assert np.isfinite(fw).all(), "kept cities must form one component"
    assert np.allclose(g.sp.numpy(), fw, rtol=1e-5, atol=1e-6)
    # walking next_hop from s reaches t in hops[s, t] links whose lengths add up to the optimum
    for s in range(g.n):
        for t in range(g.n):
            cur, length = s, 0.0
            for _ in range(int(g.hops[s, t])):
                nxt = int(g.next_hop[cur, t])
                assert g.adj[cur, nxt]
                length, cur = length + euclid[cur, nxt], nxt
            assert cur == t and math.isclose(length, fw[s, t], rel_tol=1e-5, abs_tol=1e-6)


def test_haversine_known_distances():
    # New York - Los Angeles ~3,936 km, London - Paris ~344 km, one degree of longitude on the equator 111.2 km
    assert rsp.haversine(40.7128, -74.0060, 34.0522, -118.2437) == pytest.approx(3936, rel=0.01)
    assert rsp.haversine(51.5074, -0.1278, 48.8566, 2.3522) == pytest.approx(344, rel=0.01)
    assert rsp.haversine(0.0, 0.0, 0.0, 1.0) == pytest.approx(111.2, rel=0.01)
    assert rsp.haversine(10.0, 20.0, 10.0, 20.0) == 0


def test_us_map_largest_component():
    coords, dist, radius = rsp.city_map(rsp.Config())
    assert len(coords) == 4134
    keep = rsp.largest_component((dist < radius) & ~np.eye(len(dist), dtype=bool))
    assert len(keep) == 2257


@pytest.mark.parametrize("data_seed", [0, 1])
def test_splits_are_disjoint(data_seed):
    g = plane_graph(80, data_seed, max_hops=12)
    s, t = g.train_pairs // g.n, g.train_pairs % g.n
    assert not g.held[s].any() and not g.held[t].any(), "held-out cities never start or end a training path"
    assert (g.hops[s, t] <= 12).all() and (g.hops[s, t] >= 1).all()
    seen = set(zip(s.tolist(), t.tolist()))
    starts = {}
    for name in ("test", "validation"):
        ps, pt, _ = g.splits[name]["pairs"]
        pairs = set(zip(ps.tolist(), pt.tolist()))
        # neither split's pairs are trained or in the other split, in either direction
        assert pairs and not (pairs | {(b, a) for a, b in pairs}) & seen
        assert not g.held[ps].any() and not g.held[pt].any(), "`pairs` is among the training cities"
        seen |= pairs
        ss, st, bucket = g.splits[name]["sources"]
        assert g.held[ss].all() and len(ss) > 0 and (g.hops[ss, st] <= 12).all()
        lo = torch.tensor([b[0] for b in rsp.BUCKETS])[bucket]
        hi = torch.tensor([b[1] for b in rsp.BUCKETS])[bucket]
        assert ((g.hops[ss, st] >= lo) & (g.hops[ss, st] <= hi)).all()
        starts[name] = set(ss.tolist())
    # test and validation hold out different start cities, each a holdout_frac share of the map, and each split's
    # `sources` ends at a training city or at one of its own start cities, never at the other split's
    assert not starts["test"] & starts["validation"]
    assert len(starts["test"]) == len(starts["validation"]) == int(g.held.sum()) // 2 == round(0.1 * g.n)
    for name, other in (("test", "validation"), ("validation", "test")):
        assert not set(g.splits[name]["sources"][1].tolist()) & starts[other]
    # test `sources` is the first draw from --data_seed, whatever validation draws later: its start cities are the
    # first m of a permutation of the cities, its pairs come in the order of the next permutation (less those
    # ending at a validation start city), grouped by bucket
    gen = torch.Generator().manual_seed(data_seed)
    order = torch.randperm(g.n, generator=gen).tolist()
    m = round(0.1 * g.n)
    ok = (g.hops >= 1) & (g.hops <= 12)
    candidates = [(a, b) for a in range(g.n) for b in range(g.n) if ok[a, b] and a in order[:m]]
    drawn = [candidates[i] for i in torch.randperm(len(candidates), generator=gen).tolist()]
    kept = [(a, b) for a, b in drawn if b not in order[m:2 * m]]
    groups = [[p for p in kept if lo <= g.hops[p] <= hi][:rsp.POOL] for lo, hi, _ in rsp.BUCKETS]
    assert list(zip(*(v.tolist() for v in g.splits["test"]["sources"][:2]))) == [p for grp in groups for p in grp]
    # held-out cities still appear inside training paths, so the map around them is learnable
    x, y = g.paths(s, t, 13)
    inside = torch.zeros(g.n, dtype=torch.bool)
    inside[x[:, 2:][y[:, 1:-1] >= 0]] = True
    assert inside[g.held].float().mean() > 0.5


def test_teacher_forcing_sequences():
    g = plane_graph(60, 0, max_hops=16)
    s, t = g.train_pairs[:200] // g.n, g.train_pairs[:200] % g.n
    x, y = g.paths(s, t, 17)
    assert (x[:, 0] == t).all() and (x[:, 1] == s).all() and (y[:, 0] == -1).all()
    n_targets = (y >= 0).sum(1)
    assert torch.equal(n_targets, g.hops[s, t])
    for i in range(len(s)):
        h = int(g.hops[s[i], t[i]])
        path = x[i, 1:h + 2]  # s, c1, ..., t
        assert path[-1] == t[i] and g.adj[path[:-1], path[1:]].all()
        assert torch.equal(y[i, 1:h + 1], path[1:])


def test_neighbour_queries_carry_the_map_and_no_pair():
    g = plane_graph(60, 0)
    xy = g.coords
    euclid = np.sqrt(((xy[:, None] - xy[None]) ** 2).sum(-1))
    links = (euclid < math.sqrt(8.0 / (math.pi * 59))) & ~np.eye(g.n, dtype=bool)
    c = torch.randint(g.n, (200,), generator=torch.Generator().manual_seed(0))
    x, target = g.neighbour_queries(c)
    assert x.shape == (200, 2) and (x[:, 0] == g.n).all() and torch.equal(x[:, 1], c)  # token n: no goal city
    expected = links[c.numpy()] / links[c.numpy()].sum(1, keepdims=True)  # uniform over the city's links
    assert np.allclose(target.numpy(), expected)
    # the query token is an input only: the output head scores the n cities
    model = rsp.PathModel(rsp.Config(width=16, max_hops=8), g.n)
    assert model(x[:5], 2)[-1].shape == (5, 2, g.n)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_probe_finds_coordinates_only_where_they_are(seed):
    gen = np.random.default_rng(seed)
    coords = gen.uniform(size=(300, 2))
    noise = gen.normal(size=(300, 32))
    mixed = coords @ gen.normal(size=(2, 32)) + 0.1 * noise
    assert rsp.probe_r2(mixed, coords) > 0.9
    assert rsp.probe_r2(noise, coords) < 0.1


def test_flop_count_and_matched_baselines():
    cfg = rsp.Config(width=64, n_layers=2, train_iters=4)
    blk = rsp.Block(64, 4)
    weights = sum(m.weight.numel() for m in blk.modules() if isinstance(m, torch.nn.Linear))
    assert rsp.flops_per_token(64, 1, 0, 1, 1) == pytest.approx(2 * weights, rel=0.01)  # 2 FLOPs per weight
    assert rsp.model_shape(cfg, 300) == (64, 2, True)
    assert rsp.model_shape(rsp.Config(width=64, n_layers=2, train_iters=4, arch="deep"), 300) == (64, 6, False)
    # the default shape on the US map: the wide model costs what 2 + 4 blocks and 4 heads of width 256 cost
    rec = rsp.flops_per_token(256, 6, 4, 65, 2257)
    d, blocks, tied = rsp.model_shape(rsp.Config(arch="wide"), 2257)
    assert blocks == 3 and not tied and d % 4 == 0
    assert rsp.flops_per_token(d, 3, 1, 65, 2257) <= rec < rsp.flops_per_token(d + 32, 3, 1, 65, 2257)


@pytest.mark.parametrize("arch", ["recurrent", "deep", "wide"])
def test_flop_formula_matches_the_matmuls_the_model_runs(arch):
    """flops_per_token, without its attention term (T = 0), against the matrix products PyTorch's FLOP counter sees
    in a real forward pass (which may or may not count the attention kernel itself, so that is left out)."""
    from torch.utils.flop_counter import FlopCounterMode
    cfg = rsp.Config(arch=arch, width=32, n_layers=2, train_iters=3, max_hops=11)
    V, B, T = 50, 3, cfg.max_hops + 1
    d, blocks, tied = rsp.model_shape(cfg, V)
    with FlopCounterMode(display=False) as counter:
        rsp.PathModel(cfg, V)(torch.randint(V, (B, T)), cfg.train_iters)
    counted = sum(v for op, v in counter.get_flop_counts()["Global"].items()
                  if op.__name__.split(".")[0] in ("mm", "addmm", "bmm"))
    n_blocks, n_heads = (blocks + cfg.train_iters, cfg.train_iters) if tied else (blocks, 1)
    assert counted == rsp.flops_per_token(d, n_blocks, n_heads, 0, V) * B * T


@pytest.mark.parametrize("arch", ["recurrent", "wide"])
def test_train_step_flops_match_a_counted_training_step(arch):
    """A whole training step as main runs it (the paths and the neighbour queries, forward and backward) against
    train_step_flops: the matrix products PyTorch's FLOP counter sees must equal the formula less its attention
    term (4 T d per token and block, which the counter leaves out on the CPU)."""
    from torch.utils.flop_counter import FlopCounterMode
    cfg = rsp.Config(arch=arch, width=32, n_layers=1, train_iters=3, max_hops=7, batch_size=5, neighbour_frac=0.6)
    V, T, n_nb = 40, cfg.max_hops + 1, rsp.neighbour_batch(cfg)
    model = rsp.PathModel(cfg, V)
    with FlopCounterMode(display=False) as counter:
        outs = model(torch.randint(V, (cfg.batch_size, T)), cfg.train_iters)
        outs_nb = model(torch.randint(V, (n_nb, 2)), cfg.train_iters)
        sum(o.square().mean() for o in outs + outs_nb).backward()
    counted = sum(v for op, v in counter.get_flop_counts()["Global"].items()
                  if op.__name__.split(".")[0] in ("mm", "addmm", "bmm"))
    d, blocks, tied = rsp.model_shape(cfg, V)
    applied = blocks + tied * cfg.train_iters  # blocks run per forward
    attention = 3 * applied * 4 * d * (cfg.batch_size * T * T + n_nb * 2 * 2)
    assert n_nb == 3 and counted == rsp.train_step_flops(cfg, V) - attention


def test_flop_budget_sets_steps_and_bad_checkpoint_exits_2(tmp_path, capsys):
    tiny = ["--map", "plane", "--n_cities", "30", "--max_hops", "8", "--n_test", "4", "--width", "16",
            "--train_iters", "2", "--iters", "2", "--batch_size", "8", "--device", "cpu"]
    res = rsp.main(parse_config(rsp.Config, tiny + ["--steps", "3", "--out_dir", str(tmp_path / "a")]))
    budget = res["headline"]["train_flops"] * 2
    deep = rsp.main(parse_config(rsp.Config, tiny + ["--arch", "deep", "--flop_budget", str(budget),
                                                     "--out_dir", str(tmp_path / "b")]))
    assert deep["headline"]["train_flops"] == pytest.approx(budget, rel=0.1)
    saved = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    torch.save({**saved, "config": {**saved["config"], "width": 32}}, tmp_path / "wrong.pt")
    with pytest.raises(SystemExit) as e:
        rsp.main(parse_config(rsp.Config, ["--ckpt", str(tmp_path / "wrong.pt"), "--out_dir", str(tmp_path / "c")]))
    assert e.value.code == 2
    assert not os.path.exists(tmp_path / "c" / "ckpt.pt")
    # a checkpoint from before the validation split (no eval_set in its config): its validation cities were
    # training cities, so neither --ckpt nor --resume may use it, and --resume leaves it as it was
    old = {**saved, "config": {k: v for k, v in saved["config"].items() if k != "eval_set"}}
    torch.save(old, tmp_path / "a" / "ckpt.pt")
    before = (tmp_path / "a" / "ckpt.pt").read_bytes()
    for flags in (["--ckpt", str(tmp_path / "a" / "ckpt.pt"), "--out_dir", str(tmp_path / "d")],
                  tiny + ["--steps", "6", "--resume", "--out_dir", str(tmp_path / "a")]):
        with pytest.raises(SystemExit) as e:
            rsp.main(parse_config(rsp.Config, flags))
        assert e.value.code == 2 and "predates the validation split" in capsys.readouterr().err
    assert (tmp_path / "a" / "ckpt.pt").read_bytes() == before


@pytest.mark.parametrize("bad", [["--holdout_frac", "0.3"], ["--max_hops", "1"], ["--map", "moon"],
                                 ["--width", "30", "--n_heads", "4"], ["--neighbour_frac", "-1"], ["--n_test", "501"]])
def test_bad_flags_exit_2(bad):
    with pytest.raises(SystemExit) as e:
        parse_config(rsp.Config, bad)
    assert e.value.code == 2


@pytest.mark.parametrize("n_cities, degree", [(4, 8.0), (30, 0.01)])  # too few cities; no links at all
def test_a_map_too_small_to_split_exits_2(n_cities, degree, capsys):
    with pytest.raises(SystemExit) as e:
        plane_graph(n_cities, 0, degree=degree)
    assert e.value.code == 2 and "leaves no training or no held-out pairs" in capsys.readouterr().err


def test_bad_cities_csv_exits_2(tmp_path):
    for name, text in (("missing.csv", None), ("nolat.csv", "city,x,y\na,1,2\n"), ("bad.csv", "lat,lng\n1,zz\n")):
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        with pytest.raises(SystemExit) as e:
            rsp.city_map(rsp.Config(cities_csv=str(path)))
        assert e.value.code == 2


def test_only_the_final_evaluation_reads_test_pairs(tmp_path, monkeypatch):
    """Every (start, goal) a run turns into a sequence or decodes, recorded: before the final evaluation (training,
    the log) only training and validation pairs are read; the final evaluation decodes the --eval_set pairs only."""
    seen, final = [], []
    paths, decode, evaluate = rsp.Graph.paths, rsp.decode, rsp.evaluate
    monkeypatch.setattr(rsp.Graph, "paths", lambda g, s, t, n: seen.append((bool(final), s, t)) or paths(g, s, t, n))
    monkeypatch.setattr(rsp, "decode", lambda *a: seen.append((bool(final), a[2], a[3])) or decode(*a))
    monkeypatch.setattr(rsp, "evaluate", lambda *a: final.append(1) or evaluate(*a))
    g = plane_graph(40, 0, max_hops=12)

    def pair_set(split):
        return {p for s, t, _ in g.splits[split].values() for p in zip(s.tolist(), t.tolist())}
    for eval_set in ("validation", "test"):
        seen.clear()
        final.clear()
        rsp.main(parse_config(rsp.Config, [
            "--map", "plane", "--n_cities", "40", "--max_hops", "12", "--n_test", "8", "--steps", "4", "--iters",
            "2", "--train_iters", "2", "--width", "16", "--eval_every", "2", "--eval_set", eval_set, "--device",
            "cpu", "--out_dir", str(tmp_path / eval_set)]))
        read = {False: set(), True: set()}  # before / in the final evaluation
        for in_final, s, t in seen:
            read[in_final] |= set(zip(s.tolist(), t.tolist()))
        assert read[False] & pair_set("validation") and not read[False] & pair_set("test")
        assert read[True] and read[True] <= pair_set(eval_set)


def test_learns_a_small_map(tmp_path):
    """30 cities, 200 steps: about half the held-out pairs come out as near-optimal paths (seeds 0-2 gave 0.45-0.53
    reach within 5% and 0.60-0.66 valid hops at the training depth; an untrained model reaches almost none)."""
    res = rsp.main(parse_config(rsp.Config, [
        "--map", "plane", "--n_cities", "30", "--max_hops", "8", "--width", "32", "--steps", "200", "--batch_size",
        "32", "--lr", "3e-3", "--iters", "3", "--train_iters", "2", "--eval_every", "0", "--n_test", "40",
        "--device", "cpu", "--out_dir", str(tmp_path)]))
    assert res["acc"]["reach_1.05_pairs"][1] >= 0.4
    assert res["acc"]["valid_hops_pairs"][1] >= 0.5
