"""The datasets genlab reads, each named by a ``dataset/*.yaml`` config (its ``_target_``): scikit-learn's digits,
MNIST, Fashion-MNIST, CIFAR-10, a folder of images, and synthetic blobs for tests. Each takes ``train`` (which
split) and its config's plain arguments, and returns uint8 images [N, C, H, W] with int64 labels [N]."""

import importlib.util
import logging
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from genlab.data.cache import Cache, fits_in_memory
from genlab.data.decode import decode_folder
from genlab.data.loader import ImageData
from genlab.data.split import divide
from genlab.errors import GenlabError, first_line
from genlab.images import IMAGE_SUFFIXES

log = logging.getLogger(__name__)


def digits(train: bool = True, image_size: int = 28, channels: int = 1, classes: list[int] | None = None) -> ImageData:
    """scikit-learn's bundled 8x8 digits (1,797 images, values 0..16): 80% train, 20% test."""
    pixels, target = bundled_digits()
    images = torch.from_numpy(pixels).float().div(16).view(-1, 1, 8, 8)  # [1797, 1, 8, 8] in [0, 1]
    labels = torch.from_numpy(target).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_train = int(0.8 * len(labels))
    keep = order[:n_train] if train else order[n_train:]
    images = _resize_float(images[keep], image_size)
    images = images.mul(255).round_().clamp_(0, 255).to(torch.uint8)
    return _finish(images, labels[keep], "digits", train, image_size, channels, classes)


def bundled_digits():
    """The digits' pixels [1797, 64] and labels [1797] (numpy), read from the file scikit-learn ships
    (``load_digits`` reads the same file, but importing scikit-learn costs each command more than a second)."""
    package = importlib.util.find_spec("sklearn")
    if package is not None and package.submodule_search_locations:
        found = Path(next(iter(package.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
        if found.is_file():
            table = np.loadtxt(found, delimiter=",")
            return table[:, :-1], table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits  # a scikit-learn that keeps it elsewhere

    bunch = load_digits()
    return bunch.data, bunch.target


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
           test_fraction: float = 0.1, in_memory: bool | None = None, workers: int | None = None,
           split: str | dict = "name") -> ImageData:
    """Images under ``root``; the first level of sub-folders, if any, names the classes. Decoded once into
    genlab's cache by ``workers`` processes (None: one per CPU, at most 8), resuming where an interrupted decode
    stopped. About ``test_fraction`` of them are test images, chosen by ``split`` (genlab.data.split): ``name``,
    by each file's name, so that files added later never move one between training and test; ``order``, genlab
    0.1's shuffle of the file list, for runs trained with it; or the record of a split a run's checkpoint keeps
    (its rule, and a warning when the folder's split changed since). The split's record is ``ImageData.split``."""
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
    test, record = divide([p.relative_to(base).as_posix() for p in paths], test_fraction, split, base)
    chosen = [p for p, t in zip(paths, test) if t != train]
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise GenlabError(f"dataset=folder reads 1 (grey) or 3 (RGB) channels; got dataset.channels={channels}.")
    _check_size(image_size)
    labels = torch.tensor([class_names.index(p.relative_to(base).parts[0]) if class_names else 0 for p in chosen])
    cache = Cache("folder", train, chosen, f"{image_size}:{channels}:{test_fraction}")
    found = cache.read_or_make(in_memory, lambda: decode_folder(cache, chosen, labels, image_size, mode, workers,
                                                                 in_memory, base))
    return _select(*found, "folder", train, classes, split=record)


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


def _select(images, labels, name, train, classes, split=None) -> ImageData:
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
    return ImageData(images, labels, name, split)


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
