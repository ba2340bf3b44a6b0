import dataclasses
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch

from common import (StopAfterStep, eval_config, load_checkpoint, load_weights, parse_config, resume_checkpoint,
                    save_checkpoint, set_generator_state)


@dataclasses.dataclass
class Config:
    iters: int = 4
    train_iters: int = 2
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"
    compile: bool = True
    op: str = dataclasses.field(default="add", metadata={"choices": ("add", "sub")})
    out_dir: str = "out/x"
    ckpt: str = ""

    def __post_init__(self):
        if self.train_iters > 100:
            raise ValueError("--train_iters must be <= 100")


def exit_code_and_message(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(Config, argv)
    err = capsys.readouterr().err.strip()
    return e.value.code, err


def test_parse_both_spellings_and_bools():
    cfg = parse_config(Config, ["--train-iters", "3", "--lr", "0.5", "--no-compile", "--out_dir", "o"])
    assert (cfg.train_iters, cfg.lr, cfg.compile, cfg.out_dir) == (3, 0.5, False, "o")
    assert parse_config(Config, ["--train_iters", "5", "--compile"]).train_iters == 5
    assert parse_config(Config, []) == Config()


@pytest.mark.parametrize("argv", [["--iters", "0"], ["--lr", "-1"], ["--lr", "nan"], ["--lr", "inf"],
                                  ["--iters", "two"], ["--bogus", "1"], ["--device", "tpu"], ["--op", "mul"],
                                  ["--train_iters", "101"], ["--seed", "-1"], ["--out_dir", __file__],
                                  ["--out_dir", os.path.join(__file__, "sub")], ["--out_dir", ""]])
def test_bad_values_exit_2_with_one_line(argv, capsys):
    code, err = exit_code_and_message(argv, capsys)
    assert code == 2 and err.startswith("error:") and "\n" not in err


def test_checkpoint_round_trip_is_atomic(tmp_path):
    path = str(tmp_path / "sub" / "ckpt.pt")
    state = {"model": {"w": torch.randn(3, 4)}, "config": dataclasses.asdict(Config()), "step": 7}
    save_checkpoint(path, state)
    save_checkpoint(path, state)  # overwriting goes through the temp file too
    assert os.listdir(tmp_path / "sub") == ["ckpt.pt"]
    loaded = load_checkpoint(path, Config)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["step"] == 7


def test_non_finite_weights_never_replace_a_checkpoint(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    good = {"model": {"w": torch.randn(3, 4), "n": torch.tensor(2)}, "config": dataclasses.asdict(Config()), "step": 7}
    save_checkpoint(path, good)
    broken = {**good, "model": {"w": torch.full((3, 4), float("nan")), "n": torch.tensor(2)}, "step": 8}
    with pytest.raises(SystemExit) as e:
        save_checkpoint(path, broken)
    assert e.value.code != 0 and "not overwritten" in str(e.value.code)
    assert load_checkpoint(path, Config)["step"] == 7 and os.listdir(tmp_path) == ["ckpt.pt"]


def test_bad_checkpoints_exit_2(tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    foreign = str(tmp_path / "foreign.pt")
    save_checkpoint(foreign, {"model": {}, "config": {"other": 1}})
    for path in (str(tmp_path / "missing.pt"), str(garbage), foreign):
        with pytest.raises(SystemExit) as e:
            load_checkpoint(path, Config)
        assert e.value.code == 2
        assert path in capsys.readouterr().err


def test_a_checkpoint_from_before_a_new_evaluation_flag_still_loads(tmp_path, capsys):
    """A script that gains an evaluation flag still reads its older checkpoints; a missing training field (here
    lr) or a field it does not know is another script's checkpoint."""
    old = dataclasses.asdict(Config())
    del old["iters"]
    path = str(tmp_path / "old.pt")
    save_checkpoint(path, {"model": {}, "config": old})
    assert load_checkpoint(path, Config, may_lack=["iters"])["config"] == old
    for config in ({k: v for k, v in old.items() if k != "lr"}, {**dataclasses.asdict(Config()), "other": 1}):
        save_checkpoint(path, {"model": {}, "config": config})
        with pytest.raises(SystemExit) as e:
            load_checkpoint(path, Config, may_lack=["iters"])
        assert e.value.code == 2 and "was not written by test_common.py" in capsys.readouterr().err


def test_eval_config_takes_only_evaluation_flags(capsys):
    saved, cli = dataclasses.asdict(Config(train_iters=3, lr=0.1)), Config(iters=9, lr=0.5)
    cfg = eval_config(Config, saved, cli, ["iters"])
    assert (cfg.iters, cfg.train_iters, cfg.lr) == (9, 3, 0.1)
    with pytest.raises(SystemExit) as e:  # a saved config its own __post_init__ rejects
        eval_config(Config, saved | {"train_iters": 101}, cli, ["iters"])
    assert e.value.code == 2 and "invalid config" in capsys.readouterr().err


def test_weights_that_do_not_fit_exit_2(capsys):
    model = torch.nn.Linear(3, 4)
    load_weights(model, torch.nn.Linear(3, 4).state_dict())
    with pytest.raises(SystemExit) as e:
        load_weights(model, torch.nn.Linear(5, 4).state_dict())
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "do not fit" in err and "\n" not in err


def test_an_interrupt_after_training_is_one_line_not_a_traceback(tmp_path):
    """SIGTERM while a script evaluates (its training loop has saved the checkpoint and exited): one line on stderr
    and the interrupt's exit status, as a Ctrl-C during training gives."""
    script = tmp_path / "run.py"
    script.write_text("import dataclasses, os, signal\nfrom common import parse_config\n"
                      "@dataclasses.dataclass\nclass Config:\n    iters: int = 4\n"
                      "parse_config(Config, [])\nos.kill(os.getpid(), signal.SIGTERM)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env={**os.environ,
                         "PYTHONPATH": root})
    assert run.returncode in (130, -signal.SIGINT), run.stderr
    assert run.stderr.startswith("interrupted") and run.stderr.count("\n") == 1, run.stderr


def test_resume_takes_only_the_step_budget_and_evaluation_flags(tmp_path, capsys):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, {"model": {}, "config": dataclasses.asdict(Config(lr=0.1))})
    assert resume_checkpoint(path, Config, Config(lr=0.1, iters=9), ["iters"])["config"]["lr"] == 0.1
    with pytest.raises(SystemExit) as e:  # the saved optimizer would silently keep lr 0.1
        resume_checkpoint(path, Config, Config(lr=0.5), ["iters"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "--lr 0.5 (saved: 0.1)" in err and "\n" not in err


def test_a_generator_state_from_another_device_type_exits_2(capsys):
    generator = torch.Generator().manual_seed(1)
    set_generator_state(generator, torch.Generator().manual_seed(2).get_state())
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(2).get_state())
    with pytest.raises(SystemExit) as e:  # a CUDA generator's state is 16 bytes
        set_generator_state(generator, torch.zeros(16, dtype=torch.uint8))
    assert e.value.code == 2 and "another device type" in capsys.readouterr().err


def test_stop_after_step_waits_for_the_step_then_a_second_signal_interrupts():
    before = signal.getsignal(signal.SIGTERM)
    with StopAfterStep() as stop:
        signal.raise_signal(signal.SIGTERM)  # the first only asks: the step in progress goes on
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before
    requested = []  # off the main thread (no signals there) it is inert instead of failing
    worker = threading.Thread(target=lambda: requested.append(StopAfterStep().__enter__().requested))
    worker.start(), worker.join()
    assert requested == [False]
