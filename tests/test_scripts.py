"""Every script end to end with tiny flags: the results.json contract, pictures, checkpoint, --ckpt, --resume,
determinism, the compiled path, a checkpoint on SIGTERM and the command-line errors. A new experiment adds one row
to SCRIPTS."""
import dataclasses
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

from common import parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# script -> (tiny flags for a CPU run of a few seconds, headline keys the script promises)
SCRIPTS = {
    "grokking_mod97": (["--p", "11", "--steps", "4", "--iters", "3", "--train_iters", "2", "--width", "16"],
                       ["steps_to_95", "steps_to_99", "seconds_to_99"]),
    "recurrent_addition": (["--steps", "4", "--iters", "4", "--train_iters", "2", "--width", "16",
                            "--train_digits", "3", "--test_digits", "4,8", "--n_test", "8", "--batch_size", "8"],
                           ["exact_4", "exact_8", "iters_needed_8", "exact_8_at_4x", "max_drop_at_4x"]),
    "recurrent_shortest_path": (["--map", "plane", "--n_cities", "40", "--max_hops", "12", "--n_test", "16",
                                 "--steps", "4", "--iters", "3", "--train_iters", "2", "--width", "16"],
                                ["valid_hops_sources", "reach_1.05_sources", "reach_1.05_pairs", "probe_r2"]),
    "sudoku_gnn": (["--steps", "4", "--iters", "3", "--train_iters", "2", "--width", "16", "--msg_width", "16",
                    "--batch_size", "8", "--n_test", "2", "--n_overthink", "2"],
                   ["solved_17_at_iters", "solved_30_34_at_iters", "solved_all_at_iters", "drop_to_4x_iters",
                    "samples_per_s"]),
    "sudoku_deq": (["--steps", "4", "--iters", "3", "--train_iters", "2", "--width", "16", "--msg_width", "16",
                    "--batch_size", "8", "--n_test", "1"],
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


@pytest.mark.parametrize("script", SCRIPTS)
def test_end_to_end(script, tmp_path):
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

    # same seed on CPU -> same curves
    again = run(script, args + ["--out_dir", str(tmp_path / "again"), "--device", "cpu"])
    assert again["acc"] == results["acc"]

    # --resume continues from the saved step
    run(script, args + ["--out_dir", out, "--device", "cpu", "--resume", "--steps", str(2 * steps)])
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == 2 * steps


@pytest.mark.parametrize("script", SCRIPTS)
def test_compiled_run_writes_a_plain_checkpoint(script, tmp_path, monkeypatch):
    """On CUDA each script compiles its hot function and runs under bf16 autocast. Here both are forced on the CPU
    (torch.compile with the eager backend: the same tracing, no code generation): the run must work, and its
    checkpoint must load into an uncompiled fp32 model."""
    module = importlib.import_module(script)
    monkeypatch.setattr(module, "maybe_compile", lambda fn, enabled, device: torch.compile(fn, backend="eager"))
    args = SCRIPTS[script][0]
    out = str(tmp_path / "run")
    run(script, args + ["--out_dir", out, "--device", "cpu", "--dtype", "bfloat16"])
    monkeypatch.undo()
    run(script, ["--ckpt", os.path.join(out, "ckpt.pt"), *eval_flags(script, args), "--out_dir", str(tmp_path / "eval"),
                 "--device", "cpu"])


@pytest.mark.parametrize("script", SCRIPTS)
def test_sigterm_saves_a_checkpoint_like_ctrl_c(script, tmp_path):
    """`timeout` and batch schedulers stop a run with SIGTERM: the run must save its checkpoint and exit 130, as on
    Ctrl-C. With the output piped the tqdm bar is off and every log step prints a line: the signal goes after one."""
    args = SCRIPTS[script][0]
    args = [*args[:args.index("--steps")], *args[args.index("--steps") + 2:], "--steps", "100000", "--eval_every", "1"]
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, f"{script}.py", *args, "--device", "cpu", "--out_dir", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("step "):
                break
        proc.terminate()
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "interrupted" in stdout and "Traceback" not in stderr
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] >= 1


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


@pytest.mark.parametrize("script", SCRIPTS)
def test_cli_errors_are_one_line(script, tmp_path):
    """From the real command line: a missing checkpoint and a checkpoint of another script exit 2, no traceback."""
    other = tmp_path / "other.pt"
    torch.save({"model": {}, "config": {"not_a_field": 1}}, other)
    for args in (["--ckpt", str(tmp_path / "missing.pt")], ["--ckpt", str(other)]):
        proc = subprocess.run([sys.executable, f"{script}.py", *args, "--out_dir", str(tmp_path / "o")],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_configs_are_plain():
    """Checkpoints hold the config as plain types, so every field must be int, float, str or bool."""
    for script in SCRIPTS:
        for f in dataclasses.fields(importlib.import_module(script).Config):
            assert f.type in (int, float, str, bool), (script, f.name)
