"""A variational autoencoder trained on the negative ELBO."""

import torch
from torch import Tensor, nn

from genlab.errors import GenlabError
from genlab.losses import ELBO, gaussian_blur, kl_normal, reconstruction_error, total_variation
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

    # the first is the default: the best on MNIST, Fashion-MNIST and CIFAR-10 (docs/results.md)
    scores = ("corrected", "blur_kl", "elbo", "recon", "mse", "mse_blur")

    def __init__(self, encoder: nn.Module, decoder: nn.Module, loss: ELBO):
        super().__init__(encoder, decoder)
        self.loss = loss
        self._scale = None  # set by calibrate(): (blur, kl) medians, and the fit of `corrected` on normal images

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
        (``calibrate``), so that both an odd shape and an odd latent code count; ``corrected``: the logs of
        ``mse_blur``, ``elbo`` and the KL term, each less what normal training images of the same detail
        (total variation) score and divided by its spread there, summed. A detailed image is hard to
        reconstruct whatever its class (Serra et al., ICLR 2020), and this takes that out."""
        if score in ("blur_kl", "corrected"):
            if self._scale is None:
                raise GenlabError(f"score={score} needs calibrate(normal training images) first.")
            if score == "blur_kl":
                blur, _, kl = self._terms(x)
                return blur / self._scale["blur"] + kl / self._scale["kl"]
            y, a = self._logs(x)
            return ((y - a @ self._scale["coef"]) / self._scale["spread"]).sum(1)
        mu, logvar = self.encode(x)
        logits = self.decoder(mu)
        if score in (None, "elbo"):
            return reconstruction_error(x, logits, self.loss.recon) + kl_normal(mu, logvar)
        if score == "recon":
            return reconstruction_error(x, logits, self.loss.recon)
        if score == "mse":
            return reconstruction_error(x, logits, "mse")
        if score == "mse_blur":
            return self._terms(x)[0]
        raise GenlabError(f"score={score} is not offered by VAE: use {' | '.join(self.scores)}.")

    def _terms(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per image, decoded at the posterior mean: the blurred squared error, the negative ELBO, the KL term."""
        mu, logvar = self.encode(x)
        logits = self.decoder(mu)
        kl = kl_normal(mu, logvar)
        blur = ((gaussian_blur(x) - gaussian_blur(torch.sigmoid(logits.float()))) ** 2).flatten(1).sum(1)
        return blur, reconstruction_error(x, logits, self.loss.recon) + kl, kl

    def _logs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """`corrected`'s terms: their logs [B, 3], and what they are fitted on, [log total variation, 1]: [B, 2]."""
        y = torch.stack(self._terms(x), 1).clamp(min=1e-8).log().double()
        a = torch.stack([total_variation(x).clamp(min=1e-3).log().double(), torch.ones_like(y[:, 0])], 1)
        return y, a

    def calibrate(self, x: Tensor) -> None:
        blur, _, kl = self._terms(x)
        y, a = self._logs(x)
        coef = torch.linalg.lstsq(a.cpu(), y.cpu()).solution.to(y.device)  # [2, 3]: slope and offset per term
        coef[:, 2] = torch.stack([torch.zeros_like(coef[0, 2]), y[:, 2].mean()])  # the KL term: its mean only
        self._scale = {"blur": blur.median().clamp(min=1e-8), "kl": kl.median().clamp(min=1e-8),
                       "coef": coef, "spread": (y - a @ coef).std(0).clamp(min=1e-8)}
