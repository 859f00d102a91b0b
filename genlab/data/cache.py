"""genlab's cache of decoded datasets: a file of raw uint8 images that every later run, and every process of a
run, reads (in memory, or memory-mapped when it is large), with its labels and checksum beside it."""

import contextlib
import hashlib
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch

from genlab import checkpoint, dist
from genlab.errors import first_line

log = logging.getLogger(__name__)

CHUNK = 256  # images a decoding worker takes at a time


def cache_dir() -> Path:
    """Where genlab keeps decoded datasets and its classifiers: GENLAB_CACHE or ~/.cache/genlab."""
    return Path(os.environ.get("GENLAB_CACHE", Path.home() / ".cache" / "genlab")).expanduser()


def available_memory() -> int:
    """Bytes that new allocations can take: Linux's MemAvailable, or less where a cgroup (a container, a SLURM
    job's --mem) limits this process to less."""
    free = 1 << 62
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/meminfo") as fh:
            free = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            free = min(free, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    return free


def memory_budget() -> int:
    """Bytes of memory a dataset may take in one process: an eighth of the memory available, shared by the run's
    processes on this machine (``torchrun --nproc_per_node=16``: a 128th each), so that together they take an
    eighth however many there are."""
    return available_memory() // (8 * dist.local_world())


def fits_in_memory(nbytes: int) -> bool:
    """``dataset.in_memory``'s automatic choice: read a dataset into memory when it fits ``memory_budget``, else
    map it (the processes of a machine then share one copy, in its page cache)."""
    return nbytes <= memory_budget()


def _digest(buffer) -> str:
    return hashlib.sha1(buffer).hexdigest()


class Cache:
    """One decoded dataset in genlab's cache: ``STEM.u8``, the images as raw uint8 bytes [N, C, H, W], and
    ``STEM.pt``, their shape, labels and checksum (genlab.checkpoint's format), written last: the cache is
    complete when the .pt is there. Keyed by the source files (path, size, modification time) and the
    ``settings`` that the decoding depends on. Every process reads the same files: one copy on disk, and one in
    the page cache of a machine for all the processes that map it."""

    def __init__(self, name: str, train: bool, sources, settings: str = ""):
        stamp = settings + "|" + "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sources)
        stem = f"{name}-{'train' if train else 'test'}-{hashlib.sha1(stamp.encode()).hexdigest()[:16]}"
        folder = cache_dir() / "datasets"
        self.images, self.meta = folder / f"{stem}.u8", folder / f"{stem}.pt"
        self.partial, self.progress = folder / f"{stem}.u8.partial", folder / f"{stem}.progress"
        self.held = None  # the lock file's descriptor while this process holds it

    def read(self, in_memory: bool | None = None):
        """(images, labels), or None when there is no complete, intact cache. ``in_memory`` (None:
        ``fits_in_memory``): the images read into memory and their checksum checked; else memory-mapped, read as
        batches need them, and only their size checked (a checksum would read every byte)."""
        if not self.meta.exists():
            return None
        try:
            meta = checkpoint.read(self.meta)  # its own checksum checked: labels changed on disk are never used
            shape = tuple(int(s) for s in meta["shape"])
            n = math.prod(shape)
            if self.images.stat().st_size != n:
                raise checkpoint.Damaged(f"{self.images.name} holds {self.images.stat().st_size:,} bytes, not the "
                                         f"{n:,} of {shape}")
            if fits_in_memory(n) if in_memory is None else in_memory:
                images = torch.empty(n, dtype=torch.uint8)
                with open(self.images, "rb") as fh:
                    view = memoryview(images.numpy())
                    while view:  # one read returns at most 2 GB
                        view = view[fh.readinto(view) or len(view):]
                if _digest(images.numpy()) != meta["digest"]:
                    raise checkpoint.Damaged(f"{self.images.name} no longer matches the checksum genlab wrote with it")
            else:
                images = torch.from_file(str(self.images), shared=False, size=n, dtype=torch.uint8)
            return images.view(shape), meta["labels"]
        except (checkpoint.Damaged, KeyError, OSError, RuntimeError, ValueError) as e:  # rebuilt, never fatal
            log.warning("ignoring the unreadable dataset cache %s (%s); decoding the dataset again", self.meta,
                        first_line(e))
            return None

    def read_or_make(self, in_memory: bool | None, make):
        """What ``read`` finds, else what ``make()`` decodes (and writes here): one process decodes while the
        others (ranks, sweep jobs) wait for the lock, then read its cache."""
        found = self.read(in_memory)
        if found is None:
            with self.lock():
                found = self.read(in_memory) or make()
        return found

    @contextlib.contextmanager
    def lock(self):
        """Held while this process decodes: another one wanting the same dataset waits, then reads the cache
        (an unwritable cache has no lock: each process decodes for itself)."""
        with checkpoint.file_lock(self.meta.with_suffix(".lock")) as fd:
            self.held = fd  # for decoding workers to close: a forked copy would hold the lock on
            try:
                yield
            finally:
                self.held = None

    def write(self, images: torch.Tensor, labels: torch.Tensor) -> bool:
        """Keep ``images`` (contiguous uint8) and ``labels``; False (with a warning) where the cache cannot be
        written."""
        tmp = self.images.with_name(f".{self.images.name}.tmp{os.getpid()}")
        try:
            self.images.parent.mkdir(parents=True, exist_ok=True)
            try:
                with open(tmp, "wb") as fh:
                    fh.write(images.numpy().data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self.images)
            finally:
                tmp.unlink(missing_ok=True)
            self._seal(images.shape, labels, _digest(images.numpy()))
            return True
        except (OSError, RuntimeError) as e:
            log.warning("could not write the dataset cache %s (%s); decoding each time", self.images, e)
            return False

    def _seal(self, shape, labels, digest: str) -> None:
        checkpoint.write({"shape": list(shape), "labels": labels, "digest": digest}, self.meta)
        self.progress.unlink(missing_ok=True)

    def resume(self, nbytes: int):
        """The images file of a decode in progress (a writable memory map of ``nbytes``) and the chunks it already
        holds, {chunk: [[row, why it could not be read], ...]}: those of an interrupted decode of the same files, or
        none in a new file."""
        done = {}
        if self.partial.exists() and self.partial.stat().st_size == nbytes and self.progress.exists():
            for line in self.progress.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    done[int(entry["chunk"])] = entry["bad"]
                except (ValueError, KeyError, TypeError):  # a line cut short by the interrupt: that chunk again
                    continue
        else:
            self.partial.parent.mkdir(parents=True, exist_ok=True)
            try:
                with open(self.partial, "wb") as fh:
                    if hasattr(os, "posix_fallocate"):  # the space taken now: a full disk is an OSError here, not
                        os.posix_fallocate(fh.fileno(), 0, nbytes)  # a SIGBUS at a write into the map later
                    else:
                        fh.truncate(nbytes)
            except OSError:
                self.partial.unlink(missing_ok=True)
                raise
            self.progress.write_text("")
        return np.memmap(self.partial, np.uint8, "r+", shape=(nbytes,)), done

    def record(self, chunk: int, bad: list) -> None:
        """Chunk ``chunk`` is in the partial file (written through the map: in the page cache, so a killed process
        loses none of it)."""
        with open(self.progress, "a") as fh:
            fh.write(json.dumps({"chunk": chunk, "bad": bad}) + "\n")

    def finish(self, images: np.memmap, keep: np.ndarray, labels: torch.Tensor) -> None:
        """The partial file made the cache: the rows of ``keep`` only (those that could be read)."""
        images.flush()
        if keep.all():
            self.partial.replace(self.images)
            digest = _digest(images)
        else:
            h = hashlib.sha1()
            with open(self.images.with_name(self.images.name + ".tmp"), "wb") as fh:
                for lo in range(0, len(keep), CHUNK):
                    rows = np.ascontiguousarray(images[lo:lo + CHUNK][keep[lo:lo + CHUNK]])
                    fh.write(rows.data)
                    h.update(rows)
            Path(fh.name).replace(self.images)
            self.partial.unlink()
            digest = h.hexdigest()
        self._seal((int(keep.sum()), *images.shape[1:]), labels[torch.from_numpy(keep)], digest)
