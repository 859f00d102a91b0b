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
        if not self.num_classes:
            labels = None
        elif labels is None:
            labels = torch.arange(len(z), device=z.device) % self.num_classes
        return (self.g.synthesis(self.styles(z, labels, truncation)).float() + 1) / 2

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
