"""Losses: the GAN objectives and the VAE's negative ELBO that the ``loss/*.yaml`` configs name by ``_target_``,
and the pure functions they and the models are made of.

A GAN objective is a pair of formulas on the critic's outputs (logits): ``d(real, fake)`` for the discriminator
or critic and ``g(fake, real)`` for the generator, each written once, as that class's method.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from genlab.errors import GenlabError


class GANLoss:
    """A GAN objective: ``d(real, fake)`` for the discriminator and ``g(fake, real)`` for the generator, on
    the critic's logits. ``real`` is passed to ``g`` only when ``needs_real`` (relativistic losses);
    ``gp_weight`` > 0 adds the WGAN-GP gradient penalty to the discriminator's loss (genlab.regularizers). Your
    own loss: a subclass in your own module, named by ``_target_`` in a loss config."""

    needs_real = False

    def __init__(self, gp_weight: float = 0.0):
        if gp_weight < 0:
            raise GenlabError(f"loss.gp_weight must be at least 0; got {gp_weight}.")
        self.gp_weight = gp_weight

    def d(self, real: Tensor, fake: Tensor) -> Tensor:
        raise NotImplementedError

    def g(self, fake: Tensor, real: Tensor | None = None) -> Tensor:
        raise NotImplementedError


class BCE(GANLoss):
    """Binary cross-entropy on logits; the generator's is the non-saturating form."""

    def d(self, real, fake):
        # -log sigmoid(real) - log(1 - sigmoid(fake)), written with softplus for stability
        return F.softplus(-real).mean() + F.softplus(fake).mean()

    def g(self, fake, real=None):
        return F.softplus(-fake).mean()  # non-saturating: -log sigmoid(fake)


class Minimax(BCE):
    """The original minimax objective: the generator minimises log(1 - D(G(z))) = -softplus(fake)."""

    def g(self, fake, real=None):
        return -F.softplus(fake).mean()


class Wasserstein(GANLoss):
    """The critic's mean score gap (with ``gp_weight`` > 0: WGAN-GP)."""

    def d(self, real, fake):
        return fake.mean() - real.mean()

    def g(self, fake, real=None):
        return -fake.mean()


class Hinge(GANLoss):
    """The hinge loss of SAGAN and BigGAN."""

    def d(self, real, fake):
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()

    def g(self, fake, real=None):
        return -fake.mean()


class LSGAN(GANLoss):
    """Least squares (Mao et al. 2017): real towards 1, fake towards 0."""

    def d(self, real, fake):
        return 0.5 * ((real - 1) ** 2).mean() + 0.5 * (fake**2).mean()

    def g(self, fake, real=None):
        return 0.5 * ((fake - 1) ** 2).mean()


class RaLSGAN(GANLoss):
    """Relativistic average least squares (Jolicoeur-Martineau 2018): each side is judged against the average of
    the other, real beating the average fake by 1."""

    needs_real = True

    def d(self, real, fake):
        return 0.5 * ((real - fake.mean() - 1) ** 2).mean() + 0.5 * ((fake - real.mean() + 1) ** 2).mean()

    def g(self, fake, real=None):
        return 0.5 * ((fake - real.mean() - 1) ** 2).mean() + 0.5 * ((real - fake.mean() + 1) ** 2).mean()


class RpGAN(GANLoss):
    """The relativistic pairing GAN (Jolicoeur-Martineau 2018; R3GAN, Huang et al. 2024, "The GAN is dead; long live
    the GAN!"): each real image is judged against the fake beside it, softplus(-(D(real) - D(fake))) for the
    discriminator and the reverse for the generator. With R1 and R2 (``regularizer=[r1,r2]``) it is R3GAN's
    objective, which converges locally where the plain losses need tricks."""

    needs_real = True

    def d(self, real, fake):
        return F.softplus(fake - real).mean()

    def g(self, fake, real=None):
        return F.softplus(real - fake).mean()


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


class ELBO:
    """The VAE's negative ELBO per image: ``recon`` (``bce``: Bernoulli, ``mse``: squared error of the
    sigmoid) summed over pixels, plus ``beta`` times KL(q(z|x) || N(0, I))."""

    def __init__(self, recon: str = "bce", beta: float = 1.0):
        if recon not in ("bce", "mse"):
            raise GenlabError(f"loss.recon must be bce or mse; got {recon}.")
        self.recon, self.beta = recon, beta

    def terms(self, x: Tensor, logits: Tensor, mu: Tensor, logvar: Tensor) -> tuple[Tensor, Tensor]:
        """Reconstruction error and KL, each per image: ([B], [B])."""
        return reconstruction_error(x, logits, self.recon), kl_normal(mu, logvar)


def reconstruction_error(x: Tensor, logits: Tensor, kind: str = "bce") -> Tensor:
    """Per-example reconstruction error summed over pixels: [B]. ``x`` in [0, 1]."""
    if kind == "bce":
        err = F.binary_cross_entropy_with_logits(logits.float(), x.float(), reduction="none")
    elif kind == "mse":
        err = (torch.sigmoid(logits.float()) - x.float()) ** 2
    else:
        raise ValueError(f"unknown reconstruction error {kind!r}: use bce or mse")
    return err.flatten(1).sum(dim=1)


def feature_error(h: Tensor, h_recon: Tensor) -> Tensor:
    """Half the squared distance between two images' discriminator features, summed over features: [B] (the
    VAE-GAN's likelihood in feature space)."""
    return 0.5 * (h_recon - h).pow(2).sum(1)


def total_variation(x: Tensor) -> Tensor:
    """The summed absolute difference between neighbouring pixels, across and down, per image: [B]. A measure
    of how much detail an image has: a flat image has 0."""
    x = x.float()
    return (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).sum(1) + (x[..., 1:] - x[..., :-1]).abs().flatten(1).sum(1)


def gaussian_blur(x: Tensor, sigma: float = 1.0, radius: int = 3, edge: str = "zeros") -> Tensor:
    """A separable Gaussian blur of images [B, C, H, W], each channel on its own, zero-padded (``edge="replicate"``:
    the border pixels repeated, so that the border keeps its level)."""
    k = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    k = torch.exp(-(k**2) / (2 * sigma**2))
    k = (k / k.sum()).repeat(x.shape[1], 1).unsqueeze(1)  # [C, 1, 2r+1]
    c = x.shape[1]
    x = x.float()
    if edge == "replicate":
        x = F.pad(x, (radius,) * 4, mode="replicate")
    pad = 0 if edge == "replicate" else radius
    x = F.conv2d(x, k.unsqueeze(2), padding=(0, pad), groups=c)
    return F.conv2d(x, k.unsqueeze(3), padding=(pad, 0), groups=c)
