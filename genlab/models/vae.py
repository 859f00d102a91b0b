"""A variational autoencoder trained on the negative ELBO."""

import torch
from torch import Tensor, nn

from genlab.losses import ELBO, kl_normal, reconstruction_error
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

    default_score = "corrected"  # the best on MNIST, Fashion-MNIST and CIFAR-10 (docs/results.md)

    def __init__(self, encoder: nn.Module, decoder: nn.Module, loss: ELBO):
        super().__init__(encoder, decoder)
        self.loss = loss

    def optimizer_groups(self):
        return {"vae": self.parameters()}

    def training_step(self, batch, ctx) -> dict[str, Tensor]:
        eps = torch.randn(len(batch.x), self.decoder.latent_dim, device=batch.x.device)  # for the whole batch
        out = {}
        for x, e in ctx.chunks(batch.x, eps):
            with ctx.autocast():
                mu, logvar = self.encode(x)
                logits = self.decoder(mu + e * (0.5 * logvar).exp())  # reparameterisation
            recon, kl = (t.mean() for t in self.loss.terms(x, logits, mu, logvar))
            loss = recon + self.loss.beta * kl
            ctx.backward(loss, "vae")
            ctx.tally(out, loss=loss, recon=recon, kl=kl)
        ctx.step("vae")
        return out

    def elbo_terms(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per image of ``x``, decoded at the posterior mean: the reconstruction error under the likelihood it
        trained with [B], the KL term [B], and the reconstruction in [0, 1]. What the ELBO-based anomaly scores
        (genlab.scores) need."""
        mu, logvar = self.encode(x)
        logits = self.decoder(mu)
        return reconstruction_error(x, logits, self.loss.recon), kl_normal(mu, logvar), torch.sigmoid(logits.float())
