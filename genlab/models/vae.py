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
        """``score`` (None: the first of ``scores``, the default): ``elbo``: the negative ELBO, decoded at the
        posterior mean; ``recon``: its reconstruction term alone (the training likelihood); ``mse``: squared
        reconstruction error; ``mse_blur``: squared error between the image and its reconstruction both
        blurred (Gaussian, sigma 1 pixel), which forgives the small stroke shifts normal images have but not
        a different shape; ``blur_kl``: ``mse_blur`` plus the KL term, each divided by its median over normal
        training images (``calibrate``), so that both an odd shape and an odd latent code count;
        ``corrected``: the logs of ``mse_blur`` and ``elbo`` less what normal training images of the same
        detail (total variation) score, and the log of the KL term less its mean there, each divided by its
        spread there, summed (with fewer than 10 normal images, each term less its mean only). A detailed image
        is hard to reconstruct whatever its class (Serra et al., ICLR 2020), and this takes that out."""
        score = score or self.scores[0]
        if score in ("blur_kl", "corrected"):
            if self._scale is None:
                raise GenlabError(f"score={score} needs calibrate(normal training images) first.")
            terms = self._terms(x)
            if score == "blur_kl":
                return terms[0] / self._scale["blur"] + terms[2] / self._scale["kl"]
            y, a = self._logs(terms, x)
            return ((y - a @ self._scale["coef"]) / self._scale["spread"]).sum(1).float().to(x.device)
        mu, logvar = self.encode(x)
        logits = self.decoder(mu)
        if score == "elbo":
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

    @staticmethod
    def _logs(terms: tuple[Tensor, ...], x: Tensor) -> tuple[Tensor, Tensor]:
        """`corrected`'s terms: their logs [B, 3], and what they are fitted on, [log total variation, 1]: [B, 2].
        On the CPU in float64, which every device can hand over (MPS has no float64)."""
        y = torch.stack(terms, 1).cpu().double().clamp(min=1e-8).log()
        a = torch.stack([total_variation(x).cpu().double().clamp(min=1e-3).log(), torch.ones_like(y[:, 0])], 1)
        return y, a

    @torch.no_grad()
    def calibrate(self, x: Tensor) -> None:
        terms = self._terms(x)
        y, a = self._logs(terms, x)
        if len(x) >= 10:
            coef = torch.linalg.lstsq(a, y).solution  # [2, 3]: slope and offset per term
            coef[:, 2] = torch.tensor([0.0, y[:, 2].mean().item()])  # the KL term: its mean only
        else:  # too few images to fit a slope on: each term against its mean
            coef = torch.stack([torch.zeros_like(y[0]), y.mean(0)])
        r = y - a @ coef
        spread = (r.std(0) if len(r) > 1 else torch.ones(3, dtype=r.dtype)).clamp(min=1e-3)  # a perfect fit has none
        self._scale = {"blur": terms[0].median().clamp(min=1e-8), "kl": terms[2].median().clamp(min=1e-8),
                       "coef": coef, "spread": spread}
