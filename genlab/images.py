"""Pictures of image batches: a grid of images as one PNG."""

import math
from pathlib import Path

import torch
from PIL import Image


def save_grid(images: torch.Tensor, path, nrow: int | None = None, padding: int = 2) -> None:
    """Images [N, C, H, W] with values in [0, 1] as one PNG: ``nrow`` images a row (default: a square),
    white gaps of ``padding`` pixels between them."""
    images = images.detach().float().cpu().clamp(0, 1)
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    p = padding
    grid = torch.ones(c, rows * (h + p) + p, nrow * (w + p) + p)
    for i, image in enumerate(images):
        r, col = divmod(i, nrow)
        grid[:, p + r * (h + p):p + r * (h + p) + h, p + col * (w + p):p + col * (w + p) + w] = image
    pixels = grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(pixels[..., 0] if c == 1 else pixels).save(Path(path))
