"""Differentiable augmentations of a GAN discriminator's inputs (genlab.models.GAN's ``augment``).

An augmentation is a callable from a batch of images in [-1, 1] [B, C, H, W] to a batch of the same shape,
drawing its randomness from torch's generator (which the loop seeds each step, so a resumed run augments as an
uninterrupted one would). The GAN applies it to real and fake images alike wherever the discriminator sees them
in training, and the generator's gradient passes through it (Zhao et al. 2020, "Differentiable Augmentation for
Data-Efficient GAN Training"). One of your own is such a callable and a YAML file in configs/augment/.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from genlab.errors import GenlabError


class Translation:
    """Each image shifted by a whole number of pixels, up to ``ratio`` of its side each way, drawn per image; the
    gap is filled with zeros (mid-grey in [-1, 1]) and what leaves the frame is lost."""

    def __init__(self, ratio: float = 0.125):
        if not 0 <= ratio < 0.5:
            raise GenlabError(f"the translation's ratio is a fraction of the image's side in [0, 0.5); got {ratio}.")
        self.ratio = ratio

    def __call__(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        sh, sw = int(h * self.ratio + 0.5), int(w * self.ratio + 0.5)
        if not (sh or sw):
            return x
        dy = torch.randint(-sh, sh + 1, (b,), device=x.device)
        dx = torch.randint(-sw, sw + 1, (b,), device=x.device)
        padded = F.pad(x, (sw, sw, sh, sh))  # zeros around the image
        rows = (torch.arange(h, device=x.device) + sh + dy[:, None]).view(b, 1, h, 1).expand(b, c, h, w + 2 * sw)
        cols = (torch.arange(w, device=x.device) + sw + dx[:, None]).view(b, 1, 1, w).expand(b, c, h, w)
        return padded.gather(2, rows).gather(3, cols)
