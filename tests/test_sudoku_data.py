"""The sudoku pipeline against independent checks: a brute-force exact-cover counter, plain-Python validity,
random symmetries, and malformed files."""
import numpy as np
import pytest
import torch

import sudoku_data as sd


def valid_grid(grid):
    """Independent of sd.is_valid_grid: every row, column and box is a set of the digits 1..9."""
    g = [list(grid[9 * r: 9 * r + 9]) for r in range(9)]
    units = g + [list(c) for c in zip(*g)] + [[g[3 * br + r][3 * bc + c] for r in range(3) for c in range(3)]
                                              for br in range(3) for bc in range(3)]
    return all(sorted(u) == list(range(1, 10)) for u in units)


def count_solutions(quiz, limit=2):
    """Knuth's Algorithm X over the 324 sudoku constraints: returns the number of solutions, up to `limit`."""
    def constraints(r, c, d):
        return [("cell", r, c), ("row", r, d), ("col", c, d), ("box", (r // 3) * 3 + c // 3, d)]
    rows = {(r, c, d): constraints(r, c, d) for r in range(9) for c in range(9) for d in range(1, 10)}
    cols = {}
    for key, cons in rows.items():
        for con in cons:
            cols.setdefault(con, set()).add(key)

    def select(key):
        removed = []
        for con in rows[key]:
            for other in cols[con]:
                for con2 in rows[other]:
                    if con2 != con:
                        cols[con2].remove(other)
            removed.append(cols.pop(con))
        return removed

    def deselect(key, removed):
        for con in reversed(rows[key]):
            cols[con] = removed.pop()
            for other in cols[con]:
                for con2 in rows[other]:
                    if con2 != con:
                        cols[con2].add(other)

    for i, d in enumerate(quiz):
        if d:
            select((i // 9, i % 9, int(d)))

    def search():
        if not cols:
            return 1
        con = min(cols, key=lambda k: len(cols[k]))
        found = 0
        for key in list(cols[con]):
            removed = select(key)
            found += search()
            deselect(key, removed)
            if found >= limit:
                break
        return found
    return search()


def test_pool_puzzles_have_exactly_their_shipped_solution():
    quiz, sol = sd.read_puzzles(sd.POOL_FILE)
    assert quiz.shape == sol.shape == (49151, 81) and ((quiz > 0).sum(1) == 17).all()
    for i in np.random.default_rng(0).choice(len(quiz), 12, replace=False):
        assert count_solutions(quiz[i]) == 1
        assert valid_grid(sol[i]) and ((quiz[i] == 0) | (quiz[i] == sol[i])).all()
        assert sd.solve(quiz[i].tolist()) == sol[i].tolist()


def test_peer_relu_sum_matches_a_loop_over_peers_in_value_and_gradient():
    """The gather-free sum over units against relu(a_i + b_j) summed over peers found from coordinates; its
    hand-written backward differentiates again (the DEQ's penalty needs that) as finite differences say."""
    a, b = (torch.randn(2, 81, 3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    same_unit = lambda i, j: i // 9 == j // 9 or i % 9 == j % 9 or (i // 27, i % 9 // 3) == (j // 27, j % 9 // 3)
    want = torch.stack([sum(torch.relu(a[:, i] + b[:, j]) for j in range(81) if j != i and same_unit(i, j))
                        for i in range(81)], 1)
    got = sd.peer_relu_sum(a, b)
    torch.testing.assert_close(got, want)
    w = torch.randn_like(want)
    grads_want, grads_got = (torch.autograd.grad((out * w).sum(), (a, b)) for out in (want, got))
    for g_want, g_got in zip(grads_want, grads_got):
        torch.testing.assert_close(g_got, g_want)
    assert torch.autograd.gradgradcheck(sd.peer_relu_sum, (a[:1, :, :2], b[:1, :, :2]))


def test_solver_reports_contradictions_and_validity_check_catches_errors():
    quiz, sol = sd.read_puzzles(sd.RRN_TEST)
    broken = quiz[0].copy()
    blank = int(np.flatnonzero(broken == 0)[0])
    broken[blank] = next(d for d in range(1, 10) if d != sol[0][blank] and d in sol[0][sd.PEERS[blank]])
    assert sd.solve(broken.tolist()) is None  # a digit that repeats a peer's
    swapped = sol[:4].copy()
    swapped[:, [0, 1]] = swapped[:, [1, 0]]
    assert sd.is_valid_grid(torch.from_numpy(sol[:4])).all() and not sd.is_valid_grid(torch.from_numpy(swapped)).any()


def test_rrn_test_set_groups():
    groups = sd.load_test_set(sd.RRN_TEST)
    assert sorted(groups) == list(range(17, 35))
    for givens, (quiz, sol) in groups.items():
        assert len(quiz) == 1000 and ((quiz > 0).sum(1) == givens).all()
    assert len(sd.load_test_set(sd.RRN_TEST, n_per_givens=5)[20][0]) == 5


def random_symmetry(grid, rng):
    """An independent implementation of the sampler's group: relabel, transpose, bands/stacks, rows/columns in them."""
    g = np.asarray(grid).reshape(9, 9)
    g = rng.permutation(9)[g - 1] + 1
    for _ in range(2):
        bands = rng.permutation(3)
        order = [3 * b + i for b in bands for i in rng.permutation(3)]
        g = g[order].T
    return g.T.reshape(81) if rng.random() < 0.5 else g.reshape(81)


def test_canonical_form_and_invariant_are_symmetry_invariant():
    _, sol = sd.read_puzzles(sd.RRN_VAL)
    rng = np.random.default_rng(1)
    grids = sol[rng.choice(len(sol), 6, replace=False)]
    for grid in grids:
        moved = np.stack([random_symmetry(grid, rng) for _ in range(20)])
        assert all(valid_grid(m) for m in moved)
        assert len(set(sd.grid_invariant(np.concatenate([grid[None], moved])))) == 1
        assert canonical(grid) == canonical(moved[0]) == canonical(moved[1])
    assert len({canonical(g) for g in grids}) == len({g.tobytes() for g in sd._relabel_normal(grids)})


def canonical(grid):
    return sd.canonical_grid(np.asarray(grid, dtype=np.uint8))


def test_training_pool_is_leak_free():
    quiz, sol = sd.train_pool()
    assert len(quiz) == 38690  # 49,151 - 10,461 (of which 1,083 are equivalent only through symmetries)
    held = sd.held_out_solutions()
    held_keys = set(sd.grid_invariant(held))
    assert not any(key in held_keys for key in sd.grid_invariant(sol))
    # the invariant only shortlists; canonical forms confirm that dropped grids really are equivalent
    pool_quiz, pool_sol = sd.read_puzzles(sd.POOL_FILE)
    kept = {g.tobytes() for g in sol}
    dropped = [g for g in pool_sol if g.tobytes() not in kept]
    assert len(dropped) == 10461
    by_key = {}
    for key, g in zip(sd.grid_invariant(held), held):
        by_key.setdefault(key, []).append(g)
    rng = np.random.default_rng(2)
    for i in rng.choice(len(dropped), 15, replace=False):
        key = sd.grid_invariant(dropped[i][None])[0]
        assert canonical(dropped[i]) in {canonical(h) for h in by_key[key]}


def test_sampler_yields_valid_puzzles_in_the_givens_range():
    quiz, sol = sd.train_pool()
    pool_q, pool_s = torch.from_numpy(quiz), torch.from_numpy(sol)
    q, s = sd.sample_batch(pool_q, pool_s, 512, torch.Generator().manual_seed(0), min_givens=20, max_givens=30)
    q2, s2 = sd.sample_batch(pool_q, pool_s, 512, torch.Generator().manual_seed(0), min_givens=20, max_givens=30)
    assert torch.equal(q, q2) and torch.equal(s, s2)
    givens = (q > 0).sum(1)
    assert givens.min() == 20 and givens.max() == 30
    assert ((q == 0) | (q == s)).all()
    assert all(valid_grid(g) for g in s[:100].tolist())
    # each sample is a transformed pool puzzle: its solution's invariant is one of the pool's
    pool_keys = set(sd.grid_invariant(sol))
    assert all(key in pool_keys for key in sd.grid_invariant(s[:100].numpy().astype(np.uint8)))
    # relabelling and symmetries really are applied: samples rarely equal their pool grid
    assert len({g.tobytes() for g in s.numpy().astype(np.uint8)} & {g.tobytes() for g in sol}) < 5


GOOD = "." * 81
GRID = "".join(str((3 * (r % 3) + r // 3 + c) % 9 + 1) for r in range(9) for c in range(9))  # a valid grid


@pytest.mark.parametrize("text, problem", [
    (f"{GOOD}\n123\n", "81 characters"),
    (f"{GOOD}\n{'1' * 80}x\n", "81 characters"),
    (f"{GOOD}\n{'1' * 80}\u00b2\n", "81 characters"),  # a superscript two: str.isdigit() alone accepts it
    (f"{GOOD},{GRID}\n{GOOD},{GRID[:80]}\u0661\n", "81 digits"),  # an Arabic-Indic one
    (f"{GOOD},{GRID}\n{GOOD},123\n", "81 digits"),
    (f"{GOOD},{GRID}\n{GOOD},{'1' * 81}\n", "not a valid grid"),
    (f"{GOOD},{GRID}\n{'2' + GOOD[1:]},{GRID}\n", "not a valid grid"),  # solution disagrees with a given
    (f"{GOOD}\n{GOOD},{GRID}\n", "quiz,solution"),
    (f"{GOOD}\n{'5' + GOOD[1:9] + '5' + GOOD[10:]}\n", "repeat a digit"),  # 5 twice in column 0, no solution given
    (f"{GOOD}\n{'7' + GOOD[1:20] + '7' + GOOD[21:]}\n", "repeat a digit"),  # 7 twice in the top-left box
])
def test_malformed_files_exit_2_naming_the_line(tmp_path, capsys, text, problem):
    assert valid_grid([int(ch) for ch in GRID])
    path = tmp_path / "puzzles.txt"
    path.write_text(text)
    with pytest.raises(SystemExit) as e:
        sd.read_puzzles(str(path))
    err = capsys.readouterr().err
    assert e.value.code == 2 and problem in err and f"{path}:2:" in err


def test_truncated_xz_file_exits_2(tmp_path, capsys):
    path = tmp_path / "cut.txt.xz"
    with open(sd.RRN_TEST, "rb") as f:
        path.write_bytes(f.read(5000))
    with pytest.raises(SystemExit) as e:
        sd.read_puzzles(str(path))
    assert e.value.code == 2 and str(path) in capsys.readouterr().err


def test_user_file_with_dots_and_solutions(tmp_path):
    """Dots for blanks, solutions, a blank line at the end, and the byte-order mark some editors write first."""
    quiz, sol = sd.read_puzzles(sd.RRN_TEST)
    path = tmp_path / "mine.txt"
    lines = ["".join(str(d) if d else "." for d in q) + "," + "".join(map(str, s)) for q, s in zip(quiz[:3], sol[:3])]
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8-sig")
    q, s = sd.read_puzzles(str(path))
    assert (q == quiz[:3]).all() and (s == sol[:3]).all()
