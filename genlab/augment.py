"""Differentiable augmentations of a GAN discriminator's inputs (genlab.models.GAN's ``augment``).

An augmentation is a callable from a batch of images in [-1, 1] [B, C, H, W] to a batch of the same shape,
drawing its randomness from torch's generator (which the loop seeds each step, so a resumed run augments as an
uninterrupted one would). The GAN applies it to real and fake images alike wherever the discriminator sees them
in training, and the generator's gradient passes through it (Zhao et al. 2020, "Differentiable Augmentation for
Data-Efficient GAN Training"). An augmentation may also have ``observe(real_logits, step)``: the GAN shows it the
discriminator's logits on each real batch (what an adaptive one tunes its strength from). One of your own is such a
callable and a YAML file in configs/augment/.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genlab import dist
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


class Color:
    """DiffAugment's colour, per image: brightness (add U(-0.5, 0.5)), saturation (scale each pixel's distance from
    its grey by U(0, 2); nothing for grey images) and contrast (scale the distance from the image's mean by
    U(0.5, 1.5)), in [-1, 1] units."""

    def __call__(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        x = x + (torch.rand(b, 1, 1, 1, device=x.device, dtype=x.dtype) - 0.5)
        grey = x.mean(1, keepdim=True)
        x = (x - grey) * (torch.rand(b, 1, 1, 1, device=x.device, dtype=x.dtype) * 2) + grey
        mean = x.mean((1, 2, 3), keepdim=True)
        return (x - mean) * (torch.rand(b, 1, 1, 1, device=x.device, dtype=x.dtype) + 0.5) + mean


class Cutout:
    """A square of side ``ratio`` of the image's side, centred anywhere in the image (drawn per image), set to
    zero (mid-grey); the part of it that falls outside the frame is lost."""

    def __init__(self, ratio: float = 0.5):
        if not 0 <= ratio <= 1:
            raise GenlabError(f"the cutout's ratio is a fraction of the image's side in [0, 1]; got {ratio}.")
        self.ratio = ratio

    def __call__(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        side_h, side_w = int(h * self.ratio + 0.5), int(w * self.ratio + 0.5)
        top = torch.randint(0, h, (b, 1), device=x.device) - side_h // 2
        left = torch.randint(0, w, (b, 1), device=x.device) - side_w // 2
        rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
        inside_r = (rows >= top) & (rows < top + side_h)  # [B, H]
        inside_c = (cols >= left) & (cols < left + side_w)  # [B, W]
        keep = ~(inside_r[:, :, None] & inside_c[:, None, :])
        return x * keep[:, None].to(x.dtype)


TRANSFORMS = {"color": Color, "translation": Translation, "cutout": Cutout}


class DiffAugment(nn.Module):
    """DiffAugment (Zhao et al. 2020): the transforms of ``policy`` (``color``, ``translation``, ``cutout``) in
    that order, each applied to each image with probability ``p`` (``translation`` and ``cutout``: their ratios).

    With ``target`` set, ``p`` adapts as in ADA (Karras et al. 2020, "Training Generative Adversarial Networks with
    Limited Data"): the GAN shows it the discriminator's logits on each real batch (``observe``), and every
    ``interval`` steps p moves up when the share of real images the discriminator finds real, E[sign(logit)],
    is above ``target`` (it is overfitting) and down when below, by the images seen since over ``speed`` (the
    images p takes to go from 0 to 1). The signs are counted over every rank, so that the ranks keep one p. p and
    the counts are buffers: a resumed run goes on with them. (The sign of a logit means real or fake for the BCE,
    hinge and relativistic losses; a Wasserstein critic's logits have no such zero.)"""

    def __init__(self, policy: str = "color,translation,cutout", p: float = 1.0, target: float | None = None,
                 interval: int = 4, speed: int = 100_000, translation: float = 0.125, cutout: float = 0.5):
        super().__init__()
        names = [n.strip() for n in policy.split(",") if n.strip()]
        unknown = [n for n in names if n not in TRANSFORMS]
        if unknown or not names:
            raise GenlabError(f"augment.policy names transforms among {', '.join(TRANSFORMS)}; got {policy!r}.")
        if not 0 <= p <= 1 or (target is not None and not -1 < target < 1) or interval < 1 or speed < 1:
            raise GenlabError(f"DiffAugment needs p in [0, 1], target in (-1, 1) or null, interval and speed >= 1; "
                              f"got p={p}, target={target}, interval={interval}, speed={speed}.")
        settings = {"translation": (translation,), "cutout": (cutout,), "color": ()}
        self.transforms = [TRANSFORMS[n](*settings[n]) for n in names]
        self.target, self.interval, self.speed, self.fixed = target, interval, speed, p
        self.register_buffer("p", torch.tensor(float(p)))
        self.register_buffer("signs", torch.zeros(2))  # since the last adjustment: the sum of signs, and images

    def forward(self, x: Tensor) -> Tensor:
        for transform in self.transforms:
            if self.target is None and self.fixed >= 1:
                x = transform(x)
            elif self.target is not None or self.fixed > 0:  # p read on the device: no wait for it on a GPU
                chosen = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < self.p
                x = torch.where(chosen, transform(x), x)
        return x

    @torch.no_grad()
    def observe(self, real_logits: Tensor, step: int) -> None:
        """The discriminator's logits on the real images of training step ``step``: on every ``interval``-th step, p
        moves (adaptive only)."""
        if self.target is None:
            return
        # summed over the ranks each step, so that every rank holds the same counts (and a checkpoint, rank 0's, all)
        self.signs += dist.all_reduce(torch.stack([real_logits.float().sign().sum(),
                                                   real_logits.new_tensor(real_logits.numel(), dtype=torch.float32)]))
        if (step + 1) % self.interval:
            return
        move = self.signs[1] / self.speed
        self.p.copy_((self.p + torch.where(self.signs[0] / self.signs[1] > self.target, move, -move)).clamp(0, 1))
        self.signs.zero_()
