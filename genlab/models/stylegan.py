"""A StyleGAN: genlab's GAN on the StyleGAN2-style networks (genlab.nets.stylegan), sampled with the truncation
trick."""

import math

import torch
from torch import Tensor

from genlab import dist
from genlab.errors import GenlabError
from genlab.models.gan import GAN


class StyleGAN(GAN):
    """The GAN's training step as it is (its loss, augmentation and regularizers: R1 with ``regularizer=r1``); the
    generator mixes styles in training by itself. Sampling takes ``truncation`` psi: each style w is drawn towards
    the mean style by w_mean + psi (w - w_mean) (Karras et al. 2019), trading variety for typical images; 1 is no
    truncation. The mean style is the mapping network's mean over ``mean_of`` fixed latents (of the image's class,
    for a conditional model), measured when asked for.

    ``path_length`` > 0 adds StyleGAN2's path-length regularisation to the generator, lazily: every
    ``path_length_every`` steps, a separate generator update on half a batch, weighted by the interval. It pulls
    the length of J_w^T y (the change of the image along random directions y, per unit change of w) towards its
    running mean, so that equal steps in W make equal changes to the image. Off by default (StyleGAN2 turns it off
    for CIFAR-10)."""

    untraceable = ("groups its modulated convolutions and its minibatch standard deviation by the batch, whose size a "
                   "traced graph fixes")

    mean_of = 4096

    def __init__(self, *args, path_length: float = 0.0, path_length_every: int = 4, **kwargs):
        super().__init__(*args, **kwargs)
        if path_length < 0 or path_length_every < 1:
            raise GenlabError("path-length regularisation needs path_length >= 0 and path_length_every >= 1; got "
                              f"path_length={path_length}, path_length_every={path_length_every}.")
        self.path_length, self.path_length_every = path_length, path_length_every
        self.register_buffer("pl_mean", torch.zeros(()))  # the lengths' running mean, kept in checkpoints

    def training_step(self, batch, ctx) -> dict[str, Tensor]:
        out = super().training_step(batch, ctx)
        if self.path_length and "loss_g" in out and ctx.step_index % self.path_length_every == 0:
            n = max(1, len(batch.x) // 2)
            z = torch.randn(n, self.z_dim, device=batch.x.device)
            for zc, yc in ctx.chunks(z, batch.y[:n] if self.num_classes else None):  # micro-batches: the running
                with ctx.autocast():                                                 # mean moves with each
                    penalty = self.path_length_penalty(zc, yc)
                ctx.backward(self.path_length * self.path_length_every * penalty, "g")
                ctx.tally(out, loss_pl=penalty)
            ctx.step("g")
        return out

    def path_length_penalty(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        """Mean over ``z`` of (|J_w^T y| - a)^2, with y Gaussian noise over the image (scaled by 1 / sqrt(H W), so
        that the length does not grow with the image) and a the lengths' running mean (decay 0.99, moved by this
        batch's mean over every rank)."""
        ws = self.g.mapping(z, labels)[:, None].expand(-1, self.g.num_ws, -1)
        images = self.g.synthesis(ws).float()  # the directions and the product in fp32 under autocast too
        y = torch.randn_like(images) / math.sqrt(images.shape[2] * images.shape[3])
        (grad,) = torch.autograd.grad((images * y).sum(), ws, create_graph=True)
        lengths = grad.float().square().sum(2).mean(1).sqrt()
        batch_mean = dist.all_reduce(torch.stack([lengths.detach().sum(), lengths.new_tensor(len(lengths))]))
        with torch.no_grad():
            self.pl_mean.lerp_(batch_mean[0] / batch_mean[1], 0.01)
        return (lengths - self.pl_mean).square().mean()

    def generate(self, z, labels=None, *, truncation: float = 1.0):
        if not 0 <= truncation <= 1:
            raise GenlabError(f"truncation is psi in [0, 1] (1: none; 0.7 is usual); got {truncation}.")
        labels = (labels if labels is not None else self.cycled(len(z), z.device)) if self.num_classes else None
        return (self.g.synthesis(self.styles(z, labels, truncation)).float() + 1) / 2

    def cycled(self, n: int, device) -> Tensor | None:
        """Every class in turn for ``n`` images of a conditional model (None for an unconditional one)."""
        return torch.arange(n, device=device) % self.num_classes if self.num_classes else None

    def styles(self, z: Tensor, labels: Tensor | None, truncation: float = 1.0) -> Tensor:
        """The styles [B, num_ws, w_dim] of latents ``z``, truncated by psi ``truncation``."""
        w = self.g.mapping(z, labels)
        if truncation != 1:
            mean = self.mean_style(labels, z.device)
            w = mean + truncation * (w - mean)
        return w[:, None].expand(-1, self.g.num_ws, -1)

    @torch.no_grad()
    def mean_style(self, labels: Tensor | None, device) -> Tensor:
        """The mean style over fixed latents: [1, w_dim], or for each of ``labels`` its class's, [B, w_dim]."""
        z = torch.randn(self.mean_of, self.z_dim, generator=torch.Generator().manual_seed(0)).to(device)
        if labels is None:
            return self.g.mapping(z).mean(0, keepdim=True)
        means = torch.stack([self.g.mapping(z, c.expand(z.shape[0])).mean(0) for c in labels.unique()])
        return means[torch.searchsorted(labels.unique(), labels)]

    def interpolate(self, z0: Tensor, z1: Tensor, t: Tensor, labels: Tensor | None = None, *,
                    truncation: float = 1.0) -> Tensor:
        """Images along straight lines in W between the styles of ``z0`` and ``z1`` [R, z_dim], at fractions ``t``
        [S]: [R * S, C, H, W] in [0, 1], a row per pair (W is where StyleGAN's paths are smooth)."""
        w0, w1 = (self.styles(z, labels, truncation)[:, :1] for z in (z0, z1))  # [R, 1, w_dim]
        w = torch.lerp(w0, w1, t.view(1, -1, 1).to(w0))  # [R, S, w_dim]
        ws = w.flatten(0, 1)[:, None].expand(-1, self.g.num_ws, -1)
        return (self.g.synthesis(ws).float() + 1) / 2

    def style_mix(self, rows: Tensor, cols: Tensor, *, truncation: float = 1.0) -> Tensor:
        """The style-mixing grid: the first row ``cols``' images, the first column ``rows``' images, and each
        other cell row r's styles at the coarse layers (the smallest sides: pose, shape) with column c's at the
        rest (colour, texture). [(R + 1) * (C + 1), C, H, W] in [0, 1], a blank corner first."""
        r, c = (self.styles(z, self.cycled(len(z), z.device), truncation) for z in (rows, cols))
        coarse = torch.arange(self.g.num_ws, device=r.device) < self.g.num_ws // 2
        mixed = torch.where(coarse[None, None, :, None], r[:, None], c[None])  # [R, C, num_ws, w_dim]
        cells = self.g.synthesis(torch.cat([c, r, mixed.flatten(0, 1)]))
        cells = (cells.float() + 1) / 2
        top, left, body = cells[:len(c)], cells[len(c):len(c) + len(r)], cells[len(c) + len(r):]
        blank = torch.ones_like(top[:1])
        grid = [blank, top]
        for i in range(len(r)):
            grid += [left[i:i + 1], body[i * len(c):(i + 1) * len(c)]]
        return torch.cat(grid)
