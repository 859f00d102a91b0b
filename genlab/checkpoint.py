"""Checkpoints: one file with everything needed to rebuild a model and go on training.

A checkpoint is a dict of plain data and tensors, read back with ``weights_only=True``:
``format``, ``version``, ``config`` (the resolved run config as plain containers), ``choices`` (the config
groups' options it was composed from, {"model": "vae_gan", ...}; None when unknown),
``model`` (state dict), ``optimizers`` and ``schedulers`` ({name: state dict}), ``scaler``,
``ema`` (the moving average's state dict and update count, or None), ``step``, ``epoch``,
``wall_time`` and ``processes`` (how many trained it). No random state: each training step draws from a
seed made of the run's seed, the process's rank and the step (genlab.trainer.step_seed), so a resumed
run on as many processes draws what the first would have, whatever GPUs it finds.

Every file genlab writes for itself (checkpoints, the dataset and classifier caches) carries a
``checksum`` of its content (``write``), checked when it is read (``read``): PyTorch's zip reader does
not check its entries, so a byte changed on disk would otherwise load as a different weight, silently.
"""

import collections
import contextlib
import hashlib
import logging
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from genlab import bundle
from genlab.errors import Damaged, GenlabError, first_line

log = logging.getLogger(__name__)

FORMAT = "genlab-checkpoint"
VERSION = 3  # 3: no random state (the steps' draws are seeded by step), a checksum


# version 1 named a loss by its config name; version 2 by the _target_ its config names
LOSS_TARGETS = {"bce": "BCE", "minimax": "Minimax", "wasserstein": "Wasserstein", "hinge": "Hinge", "lsgan": "LSGAN",
                "elbo": "ELBO"}


def digest(obj) -> str:
    """A checksum of nested dicts, lists, tensors and plain values: every tensor's dtype, shape and bytes, and
    every other value's repr, in order."""
    h = hashlib.blake2b(digest_size=16)

    def walk(o):
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(o, dict):
            h.update(b"D%d" % len(o))
            for k, v in o.items():
                walk(k)
                walk(v)
        elif isinstance(o, (list, tuple)):
            h.update(b"L%d" % len(o))
            for v in o:
                walk(v)
        else:
            h.update(f"{type(o).__name__}:{o!r}".encode())

    walk(obj)
    return h.hexdigest()


# what torch.load(weights_only=True) reads back, besides tensors and the containers that ``portable`` walks
PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)


def portable(obj, where: str = ""):
    """``obj`` as ``read`` can read it back (weights_only=True): numpy numbers become Python's, numpy arrays
    tensors, paths strings, subclasses of int, float and str their base; anything else is refused with one line
    naming its key (``where``), so that a run finds out at its first checkpoint, not at its resume."""
    if isinstance(obj, torch.Tensor) or type(obj) in PLAIN:
        return obj
    if isinstance(obj, dict):
        kind = collections.OrderedDict if isinstance(obj, collections.OrderedDict) else dict
        return kind((portable(k, f"{where}/{k!r} (a key)"), portable(v, f"{where}/{k}")) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set)):
        kind = next(t for t in (list, tuple, set) if isinstance(obj, t))  # a named tuple: a plain one
        return kind(portable(v, f"{where}/{i}") for i, v in enumerate(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray) and obj.dtype != object:
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    for base in (bool, int, float, complex, str, bytes):
        if isinstance(obj, base):
            return base(obj)
    raise GenlabError(f"{where.lstrip('/') or 'the value'} is a {type(obj).__module__}.{type(obj).__qualname__}, which a "
                      "checkpoint cannot hold: genlab reads checkpoints back with weights_only=True (tensors, numbers, "
                      "strings, lists, tuples, sets and dicts). Turn it into one of those in the state_dict() that "
                      "returns it.")


def write(obj: dict, path: Path) -> None:
    """``obj`` with its ``checksum``, atomically: a temporary file, fsync, then rename over ``path``. Raises
    OSError or RuntimeError when the write fails (a full disk shows as either); ``path`` is then as it was.
    What ``read`` could not read back is converted or refused first (``portable``)."""
    path = Path(path)
    obj = portable(obj)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp, open(tmp, "wb") as fh:
        torch.save({**obj, "checksum": digest(obj)}, fh)


@contextlib.contextmanager
def replacing(path: Path):
    """A temporary file beside ``path`` (``.NAME.tmpPID``, which ``clean`` removes if its process dies) to fill in
    the block; then fsynced and renamed over ``path``, atomically. On any failure it is removed, ``path`` as it was."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock (flock) on the file ``path``, made if missing, held for the block: another process
    taking it waits. Yields the lock's file descriptor, or None where there is no lock to take (an unwritable
    folder; a file system without locks, with a warning): the block then runs unguarded."""
    import fcntl

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a")
    except OSError:
        yield None
        return
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError as e:  # a file system without locks (Lustre without -o flock, NFS without lockd)
            log.warning("cannot lock %s (%s); going on without waiting for other processes", path, e)
        yield fh.fileno()


def read(path: Path, map_location="cpu", required: bool = True) -> dict:
    """What ``write`` wrote, or Damaged: refused when it holds more than tensors and plain data (weights_only:
    no code runs), when it cannot be read, or when its content no longer matches its checksum. ``required=False``
    also takes a file with no checksum at all (a checkpoint of an earlier genlab)."""
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise Damaged(f"{path} is refused: it holds objects other than tensors and plain data, which genlab never "
                      f"unpickles (weights_only=True). ({first_line(e)})") from e
    except Exception as e:  # truncated zip, foreign bytes, legacy pickles: all unreadable here
        raise Damaged(f"{path} cannot be read (truncated or damaged?): {first_line(e)}") from e
    if not isinstance(obj, dict):
        raise Damaged(f"{path} is not a file genlab wrote.")
    expected = obj.pop("checksum", None)
    if expected is None and required:
        raise Damaged(f"{path} has no checksum: not written by this genlab.")
    if expected is not None and expected != digest(obj):
        raise Damaged(f"{path} is damaged: its content no longer matches the checksum genlab wrote with it (a byte "
                      "changed on disk?).")
    return obj


def save(state: dict, path: Path) -> None:
    """A checkpoint, written whole or not at all (``write``); a failed write says why and leaves the previous one."""
    path = Path(path)
    try:
        write({"format": FORMAT, "version": VERSION, **state}, path)
    except Damaged:
        raise
    except GenlabError as e:  # a value no checkpoint can hold (portable)
        raise GenlabError(f"could not write the checkpoint {path}: {e}") from e
    except (OSError, RuntimeError) as e:  # a full disk shows as either, depending on where the write stopped
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "the write stopped short (a full disk, a quota, a file-size limit?)"
        free = shutil.disk_usage(path.parent).free / 2**20
        kept = f"the previous {path.name} is intact" if path.exists() else "nothing was written"
        raise GenlabError(f"could not write the checkpoint {path}: {reason} ({free:.0f} MiB free on that disk); "
                          f"{kept}.") from e


def resolve(path) -> Path:
    """A checkpoint file, or a run directory (its checkpoints/last.pt), or an export folder (its weights)."""
    p = Path(path).expanduser()
    if p.is_dir() and bundle.is_export(p):
        return p / bundle.WEIGHTS  # read through bundle.verify, which names a missing or changed file
    if p.is_dir():
        for candidate in (p / "checkpoints" / "last.pt", p / "last.pt"):
            if candidate.is_file():
                return candidate
        raise GenlabError(f"no checkpoint in {p}: expected {p / 'checkpoints' / 'last.pt'}.")
    if not p.is_file():
        raise GenlabError(f"checkpoint not found: {p} (give a run directory or a .pt file).")
    return p


def copy(source: Path, path: Path) -> None:
    """``path`` as a copy of the file ``source`` (a kept checkpoint's ``last.pt``): its own file, not a link, so
    that changing one never changes the other; put in place atomically, as ``write`` does."""
    with replacing(path) as tmp:
        shutil.copyfile(source, tmp)  # copy_file_range: a reflink where the file system has them


def clean(folder: Path) -> list[Path]:
    """Remove the temporary files (``.NAME.tmpPID``) that writes killed midway left in ``folder``: those of processes
    that are gone, and this one's. Returns what was removed."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp*"):
        pid = tmp.name.rpartition(".tmp")[2]
        if pid.isdigit() and (int(pid) == os.getpid() or not alive(int(pid))):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def kept(run_dir: Path) -> list[Path]:
    """A run's kept copies (``checkpoints/epoch_NNNN.pt``), newest first (by epoch number, not by name)."""
    found = [(int(m.group(1)), p) for p in (Path(run_dir) / "checkpoints").glob("epoch_*.pt")
             if (m := re.fullmatch(r"epoch_(\d+)\.pt", p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def load_intact(run_dir: Path, map_location="cpu") -> tuple[Path, dict]:
    """The newest checkpoint of a run that can be read whole: ``last.pt``, or, when it is damaged (truncated,
    a byte changed), the newest kept copy that is not, with a warning. Raises the damage of ``last.pt`` when
    none is intact."""
    last = Path(run_dir) / "checkpoints" / "last.pt"
    try:
        return last, load(last, map_location)
    except Damaged as damage:
        for path in kept(run_dir):
            try:
                state = load(path, map_location)
            except Damaged:
                continue
            log.warning("%s; resuming from the newest intact kept copy, %s (step %d)", damage, path.name, state["step"])
            return path, state
        raise


def load(path, map_location="cpu") -> dict:
    """Read a genlab checkpoint safely (no code runs, the checksum checked), or raise a GenlabError that says why not.
    An export folder (genlab export) reads as a checkpoint of its weights alone."""
    p = resolve(path)
    if bundle.is_export(p.parent) and p.name == bundle.WEIGHTS:
        return bundle.read_state(p.parent)
    state = read(p, map_location, required=False)  # checkpoints of genlab before version 3 have no checksum
    if state.get("format") != FORMAT:
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
    dataset = config.get("dataset") if isinstance(config, dict) else None
    if isinstance(dataset, dict) and dataset.get("_target_") in ("genlab.data.folder", "genlab.data.datasets.folder"):
        dataset.setdefault("split", "order")  # trained before folders were split by file name: its own split
    return state
