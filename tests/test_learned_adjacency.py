"""learned_adjacency.py: the Gumbel-top-k draw and its score-function gradient are exact/unbiased (checked against
enumeration), precision/recall are right on known graphs, the GNN reads only the sampled neighbours (so the
first-iteration reward of a cell depends on its own draw alone), the sampler reads the digits only when asked, the
graph freezes and a fresh GNN trains on it, and a tiny CPU run learns a graph far better than uniform through the
surrogate loss alone."""
import itertools
import math

import pytest
import torch

import learned_adjacency as la
import sudoku_data as sd
from common import parse_config

N, K = 5, 2  # a categorical over 5 items, 2 drawn without replacement: 20 ordered draws to enumerate


def exact_ordered_probs(theta):
    """P(ordered draw (a, b)) = p_a * p_b / (1 - p_a), written out by hand in float64: the independent reference."""
    p = theta.double().softmax(0)
    draws = list(itertools.permutations(range(N), K))
    return draws, torch.stack([p[a] * p[b] / (1 - p[a]) for a, b in draws])


def reward(draws):  # (..., K) ordered draws -> a reward that depends on the set non-linearly
    w = torch.tensor([0.3, -1.0, 2.0, 0.5, -0.2], dtype=torch.float64)
    both_low = (draws < 2).all(-1).double()
    return w[draws].sum(-1) + 3.0 * both_low


THETA = torch.tensor([0.5, -0.3, 1.2, 0.0, -1.0])


def test_gumbel_topk_draws_like_sequential_sampling():
    """The frequencies of the ordered Gumbel-top-k draws match p_a * p_b / (1 - p_a) for every ordered pair."""
    draws, probs = exact_ordered_probs(THETA)
    n = 200_000
    idx = la.gumbel_topk(THETA.log_softmax(0).expand(n, N), K, torch.Generator().manual_seed(0))  # (n, K)
    counts = torch.bincount(idx[:, 0] * N + idx[:, 1], minlength=N * N).double() / n
    freq = torch.stack([counts[a * N + b] for a, b in draws])
    assert (freq - probs).abs().max() < 4 * (probs * (1 - probs) / n).sqrt().max()


def ordered_log_q(logp, idx):
    return la.ordered_draw(logp, idx)[0]


@pytest.mark.parametrize("theta", [THETA, torch.tensor([9.0, 8.0, -5.0, -6.0, -7.0])])  # the second is peaked
def test_ordered_log_prob_matches_enumeration(theta):
    draws, probs = exact_ordered_probs(theta)
    logq = ordered_log_q(theta.log_softmax(0).expand(len(draws), N), torch.tensor(draws))
    assert torch.allclose(logq.double().exp(), probs, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("scale", [1.0, 40.0])  # the second is peaked: the remaining mass falls to ~e^-40
def test_draw_entropy_matches_the_conditionals(scale):
    """The entropy of each draw's renormalised conditional, written out by masking the earlier draws, matches the
    O(N + k) formula in value and gradient (float64); in float32 it stays within float32 rounding, NaN-free. One
    table broadcast over many draws matches the masked formula on that table."""
    theta = (torch.randn(2, 30, 81, generator=torch.Generator().manual_seed(0)) * scale).requires_grad_(True)
    idx = la.gumbel_topk(theta.detach().log_softmax(-1), 20, torch.Generator().manual_seed(1))  # (2, 30, 20)
    hot = torch.nn.functional.one_hot(idx, 81)
    logp = theta.double().log_softmax(-1)
    cond = logp.unsqueeze(-2).masked_fill((hot.cumsum(-2) - hot).bool(), la.NEG).log_softmax(-1)  # (2, 30, 20, 81)
    masked = -(cond.exp() * cond).sum(-1).mean()
    fast, fast32 = la.ordered_draw(logp, idx)[1], la.ordered_draw(theta.log_softmax(-1), idx)[1]
    assert torch.allclose(fast, masked, rtol=1e-10) and torch.allclose(fast32.double(), masked, rtol=1e-4)
    g_fast, g_masked, g_32 = (torch.autograd.grad(e, theta, retain_graph=True)[0] for e in (fast, masked, fast32))
    assert torch.allclose(g_fast, g_masked, atol=1e-12) and torch.allclose(g_32, g_masked, atol=1e-5)
    cond = logp[:1].unsqueeze(-2).masked_fill((hot.cumsum(-2) - hot).bool(), la.NEG).log_softmax(-1)
    one_table = la.ordered_draw(logp[:1], idx)[1]  # one (1, 30, 81) table for both draws of each row
    assert torch.allclose(one_table, -(cond.exp() * cond).sum(-1).mean(), rtol=1e-10)


def estimate_gradient(baseline, log_prob_fn, seed, batches=40, per_batch=2000, G=4):
    """Mean and standard error of the surrogate gradient over `batches` independent batches of draws."""
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for _ in range(batches):
        theta = THETA.clone().requires_grad_(True)
        logp = theta.log_softmax(0).expand(G, per_batch, N)
        idx = la.gumbel_topk(logp.detach(), K, gen)  # (G, per_batch, K)
        loss = la.surrogate(log_prob_fn(logp, idx), reward(idx).float(), baseline, torch.full((1,), 1.5))
        grads.append(torch.autograd.grad(-loss, theta)[0])  # -loss: the gradient of E[reward] itself
    grads = torch.stack(grads).double()
    return grads.mean(0), grads.std(0) / batches ** 0.5


@pytest.mark.parametrize("baseline", la.BASELINES)
@pytest.mark.parametrize("seed", [0, 1])
def test_surrogate_gradient_is_unbiased(baseline, seed):
    """Mean surrogate gradient over 320k draws = the exact gradient of E[reward] by enumeration, within 4.5
    standard errors per coordinate, for every baseline; a log-probability that forgets the renormalisation
    (sum_t log p(s_t)) is biased and is caught by the same check, so the check has the power to fail."""
    theta = THETA.clone().double().requires_grad_(True)
    draws, probs = exact_ordered_probs(theta)
    exact = torch.autograd.grad((probs * reward(torch.tensor(draws))).sum(), theta)[0]
    mean, se = estimate_gradient(baseline, ordered_log_q, seed)
    assert ((mean - exact).abs() < 4.5 * se + 1e-4).all(), (mean, exact, se)
    naive = lambda logp, idx: logp.gather(-1, idx).sum(-1)
    mean, se = estimate_gradient(baseline, naive, seed)
    assert ((mean - exact).abs() > 6 * se).any(), (mean, exact, se)


def test_rloo_cuts_the_variance():
    """On the tiny problem, leave-one-out has well under half the variance of no baseline."""
    _, se_none = estimate_gradient("none", ordered_log_q, 0, batches=20)
    _, se_rloo = estimate_gradient("rloo", ordered_log_q, 0, batches=20)
    assert (se_rloo ** 2).sum() < 0.5 * (se_none ** 2).sum()


def test_precision_recall_on_known_graphs():
    """Hand-counted on a 4-node ring, and the sudoku extremes: the true peers, no peers, uniform draws (25%)."""
    ring = la.true_adjacency(torch.tensor([[1, 3], [0, 2], [1, 3], [2, 0]]))
    nbrs = torch.tensor([[[1, 2], [0, 2], [0, 1], [0, 1]]])  # true edges chosen: 1, 2, 1, 1 of 8
    precision, recall = la.adjacency_scores(nbrs, ring)
    assert precision.item() == pytest.approx(5 / 8) and recall.item() == pytest.approx((1 + 2 + 1 + 1) / 8)
    star = torch.zeros(4, 4, dtype=torch.bool)  # node 0 has 3 true neighbours, the others 1: recall is per node
    star[0, 1:] = star[1:, 0] = True
    precision, recall = la.adjacency_scores(torch.tensor([[[1], [0], [3], [0]]]), star)  # K = 1
    assert precision.item() == pytest.approx(3 / 4) and recall.item() == pytest.approx((1 / 3 + 1 + 0 + 1) / 4)

    peers = sd.peer_index()
    adj = la.true_adjacency(peers)
    assert adj.sum().item() == 81 * 20 and torch.equal(adj, adj.T) and not adj.diagonal().any()
    precision, recall = la.adjacency_scores(peers[None], adj)
    assert precision.item() == 1.0 and recall.item() == 1.0
    others = torch.stack([torch.nonzero(~adj[i] & (torch.arange(81) != i)).flatten()[:20] for i in range(81)])
    assert la.adjacency_scores(others[None], adj)[0].item() == 0.0
    uniform = torch.zeros(200, 81, 81).masked_fill(torch.eye(81, dtype=torch.bool), la.NEG).log_softmax(-1)
    precision, _ = la.adjacency_scores(la.gumbel_topk(uniform, 20, torch.Generator().manual_seed(0)), adj)
    assert precision.mean().item() == pytest.approx(0.25, abs=0.01)


def test_gnn_reads_only_the_sampled_neighbours():
    """After one iteration a cell's logits depend on its own input and its K sampled neighbours, no other cell's."""
    torch.manual_seed(0)
    gnn = la.GNN(la.Config(width=16, msg_width=16)).eval()
    nbrs = torch.randperm(80)[:5].view(1, 1, 5).expand(1, 81, 5).clone()  # cell 80 is nobody's neighbour...
    nbrs[0, 80] = torch.tensor([0, 1, 2, 3, 4])
    quiz = torch.zeros(1, 81, dtype=torch.long)
    with torch.no_grad():
        base = gnn(quiz, nbrs, 1)[0][0, 0]  # (81, 9)
        for cell in range(81):
            changed = quiz.clone()
            changed[0, cell] = 7
            moved = (gnn(changed, nbrs, 1)[0][0, 0] - base).abs().amax(-1) > 1e-6  # (81,)
            expected = (nbrs[0] == cell).any(-1)
            expected[cell] = True
            assert torch.equal(moved, expected), cell


def test_draws_are_scored_by_the_first_iterations_and_the_gnn_trains_on_the_first():
    """score_draws: the draws are Gumbel-top-k of the sampler's p (the generator's stream), log q is that of the ordered
    draws, the reward is each draw's first reward_iters iterations; the GNN's loss and its gradient are those of the
    GNN run on the first draw."""
    torch.manual_seed(0)
    cfg = la.Config(width=16, msg_width=16, sampler_width=16, train_iters=3, reward_iters=2)
    model = la.Model(cfg)
    torch.nn.init.normal_(model.sampler.qk.weight)  # a non-uniform p
    quiz, sol = torch.randint(10, (3, 81)), torch.randint(1, 10, (3, 81))
    gnn, G = list(model.gnn.parameters()), cfg.n_graphs
    logp = model.sampler(quiz)
    draws = la.gumbel_topk(logp.detach().expand(G, -1, -1, -1), cfg.k, torch.Generator().manual_seed(1))
    nbrs, logq, reward, _ = la.score_draws(model, quiz, sol, cfg, torch.Generator().manual_seed(1))
    assert torch.equal(nbrs, draws) and torch.allclose(logq, la.ordered_draw(logp, draws)[0])
    ce = la.cell_losses(model.gnn(quiz.repeat(G, 1), draws.flatten(0, 1), cfg.reward_iters)[0], sol.repeat(G, 1))
    assert torch.allclose(reward, -ce.mean(0).view(reward.shape))
    loss = la.train_loss(model, quiz, sol, cfg, torch.Generator().manual_seed(1))[1]
    expected = la.cell_losses(model.gnn(quiz, draws[0], cfg.train_iters)[0], sol).mean()
    assert torch.allclose(loss, expected)
    for got, want in zip(torch.autograd.grad(loss, gnn), torch.autograd.grad(expected, gnn)):
        assert torch.allclose(got, want, atol=1e-7)


def test_train_loss_adds_the_surrogate_and_the_entropy_bonus():
    """A step's loss: the GNN's, plus the surrogate with the EMA baseline, minus the bonus at weight
    --entropy * e^entropy_log_gain (both buffers as they are before the step updates them)."""
    torch.manual_seed(0)
    cfg = la.Config(width=16, msg_width=16, sampler_width=16, train_iters=2, baseline="ema", entropy=0.05)
    model = la.Model(cfg)
    torch.nn.init.normal_(model.sampler.qk.weight)
    model.sampler.reward_ema.normal_(), model.sampler.entropy_log_gain.fill_(0.7)
    quiz, sol = torch.randint(10, (3, 81)), torch.randint(1, 10, (3, 81))
    loss, loss_gnn, reward, entropy = la.train_loss(model, quiz, sol, cfg, torch.Generator().manual_seed(1))
    nbrs, logq, reward_2, entropy_2 = la.score_draws(model, quiz, sol, cfg, torch.Generator().manual_seed(1))
    assert torch.equal(reward, reward_2) and torch.equal(entropy, entropy_2)
    assert torch.allclose(loss_gnn, la.gnn_loss(model.gnn, quiz, sol, nbrs[0], cfg))
    surrogate = la.surrogate(logq, reward, "ema", model.sampler.reward_ema)
    assert torch.allclose(loss, loss_gnn + surrogate - 0.05 * math.exp(0.7) * entropy)


def test_frozen_graph_trains_the_gnn_alone_on_top_k():
    """Past --graph_steps: the loss is the GNN's on the top-K graph, nothing reaches the sampler, and no draw is made
    (the generator is not advanced)."""
    torch.manual_seed(0)
    cfg = la.Config(width=16, msg_width=16, sampler_width=16, train_iters=2)
    model = la.Model(cfg)
    torch.nn.init.normal_(model.sampler.qk.weight)
    quiz, sol = torch.randint(10, (3, 81)), torch.randint(1, 10, (3, 81))
    gen = torch.Generator().manual_seed(1)
    before = gen.get_state()
    loss, loss_gnn, reward, entropy = la.train_loss(model, quiz, sol, cfg, gen, learn_graph=False)
    assert reward is None and entropy is None and loss is loss_gnn and torch.equal(gen.get_state(), before)
    top_k = model.sampler(quiz).topk(cfg.k, -1).indices
    assert torch.allclose(loss, la.gnn_loss(model.gnn, quiz, sol, top_k, cfg))
    loss.backward()
    assert all(p.grad is None for p in model.sampler.parameters())


def test_position_embedding_is_inert_until_switched_on():
    """While the sampler learns (pos_on = 0) the GNN reads digits only: even a live position table changes no output
    and gets a zero gradient (so AdamW leaves it at its zero start); switched on, it is read."""
    torch.manual_seed(0)
    gnn = la.GNN(la.Config(width=16, msg_width=16))
    quiz, nbrs = torch.randint(10, (2, 81)), torch.randint(81, (2, 81, 20))
    digits_only = gnn(quiz, nbrs, 3)[0]
    torch.nn.init.normal_(gnn.pos)
    logits = gnn(quiz, nbrs, 3)[0]
    logits.sum().backward()
    assert torch.equal(logits, digits_only) and torch.count_nonzero(gnn.pos.grad) == 0
    gnn.pos_on.fill_(1)
    assert not torch.allclose(gnn(quiz, nbrs, 3)[0], digits_only)


def test_refine_loss_starts_deep_and_settles():
    """The --refine steps: the GNN's loss is that of iterations skip+1..skip+train_iters of a run from the start, the
    sampler's reward (first iteration from the start) is the same at every depth, and the settle term adds the move
    of one more iteration."""
    torch.manual_seed(0)
    cfg = la.Config(width=16, msg_width=16, sampler_width=16, train_iters=3)
    model = la.Model(cfg)
    torch.nn.init.normal_(model.sampler.qk.weight)
    quiz, sol = torch.randint(10, (3, 81)), torch.randint(1, 10, (3, 81))
    _, _, reward0, _ = la.train_loss(model, quiz, sol, cfg, torch.Generator().manual_seed(1))
    _, loss, reward2, _ = la.train_loss(model, quiz, sol, cfg, torch.Generator().manual_seed(1), skip=2)
    assert torch.allclose(reward0, reward2)
    nbrs = la.score_draws(model, quiz, sol, cfg, torch.Generator().manual_seed(1))[0][0]  # the first draw
    logits, h = model.gnn(quiz, nbrs, 2 + cfg.train_iters)
    assert torch.allclose(loss, la.cell_losses(logits[2:], sol).mean())
    settled = la.gnn_loss(model.gnn, quiz, sol, nbrs, cfg, skip=2, settle=0.5)
    moved = model.gnn(quiz, nbrs, 1, h)[1] - h
    assert torch.allclose(settled, loss + 0.5 * moved.pow(2).sum(-1).mean())


def test_halting_iteration_matches_a_loop():
    """Adaptive compute stops at the first iteration whose argmax equals those of the n iterations before it."""
    pred = torch.zeros(12, 50, 81, dtype=torch.long)
    pred[:, :, 0] = torch.randint(2, (12, 50), generator=torch.Generator().manual_seed(0))  # repeats are common
    pred[:, :5, 0] = 1  # constant from the start
    for n in (1, 2, 3):
        got = la.halting_iteration(pred, n)
        for j in range(pred.shape[1]):
            repeats = [t for t in range(n, len(pred)) if all(torch.equal(pred[t, j], pred[t - d, j])
                                                             for d in range(1, n + 1))]
            assert got[j] == (repeats[0] if repeats else len(pred) - 1), (n, j)
        assert (got[:5] == n).all()
    assert (la.halting_iteration(pred[:2], 2) == 1).all()  # too few iterations for two repeats: the last one


@pytest.mark.parametrize("reads", ["positions", "cells"])
def test_sampler_reads_the_digits_only_when_asked(reads):
    """--sampler_reads positions gives every puzzle the same p(j | i), even with the head's path through the
    transformer switched on; --sampler_reads cells lets two puzzles get different graphs."""
    torch.manual_seed(0)
    sampler = la.GraphSampler(la.Config(sampler_width=16, sampler_reads=reads))
    torch.nn.init.normal_(sampler.qk.weight)  # starts at zero; made live so a digit dependence would show
    quiz = torch.randint(10, (2, 81), generator=torch.Generator().manual_seed(0))  # two boards, 0 = blank
    with torch.no_grad():
        logp = sampler(quiz)
    assert logp.shape == (2, 81, 81) and torch.allclose(logp.exp().sum(-1), torch.ones(2, 81))
    assert torch.equal(logp[0], logp[1]) == (reads == "positions")


def test_sampler_learns_the_graph_on_easy_puzzles(tmp_path):
    """250 steps on 40-50-given puzzles (width 32, one iteration): the sampler, trained by the surrogate loss alone,
    gives a top-K graph on held-out test puzzles well above uniform (25%; untrained: 0.25-0.26); seeds 0-3 reach
    0.40, 0.35, 0.36, 0.34. The sampler's lr decays here: held constant (the default) over only 250 steps, seeds 0-3
    gave 0.29-0.36. --refine 0 --graph_steps 1: the sampler's learning alone, as measured."""
    cfg = la.Config(device="cpu", compile=False, width=32, msg_width=32, sampler_width=32, min_givens=40,
                    max_givens=50, curriculum=0, train_iters=1, iters=1, steps=250, batch_size=16, warmup=0,
                    lr=1e-2, sampler_lr=1e-2, sampler_decay=True, entropy=3e-2, refine=0, graph_steps=1, n_test=4,
                    eval_every=0, var_draws=2, out_dir=str(tmp_path))
    precision = la.main(cfg)["headline"]["adjacency_precision"]
    assert precision >= 0.31, precision


def test_graph_freezes_and_a_fresh_gnn_trains_on_it(tmp_path):
    """--graph_steps 0.4 of 5 steps: the sampler takes 2 optimizer steps, then stops; at step 2 the GNN is reset
    (new weights, no optimizer state, positions switched on) and takes the last 3 steps."""
    cfg = la.Config(device="cpu", compile=False, width=8, msg_width=8, sampler_width=8, train_iters=1, iters=1,
                    steps=5, batch_size=2, warmup=0, graph_steps=0.4, n_test=1, eval_every=0, var_draws=2,
                    out_dir=str(tmp_path))
    la.main(cfg)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    model = la.Model(cfg)
    model.load_state_dict(state["model"])
    steps = [int(state["optimizer"]["state"][i]["step"]) for i in range(len(state["optimizer"]["state"]))]
    n_gnn = len(list(model.gnn.parameters()))  # the optimizer's first group: the GNN, then the sampler
    assert state["frozen_at"] == 2 and model.gnn.pos_on == 1 and model.gnn.pos.abs().sum() > 0
    assert set(steps[:n_gnn]) == {3} and set(steps[n_gnn:]) == {2}


def test_a_resume_whose_budget_puts_the_freeze_behind_it_freezes_at_once(tmp_path):
    """Stopped at step 3 of 10 before its freeze (--graph_steps 0.5: step 5), then resumed with --steps 4, whose
    freeze step would be 2: the graph freezes at the resume, step 3, instead of never."""
    from test_scripts import sigterm_in_backward
    args = ["--device", "cpu", "--width", "8", "--msg_width", "8", "--sampler_width", "8", "--train_iters", "1",
            "--iters", "1", "--batch_size", "2", "--warmup", "0", "--graph_steps", "0.5", "--n_test", "1",
            "--eval_every", "0", "--var_draws", "2", "--out_dir", str(tmp_path)]
    with sigterm_in_backward(3), pytest.raises(SystemExit):
        la.main(parse_config(la.Config, args + ["--steps", "10"]))
    state = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert state["step"] == 3 and state["frozen_at"] == 5
    la.main(parse_config(la.Config, args + ["--steps", "4", "--resume"]))
    state = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert state["step"] == 4 and state["frozen_at"] == 3 and state["model"]["gnn.pos_on"] == 1
