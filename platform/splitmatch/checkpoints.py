"""A run's folder and the weights in it: where the run lives (`run_location`, a local mirror of a
remote one), who holds it (`run_lock`), and how its weights are written, found again, loaded and
checked against the config that is about to reuse them.

A run folder holds `checkpoint_*/state.pt` (Ray Train's checkpoints: weights, optimizer, where the
loop was, the config), `best_model.pt` (the weights chosen on the selection split) and
`final_metrics.json`. Everything is plain tensors and values, loaded with
`torch.load(weights_only=True)`: a crafted pickle is refused, never run. Every file is written
whole or not at all (`files.write_atomic`), so that a full disk or a kill mid-write leaves no file
that looks complete.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import re
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import nn

from splitmatch import storage
from splitmatch.config import (RESULT_NEUTRAL_KEYS, Config, ConfigError, config_differences,
                               describe_differences)
from splitmatch.errors import RunInUse, UserError
from splitmatch.files import Busy, held_lock, write_atomic

FINAL_METRICS = "final_metrics.json"
BEST_MODEL = "best_model.pt"
# A checkpoint's key for the weight average (train.ema_decay), when the run keeps one.
AVERAGE = "weight_average"
# The key of a result checkpoint's chosen seen-score calibration (what `predict` uses for auto).
CALIBRATION = "seen_score_calibration"
# What `--resume` may change in a run's config: a longer budget (the stored config and the MLflow
# run record the change). Everything else that can change a result must match.
RESUME_MAY_GROW = ("train.max_iters",)
# What `eval` may change against the config stored with a checkpoint: how the model is evaluated
# and on which device, not what it is or which classes it was trained on.
EVAL_MAY_DIFFER = ("inference.", "eval.", "data.test_split", "data.select_split", "train.use_gpu",
                   "train.num_workers", "train.cpus_per_worker", "data.root")


class CheckpointError(UserError):
    """A file given as a checkpoint that is none, or that does not load."""


def save_weights(path: Path, payload: dict) -> Path:
    return write_atomic(path, lambda handle: torch.save(payload, handle))


def save_checkpoint(directory: Path, model: nn.Module, optimizer, iteration: int, epoch: int,
                    best_hiou: float, config: dict, calibration: float | None = None,
                    average: dict | None = None) -> Path:
    """Tensors and plain values only, so loading can use `torch.load(weights_only=True)`. The
    config that made the weights travels with them (as `config.at_rest` gives it: no
    credentials): `eval` and `--resume` check it; so does the seen-score calibration chosen for
    them (`calibration`), when they are a run's result. `average`: the weight average's state
    (`averaging.WeightAverage.state_dict`), kept so that `--resume` continues it."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "iteration": iteration, "epoch": epoch, "best_hiou": best_hiou, "config": config}
    if calibration is not None:
        state[CALIBRATION] = calibration
    if average is not None:
        state[AVERAGE] = average
    save_weights(directory / "state.pt", state)
    return directory


# What torch.load raises for a file that is not a whole, plain checkpoint: cut short, not a torch
# file at all, or a pickle that the weights-only loader refuses.
_UNLOADABLE = (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError,
               AttributeError, TypeError)


def load_state(path: str | Path) -> dict:
    """A checkpoint directory (or its state.pt, best_model.pt, a bare model state dict), loaded
    without pickles. A missing file or one that does not load is a one-line CheckpointError."""
    path = Path(path)
    if path.is_dir():
        path = path / "state.pt"
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except _UNLOADABLE as exc:
        raise CheckpointError(f"{path} is not a checkpoint that loads ({_why(exc)})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a checkpoint (it holds a {type(state).__name__}, "
                              f"not a dict of weights)")
    return state if "model" in state else {"model": state}


# Where torch's weights-only refusal gives its cause, after a first line that advises loading
# with weights_only=False (which would run a crafted pickle) and may hold terminal escape codes.
_REFUSAL_CAUSE = re.compile(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)")
_ESCAPES = re.compile(r"\x1b\[[0-9;]*m")


def _why(exc: BaseException) -> str:
    """A loader's error in one line: its first, or for torch's page-long weights-only refusal
    the cause it names."""
    text = _ESCAPES.sub("", str(exc)).strip()
    refusal = _REFUSAL_CAUSE.search(text)
    if refusal:
        return f"{type(exc).__name__}: {refusal.group(1)}; refused by the weights-only loader"
    lines = text.splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def newest_checkpoint(run_dir: str | Path,
                      passed_over: list[tuple[Path, str]] | None = None) -> tuple[Path, int] | None:
    """(directory, iteration) of the complete checkpoint with the highest iteration in `run_dir`.

    Read from the disk rather than from Ray Train's snapshot: an interrupt can land after a
    checkpoint was written but before the snapshot names it (or before there is a snapshot at
    all), and that checkpoint is the newest progress. One whose state.pt does not load (cut
    short mid-copy, damaged, a crafted pickle) is passed over; each such (directory, why) is
    appended to `passed_over`, for the caller to say.
    """
    newest = None
    # Folders only: Ray Train's checkpoint_manager_snapshot.json shares their prefix.
    for directory in sorted(p for p in Path(run_dir).glob("checkpoint_*") if p.is_dir()):
        try:  # memory-mapped: only the iteration is read here
            iteration = torch.load(directory / "state.pt", map_location="cpu", weights_only=True,
                                   mmap=True)["iteration"]
        except (*_UNLOADABLE, KeyError) as exc:
            if passed_over is not None:
                passed_over.append((directory, _why(exc)))
            continue
        if newest is None or iteration > newest[1]:
            newest = (directory, iteration)
    return newest


def remove_unloadable_checkpoints(run_dir: str | Path) -> list[Path]:
    """Delete the checkpoint folders of a failed run whose state.pt does not load (a copy cut
    short by a full disk), so that nothing is left under a checkpoint's name that is not one;
    returns them. Only for a run that no process works on any more (the run lock is held)."""
    import shutil

    passed_over: list[tuple[Path, str]] = []
    newest_checkpoint(run_dir, passed_over)
    for directory, _ in passed_over:
        shutil.rmtree(directory, ignore_errors=True)
    return [directory for directory, _ in passed_over]


def final_checkpoint(run_dir: Path) -> Path:
    """The last checkpoint of a finished run (ablation rows are compared at equal budget, not
    best-of, and never selected on the split they report)."""
    newest = newest_checkpoint(run_dir)
    if newest is None:
        raise CheckpointError(f"no checkpoint in {run_dir}")
    return newest[0]


def result_checkpoint(run_dir: Path) -> Path:
    """The weights a finished run's figures belong to: those chosen on the selection split
    (best_model.pt) when it had one, else its last checkpoint."""
    best = Path(run_dir) / BEST_MODEL
    return best if best.is_file() else final_checkpoint(run_dir)


def check_run_config(run_dir: Path, cfg: Config, may_grow: tuple[str, ...] = ()) -> dict[str, tuple]:
    """Refuse to reuse `run_dir` (its checkpoints, its final figures) when the config that made it
    differs from `cfg` in anything that can change a result; the error names the keys.

    Numeric keys in `may_grow` may be larger in `cfg`: those changes are returned as
    {key: (stored, wanted)} for the caller to record.
    """
    import yaml

    stored = Path(run_dir) / "config.yaml"
    if not stored.is_file():
        return {}
    differences = config_differences(yaml.safe_load(stored.read_text()), cfg)
    grown = _grown(differences, may_grow)
    refused = {key: change for key, change in differences.items() if key not in grown}
    if refused:
        allowed = f" (only {', '.join(may_grow)} may grow)" if may_grow else ""
        raise ConfigError(f"{run_dir} was made with another config ({describe_differences(refused)})"
                          f"{allowed}; reusing it would mix results: choose another name "
                          f"(--set name=...) or remove that directory")
    return grown


def _grown(differences: dict[str, tuple], may_grow: tuple[str, ...]) -> dict[str, tuple]:
    return {key: (old, new) for key, (old, new) in differences.items()
            if key in may_grow and isinstance(old, (int, float)) and new >= old}


def check_checkpoint_config(checkpoint: str | Path, state: dict, cfg: Config) -> str:
    """Refuse to evaluate a checkpoint under a config other than the one that trained it (another
    unseen split, model or CLIP); returns where the stored config came from, or why none.

    The config is stored in the checkpoint; older checkpoints fall back to their run's config.yaml.
    """
    import yaml

    stored, source = state.get("config"), str(checkpoint)
    if stored is None:
        path = Path(checkpoint)
        # checkpoint_*/ or checkpoint_*/state.pt, or a run's best_model.pt
        run_dir = path.parent.parent if path.name == "state.pt" else path.parent
        if (run_dir / "config.yaml").is_file():
            stored, source = yaml.safe_load((run_dir / "config.yaml").read_text()), str(run_dir / "config.yaml")
    if stored is None:
        return f"{checkpoint} carries no config: not checked"
    differences = config_differences(stored, cfg, neutral=(*RESULT_NEUTRAL_KEYS, *EVAL_MAY_DIFFER))
    # A checkpoint from before a run's budget grew on --resume belongs to that run too.
    differences = {k: v for k, v in differences.items() if k not in _grown(differences, RESUME_MAY_GROW)}
    if differences:
        raise ConfigError(f"{source}: the checkpoint was trained under another config "
                          f"({describe_differences(differences)}); evaluate it with its run's "
                          f"config.yaml")
    return f"config checked against {source}"


def run_location(cfg: Config) -> str:
    """Where the run `cfg.name` lives: a folder under `train.storage_path`, or a prefix on object
    storage (Ray Train writes its checkpoints there itself)."""
    return storage.join(cfg.train.storage_path, cfg.name)


def run_directory(cfg: Config) -> Path:
    """The run's local folder: the run itself, or this node's mirror of a remote one, holding
    what the driver needs to check and report it (`pull_run`)."""
    run_dir = storage.local_path(run_location(cfg))
    if storage.is_remote(cfg.train.storage_path):
        pull_run(run_location(cfg), run_dir)
    return run_dir


def pull_run(location: str, run_dir: Path) -> None:
    """Mirror a remote run's config, selected weights, final figures and checkpoints (only those
    the remote still has: a mirrored checkpoint the run has since dropped must not look newest)."""
    for name in ("config.yaml", BEST_MODEL, FINAL_METRICS):
        storage.pull(storage.join(location, name), run_dir / name, refresh=True)
    remote = {name for name in storage.listdir(location) if name.startswith("checkpoint_")}
    for stale in run_dir.glob("checkpoint_*"):
        if stale.name not in remote:
            shutil.rmtree(stale, ignore_errors=True)
    for name in remote:
        storage.pull(storage.join(location, name, "state.pt"), run_dir / name / "state.pt")


def run_key(cfg: Config) -> str:
    """What the run's MLflow run is tagged with (tracking.RUN_KEY_TAG): the same from every
    machine for a run on object storage, the local folder otherwise."""
    location = run_location(cfg)
    return location if storage.is_remote(location) else str(storage.local_path(location))


def share(run_dir: Path, location: str, *names: str) -> None:
    """Push files written in a remote run's local folder to the run's remote prefix."""
    if storage.is_remote(location):
        for name in names:
            storage.push(run_dir / name, storage.join(location, name))


@contextlib.contextmanager
def run_lock(name: str, run_dir: Path):
    """Held while a process works on the run folder `run_dir`: a second `train` of the same name
    (or a trial, or an ablation row) is refused in one line, whichever starts second, before it
    touches the folder or Ray. On object storage it holds on this machine only (the local
    mirror's folder)."""
    holder = (f"pid {os.getpid()} ({Path(sys.argv[0]).name} {' '.join(sys.argv[1:2])}), "
              f"since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    try:  # beside the folder, not in it: a command refused before it starts leaves no run folder
        with held_lock(run_dir.parent / f".{name}.lock", holder):
            yield
    except Busy as busy:
        raise RunInUse(f"run '{name}' in {run_dir} is in use by {busy.holder or 'another process'}:"
                       f" wait for it to end, or choose another name (--set name=...)") from None
