"""Losses as pure functions of logits (GANs) or of reconstructions and posteriors (VAEs).

GAN losses come in pairs: ``d_<name>(real, fake)`` for the discriminator or critic and
``g_<name>(fake)`` for the generator, where ``real`` and ``fake`` are the critic's
outputs (logits) on real and generated images.
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def d_bce(real: Tensor, fake: Tensor) -> Tensor:
    # -log sigmoid(real) - log(1 - sigmoid(fake)), written with softplus for stability
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def g_bce(fake: Tensor) -> Tensor:
    # non-saturating: -log sigmoid(fake)
    return F.softplus(-fake).mean()


def g_minimax(fake: Tensor) -> Tensor:
    # the original objective: minimise log(1 - sigmoid(fake)) = -softplus(fake)
    return -F.softplus(fake).mean()


def d_wasserstein(real: Tensor, fake: Tensor) -> Tensor:
    return fake.mean() - real.mean()


def g_wasserstein(fake: Tensor) -> Tensor:
    return -fake.mean()


def d_hinge(real: Tensor, fake: Tensor) -> Tensor:
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


def g_hinge(fake: Tensor) -> Tensor:
    return -fake.mean()


def d_lsgan(real: Tensor, fake: Tensor) -> Tensor:
    return 0.5 * ((real - 1) ** 2).mean() + 0.5 * (fake**2).mean()


def g_lsgan(fake: Tensor) -> Tensor:
    return 0.5 * ((fake - 1) ** 2).mean()


GAN_LOSSES = {
    "bce": (d_bce, g_bce),
    "minimax": (d_bce, g_minimax),
    "wasserstein": (d_wasserstein, g_wasserstein),
    "hinge": (d_hinge, g_hinge),
    "lsgan": (d_lsgan, g_lsgan),
}


def gradient_penalty(critic, real: Tensor, fake: Tensor) -> Tensor:
    """WGAN-GP: (||grad_x critic(x)|| - 1)^2 at random points between real and fake images.

    Under autocast the critic runs in the low precision, and the input gradient is taken unscaled,
    unlike the loss's backward, which the loop scales for fp16. The penalty holds that gradient's
    norm near 1 per image, and each element near 1/sqrt(pixels), well inside fp16's range:
    multiplying by the fp16 scaler's scale (2^16 at first) would overflow it, and underflow needs
    norms below about 1e-4, where the penalty is about 1 whatever the rounding.
    """
    eps = torch.rand(real.shape[0], *([1] * (real.dim() - 1)), device=real.device)
    x = (eps * real.float() + (1 - eps) * fake.float()).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x).float().sum(), x, create_graph=True)
    return ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


def kl_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per example, summed over latent dimensions: [B]."""
    return -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(dim=1)


def reconstruction_error(x: Tensor, logits: Tensor, kind: str = "bce") -> Tensor:
    """Per-example reconstruction error summed over pixels: [B]. ``x`` in [0, 1]."""
    if kind == "bce":
        err = F.binary_cross_entropy_with_logits(logits.float(), x.float(), reduction="none")
    elif kind == "mse":
        err = (torch.sigmoid(logits.float()) - x.float()) ** 2
    else:
        raise ValueError(f"unknown reconstruction error {kind!r}: use bce or mse")
    return err.flatten(1).sum(dim=1)


def gaussian_blur(x: Tensor, sigma: float = 1.0, radius: int = 3) -> Tensor:
    """A separable Gaussian blur of images [B, C, H, W], each channel on its own, zero-padded."""
    k = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    k = torch.exp(-(k**2) / (2 * sigma**2))
    k = (k / k.sum()).repeat(x.shape[1], 1).unsqueeze(1)  # [C, 1, 2r+1]
    c = x.shape[1]
    x = F.conv2d(x.float(), k.unsqueeze(2), padding=(0, radius), groups=c)
    return F.conv2d(x, k.unsqueeze(3), padding=(radius, 0), groups=c)
