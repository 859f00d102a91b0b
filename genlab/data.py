"""Datasets as tensors: each is decoded once into uint8 images [N, C, H, W] and int64 labels [N].

Every loader here is named by a ``dataset/*.yaml`` config (its ``_target_``) and takes
``train`` (which split) plus the config's plain arguments. Normalisation to floats happens
later, on the training device, a whole batch at a time.

The datasets read from files are decoded once into genlab's cache (``Cache``): a file of raw
uint8 images that every later run, and every process of a run, reads. A dataset that fits
comfortably in memory is read into it; a larger one is memory-mapped and read by index a batch
at a time, so that a process's own memory stays flat however large the dataset (``in_memory``).
"""

import contextlib
import hashlib
import json
import logging
import math
import multiprocessing
import os
import pickle
import signal
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from genlab import checkpoint
from genlab.errors import GenlabError, first_line

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class ImageData:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]
    name: str

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])


class Batch(NamedTuple):
    """What a model's ``training_step`` gets: images and their labels (unconditional models ignore them)."""

    x: torch.Tensor  # float images [B, C, H, W] in [0, 1], on the training device
    y: torch.Tensor  # int64 class labels [B], on the same device


class Loader:
    """Batches drawn by index from a uint8 dataset kept on the training device (or, on a GPU it does not fit
    easily, in host memory or memory-mapped, each batch gathered into pinned memory), normalised there a whole
    batch at a time. The order of epoch ``e`` is a
    function of (seed, e) alone, so a run resumed mid-epoch replays it. Incomplete last batches are dropped.

    ``batch_size`` is the batch of one optimisation step over all ``world`` processes: rank ``r`` takes the
    r-th of ``world`` equal slices of each batch, so that the ranks together see what one process would."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, device="cpu", seed: int = 0,
                 rank: int = 0, world: int = 1):
        self.device = torch.device(device)
        self.n = images.shape[0]
        if self.n == 0:
            raise GenlabError("the training split has no images.")
        if batch_size % world:
            raise GenlabError(f"trainer.batch_size={batch_size} is the batch of each step over all {world} processes, "
                              f"so it must be a multiple of {world}; e.g. trainer.batch_size={batch_size // world * world or world}.")
        if batch_size > self.n:
            log.warning("trainer.batch_size=%d is more than the %d training images; using %d", batch_size, self.n,
                        self.n // world * world)
        self.batch_size = min(batch_size, self.n // world * world)
        if self.batch_size == 0:
            raise GenlabError(f"the training split has {self.n} images, fewer than the {world} processes.")
        self.steps_per_epoch = self.n // self.batch_size
        self.seed, self.rank, self.local = seed, rank, self.batch_size // world
        self.images = self._place(images)
        self.labels = labels.to(self.images.device)  # where the images are: both are indexed by one order

    def _place(self, images: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return images.to(self.device) if images.numel() < free // 4 else images
        return images.to(self.device)

    def order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g).to(self.images.device)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """This rank's share of the batches of ``epoch``, from its ``start``-th on."""
        order = self.order(epoch)
        for i in range(start, self.steps_per_epoch):
            lo = i * self.batch_size + self.rank * self.local
            idx = order[lo:lo + self.local]
            yield Batch(self._gather(self.images, idx).float().div_(255), self._gather(self.labels, idx))

    def _gather(self, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` of ``t`` on the training device. From pinned host memory (a dataset the GPU cannot hold)
        the rows are gathered into a pinned buffer, so that the copy to the GPU runs beside the computation
        (``index_select`` alone would return pageable memory, and the copy would wait)."""
        if t.device == self.device:
            return t.index_select(0, idx)
        rows = torch.empty((len(idx), *t.shape[1:]), dtype=t.dtype, pin_memory=True)
        return torch.index_select(t, 0, idx, out=rows).to(self.device, non_blocking=True)


# --- the datasets ---------------------------------------------------------------------------


def digits(train: bool = True, image_size: int = 28, channels: int = 1, classes: list[int] | None = None) -> ImageData:
    """scikit-learn's bundled 8x8 digits (1,797 images, values 0..16): 80% train, 20% test."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float().div(16).unsqueeze(1)  # [1797, 1, 8, 8] in [0, 1]
    labels = torch.from_numpy(bunch.target).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_train = int(0.8 * len(labels))
    keep = order[:n_train] if train else order[n_train:]
    images = _resize_float(images[keep], image_size)
    images = images.mul(255).round_().clamp_(0, 255).to(torch.uint8)
    return _finish(images, labels[keep], "digits", train, image_size, channels, classes)


def mnist(root: str = "data", train: bool = True, download: bool = True, image_size: int = 28, channels: int = 1,
          classes: list[int] | None = None, in_memory: bool | None = None) -> ImageData:
    return _torchvision("MNIST", "mnist", root, train, download, image_size, channels, classes, in_memory)


def fashion_mnist(root: str = "data", train: bool = True, download: bool = True, image_size: int = 28,
                  channels: int = 1, classes: list[int] | None = None, in_memory: bool | None = None) -> ImageData:
    return _torchvision("FashionMNIST", "fashion_mnist", root, train, download, image_size, channels, classes,
                        in_memory)


def cifar10(root: str = "data", train: bool = True, download: bool = True, image_size: int = 32, channels: int = 3,
            classes: list[int] | None = None, in_memory: bool | None = None) -> ImageData:
    """CIFAR-10 from its python batches in ``root/cifar-10-batches-py`` (torchvision's layout)."""
    folder = Path(root).expanduser() / "cifar-10-batches-py"
    files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    if download and not all((folder / f).exists() for f in files):
        _download("cifar10", folder, files, "cifar-10-batches-py",
                  lambda: _tv_class("CIFAR10")(root, train=train, download=True))
    missing = [f for f in files if not (folder / f).exists()]
    if missing:
        raise _missing_error("cifar10", folder, files, "cifar-10-batches-py", "the files are not there")

    def decode():
        images, labels = [], []
        for f in files:
            with open(folder / f, "rb") as fh:
                batch = pickle.load(fh, encoding="latin1")  # the dataset's own format
            images.append(torch.as_tensor(batch["data"], dtype=torch.uint8).view(-1, 3, 32, 32))
            labels.append(torch.as_tensor(batch["labels"], dtype=torch.long))
        return torch.cat(images), torch.cat(labels)

    images, labels = _cached("cifar10", train, [folder / f for f in files], decode, image_size, channels, in_memory)
    return _select(images, labels, "cifar10", train, classes)


def folder(root: str, train: bool = True, image_size: int = 64, channels: int = 3, classes: list[int] | None = None,
           test_fraction: float = 0.1, in_memory: bool | None = None, workers: int | None = None) -> ImageData:
    """Images under ``root``; the first level of sub-folders, if any, names the classes. Decoded once into
    genlab's cache by ``workers`` processes (None: one per CPU, at most 8), resuming where an interrupted decode
    stopped."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise GenlabError(f"dataset=folder: {base} is not a directory. Set dataset.root to a folder of images.")
    paths = sorted(p for p in base.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise GenlabError(
            f"dataset=folder: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {base}. "
            "Set dataset.root to a folder that holds them (sub-folders are read as classes)."
        )
    class_names = sorted({p.relative_to(base).parts[0] for p in paths if len(p.relative_to(base).parts) > 1})
    top = [p for p in paths if len(p.relative_to(base).parts) == 1]
    if class_names and top:
        raise GenlabError(
            f"dataset=folder: {base} has {len(top)} image(s) at its top level (e.g. {top[0].name}) beside the class "
            f"sub-folders {', '.join(class_names[:5])}{' ...' if len(class_names) > 5 else ''}, so they have no class. "
            "Move them into a sub-folder of their own, or point dataset.root at a folder that holds only images or "
            "only class sub-folders."
        )
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(0)).tolist()
    n_test = int(round(test_fraction * len(paths))) if len(paths) > 1 else 0
    chosen = [paths[i] for i in sorted(order[n_test:] if train else order[:n_test])]
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise GenlabError(f"dataset=folder reads 1 (grey) or 3 (RGB) channels; got dataset.channels={channels}.")
    _check_size(image_size)
    labels = torch.tensor([class_names.index(p.relative_to(base).parts[0]) if class_names else 0 for p in chosen])
    cache = Cache("folder", train, chosen, f"{image_size}:{channels}:{test_fraction}")
    found = cache.read_or_make(in_memory, lambda: _decode_folder(cache, chosen, labels, image_size, mode, workers,
                                                                 in_memory, base))
    return _select(*found, "folder", train, classes)


def synthetic(train: bool = True, n: int = 512, image_size: int = 28, channels: int = 1, n_classes: int = 10,
              classes: list[int] | None = None, seed: int = 0) -> ImageData:
    """Blobs: class k is a bright Gaussian spot at the k-th of n_classes places on a circle."""
    g = torch.Generator().manual_seed(seed + (0 if train else 1))
    labels = torch.randint(0, n_classes, (n,), generator=g)
    angle = 2 * torch.pi * labels.float() / n_classes
    centre = 0.5 + 0.3 * torch.stack([angle.cos(), angle.sin()], dim=1)  # [n, 2] in (0, 1)
    centre = centre + 0.03 * torch.randn(n, 2, generator=g)
    grid = (torch.arange(image_size).float() + 0.5) / image_size
    dy = grid.view(1, -1, 1) - centre[:, 0].view(-1, 1, 1)
    dx = grid.view(1, 1, -1) - centre[:, 1].view(-1, 1, 1)
    blob = torch.exp(-(dx**2 + dy**2) / (2 * 0.08**2))  # [n, H, W]
    images = blob.unsqueeze(1).expand(-1, channels, -1, -1)
    images = images.mul(255).round().clamp(0, 255).to(torch.uint8).contiguous()
    return _finish(images, labels, "synthetic", train, image_size, channels, classes)


# --- shared steps ---------------------------------------------------------------------------


def _finish(images, labels, name, train, image_size, channels, classes) -> ImageData:
    """Resize, convert channels and keep only ``classes``: the same for every dataset made in memory."""
    return _select(_to_channels(_resize_uint8(images, image_size), channels, name), labels, name, train, classes)


def _select(images, labels, name, train, classes) -> ImageData:
    """Only the images of ``classes`` (all when None). Of a memory-mapped dataset, those are read into memory."""
    if classes is not None:
        wanted = torch.as_tensor(list(classes), dtype=torch.long)
        keep = torch.isin(labels, wanted)
        if not keep.any():
            present = sorted(labels.unique().tolist())
            raise GenlabError(
                f"dataset.classes={list(classes)} selects no {'training' if train else 'test'} image "
                f"of {name}; its labels are {present}."
            )
        images, labels = images[keep], labels[keep]
    return ImageData(images, labels, name)


def _resize_float(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _check_size(size: int) -> None:
    if size < 1:
        raise GenlabError(f"dataset.image_size must be a positive number of pixels; got {size}.")


def _resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    _check_size(size)
    if images.shape[-2:] == (size, size):
        return images
    out = [_resize_float(chunk.float(), size).round_().clamp_(0, 255).to(torch.uint8) for chunk in images.split(4096)]
    return torch.cat(out)


def _to_channels(images: torch.Tensor, channels: int, name: str) -> torch.Tensor:
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if have == 3 and channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images.float() * weights).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
    raise GenlabError(f"{name} has {have} channel(s); dataset.channels={channels} cannot be made from them (use 1 or 3).")


def _square_resize(im, size: int):
    from PIL import Image

    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return im.resize((size, size), Image.Resampling.BICUBIC)


def _tv_class(name: str):
    import torchvision.datasets

    return getattr(torchvision.datasets, name)


def _torchvision(cls_name, name, root, train, download, image_size, channels, classes, in_memory) -> ImageData:
    """MNIST-style torchvision sets: idx files in ``root/<cls_name>/raw``."""
    cls = _tv_class(cls_name)
    folder = Path(root).expanduser() / cls_name / "raw"
    prefix = "train" if train else "t10k"
    files = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    if download and not all((folder / f).exists() for f in files):
        _download(name, folder, files, f"{cls_name}/raw", lambda: cls(root, train=train, download=True))
    if not all((folder / f).exists() for f in files):
        raise _missing_error(name, folder, files, f"{cls_name}/raw", "the files are not there")

    def decode():
        from torchvision.datasets.mnist import read_image_file, read_label_file

        return read_image_file(str(folder / files[0])).unsqueeze(1).contiguous(), read_label_file(str(folder / files[1])).long()

    images, labels = _cached(name, train, [folder / f for f in files], decode, image_size, channels, in_memory)
    return _select(images, labels, name, train, classes)


def _download(name, folder, files, layout, fetch) -> None:
    log.info("%s: not found in %s; downloading it there", name, folder)
    try:
        fetch()
    except Exception as e:  # torchvision raises RuntimeError, URLError, OSError, ... when offline
        first = first_line(e)
        raise _missing_error(name, folder, files, layout, f"download failed: {first.rstrip(':')}") from e


def _missing_error(name, folder, files, layout, reason) -> GenlabError:
    return GenlabError(
        f"Dataset '{name}' was not found and could not be loaded ({reason}). "
        f"genlab looked in {folder.resolve()} for the files {', '.join(files)} "
        f"(torchvision's layout: <root>/{layout}/). If the data is on disk elsewhere, point genlab "
        f"at the folder that holds {layout.split('/')[0]}/ with dataset.root=PATH on the command line "
        f"or the GENLAB_DATA environment variable. With network access, dataset.download=true "
        f"fetches it into dataset.root. The offline default, dataset=digits, needs no files."
    )


def cache_dir() -> Path:
    """Where genlab keeps decoded datasets and its classifiers: GENLAB_CACHE or ~/.cache/genlab."""
    return Path(os.environ.get("GENLAB_CACHE", Path.home() / ".cache" / "genlab")).expanduser()


def _cached(name, train, sources, decode, image_size, channels, in_memory):
    """The images (resized, in ``channels``) and labels that ``decode`` makes of ``sources``, decoded once into
    genlab's cache."""
    _check_size(image_size)
    cache = Cache(name, train, sources, f"{image_size}:{channels}")

    def make():
        images, labels = decode()
        images = _to_channels(_resize_uint8(images, image_size), channels, name).contiguous()
        if not cache.write(images, labels) or (fits_in_memory(images.numel()) if in_memory is None else in_memory):
            return images, labels  # already in memory: not read back from the file just written
        return cache.read(False) or (images, labels)

    return cache.read_or_make(in_memory, make)


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


def fits_in_memory(nbytes: int) -> bool:
    """``dataset.in_memory``'s automatic choice: read a dataset into memory when it takes at most an eighth of the
    memory available (room for each of several processes of a run on one machine to hold its copy), else map it."""
    return nbytes <= available_memory() // 8


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


CHUNK = 256  # images a decoding worker takes at a time


def _decode_folder(cache: Cache, paths: list[Path], labels: torch.Tensor, size: int, mode: str, workers, in_memory,
                   base: Path):
    """(images, labels) of the image files ``paths``, decoded by ``workers`` processes into ``cache`` (or into
    memory where the cache cannot be written), a chunk at a time; an interrupted decode resumes after the last
    chunk it finished. Files that cannot be read are left out, with a warning."""
    n, shape = len(paths), (len(paths), len(mode), size, size)
    try:
        flat, done = cache.resume(math.prod(shape))
    except OSError as e:
        log.warning("could not write the dataset cache %s (%s); decoding into memory", cache.partial, e)
        flat, done, cache = np.empty(math.prod(shape), np.uint8), {}, None
    images = flat.reshape(shape)
    todo = [c for c in range(math.ceil(n / CHUNK)) if c not in done]
    left = sum(len(paths[c * CHUNK:(c + 1) * CHUNK]) for c in todo)
    if done:
        log.info("dataset=folder: resuming an interrupted decode of %s: %d of %d images were decoded", base,
                 n - left, n)
    from tqdm import tqdm

    with tqdm(total=n, initial=n - left, unit="img", desc="decoding images", disable=None, leave=False) as bar:
        held = cache.held if cache is not None else None
        for c, rows, bad in _decode_chunks(paths, todo, size, mode, workers, held):
            images[c * CHUNK:c * CHUNK + len(rows)] = rows
            done[c] = [[c * CHUNK + i, why] for i, why in bad]
            if cache is not None:
                cache.record(c, done[c])
            bar.update(len(rows))
    bad = [b for c in sorted(done) for b in done[c]]
    if bad:
        log.warning("dataset=folder: skipped %d unreadable file(s) of %d, e.g. %s", len(bad), n, bad[0][1])
    if len(bad) == n:
        raise GenlabError(f"dataset=folder: none of the {n} image files under {base} could be read.")
    keep = np.ones(n, dtype=bool)
    keep[[row for row, _ in bad]] = False
    if cache is None:
        return torch.from_numpy(images[keep]), labels[torch.from_numpy(keep)]
    try:
        cache.finish(images, keep, labels)
    except OSError as e:  # a full disk, a quota: train from memory, with the decoded images kept for a rerun
        log.warning("could not write the dataset cache %s (%s); keeping the images in memory", cache.images, e)
        return torch.from_numpy(np.array(images[keep])), labels[torch.from_numpy(keep)]
    del images, flat
    found = cache.read(in_memory)
    if found is None:
        raise GenlabError(f"dataset=folder: the decoded images in {cache.images} could not be read back.")
    return found


def _decode_chunks(paths, chunks, size, mode, workers, held=None):
    """(chunk, its images [k, C, size, size], its unreadable rows) for each of ``chunks``, in the order they are
    done: in this process, or in ``workers`` processes (None: one a CPU, at most 8). ``held``: a descriptor the
    workers close (the cache's lock)."""
    jobs = [(c, paths[c * CHUNK:(c + 1) * CHUNK]) for c in chunks]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # macOS: no affinity
    workers = min(cpus, 8) if workers is None else workers
    if workers <= 1 or len(jobs) < 2:
        for c, chunk in jobs:
            yield (c, *_decode_chunk(chunk, size, mode))
        return
    # fork on Linux: a worker needs none of this process's imports (macOS's fork is unsafe with its system libraries)
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_start, initargs=(held,))
    try:
        futures = {pool.submit(_decode_chunk, chunk, size, mode): c for c, chunk in jobs}
        for f in as_completed(futures):
            yield (futures.pop(f), *f.result())  # popped: a finished chunk is not kept in memory
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _worker_start(held) -> None:
    """In each decoding worker: Ctrl-C stops the main process, which stops the workers; the workers die with it
    (Linux); and a forked copy of the lock's descriptor is closed, or a worker outliving a killed main process
    would keep every other process waiting on the lock."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if held is not None and sys.platform.startswith("linux"):  # only a forked worker has the descriptor
        os.close(held)
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _decode_chunk(paths, size: int, mode: str):
    """The images of ``paths`` as uint8 [k, C, size, size] (zeros where unreadable) and the unreadable ones,
    [(row, why)]."""
    from PIL import Image, UnidentifiedImageError

    out = np.zeros((len(paths), len(mode), size, size), dtype=np.uint8)
    bad = []
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                im = _square_resize(im.convert(mode), size)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            bad.append((i, f"{p} ({first_line(e)})"))
            continue
        out[i] = np.asarray(im, dtype=np.uint8).reshape(size, size, len(mode)).transpose(2, 0, 1)
    return out, bad
