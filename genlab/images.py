"""Images as tensors and files: uint8 pixels to floats and back, a grid as one PNG, a folder of PNGs, a folder
read back."""

import logging
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from genlab.errors import GenlabError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def as_float(images: torch.Tensor, device=None) -> torch.Tensor:
    """uint8 images as floats in [0, 1] (float images as they are), on ``device`` when given: the one place where
    stored pixels become what models take."""
    if device is not None:
        images = images.to(device)
    return images.float().div_(255) if images.dtype == torch.uint8 else images.float()


def grid_of(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> torch.Tensor:
    """Images [N, C, H, W] with values in [0, 1] as one image [C, H', W'] on the CPU: ``nrow`` images a row
    (default: a square), white gaps of ``padding`` pixels between them."""
    images = images.detach().float().cpu().clamp(0, 1)
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    p = padding
    grid = torch.ones(c, rows * (h + p) + p, nrow * (w + p) + p)
    for i, image in enumerate(images):
        r, col = divmod(i, nrow)
        grid[:, p + r * (h + p):p + r * (h + p) + h, p + col * (w + p):p + col * (w + p) + w] = image
    return grid


def save_image(image: torch.Tensor, path) -> None:
    """One image [C, H, W] in [0, 1] as a PNG."""
    pixels = to_uint8(image).permute(1, 2, 0).numpy()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")  # whole or not at all: a kill mid-write leaves no half PNG
    Image.fromarray(pixels[..., 0] if image.shape[0] == 1 else pixels).save(tmp, format="PNG")
    tmp.replace(path)


def save_grid(images: torch.Tensor, path, nrow: int | None = None, padding: int = 2) -> None:
    """Images [N, C, H, W] with values in [0, 1] as one PNG (``grid_of``)."""
    save_image(grid_of(images, nrow, padding), path)


def write_pngs(images: torch.Tensor, folder, labels: torch.Tensor | None = None) -> None:
    """Images [N, C, H, W] in [0, 1] as ``folder/000000.png``, ... (grey or RGB, 8 bits), and ``samples.npz``
    beside them: ``images`` uint8 [N, H, W, C] and, when given, ``labels`` [N]. torch-fidelity, clean-fid and
    pytorch-fid read such a folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("[0-9][0-9][0-9][0-9][0-9][0-9].png"):  # a folder written before: leave no stale samples
        old.unlink()
    pixels = to_uint8(images).permute(0, 2, 3, 1).numpy()
    for i, image in enumerate(pixels):
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(folder / f"{i:06d}.png")
    arrays = {"images": pixels} if labels is None else {"images": pixels, "labels": labels.cpu().numpy()}
    np.savez_compressed(folder.parent / "samples.npz", **arrays)


def read_images(folder, channels: int, size: int) -> torch.Tensor:
    """The images of a folder (png, jpg, ...) as uint8 [N, C, H, W]: grey for 1 channel, RGB for 3 (others are
    converted, with a warning); every image must be ``size`` x ``size``. A `genlab sample format=png` run
    directory stands for its ``samples/`` folder."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise GenlabError(f"samples={folder} is not a folder of images.")
    if (folder / "samples").is_dir() and (folder / "samples.npz").is_file():
        folder = folder / "samples"
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise GenlabError(f"samples={folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    images, warned = [], False
    for p in paths:
        with Image.open(p) as im:
            if im.size != (size, size):
                raise GenlabError(f"{p} is {im.size[0]}x{im.size[1]}, but the dataset's images are {size}x{size} "
                                  "(set dataset.image_size, or resize the samples).")
            mode = "L" if channels == 1 else "RGB"
            if im.mode != mode and not warned:
                warned = True
                log.warning("%s is %s, the dataset's images are %s: converting it and any other such image", p, im.mode, mode)
            im = im.convert(mode)
            images.append(torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, channels))
    return torch.stack(images).permute(0, 3, 1, 2).contiguous()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats to 8-bit values, rounding to nearest, on the CPU."""
    return images.detach().float().cpu().clamp(0, 1).mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


def save_gif(paths: list, path, max_frames: int = 100, max_side: int = 640, seconds: float = 0.2) -> None:
    """PNG frames (in order) as one looping GIF: evenly subsampled to ``max_frames`` (the first and the last kept),
    scaled down so that no side exceeds ``max_side`` pixels, ``seconds`` a frame and the last held longer."""
    if len(paths) > max_frames:
        paths = [paths[round(i * (len(paths) - 1) / (max_frames - 1))] for i in range(max_frames)]
    frames = []
    for p in paths:
        with Image.open(p) as im:
            frame = im.convert("RGB")
        if max(frame.size) > max_side:
            scale = max_side / max(frame.size)
            frame = frame.resize((round(frame.width * scale), round(frame.height * scale)), Image.Resampling.LANCZOS)
        frames.append(frame)
    if not frames:
        return
    durations = [round(seconds * 1000)] * (len(frames) - 1) + [round(seconds * 5000)]
    tmp = Path(path).with_suffix(".tmp.gif")
    frames[0].save(tmp, save_all=True, append_images=frames[1:], duration=durations, loop=0)
    tmp.replace(path)
