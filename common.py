"""Small helpers shared by the experiment scripts. Nothing here knows about a particular model or data set."""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import threading

import numpy as np
import torch

DEVICES = ("auto", "cuda", "mps", "cpu")
DTYPES = ("auto", "bfloat16", "float32")
POSITIVE_INTS = ("iters", "train_iters", "steps", "batch_size", "width")  # flags that must be >= 1
NON_NEGATIVE = ("n_test", "eval_every", "lr", "weight_decay")  # flags that must be >= 0 (eval_every 0 = off)


def user_error(msg):
    """A problem the user can fix (bad flag, bad file, wrong checkpoint): one line, exit code 2, no traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        user_error(message)


def parse_config(config_cls, argv=None):
    """Build an argparse CLI from a Config dataclass: --snake_case and --kebab-case, bools as --x/--no-x.
    Range checks: every float finite, the common names above, plus the dataclass's own __post_init__ (raise
    ValueError there). A command-line run also treats SIGTERM (`timeout`, a batch scheduler) like Ctrl-C (training
    loops catch both with StopAfterStep), and an interrupt outside training prints one line, not a traceback."""
    parser = _Parser(description=sys.modules[config_cls.__module__].__doc__, formatter_class=_HelpFormatter)
    for f in dataclasses.fields(config_cls):
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        if f.type is bool:
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            choices = DEVICES if f.name == "device" else DTYPES if f.name == "dtype" else f.metadata.get("choices")
            parser.add_argument(*names, dest=f.name, type=f.type, default=f.default, choices=choices,
                                help=f.metadata.get("help"))
    args = vars(parser.parse_args(argv))
    for name, value in args.items():
        if isinstance(value, float) and not math.isfinite(value):
            user_error(f"--{name} must be a finite number, got {value}")
    for name in POSITIVE_INTS:
        if name in args and args[name] < 1:
            user_error(f"--{name} must be >= 1, got {args[name]}")
    for name in NON_NEGATIVE:
        if name in args and args[name] < 0:
            user_error(f"--{name} must be >= 0, got {args[name]}")
    for name, value in args.items():
        if name.endswith("seed") and not 0 <= value < 2 ** 32:  # numpy's range
            user_error(f"--{name} must be in 0..2**32-1, got {value}")
    if "out_dir" in args:
        check_out_dir(args["out_dir"])
    try:
        cfg = config_cls(**args)
    except ValueError as e:
        user_error(str(e))
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.excepthook = _interrupt_in_one_line
    return cfg


def check_out_dir(path):
    """Before any work: --out_dir must be a directory that exists or can be made, so an unusable one is found now,
    not when training ends and its checkpoint has nowhere to go. Nothing is created here."""
    probe = os.path.abspath(path) if path else ""
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not probe or not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        user_error(f"--out_dir {path!r} cannot be used: {probe or 'empty path'} is not a writable directory")


def _interrupt_in_one_line(exc_type, exc, tb):
    """Ctrl-C or SIGTERM outside the training loop (during evaluation or plotting; training has saved its checkpoint
    by then): one line instead of a traceback. Python still exits with the interrupt's status (130)."""
    if issubclass(exc_type, KeyboardInterrupt):
        print("interrupted: the run stopped before it finished; checkpoints it saved are kept", file=sys.stderr)
    else:
        sys.__excepthook__(exc_type, exc, tb)


class StopAfterStep:
    """`with StopAfterStep() as stop:` around a training loop that reads `stop.requested` between steps. The first
    Ctrl-C or SIGTERM only sets it, so the checkpoint the loop then writes holds whole steps: weights, optimizer,
    step count and random streams agree, and --resume goes on exactly as an uninterrupted run would. A second one
    interrupts at once (the checkpoint on disk stays as it was)."""

    def __enter__(self):
        self.requested = False
        on_main_thread = threading.current_thread() is threading.main_thread()  # only it may handle signals
        self._before = {s: signal.signal(s, self._request) for s in (signal.SIGINT, signal.SIGTERM) if on_main_thread}
        return self

    def _request(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (interrupt again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for s, handler in self._before.items():
            signal.signal(s, handler)


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name):
    """auto = cuda > mps > cpu. Asking for a device this machine lacks is a user error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available() or name == "mps" and not torch.backends.mps.is_available():
        user_error(f"--device {name} requested but it is not available on this machine")
    device = torch.device(name)
    print(f"device: {device_name(device)}")
    return device


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def pick_dtype(name, device):
    """auto = bf16 autocast on CUDA, fp32 elsewhere (MPS bf16 autocast is patchy, CPU bf16 is slow)."""
    if name == "auto":
        name = "bfloat16" if device.type == "cuda" else "float32"
    return torch.bfloat16 if name == "bfloat16" else torch.float32


def autocast(device, dtype):
    """Wraps forward + loss only; parameters and optimizer state stay fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def fp32(device):
    """A region that stays in fp32 inside autocast (where autocast exists for the device: not MPS on torch 2.4)."""
    return torch.autocast(device.type, enabled=False) if device.type in ("cuda", "cpu") else contextlib.nullcontext()


def maybe_compile(module, enabled, device):
    """torch.compile on CUDA only: it is never required, and elsewhere it costs more than it saves."""
    return torch.compile(module) if enabled and device.type == "cuda" else module


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mem_gb(device):
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def log_progress(bar, step, **stats):
    """A log step's numbers: the tqdm bar's postfix on a terminal, a printed line where tqdm turned the bar off
    (output to a file: a batch job, nohup), so such a log still shows how training went."""
    bar.set_postfix(**stats)
    if bar.disable:
        print(f"step {step}: " + " ".join(f"{k} {v}" for k, v in stats.items()), flush=True)


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, obj):
    """Atomic: write a temp file, then rename over the old checkpoint, so a crash never leaves half a file.
    Weights that are not finite are never written: the run stops and the checkpoint on disk stays as it was."""
    if not all(torch.isfinite(v).all() for v in obj["model"].values() if v.is_floating_point()):
        sys.exit(f"stopped: the model's weights are not finite; {path} was not overwritten")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, config_cls, may_lack=()):
    """Load a checkpoint written by a script with this Config; anything else is a user error. Its config may lack
    the fields in `may_lack`, the evaluation flags, which come from the command line: so an evaluation flag added to
    a script later does not orphan the checkpoints written before it."""
    if not os.path.isfile(path):
        user_error(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt or foreign file
        user_error(f"checkpoint {path} could not be read ({type(e).__name__})")
    fields = {f.name for f in dataclasses.fields(config_cls)}
    if (not isinstance(ckpt, dict) or {"model", "config"} - ckpt.keys() or set(ckpt["config"]) - fields
            or fields - set(ckpt["config"]) - set(may_lack)):
        script = os.path.basename(getattr(sys.modules[config_cls.__module__], "__file__", config_cls.__module__))
        user_error(f"checkpoint {path} was not written by {script} (config fields differ)")
    return ckpt


def resume_checkpoint(path, config_cls, cfg, may_change):
    """--resume continues the run saved at `path`, so every flag but the step budget, the log interval and those in
    `may_change` (evaluation and system flags) must be as saved: a changed --lr would be overridden by the saved
    optimizer state, a changed data flag would train on other data, and results.json would report neither."""
    ckpt = load_checkpoint(path, config_cls, may_change)
    changed = [f"--{k} {getattr(cfg, k)} (saved: {v})" for k, v in ckpt["config"].items()
               if k not in (*may_change, "steps", "eval_every", "resume") and getattr(cfg, k) != v]
    if changed:
        user_error(f"--resume continues the run in {path} with its own flags, but {', '.join(changed)}; "
                   f"give the saved values, or start a new run in another --out_dir")
    return ckpt


def set_generator_state(generator, state):
    """Restore a saved generator state; one saved on another device type (CPU and CUDA states differ) is a user
    error, not a traceback."""
    try:
        generator.set_state(state.to(generator.get_state().device))
    except RuntimeError:
        user_error("the checkpoint's random streams were saved on another device type; --resume it on that one")


def load_weights(model, weights):
    """Weights that do not fit the model built from the checkpoint's config are a user error, not a traceback."""
    try:
        model.load_state_dict(weights)
    except (RuntimeError, KeyError) as e:
        detail = str(e).strip().splitlines()[-1].strip()
        user_error(f"checkpoint weights do not fit the model built from its config ({detail})")


def eval_config(config_cls, saved, cli, names):
    """--ckpt: the model comes from the saved config (a dict); only the evaluation flags in `names` come from the
    CLI. A saved config that is invalid, alone or with those flags, is a user error."""
    try:
        return config_cls(**{**saved, **{n: getattr(cli, n) for n in names}})
    except ValueError as e:
        user_error(f"checkpoint {cli.ckpt} holds an invalid config: {e}")


def write_results(out_dir, results):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)


def plot_acc_vs_iters(path, curves, train_iters, title, ylabel="accuracy"):
    """curves: {label: [acc after 1, 2, ... iterations]}; the dashed line marks the training depth."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, acc in curves.items():
        ax.plot(range(1, len(acc) + 1), acc, label=label)
    ax.axvline(train_iters, color="gray", linestyle="--", label=f"train_iters = {train_iters}")
    ax.set(xlabel="iteration", ylabel=ylabel, title=title, ylim=(-0.02, 1.02))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
