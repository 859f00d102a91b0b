"""A variational autoencoder trained on the negative ELBO."""

import torch
from torch import Tensor, nn

from genlab.errors import GenlabError
from genlab.losses import ELBO, gaussian_blur, kl_normal, reconstruction_error
from genlab.models.base import GenerativeModel


class Autoencoder(GenerativeModel):
    """What the models with a Gaussian encoder share: ``encoder(x) -> (mu, logvar)``, ``decoder(z) -> pixel
    logits``, a standard normal prior. `genlab sample` draws reconstructions, a latent map and traversals for
    any model with ``encode``."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.encoder(x)
        return mu.float(), logvar.float()

    def latent(self, n, generator=None):
        return torch.randn(n, self.decoder.latent_dim, generator=generator)

    def generate(self, z, labels=None):
        return torch.sigmoid(self.decoder(z).float())

    def reconstruct(self, x: Tensor) -> Tensor:
        """Decoded posterior means, in [0, 1]."""
        return self.generate(self.encode(x)[0])


class VAE(Autoencoder):
    """An `Autoencoder` trained on ``loss``, the negative ELBO with a Bernoulli or Gaussian likelihood."""

    scores = ("blur_kl", "elbo", "recon", "mse", "mse_blur")  # the first is the default: the best on MNIST and Fashion-MNIST

    def __init__(self, encoder: nn.Module, decoder: nn.Module, loss: ELBO):
        super().__init__(encoder, decoder)
        self.loss = loss
        self._scale = None  # (blur, kl) medians on normal images, set by calibrate()

    def optimizer_groups(self):
        return {"vae": self.parameters()}

    def training_step(self, batch, ctx) -> dict[str, Tensor]:
        x = batch.x
        with ctx.autocast():
            mu, logvar = self.encode(x)
            z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()  # reparameterisation
            logits = self.decoder(z)
        recon, kl = (t.mean() for t in self.loss.terms(x, logits, mu, logvar))
        loss = recon + self.loss.beta * kl
        ctx.backward(loss, "vae")
        ctx.step("vae")
        return {"loss": loss.detach(), "recon": recon.detach(), "kl": kl.detach()}

    def anomaly_score(self, x: Tensor, score: str | None = None) -> Tensor:
        """``elbo``: the negative ELBO, decoded at the posterior mean; ``recon``: its reconstruction
        term alone (the training likelihood); ``mse``: squared reconstruction error; ``mse_blur``: squared
        error between the image and its reconstruction both blurred (Gaussian, sigma 1 pixel), which
        forgives the small stroke shifts normal images have but not a different shape; ``blur_kl``:
        ``mse_blur`` plus the KL term, each divided by its median over normal training images
        (``calibrate``), so that both an odd shape and an odd latent code count."""
        if score == "blur_kl":
            if self._scale is None:
                raise GenlabError("score=blur_kl needs calibrate(normal training images) first.")
            blur, kl = self._blur_kl(x)
            return blur / self._scale[0] + kl / self._scale[1]
        mu, logvar = self.encode(x)
        logits = self.decoder(mu)
        if score in (None, "elbo"):
            return reconstruction_error(x, logits, self.loss.recon) + kl_normal(mu, logvar)
        if score == "recon":
            return reconstruction_error(x, logits, self.loss.recon)
        if score == "mse":
            return reconstruction_error(x, logits, "mse")
        if score == "mse_blur":
            return self._blur_kl(x)[0]
        raise GenlabError(f"score={score} is not offered by VAE: use {' | '.join(self.scores)}.")

    def _blur_kl(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.encode(x)
        blur = ((gaussian_blur(x) - gaussian_blur(self.generate(mu))) ** 2).flatten(1).sum(1)
        return blur, kl_normal(mu, logvar)

    def calibrate(self, x: Tensor) -> None:
        blur, kl = self._blur_kl(x)
        self._scale = (blur.median().clamp(min=1e-8), kl.median().clamp(min=1e-8))
