"""Checkpoints: one file with everything needed to rebuild a model and go on training.

A checkpoint is a dict of plain data and tensors, read back with ``weights_only=True``:
``format``, ``version``, ``config`` (the resolved run config as plain containers), ``choices`` (the config
groups' options it was composed from, {"model": "vae_gan", ...}; None when unknown),
``model`` (state dict), ``optimizers`` and ``schedulers`` ({name: state dict}), ``scaler``,
``ema`` (the moving average's state dict and update count, or None), ``step``, ``epoch``,
``wall_time`` and ``processes`` (how many trained it). No random state: each training step draws from a
seed made of the run's seed, the process's rank and the step (genlab.trainer.step_seed), so a resumed
run on as many processes draws what the first would have, whatever GPUs it finds.
"""

import os
import pickle
import shutil
from pathlib import Path

import torch

from genlab.errors import GenlabError

FORMAT = "genlab-checkpoint"
VERSION = 3  # 3: no random state (the steps' draws are seeded by step)

# version 1 named a loss by its config name; version 2 by the _target_ its config names
LOSS_TARGETS = {"bce": "BCE", "minimax": "Minimax", "wasserstein": "Wasserstein", "hinge": "Hinge", "lsgan": "LSGAN",
                "elbo": "ELBO"}


def save(state: dict, path: Path) -> None:
    """Write atomically: a temporary file, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save({"format": FORMAT, "version": VERSION, **state}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # a full disk shows as either, depending on where the write stopped
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "the write stopped short (a full disk, a quota, a file-size limit?)"
        free = shutil.disk_usage(path.parent).free / 2**20
        kept = f"the previous {path.name} is intact" if path.exists() else "nothing was written"
        raise GenlabError(f"could not write the checkpoint {path}: {reason} ({free:.0f} MiB free on that disk); "
                          f"{kept}.") from e
    finally:
        tmp.unlink(missing_ok=True)


def resolve(path) -> Path:
    """A checkpoint file, or a run directory (its checkpoints/last.pt)."""
    p = Path(path).expanduser()
    if p.is_dir():
        for candidate in (p / "checkpoints" / "last.pt", p / "last.pt"):
            if candidate.is_file():
                return candidate
        raise GenlabError(f"no checkpoint in {p}: expected {p / 'checkpoints' / 'last.pt'}.")
    if not p.is_file():
        raise GenlabError(f"checkpoint not found: {p} (give a run directory or a .pt file).")
    return p


def load(path, map_location="cpu") -> dict:
    """Read a genlab checkpoint safely (no code runs), or raise a GenlabError that says why not."""
    p = resolve(path)
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise GenlabError(
            f"{p} is refused: it holds objects other than tensors and plain data, which genlab "
            f"never unpickles (weights_only=True). It is not a genlab checkpoint. ({str(e).splitlines()[0]})"
        ) from e
    except Exception as e:  # truncated zip, foreign bytes, legacy pickles: all unreadable here
        raise GenlabError(f"{p} cannot be read as a checkpoint (truncated or damaged?): {str(e).splitlines()[0]}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise GenlabError(f"{p} is not a genlab checkpoint (no '{FORMAT}' marker).")
    if state.get("version", 0) > VERSION:
        raise GenlabError(
            f"{p} is a version {state['version']} checkpoint; this genlab reads up to version {VERSION}. Upgrade genlab."
        )
    return upgrade(state)


def upgrade(state: dict) -> dict:
    """A checkpoint of an earlier version in today's terms."""
    config = state.get("config")
    if state.get("version", 1) < 2 and isinstance(config, dict):
        loss = dict(config.get("loss") or {})
        if "name" in loss:
            config["loss"] = {"_target_": f"genlab.losses.{LOSS_TARGETS[loss.pop('name')]}", **loss}
        config.setdefault("scheduler", {"_target_": "genlab.schedules.Constant", "warmup": 0, "nets": {}})
        state.setdefault("schedulers", {})
        state.setdefault("ema", None)
    return state
