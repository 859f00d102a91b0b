"""A StyleGAN: genlab's GAN on the StyleGAN2-style networks (genlab.nets.stylegan), sampled with the truncation
trick."""

import torch
from torch import Tensor

from genlab.errors import GenlabError
from genlab.models.gan import GAN


class StyleGAN(GAN):
    """The GAN's training step as it is (its loss, augmentation and regularizers: R1 with ``regularizer=r1``); the
    generator mixes styles in training by itself. Sampling takes ``truncation`` psi: each style w is drawn towards
    the mean style by w_mean + psi (w - w_mean) (Karras et al. 2019), trading variety for typical images; 1 is no
    truncation. The mean style is the mapping network's mean over ``mean_of`` fixed latents (of the image's class,
    for a conditional model), measured when asked for."""

    mean_of = 4096

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
        means = torch.stack([self.g.mapping(z, c.expand(len(z))).mean(0) for c in labels.unique()])
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
