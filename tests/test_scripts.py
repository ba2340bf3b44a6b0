"""Every script end to end with tiny flags: the results.json contract, pictures, checkpoint, --ckpt, --resume,
determinism, the compiled path, a checkpoint on SIGTERM and the command-line errors. A new experiment adds one row
to SCRIPTS."""
import concurrent.futures
import contextlib
import dataclasses
import importlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import sudoku_data
from common import parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# script -> (tiny flags for a CPU run of a few seconds: 4 steps, one backward pass each, a log step at 2; headline keys
# the script promises)
SCRIPTS = {
    "grokking_mod97": (["--p", "11", "--steps", "4", "--iters", "3", "--train_iters", "2", "--width", "16",
                        "--eval_every", "2"],
                       ["steps_to_95", "steps_to_99", "seconds_to_99"]),
    "recurrent_addition": (["--steps", "4", "--iters", "4", "--train_iters", "2", "--width", "16",
                            "--train_digits", "3", "--test_digits", "4,8", "--n_test", "8", "--batch_size", "8",
                            "--eval_every", "2"],
                           ["exact_4", "exact_8", "iters_needed_8", "exact_8_at_4x", "max_drop_at_4x"]),
    "recurrent_shortest_path": (["--map", "plane", "--n_cities", "40", "--max_hops", "12", "--n_test", "16",
                                 "--steps", "4", "--iters", "3", "--train_iters", "2", "--width", "16",
                                 "--eval_every", "2"],
                                ["valid_hops_sources", "reach_1.05_sources", "reach_1.05_pairs", "probe_r2"]),
    "sudoku_gnn": (["--steps", "4", "--iters", "3", "--train_iters", "2", "--width", "16", "--msg_width", "16",
                    "--batch_size", "8", "--n_test", "2", "--n_overthink", "2", "--eval_every", "2"],
                   ["solved_17_at_iters", "solved_30_34_at_iters", "solved_all_at_iters", "drop_to_4x_iters",
                    "samples_per_s"]),
    "sudoku_deq": (["--steps", "4", "--iters", "3", "--train_iters", "2", "--width", "16", "--msg_width", "16",
                    "--batch_size", "8", "--n_test", "1", "--eval_every", "2"],
                   ["spectral_radius", "residual", "solved_17_at_iters", "solved_all_at_iters", "recoveries"]),
    "learned_adjacency": (["--steps", "4", "--iters", "3", "--train_iters", "2", "--width", "16", "--msg_width", "16",
                           "--sampler_width", "16", "--batch_size", "4", "--n_test", "2", "--var_draws", "2",
                           "--eval_every", "2", "--refine", "0.5"],
                          ["adjacency_precision", "adjacency_recall", "solved_all_at_iters", "adaptive_solved_all",
                           "adaptive_mean_iters", "grad_var_none", "grad_var_ema", "grad_var_rloo"]),
}
CKPT_KEYS = {"model", "optimizer", "config", "step", "results", "rng"}


def flag(args, name):
    return int(args[args.index(name) + 1])


def eval_flags(script, args):
    """The row's evaluation flags other than --iters (e.g. --n_test), so that --ckpt evaluates the same small set."""
    names = importlib.import_module(script).EVAL_FLAGS
    pairs = [args[i:i + 2] for i in range(0, len(args), 2)]
    return [x for name, value in pairs if name[2:] in names and name != "--iters" for x in (name, value)]


def run(script, args):
    module = importlib.import_module(script)
    return module.main(parse_config(module.Config, args))


def check_contract(script, out_dir, iters, headline_keys):
    with open(os.path.join(out_dir, "results.json")) as f:
        results = json.load(f)
    assert results["script"] == script and results["iters"] == iters
    for key in ("config", "train_iters", "train_time_s", "samples_per_s", "peak_mem_gb", "device", "torch", "seed"):
        assert key in results, key
    assert results["acc"], "no accuracy curves"
    for name, curve in results["acc"].items():
        assert len(curve) == iters, name
        assert all(0.0 <= a <= 1.0 for a in curve), name
    assert set(headline_keys) <= set(results["headline"])
    assert os.path.getsize(os.path.join(out_dir, "acc_vs_iters.png")) > 0
    return results


@contextlib.contextmanager
def in_backward(n, action):
    """Call action() in the middle of the n-th training step of this process, at its backward pass."""
    backward, calls = torch.Tensor.backward, []

    def backward_with_action(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            action()
        return backward(self, *args, **kwargs)

    torch.Tensor.backward = backward_with_action
    try:
        yield
    finally:
        torch.Tensor.backward = backward


def sigterm_in_backward(n):
    """SIGTERM to this process in the n-th training step, as `timeout` would send it: the training loop must finish
    that step, save it whole and exit 130."""
    def sigterm():
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL, "SIGTERM would kill the test process"
        signal.raise_signal(signal.SIGTERM)
    return in_backward(n, sigterm)


class Crash(Exception):
    pass


def crash_in_backward(n):
    """An error in the n-th training step (out of memory, a lost machine): the run dies without saving anything."""
    def crash():
        raise Crash
    return in_backward(n, crash)


def assert_same_training_state(path_a, path_b):
    """Two checkpoints hold the same step, weights and optimizer state, bit for bit."""
    a, b = (torch.load(path, weights_only=True) for path in (path_a, path_b))
    assert a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys() and a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for name, w in a["model"].items():
        assert torch.equal(w, b["model"][name]), name
    for p, state in a["optimizer"]["state"].items():
        for k, v in state.items():
            other = b["optimizer"]["state"][p][k]
            assert torch.equal(v, other) if torch.is_tensor(v) else v == other, (p, k)


@pytest.mark.parametrize("script", SCRIPTS)
def test_end_to_end(script, tmp_path, capsys, monkeypatch):
    args, headline_keys = SCRIPTS[script]
    iters, steps = flag(args, "--iters"), flag(args, "--steps")
    out = str(tmp_path / "run")
    results = run(script, args + ["--out_dir", out, "--device", "cpu"])
    assert results == check_contract(script, out, iters, headline_keys)

    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert CKPT_KEYS <= set(ckpt) and ckpt["step"] == steps
    assert all(isinstance(v, (int, float, str, bool, type(None))) for v in ckpt["config"].values())

    # --ckpt: evaluation only, with more iterations than before
    evaluated = run(script, ["--ckpt", os.path.join(out, "ckpt.pt"), "--iters", str(iters + 2),
                             *eval_flags(script, args), "--out_dir", str(tmp_path / "eval"), "--device", "cpu"])
    check_contract(script, str(tmp_path / "eval"), iters + 2, headline_keys)
    assert evaluated["config"]["width"] == ckpt["config"]["width"]
    module = importlib.import_module(script)
    if hasattr(module, "load_test_set"):  # the sudoku scripts: settings are chosen without reading a test puzzle
        read = []
        with monkeypatch.context() as m:
            m.setattr(module, "load_test_set",
                      lambda path, *a: read.append(path) or sudoku_data.load_test_set(path, *a))
            run(script, ["--ckpt", os.path.join(out, "ckpt.pt"), "--eval_set", "validation", *eval_flags(script, args),
                         "--out_dir", str(tmp_path / "eval_validation"), "--device", "cpu"])
        assert read and set(read) == {sudoku_data.RRN_VAL}, read

    # same seed on CPU -> same curves, also when SIGTERM stops the run in its first step, --resume goes on, a crash
    # in step 3 leaves the checkpoint of the log step 2 (grokking_mod97 saves after each seed of a few seconds), and
    # --resume finishes from there
    interrupted = args + ["--out_dir", str(tmp_path / "again"), "--device", "cpu"]
    capsys.readouterr()
    with sigterm_in_backward(1), pytest.raises(SystemExit) as e:
        run(script, interrupted)
    assert e.value.code == 130 and "interrupted" in capsys.readouterr().out
    assert torch.load(tmp_path / "again" / "ckpt.pt", weights_only=True)["step"] == 1
    with crash_in_backward(2), pytest.raises(Crash):
        run(script, interrupted + ["--resume"])
    saved_at = 1 if script == "grokking_mod97" else 2
    assert torch.load(tmp_path / "again" / "ckpt.pt", weights_only=True)["step"] == saved_at
    assert run(script, interrupted + ["--resume"])["acc"] == results["acc"]
    assert_same_training_state(os.path.join(out, "ckpt.pt"), tmp_path / "again" / "ckpt.pt")  # tiny runs solve little

    # --resume continues from the saved step
    run(script, args + ["--out_dir", out, "--device", "cpu", "--resume", "--steps", str(2 * steps)])
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == 2 * steps


@pytest.mark.parametrize("script", SCRIPTS)
def test_compiled_run_writes_a_plain_checkpoint(script, tmp_path, monkeypatch):
    """On CUDA each script compiles its hot function and runs under bf16 autocast. Here both are forced on the CPU
    (torch.compile with a backend that runs the traced graph as it is and counts it: the same tracing, no code
    generation): the run must work, training and evaluation must need fewer compiled versions than Dynamo's limit
    of 8 (past it, Dynamo silently runs the function uncompiled), and the checkpoint must load into an uncompiled
    fp32 model."""
    import torch._dynamo.testing
    module, counter = importlib.import_module(script), torch._dynamo.testing.CompileCounter()
    monkeypatch.setattr(module, "maybe_compile", lambda fn, enabled, device: torch.compile(fn, backend=counter))
    args = SCRIPTS[script][0]
    out = str(tmp_path / "run")
    run(script, args + ["--out_dir", out, "--device", "cpu", "--dtype", "bfloat16"])
    assert counter.frame_count < 8, counter.frame_count
    monkeypatch.undo()
    run(script, ["--ckpt", os.path.join(out, "ckpt.pt"), *eval_flags(script, args), "--out_dir", str(tmp_path / "eval"),
                 "--device", "cpu"])


def command_line(script, *args):
    return subprocess.Popen([sys.executable, f"{script}.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish_all(procs, after_first_log=False):
    """Wait for every process at once (most of a run's time here is importing torch and building its data):
    -> [(returncode, stdout, stderr)]. after_first_log: send SIGTERM once a process prints its first log step."""
    def finish(proc):
        try:
            if after_first_log:
                for line in proc.stdout:
                    if line.startswith("step "):
                        break
                proc.terminate()
            stdout, stderr = proc.communicate(timeout=300)
            return proc.returncode, stdout, stderr
        finally:
            proc.kill()
    with concurrent.futures.ThreadPoolExecutor(len(procs)) as pool:
        return list(pool.map(finish, procs))


def test_sigterm_from_outside_saves_a_checkpoint_like_ctrl_c(tmp_path):
    """`timeout` and batch schedulers stop a run with SIGTERM: the run must save its checkpoint and exit 130, as on
    Ctrl-C. A real process this time (test_end_to_end signals each script from inside): with the output piped the tqdm
    bar is off and every log step prints a line, and the signal goes after the first one. The handler is common.py's
    StopAfterStep, the same in every script, so one script stands for all (one with no early stop at a target)."""
    args = SCRIPTS["recurrent_addition"][0]
    args = [*args[:args.index("--steps")], *args[args.index("--steps") + 2:], "--steps", "100000", "--eval_every", "1"]
    [(returncode, stdout, stderr)] = finish_all([command_line("recurrent_addition", *args, "--device", "cpu",
                                                              "--out_dir", str(tmp_path))], after_first_log=True)
    assert returncode == 130, stderr
    assert "interrupted" in stdout and "Traceback" not in stderr
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] >= 1


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("bad", [["--iters", "0"], ["--batch_size", "-1"], ["--device", "tpu"],
                                 ["--no_such_flag", "1"], ["--steps", "many"]])
def test_bad_flags_exit_2(script, bad, capsys):
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as e:
        parse_config(module.Config, bad)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err


def bad_checkpoints(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"model": {}, "config": {"not_a_field": 1}}, other)
    return tmp_path / "missing.pt", other


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_missing_or_foreign_checkpoint_exits_2(script, tmp_path, capsys):
    for path in bad_checkpoints(tmp_path):
        with pytest.raises(SystemExit) as e:
            run(script, ["--ckpt", str(path), "--out_dir", str(tmp_path / "o"), "--device", "cpu"])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error:") and "\n" not in err, err


def test_cli_errors_are_one_line(tmp_path):
    """The same from the real command line (common.py's user_error, shared by every script): exit 2, no traceback,
    and the script named by its file (its module is __main__ there)."""
    results = finish_all([command_line("sudoku_gnn", "--ckpt", str(path), "--out_dir", str(tmp_path / "o"))
                          for path in bad_checkpoints(tmp_path)])
    for returncode, _, stderr in results:
        assert returncode == 2, stderr
        assert stderr.startswith("error:") and "Traceback" not in stderr
        assert len(stderr.strip().splitlines()) == 1
    assert "was not written by sudoku_gnn.py" in results[1][2]


def test_configs_are_plain():
    """Checkpoints hold the config as plain types, so every field must be int, float, str or bool."""
    for script in SCRIPTS:
        for f in dataclasses.fields(importlib.import_module(script).Config):
            assert f.type in (int, float, str, bool), (script, f.name)
