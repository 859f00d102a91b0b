"""An inspection dataset in MVTec AD's folder layout (``dataset=mvtec``): defect-free images to train on, and test
images of each defect type with a pixel mask of each defect.

    ROOT/[CATEGORY/]train/good/*.png|jpg|...            defect-free training images
    ROOT/[CATEGORY/]test/good/*                         defect-free test images (label 0)
    ROOT/[CATEGORY/]test/<defect type>/*                defective test images (labels 1..K, types in sorted order)
    ROOT/[CATEGORY/]ground_truth/<type>/<stem>_mask.png 0 = normal, > 0 = defect (a defect may have none)

Images of any size and mode are brought to ``image_size`` squares of ``channels`` channels, and their masks to the
same geometry (nearest sampling), decoded once into genlab's cache (genlab.data.cache). ``read_image`` brings one
more file (`genlab predict`) to the same geometry. The dataset's ``_target_`` is ``genlab.data.mvtec.mvtec``: the
module keeps this name (``genlab.data.mvtec``), so the function cannot also be ``genlab.data.mvtec``."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from genlab.data.cache import Cache, fits_in_memory
from genlab.data.datasets import _check_size
from genlab.data.loader import ImageData
from genlab.data.split import by_name
from genlab.errors import GenlabError, first_line
from genlab.images import IMAGE_SUFFIXES

FITS = ("resize", "crop")
LAYOUT = ("train/good/ (defect-free training images), test/good/ and test/<defect type>/ (test images), "
          "ground_truth/<defect type>/<image stem>_mask.png (masks)")


def mvtec(root: str, category: str | None = None, train: bool = True, validation: bool = False,
          image_size: int = 128, channels: int = 1, fit: str = "resize", val_fraction: float = 0.1,
          val_defects: float = 0.0, classes: list[int] | None = None, in_memory: bool | None = None) -> ImageData:
    """One split of an MVTec AD folder. ``train``: train/good less the validation images; ``validation`` (whatever
    ``train`` says): the images of train/good whose names' position (genlab.data.split) is below ``val_fraction``,
    at least one on each side of two or more, and with ``val_defects`` that share of test/ (good and defective,
    chosen by name), labelled validation images for ``threshold=f1_max``; neither: the rest of test/, with the masks
    of ground_truth/. ``fit``:
    ``resize`` squashes each image to the square, ``crop`` scales its shorter side to it and keeps the centre.
    ``classes``: keep only these labels (0 = good, 1..K the defect types)."""
    base = category_root(root, category)
    mode = _mode(channels, fit)
    if not 0 <= val_fraction < 1:
        raise GenlabError(f"dataset.val_fraction is the share of train/good held out for validation, in [0, 1); "
                          f"got {val_fraction}.")
    if not 0 <= val_defects < 1:
        raise GenlabError(f"dataset.val_defects is the share of test/ moved to the validation split, in [0, 1); "
                          f"got {val_defects}.")
    _check_size(image_size)
    if validation and not val_defects:
        items, class_names = _good_items(base, val_fraction, True), ["good"]
    elif train and not validation:
        items, class_names = _good_items(base, val_fraction, False), ["good"]
    else:
        test, class_names = _test_items(base)
        names = [p.relative_to(base).as_posix() for p, _, _ in test]
        held = by_name(names, val_defects) if val_defects else [False] * len(test)
        items = [it for it, h in zip(test, held) if h == validation]
        if validation:
            items = _good_items(base, val_fraction, True) + items
        elif not items:
            raise GenlabError(f"dataset.val_defects={val_defects} leaves no test image.")
    labels = torch.tensor([label for _, label, _ in items], dtype=torch.long)
    with_masks = validation or not train
    images = _decoded(base, items, labels, image_size, mode, fit, with_masks, in_memory)
    if with_masks:
        images, masks = images[:, :channels].contiguous(), images[:, channels:].contiguous()
    else:  # defect-free: no mask to read (a view of one zero: no memory)
        masks = torch.zeros((), dtype=torch.uint8).expand(len(items), 1, image_size, image_size)
    known = torch.tensor([mask is not None or label == 0 for _, label, mask in items], dtype=torch.bool)
    data = ImageData(images, labels, "mvtec", masks=masks, mask_known=known, class_names=class_names,
                     paths=[path.relative_to(base).as_posix() for path, _, _ in items])
    return _keep(data, classes, "validation" if validation else "training" if train else "test")


def read_image(path, size: int, channels: int = 1, fit: str = "resize") -> torch.Tensor:
    """One image file as the dataset's images are: uint8 [channels, size, size]; GenlabError naming the file when it
    cannot be read."""
    _check_size(size)
    mode = _mode(channels, fit)
    image = _fitted(_open(Path(path), str(path)).convert(mode), size, fit, Image.Resampling.BICUBIC)
    return torch.from_numpy(image.reshape(size, size, len(mode)).transpose(2, 0, 1).copy())


def _mode(channels: int, fit: str) -> str:
    """PIL's mode for ``channels``, with ``fit`` checked too."""
    if fit not in FITS:
        raise GenlabError(f"dataset.fit must be {' or '.join(FITS)}; got {fit!r}.")
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise GenlabError(f"dataset=mvtec reads 1 (grey) or 3 (RGB) channels; got dataset.channels={channels}.")
    return mode


def category_root(root: str, category: str | None) -> Path:
    """The folder holding train/, test/ and ground_truth/: ``root`` itself, or its sub-folder ``category`` (which
    may be left out where ``root`` holds only one)."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise GenlabError(f"dataset=mvtec: {base} is not a directory. Set dataset.root to a folder in the MVTec AD "
                          f"layout: {LAYOUT}.")
    found = sorted(d.name for d in base.iterdir() if (d / "train" / "good").is_dir())
    if category is not None:
        if (base / category / "train" / "good").is_dir():
            return base / category
        raise GenlabError(f"dataset.category={category}: there is no {base / category / 'train' / 'good'}/; the "
                          f"categories under {base} are: {', '.join(found) or 'none'}.")
    if (base / "train" / "good").is_dir():
        return base
    if len(found) == 1:
        return base / found[0]
    if found:
        raise GenlabError(f"dataset=mvtec: {base} holds {len(found)} categories ({', '.join(found)}); choose one with "
                          "dataset.category=NAME.")
    raise GenlabError(f"dataset=mvtec: there is no {base / 'train' / 'good'}/ (nor CATEGORY/train/good/ under {base}); "
                      f"expected the MVTec AD layout: {LAYOUT}.")


def _files(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _good_items(base: Path, val_fraction: float, validation: bool) -> list[tuple]:
    """(path, label 0, no mask) for the training or the validation images of train/good."""
    paths = _files(base / "train" / "good")
    if not paths:
        raise GenlabError(f"dataset=mvtec: {base / 'train' / 'good'}/ holds no images "
                          f"({', '.join(sorted(IMAGE_SUFFIXES))}).")
    held = by_name([p.relative_to(base).as_posix() for p in paths], val_fraction)
    chosen = [p for p, h in zip(paths, held) if h == validation]
    if not chosen:  # by_name leaves one on each side of two or more
        why = "its only image trains" if len(paths) == 1 else f"dataset.val_fraction={val_fraction} holds none out"
        raise GenlabError(f"dataset=mvtec: {base / 'train' / 'good'}/ has no validation image: {why}.")
    return [(p, 0, None) for p in chosen]


def _test_items(base: Path) -> tuple[list[tuple], list[str]]:
    """(path, label, its mask or None) for every image of test/, and the names of the labels."""
    test = base / "test"
    if not test.is_dir():
        raise GenlabError(f"dataset=mvtec: there is no {test}/; expected the MVTec AD layout: {LAYOUT}.")
    stray = _files(test)
    if stray:
        raise GenlabError(f"dataset=mvtec: {stray[0]} is directly in test/; a test image goes in test/good/ or "
                          "test/<defect type>/.")
    kinds = sorted(d.name for d in test.iterdir() if d.is_dir() and _files(d))
    if not kinds:
        raise GenlabError(f"dataset=mvtec: {test}/ holds no images; expected test/good/ and test/<defect type>/ "
                          f"folders of them ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    class_names = ["good", *(k for k in kinds if k != "good")]
    masks = {(p.parent.name, p.stem): p for d in _folders(base / "ground_truth") for p in _files(d)}
    items = [(p, label, masks.pop((kind, f"{p.stem}_mask"), None))
             for label, kind in enumerate(class_names) for p in _files(test / kind)]
    if masks:
        orphan = min(masks.values())
        raise GenlabError(f"dataset=mvtec: the mask {orphan.relative_to(base)} has no test image: expected "
                          f"test/{orphan.parent.name}/{orphan.stem.removesuffix('_mask')}.png (or .jpg, ...) beside it "
                          "(a mask is named <image stem>_mask.png). Remove the mask or add its image.")
    return items, class_names


def _folders(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir()) if folder.is_dir() else []


def _decoded(base, items, labels, size, mode, fit, with_masks, in_memory) -> torch.Tensor:
    """The images of ``items`` [N, C, size, size] (with their masks as one more channel when ``with_masks``),
    decoded once into genlab's cache."""
    sources = [p for p, _, _ in items] + ([m for _, _, m in items if m is not None] if with_masks else [])
    cache = Cache("mvtec", not with_masks, sources, f"{size}:{mode}:{fit}:{'masks' if with_masks else ''}")

    def make():
        images = torch.from_numpy(_decode(base, items, size, mode, fit, with_masks))
        if not cache.write(images, labels) or (fits_in_memory(images.numel()) if in_memory is None else in_memory):
            return images, labels  # already in memory: not read back from the file just written
        return cache.read(False) or (images, labels)

    return cache.read_or_make(in_memory, make)[0]


def _decode(base, items, size, mode, fit, with_masks) -> np.ndarray:
    """uint8 [N, C (+1 for the masks), size, size]: each image, and its mask (zeros where it has none)."""
    c = len(mode)
    out = np.zeros((len(items), c + with_masks, size, size), dtype=np.uint8)
    for i, (path, _, mask) in enumerate(items):
        image = _open(path, path.relative_to(base).as_posix())
        pixels = _fitted(image.convert(mode), size, fit, Image.Resampling.BICUBIC)
        out[i, :c] = pixels.reshape(size, size, c).transpose(2, 0, 1)
        if with_masks and mask is not None:
            out[i, c] = _fitted(_binary(mask, image, path, base), size, fit, Image.Resampling.NEAREST)
    return out


def _open(path: Path, name: str) -> Image.Image:
    """The image file ``path``, read; GenlabError naming it as ``name`` when it cannot be."""
    try:
        with Image.open(path) as im:
            im.load()
            return im
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise GenlabError(f"dataset=mvtec: cannot read the image {name} ({first_line(e)}).") from e


def _binary(mask_path: Path, image: Image.Image, path: Path, base: Path) -> Image.Image:
    """The mask of ``image`` (the file ``path``) as a 0/1 image ("L"), checked against its image's size."""
    mask = _open(mask_path, mask_path.relative_to(base).as_posix())
    if mask.size != image.size:
        (mw, mh), (w, h) = mask.size, image.size
        raise GenlabError(f"dataset=mvtec: the mask {mask_path.relative_to(base)} is {mw}x{mh} pixels but its image "
                          f"{path.relative_to(base)} is {w}x{h}; a mask must have its image's size.")
    values = np.asarray(mask if mask.mode in ("1", "L", "I", "I;16", "F") else mask.convert("L"))
    return Image.fromarray((values > 0).astype(np.uint8))


def _fitted(im: Image.Image, size: int, fit: str, resample) -> np.ndarray:
    """``im`` as a ``size`` square: squashed (``resize``) or its centre square (``crop``), antialiased for
    bicubic sampling; the same geometry for an image and its mask."""
    w, h = im.size
    s = min(w, h)
    box = (0, 0, w, h) if fit == "resize" else ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
    return np.asarray(im.resize((size, size), resample, box=box))


def _keep(data: ImageData, classes, split: str) -> ImageData:
    """Only the images of ``classes`` (all when None)."""
    if classes is None:
        return data
    keep = torch.isin(data.labels, torch.as_tensor(list(classes), dtype=torch.long))
    if not keep.any():
        raise GenlabError(f"dataset.classes={list(classes)} selects no {split} image of mvtec; its labels are "
                          f"{sorted(data.labels.unique().tolist())} ({', '.join(data.class_names)}).")
    rows = keep.nonzero().squeeze(1).tolist()
    return ImageData(data.images[keep], data.labels[keep], data.name, masks=data.masks[keep],
                     mask_known=data.mask_known[keep], class_names=data.class_names,
                     paths=[data.paths[i] for i in rows])
