"""Sudoku data shared by sudoku_gnn.py, sudoku_deq.py and learned_adjacency.py: files, leak-free split, sampler.

Shipped in data/ (quiz,solution per line, 81 digits each, 0 = blank, xz-compressed):
  sudoku17.csv.xz        Royle's 49,151 17-clue puzzles with solutions from `solve` below: the training pool
  rrn-test.csv.xz        RRN test set (Palm et al. 2018): 1,000 puzzles for each givens count 17..34
  rrn-validation.csv.xz  RRN validation set, same layout: model selection only
  satnet-test.csv.xz     SATNet's 10,000 puzzles (about 36 givens); its first 1,000 rows are the usual test slice

The RRN puzzles are relabelled Royle puzzles with extra givens, so a pool puzzle whose solution grid is equivalent
(digit relabelling + the sampler's row/column symmetries) to any RRN test or validation solution is dropped from
training. A pool grid is dropped when its `grid_invariant` (equal for all equivalent grids, seconds for the whole
pool) matches a held-out grid's; `--confirm` checks with exact canonical forms (`canonical_grid`) that every
dropped grid is truly equivalent, i.e. that the invariant drops nothing it should keep.

  python sudoku_data.py                          # split counts + sampler throughput
  python sudoku_data.py --confirm                # ... and confirm every dropped grid with canonical forms (1-2 min)
  python sudoku_data.py --solve sudoku17.txt     # regenerate data/sudoku17.csv.xz from Royle's list (~minutes)
"""
import argparse
import functools
import itertools
import lzma
import multiprocessing
import os
import time

import numpy as np
import torch

from common import pick_device, user_error

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
POOL_FILE, RRN_TEST, RRN_VAL = (os.path.join(DATA_DIR, f) for f in (
    "sudoku17.csv.xz", "rrn-test.csv.xz", "rrn-validation.csv.xz"))
EVAL_SETS = {"test": RRN_TEST, "validation": RRN_VAL}  # each 1,000 puzzles per givens count 17..34

# ---------------------------------------------------------------------------------------------------------------
# the board: 27 units (rows, columns, boxes) and the 20 peers of each cell

ROWS = [[9 * r + c for c in range(9)] for r in range(9)]
COLS = [[9 * r + c for r in range(9)] for c in range(9)]
BOXES = [[9 * (3 * br + r) + 3 * bc + c for r in range(3) for c in range(3)] for br in range(3) for bc in range(3)]
UNITS = ROWS + COLS + BOXES
PEERS = [sorted({p for u in UNITS if i in u for p in u} - {i}) for i in range(81)]


def peer_index():
    """(81, 20) long tensor: PEERS[i] are the cells sharing a row, column or box with cell i."""
    return torch.tensor(PEERS)


def peer_relu_sum(a, b):
    """a, b (B, 81, m) -> (B, 81, m): for each cell i, the sum over its 20 peers j of relu(a_i + b_j), without a gather.

    Equal to relu(a[:, :, None] + b[:, peer_index()]).sum(2), but built from reshapes and broadcasting only: the
    peers of a cell are its row, column and box minus itself, and a row shares a 3-cell segment with a box (so does a
    column). Summing over the row, the column and the box (a dense 9x9 table of pairs each), then subtracting the row
    and column segments (counted twice) and the cell itself (counted 3 - 2 = once), counts every peer once. The
    backward is written out (PeerReluSum): autograd keeps only a and b, and each table is rebuilt, used and freed in
    turn, so no (B, 81, 20, m) edge tensor is ever in memory, at most one table is, and b's gradient needs no
    scatter-add. Compiled, each table is one fused reduction in the forward and in the backward."""
    return PeerReluSum.apply(a, b)


PAIR_TERMS = (((3, 4), 1), ((1, 2), 1), ((2, 4), 1), ((4,), -1), ((2,), -1))  # row, column, box, -segments


def grouped(grid, axes):  # (B, band, row, stack, column, m) -> (..., 3^k, m): cells that differ only along `axes`
    return grid.movedim(axes, tuple(range(-len(axes) - 1, -1))).flatten(-len(axes) - 1, -2)


def ungrouped(t, axes):  # the inverse of grouped
    return t.unflatten(-2, (3,) * len(axes)).movedim(tuple(range(-len(axes) - 1, -1)), axes)


class PeerReluSum(torch.autograd.Function):
    """peer_relu_sum with a hand-written backward. For the pairs (i, j) of one unit, with on_ij = [a_i + b_j > 0]:
    dL/da_i = g_i sum_j on_ij and dL/db_j = sum_i g_i on_ij. The backward is made of differentiable ops, so a
    double backward (the DEQ's spectral penalty) goes through it; relu's second derivative is zero."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        grid_a, grid_b = a.unflatten(1, (3, 3, 3, 3)), b.unflatten(1, (3, 3, 3, 3))
        out = -torch.relu(grid_a + grid_b)  # the cell itself, which the terms count once
        for axes, sign in PAIR_TERMS:
            pa, pb = grouped(grid_a, axes), grouped(grid_b, axes)
            out = out + sign * ungrouped(torch.relu(pa.unsqueeze(-2) + pb.unsqueeze(-3)).sum(-2), axes)
        return out.flatten(1, 4)

    @staticmethod
    def backward(ctx, grad):
        grid_a, grid_b = (t.unflatten(1, (3, 3, 3, 3)) for t in ctx.saved_tensors)
        grid_g = grad.unflatten(1, (3, 3, 3, 3))
        grad_a = grad_b = -grid_g * (grid_a + grid_b > 0)  # the cell itself; the sums below make new tensors
        for axes, sign in PAIR_TERMS:
            pa, pb, pg = (grouped(t, axes) for t in (grid_a, grid_b, grid_g))
            with torch.no_grad():  # (..., i, j, m): 1 where relu is active (in place: no bool table, no copy)
                on = (pa.unsqueeze(-2) + pb.unsqueeze(-3)).gt_(0).to(grad.dtype)
            grad_a = grad_a + sign * ungrouped(pg * on.sum(-2), axes)
            grad_b = grad_b + sign * ungrouped((on * pg.unsqueeze(-2)).sum(-3), axes)
        return grad_a.flatten(1, 4), grad_b.flatten(1, 4)


def is_valid_grid(grid):
    """grid (B, 81) digits 1..9 -> (B,) bool: every row, column and box holds each digit once."""
    units = grid.long()[:, torch.tensor(UNITS, device=grid.device)]  # (B, 27, 9)
    return (units.sort(2).values == torch.arange(1, 10, device=grid.device)).all(2).all(1)


# ---------------------------------------------------------------------------------------------------------------
# solver: constraint propagation (naked + hidden singles) and depth-first search on the most constrained cell

ALL = 0x1FF
UNITS_OF = [[u for u in UNITS if i in u] for i in range(81)]


def _assign(masks, cell, bit):
    return all(_eliminate(masks, cell, b) for b in (1 << d for d in range(9)) if b != bit and masks[cell] & b)


def _eliminate(masks, cell, bit):
    if not masks[cell] & bit:
        return True
    masks[cell] &= ~bit
    m = masks[cell]
    if m == 0:
        return False
    if m & (m - 1) == 0 and not all(_eliminate(masks, p, m) for p in PEERS[cell]):  # naked single
        return False
    for unit in UNITS_OF[cell]:  # hidden single: `bit` has one place left in this unit
        places = [c for c in unit if masks[c] & bit]
        if not places or len(places) == 1 and not _assign(masks, places[0], bit):
            return False
    return True


def _search(masks):
    open_cells = [(bin(m).count("1"), c) for c, m in enumerate(masks) if m & (m - 1)]
    if not open_cells:
        return masks
    _, cell = min(open_cells)
    for d in range(9):
        if masks[cell] & (1 << d):
            trial = masks.copy()
            if _assign(trial, cell, 1 << d) and (done := _search(trial)):
                return done
    return None


def solve(quiz):
    """quiz: 81 ints, 0 = blank -> 81 ints of a solution, or None if there is none."""
    masks = [ALL] * 81
    for cell, d in enumerate(quiz):
        if d and not _assign(masks, cell, 1 << (d - 1)):
            return None
    done = _search(masks)
    return None if done is None else [m.bit_length() for m in done]


# ---------------------------------------------------------------------------------------------------------------
# files: one puzzle per line, 81 characters (digits, 0 or . for blank), optionally ",solution"; .xz is read too

def read_puzzles(path):
    """-> (quiz (N, 81) uint8, solution (N, 81) uint8 or None). Any malformed line is a user error."""
    try:
        with (lzma.open if path.endswith(".xz") else open)(path, "rt", encoding="utf-8-sig") as f:  # -sig: a BOM
            lines = [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip()]
    except (OSError, EOFError, lzma.LZMAError, UnicodeDecodeError) as e:  # EOFError: a cut .xz
        user_error(f"cannot read puzzle file {path}: {e}")
    if not lines:
        user_error(f"{path}: no puzzles in file")
    quizzes, solutions = [], []
    for n, line in lines:
        fields = line.split(",")
        if len(fields) > 2 or len(fields) != len(lines[0][1].split(",")):
            user_error(f"{path}:{n}: expected 'quiz' or 'quiz,solution' on every line, got {line[:40]!r}")
        quiz = fields[0].strip().replace(".", "0")
        if len(quiz) != 81 or not (quiz.isascii() and quiz.isdigit()):  # isdigit alone takes '²'
            user_error(f"{path}:{n}: a puzzle needs 81 characters from 0-9 or '.', got {fields[0][:40]!r}")
        quizzes.append(quiz)
        if len(fields) == 2:
            sol = fields[1].strip()
            if len(sol) != 81 or not (sol.isascii() and sol.isdigit()) or "0" in sol:
                user_error(f"{path}:{n}: a solution needs 81 digits 1-9, got {sol[:40]!r}")
            solutions.append(sol)
    quiz = _digits(quizzes)
    units = np.sort(quiz[:, np.array(UNITS)], 2)  # (N, 27, 9) each unit's givens in order, blanks (0) first
    clash = ((units[..., 1:] == units[..., :-1]) & (units[..., 1:] > 0)).any((1, 2))
    if clash.any():
        n = lines[int(clash.argmax())][0]
        user_error(f"{path}:{n}: the puzzle's givens repeat a digit in a row, column or box")
    if not solutions:
        return quiz, None
    sol = _digits(solutions)
    bad = ~is_valid_grid(torch.from_numpy(sol)).numpy() | ((quiz != 0) & (quiz != sol)).any(1)
    if bad.any():
        n = lines[int(bad.argmax())][0]
        user_error(f"{path}:{n}: the solution is not a valid grid that agrees with the puzzle's givens")
    return quiz, sol


def _digits(lines):
    return (np.frombuffer("".join(lines).encode("ascii"), np.uint8) - ord("0")).reshape(-1, 81)


def write_puzzles(path, quiz, sol):
    with (lzma.open if path.endswith(".xz") else open)(path, "wt") as f:
        for q, s in zip(quiz, sol):
            f.write("".join(map(str, q)) + "," + "".join(map(str, s)) + "\n")


def load_test_set(path=RRN_TEST, n_per_givens=0):
    """-> {givens: (quiz, solution) uint8 arrays}; n_per_givens > 0 keeps the first n of each givens count."""
    quiz, sol = read_puzzles(path)
    givens = (quiz != 0).sum(1)
    groups = {}
    for g in np.unique(givens):
        idx = np.flatnonzero(givens == g)[: n_per_givens or None]
        groups[int(g)] = (quiz[idx], sol[idx])
    return groups


def groups_to_device(groups, n, device):
    """load_test_set's groups as long tensors on `device`, the first n of each givens count (0 = all)."""
    return {g: (torch.from_numpy(q[:n or None]).long().to(device), torch.from_numpy(s[:n or None]).long().to(device))
            for g, (q, s) in groups.items()}


# ---------------------------------------------------------------------------------------------------------------
# equivalence of solution grids under relabelling, transpose, band/stack and row/column-in-band permutations

def _line_perms():
    """All 1,296 permutations of 9 lines that keep the 3-line groups (bands or stacks) intact."""
    p3 = list(itertools.permutations(range(3)))
    return np.array([[3 * outer[g] + inner[g][k] for g in range(3) for k in range(3)]
                     for outer in p3 for inner in itertools.product(p3, repeat=3)])


LINE_PERMS = _line_perms()  # (1296, 9): new line k = old line LINE_PERMS[:, k]
LINE_INV = np.argsort(LINE_PERMS, axis=1)


def canonical_grid(grid):
    """The lexicographically smallest relabelled grid in the symmetry orbit of `grid` ((81,) digits 1..9), as bytes.
    Row 0 can always be made 0..8, so the search is over which row goes on top, its band partner below it and the
    column permutation; the rest of the order is then fixed by sorting rows inside bands and bands by their rows."""
    best = None
    for g in (grid.reshape(9, 9) - 1, grid.reshape(9, 9).T - 1):
        pos = np.argsort(g, axis=1)  # pos[i, d] = column of digit d in row i
        for top, second in ((r, s) for r in range(9) for s in range(3 * (r // 3), 3 * (r // 3) + 3) if s != r):
            # relabel d -> new column of d in the top row: row `second` becomes c^-1 o pi o c with pi below
            pi = pos[top][g[second]]
            rows2 = np.take_along_axis(LINE_INV, pi[LINE_PERMS], axis=1)  # (1296, 9)
            code = rows2 @ (9 ** np.arange(8, -1, -1))
            for c in np.flatnonzero(code == code.min()):
                if best is not None and code[c] > best[1]:
                    continue
                relabel = LINE_INV[c][pos[top]]  # digit -> new digit
                new = relabel[g[:, LINE_PERMS[c]]] @ (9 ** np.arange(8, -1, -1))  # each row as one integer
                third = 3 * (top // 3) + 3 - top % 3 - second % 3
                others = sorted(tuple(sorted(new[3 * b: 3 * b + 3])) for b in range(3) if b != top // 3)
                key = (new[top], new[second], new[third]) + others[0] + others[1]
                if best is None or key < best:
                    best = key
    return np.array(best, dtype=np.int64).tobytes()


ROW_PAIRS = torch.tensor([(3 * b + i, 3 * b + j) for b in range(3) for i, j in ((0, 1), (0, 2), (1, 2))] +  # in a band
                         [(3 * b1 + i, 3 * b2 + j) for b1, b2 in ((0, 1), (0, 2), (1, 2))  # across two bands
                          for i in range(3) for j in range(3)])  # (36, 2)


def grid_invariant(sol, chunk=2048):
    """sol (N, 81) digits 1..9 -> (N,) bytes, equal for equivalent grids (cheap; may collide for others).
    For rows i != j, the map 'column of a digit in row i -> its column in row j' is a permutation whose cycle type
    survives relabelling and column permutations; row symmetries only reorder the pairs, so sorted multisets of
    cycle types (within bands, across bands) are invariant; transpose swaps the row and column parts. The cycle type
    is coded by the fixed-point counts of sigma, ..., sigma^4: they give the number of cycles of each length 1..4,
    and the other elements (if any) form one cycle, since two cycles of length >= 5 do not fit in 9."""
    def part(g):  # g (n, 9, 9) int64 digits 0..8; torch: its gathers run several times faster than numpy's here
        n = len(g)
        sigma = g.argsort(dim=2)[:, ROW_PAIRS[:, 1]].gather(2, g[:, ROW_PAIRS[:, 0]])  # (n, 36, 9)
        powers = [sigma]
        while len(powers) < 4:
            powers.append(sigma.gather(2, powers[-1]))
        cycle_type = sum((p == torch.arange(9)).sum(2) * 10 ** k for k, p in enumerate(powers))  # a digit per power
        inside = (cycle_type[:, :9].reshape(n, 3, 3).sort(2).values @ 7 ** torch.arange(3)).sort(1).values  # per band
        across = (cycle_type[:, 9:].reshape(n, 3, 9).sort(2).values @ 7 ** torch.arange(9)).sort(1).values  # band pair
        return torch.cat([inside, across], 1).numpy()  # (n, 6), int64 with wraparound = a hash
    keys = []
    for start in range(0, len(sol), chunk):  # chunks small enough to stay in cache over the four powers
        g = torch.from_numpy(sol[start:start + chunk].reshape(-1, 9, 9).astype(np.int64) - 1)
        a, b = part(g), part(g.transpose(1, 2))
        differ = a != b
        first = differ.argmax(1)[:, None]
        swap = differ.any(1)[:, None] & (np.take_along_axis(a, first, 1) > np.take_along_axis(b, first, 1))
        key = np.concatenate([np.where(swap, b, a), np.where(swap, a, b)], 1)  # (row part, column part), sorted
        keys += [row.tobytes() for row in key]
    return keys


def held_out_solutions():
    """The RRN test and validation solution grids, one per relabelling class (each comes with 17..34 givens)."""
    return np.unique(_relabel_normal(np.concatenate([read_puzzles(path)[1] for path in (RRN_TEST, RRN_VAL)])), axis=0)


@functools.cache
def train_pool(verbose=True):
    """Pool puzzles whose solution grid is equivalent to no RRN test or validation solution -> (quiz, sol) uint8.
    A pool grid is dropped when its invariant matches a held-out grid's: that catches every equivalent grid, and
    `python sudoku_data.py --confirm` checks with canonical forms that each dropped grid is in fact equivalent."""
    quiz, sol = read_puzzles(POOL_FILE)
    held = held_out_solutions()
    held_keys = set(grid_invariant(held))
    dropped = np.array([key in held_keys for key in grid_invariant(sol)])
    if verbose:
        relabelled = {g.tobytes() for g in held}
        by_relabel = sum(g.tobytes() in relabelled for g in _relabel_normal(sol[dropped]))
        print(f"sudoku pool: {len(quiz)} puzzles; {dropped.sum()} have a solution equivalent to one of the "
              f"{len(held)} test/validation grids ({by_relabel} by relabelling alone, "
              f"{dropped.sum() - by_relabel} only with symmetries) and are dropped; {(~dropped).sum()} train")
    return quiz[~dropped], sol[~dropped]


def _relabel_normal(sol):
    """Relabel each grid so that its first row reads 1..9: equal iff equivalent under relabelling alone."""
    inverse = np.zeros((len(sol), 10), np.uint8)
    np.put_along_axis(inverse, sol[:, :9].astype(np.int64), np.arange(1, 10, dtype=np.uint8)[None], axis=1)
    return np.take_along_axis(inverse, sol.astype(np.int64), axis=1)


def confirm_split():
    """Slow exact check (1-2 minutes): every dropped pool grid has a held-out grid with the same canonical form."""
    quiz, sol = read_puzzles(POOL_FILE)
    held_canon = {canonical_grid(g) for g in held_out_solutions()}
    train_sol = train_pool(verbose=False)[1]
    kept = {g.tobytes() for g in train_sol}
    dropped = [g for g in sol if g.tobytes() not in kept]
    confirmed = sum(canonical_grid(g) in held_canon for g in dropped)
    leaks = sum(canonical_grid(g) in held_canon for g in train_sol)
    print(f"canonical forms: {confirmed}/{len(dropped)} dropped grids equivalent to a held-out grid; "
          f"{leaks} training grids equivalent to one")


# ---------------------------------------------------------------------------------------------------------------
# training sampler (RRN's recipe): pool puzzle -> relabel digits -> random symmetry -> extra givens from the solution

@functools.cache
def _line_perms_on(device):  # once per device: a copy from host memory every batch would wait for the GPU
    return torch.as_tensor(LINE_PERMS, device=device)


def sample_batch(pool_quiz, pool_sol, batch_size, generator, min_givens=17, max_givens=34, each_once=False):
    """pool_* (N, 81) uint8 on the sampling device -> quiz (B, 81) long 0..9 (0 = blank), solution (B, 81) 1..9.
    The givens count is uniform in min_givens..max_givens (never fewer than the pool puzzle's own). each_once: every
    pool puzzle once, in order (batch_size = N), instead of a draw with replacement."""
    dev, B = pool_quiz.device, batch_size
    idx = torch.arange(B, device=dev) if each_once else torch.randint(len(pool_quiz), (B,), generator=generator,
                                                                        device=dev)
    digits = torch.rand(B, 9, generator=generator, device=dev).argsort(1) + 1  # (B, 9) new name of digits 1..9
    relabel = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=dev), digits], 1)  # blank stays blank
    perms = _line_perms_on(dev)
    rows = perms[torch.randint(len(perms), (B,), generator=generator, device=dev)]  # (B, 9)
    cols = perms[torch.randint(len(perms), (B,), generator=generator, device=dev)]
    src = rows[:, :, None] * 9 + cols[:, None, :]  # (B, 9, 9): new cell (r, c) reads old cell src[r, c]
    transpose = torch.rand(B, 1, 1, generator=generator, device=dev) < 0.5
    src = torch.where(transpose, src.transpose(1, 2), src).reshape(B, 81)
    quiz = relabel.gather(1, pool_quiz[idx].long().gather(1, src))
    sol = relabel.gather(1, pool_sol[idx].long().gather(1, src))
    target = torch.randint(min_givens, max_givens + 1, (B, 1), generator=generator, device=dev)
    extra = target - (quiz > 0).sum(1, keepdim=True)
    keys = torch.rand(B, 81, generator=generator, device=dev).masked_fill(quiz > 0, 2.0)
    reveal = keys.argsort(1).argsort(1) < extra  # the `extra` blank cells with the smallest keys
    return torch.where(reveal, sol, quiz), sol


def _build_pool(src):
    """Solve Royle's list (81-digit puzzle lines; other lines are skipped) and replace the pool file, atomically."""
    try:
        with open(src) as f:
            lines = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        user_error(f"cannot read {src}: {e}")
    quizzes = [[int(ch) for ch in line] for line in lines if len(line) == 81 and line.isascii() and line.isdigit()]
    if not quizzes:
        user_error(f"{src}: no line of 81 digits 0-9")
    print(f"{len(quizzes)} puzzles; {len(lines) - len(quizzes)} other lines skipped (Royle's list has a header)")
    t0 = time.time()
    with multiprocessing.Pool() as workers:
        sols = workers.map(solve, quizzes, chunksize=64)
    quiz, sol = np.array(quizzes, np.uint8), np.array(sols, np.uint8)
    assert is_valid_grid(torch.from_numpy(sol)).all() and ((quiz == 0) | (quiz == sol)).all()
    write_puzzles(POOL_FILE + ".tmp.xz", quiz, sol)
    os.replace(POOL_FILE + ".tmp.xz", POOL_FILE)
    print(f"solved {len(quiz)} puzzles in {time.time() - t0:.0f} s -> {POOL_FILE}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--solve", metavar="ROYLE_TXT", help="solve Royle's list and rewrite the pool file")
    parser.add_argument("--confirm", action="store_true", help="also confirm the split with canonical forms (slow)")
    parser.add_argument("--device", default="cpu", choices=("auto", "cuda", "mps", "cpu"))
    args = parser.parse_args()
    if args.solve:
        _build_pool(args.solve)
    else:
        t0 = time.time()
        quiz, sol = train_pool()
        print(f"split took {time.time() - t0:.1f} s")
        if args.confirm:
            confirm_split()
        dev = pick_device(args.device)
        pq, ps = torch.from_numpy(quiz).to(dev), torch.from_numpy(sol).to(dev)
        gen = torch.Generator(device=dev).manual_seed(0)
        for batch in (256, 4096, 65536):
            sample_batch(pq, ps, batch, gen)
            n, t0 = 0, time.time()
            while time.time() - t0 < 2:
                sample_batch(pq, ps, batch, gen)
                n += batch
            if dev.type == "cuda":
                torch.cuda.synchronize()
            print(f"sampler on {dev.type}, batch {batch}: {n / (time.time() - t0):,.0f} puzzles/s")
