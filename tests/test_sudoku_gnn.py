"""sudoku_gnn.py: the message passing follows the peer graph, a tiny CPU model learns to solve easy puzzles and
improves with iterations, and the `--puzzles` / `--ckpt` paths handle good and bad user input."""
import pytest
import torch

import sudoku_data as sd
import sudoku_gnn as sg
from common import parse_config

EASY = 60  # givens of the held-out easy puzzles in the learning test


def tiny_model(**kw):
    torch.manual_seed(0)
    return sg.RRN(sg.Config(width=16, msg_width=16, device="cpu", **kw)).eval()


def test_one_iteration_only_reaches_peers():
    """After one iteration a cell's logits depend on its own input and its 20 peers', no other cell's."""
    model = tiny_model(pos=False)
    quiz = torch.zeros(1, 81, dtype=torch.long)
    changed = quiz.clone()
    changed[0, 80] = 5  # cell (8, 8): a peer of (8, 0) but not of (0, 1)
    with torch.no_grad():
        a, b = model(quiz, 2)[0], model(changed, 2)[0]  # (2, 1, 81, 9) each
    moved = (a[0, 0] - b[0, 0]).abs().amax(-1) > 1e-6  # (81,) after iteration 1
    expected = torch.zeros(81, dtype=torch.bool)
    expected[sd.PEERS[80] + [80]] = True
    assert torch.equal(moved, expected)
    assert ((a[1, 0, 1] - b[1, 0, 1]).abs() > 1e-6).any()  # two hops reach every cell


def test_sweep_carries_the_state_across_its_chunks():
    """The evaluation runs ITER_CHUNK iterations per call and carries the state: its per-iteration verdicts over
    40 iterations (three chunks) must be those of one 40-iteration call. The target is the single call's answer at
    iteration 30, so a chunk that restarted from scratch would miss it."""
    model, iters = tiny_model(), 40
    assert iters > 2 * sg.ITER_CHUNK
    quiz = torch.from_numpy(sd.read_puzzles(sd.RRN_TEST)[0][:6]).long()
    with torch.no_grad():
        pred = model(quiz, iters)[0].argmax(-1) + 1  # (iters, 6, 81)
    target = pred[29]
    correct, _, _ = sg.sweep(model, quiz, target, iters, torch.float32)
    assert torch.equal(correct, (pred == target).all(-1)) and correct[29].all()


def reveal(quiz, sol, givens, seed):
    """Copy solution digits into random blanks until each puzzle has `givens` givens."""
    keys = torch.rand(quiz.shape, generator=torch.Generator().manual_seed(seed)).masked_fill(quiz > 0, 2.0)
    extra = givens - (quiz > 0).sum(1, keepdim=True)
    return torch.where(keys.argsort(1).argsort(1) < extra, sol, quiz)


def test_tiny_model_learns_easy_puzzles(tmp_path):
    """Trained 100 steps on 50-60 givens with 6 iterations, it solves held-out validation puzzles topped up to
    60 givens (21 blanks, chance ~1e-20), far more of them after 12 iterations than after 1."""
    cfg = parse_config(sg.Config, ["--device", "cpu", "--width", "32", "--msg_width", "32", "--train_iters", "6",
                                   "--iters", "12", "--steps", "100", "--batch_size", "32", "--lr", "2e-2",
                                   "--warmup", "10", "--curriculum", "0", "--min_givens", "50", "--max_givens", "60",
                                   "--n_test", "1", "--n_overthink", "0", "--eval_every", "0", "--seed", "0",
                                   "--out_dir", str(tmp_path)])
    sg.main(cfg)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model = sg.RRN(sg.Config(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    quiz, sol = (torch.from_numpy(a).long() for a in sd.load_test_set(sd.RRN_VAL, 50)[34])
    quiz = reveal(quiz, sol, EASY, seed=123)
    with torch.no_grad():
        pred = model.eval()(quiz, 12)[0].argmax(-1) + 1  # (12, 50, 81)
    solved = [(sd.is_valid_grid(p) & (p == sol).all(1)).float().mean().item() for p in pred]
    assert solved[-1] >= 0.5, solved  # seeds 0-3 reach 0.78, 1.0, 0.96, 1.0 (0.0 after one iteration)
    assert solved[-1] >= solved[0] + 0.4, solved

    # the same puzzles through `--puzzles` with their solutions: halting stops a puzzle once its answer is a valid
    # grid that keeps the givens, and the count of matches agrees with a check of the written solutions
    path = tmp_path / "easy.txt"
    path.write_text("".join("".join(map(str, q.tolist())) + "," + "".join(map(str, x.tolist())) + "\n"
                            for q, x in zip(quiz, sol)))
    out = sg.main(parse_config(sg.Config, ["--ckpt", str(tmp_path / "ckpt.pt"), "--puzzles", str(path), "--iters",
                                           "12", "--device", "cpu", "--out_dir", str(tmp_path / "solve")]))
    rows = [line.split() for line in (tmp_path / "solve" / "solutions.txt").read_text().splitlines()]
    answers = torch.tensor([[int(c) for c in r[0]] for r in rows])  # (50, 81)
    right = (answers == sol).all(1)
    assert out["solved"] == int(right.sum()) >= 0.5 * len(sol), out
    # the puzzles have one solution each, so a valid grid that keeps the givens is it: halting may only help
    assert out["solved"] >= int((pred[-1] == sol).all(1).sum()) and out["mean_iters"] < 12


def run_cli(capsys, *args):
    """`python sudoku_gnn.py ARGS` in this process (its __main__ is exactly this call) -> (exit code, stdout, stderr).
    tests/test_scripts.py runs the real command line for every script."""
    try:
        sg.main(parse_config(sg.Config, list(args)))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    sg.main(parse_config(sg.Config, ["--device", "cpu", "--width", "16", "--msg_width", "16", "--steps", "2",
                                     "--train_iters", "2", "--iters", "3", "--batch_size", "4", "--n_test", "1",
                                     "--n_overthink", "1", "--eval_every", "0", "--out_dir", str(out)]))
    return str(out / "ckpt.pt")


def test_puzzles_file_prints_each_solution(tiny_ckpt, tmp_path, capsys):
    quiz, sol = sd.load_test_set(sd.RRN_TEST, 1)[34]
    easy = sol.copy()
    easy[0, :3] = 0  # three blanks with a unique answer
    path = tmp_path / "mine.txt"
    path.write_text("".join(map(str, easy[0])).replace("0", ".") + "\n" + "".join(map(str, quiz[0])) + "\n")
    code, out, err = run_cli(capsys, "--ckpt", tiny_ckpt, "--puzzles", str(path), "--iters", "4", "--device", "cpu",
                             "--out_dir", str(tmp_path / "o"))
    assert code == 0, err
    lines = out.strip().splitlines()
    rows = [line.split() for line in lines if line.startswith(("1: ", "2: "))]
    assert len(rows) == 2
    for row, q in zip(rows, (easy[0], quiz[0])):  # the printed flags agree with an independent check of the grid
        grid = torch.tensor([int(c) for c in row[1]])[None]
        q = torch.from_numpy(q).long()[None]
        assert row[2] == f"valid={bool(sd.is_valid_grid(grid))}"
        assert row[3] == f"keeps_givens={bool(((q == 0) | (grid == q)).all())}"
        assert row[4].startswith("iters=") and 1 <= int(row[4][6:]) <= 4
    n_ok = sum(r[2:4] == ["valid=True", "keeps_givens=True"] for r in rows)
    assert lines[-1] == f"solved {n_ok}/2"
    first = rows[0][1]
    assert (tmp_path / "o" / "solutions.txt").read_text().splitlines()[0] == first
    assert not (tmp_path / "o" / "ckpt.pt").exists()  # a --ckpt run never writes a checkpoint


@pytest.mark.parametrize("content,message", [("123\n", ":1: a puzzle needs 81 characters"),
                                             ("0" * 81 + "," + "1" * 81 + "\n", ":1: the solution is not a valid")])
def test_malformed_puzzle_file_exits_2(tiny_ckpt, tmp_path, capsys, content, message):
    path = tmp_path / "bad.txt"
    path.write_text(content)
    code, _, err = run_cli(capsys, "--ckpt", tiny_ckpt, "--puzzles", str(path), "--device", "cpu",
                           "--out_dir", str(tmp_path / "o"))
    assert code == 2 and err.startswith("error:") and message in err, err
    assert len(err.strip().splitlines()) == 1


def test_bad_checkpoints_exit_2(tiny_ckpt, tmp_path, capsys):
    ckpt = torch.load(tiny_ckpt, weights_only=True)
    ckpt["config"]["width"] = 24  # the weights no longer fit the model the config builds
    wrong = tmp_path / "wrong.pt"
    torch.save(ckpt, wrong)
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint")
    for path, message in ((tmp_path / "missing.pt", "does not exist"), (wrong, "do not fit"),
                          (garbage, "could not be read")):
        code, _, err = run_cli(capsys, "--ckpt", str(path), "--device", "cpu", "--out_dir", str(tmp_path / "o"))
        assert code == 2 and err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli(capsys, "--puzzles", "x.txt")
    assert code == 2 and "--puzzles needs --ckpt" in err


def test_puzzles_file_with_solutions_reports_matches(tiny_ckpt, tmp_path, capsys):
    quiz, sol = sd.load_test_set(sd.RRN_TEST, 3)[30]
    path = tmp_path / "with_solutions.txt"
    path.write_text("".join("".join(map(str, q)) + "," + "".join(map(str, s)) + "\n" for q, s in zip(quiz, sol)))
    out = sg.main(parse_config(sg.Config, ["--ckpt", tiny_ckpt, "--puzzles", str(path), "--iters", "2",
                                           "--device", "cpu", "--out_dir", str(tmp_path / "o")]))
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [line.split() for line in lines if line[:3] in ("1: ", "2: ", "3: ")]
    matches = [r[1] == "".join(map(str, s)) for r, s in zip(rows, sol)]  # independent of the printed flag
    assert [r[4] for r in rows] == [f"matches={m}" for m in matches]
    assert lines[-1] == f"solved {sum(matches)}/3" and out["solved"] == sum(matches)
