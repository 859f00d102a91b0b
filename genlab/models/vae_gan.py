"""The VAE-GAN of Larsen et al. 2016: a VAE whose reconstruction error is measured in a discriminator's
features rather than in pixels, and whose decoder is also the generator of a GAN."""

import torch
from torch import Tensor, nn

from genlab.errors import GenlabError
from genlab.losses import GANLoss, feature_error, gradient_penalty, kl_normal
from genlab.models.vae import Autoencoder


class VAEGAN(Autoencoder):
    """An `Autoencoder` (``encoder``, ``decoder``) and a ``discriminator`` with
    ``features(x)`` and ``score(features) -> logits``, trained with the GAN ``loss``. One step:

    - feature error: half the squared distance between the discriminator's features of an image and of its
      reconstruction, summed over features (a Gaussian likelihood in feature space);
    - encoder: ``beta`` * KL + feature error;
    - decoder: ``gamma`` * feature error + the GAN loss of its reconstructions and prior samples;
    - discriminator: the GAN loss, real images against reconstructions and prior samples.

    The three losses come from one forward pass, and all three gradients are taken before any optimizer steps.
    With ``augment`` (genlab.augment: ``augment=diffaugment``), the GAN loss judges augmented images, in passes of
    their own, while the feature error keeps comparing each image with its reconstruction as they are.
    Its default anomaly score is ``feature`` (genlab.scores.Feature: the feature error of the posterior mean's
    reconstruction, the better one on one-class MNIST); the reconstruction's pixel errors (``mse``) fit it too.
    """

    default_score = "feature"

    def __init__(self, encoder: nn.Module, decoder: nn.Module, discriminator: nn.Module, loss: GANLoss,
                 gamma: float = 0.1, beta: float = 1.0, augment=None):
        super().__init__(encoder, decoder)
        if not (hasattr(discriminator, "features") and hasattr(discriminator, "score")):
            raise GenlabError(f"the VAE-GAN's discriminator needs features(x) and score(h) methods; "
                              f"{type(discriminator).__name__} has not both (genlab.nets.DCGANDiscriminator has).")
        if gamma < 0 or beta < 0:
            raise GenlabError(f"model.gamma and model.beta must be >= 0; got {gamma} and {beta}.")
        self.d, self.loss, self.gamma, self.beta = discriminator, loss, gamma, beta
        self.augment = augment

    def optimizer_groups(self):
        return {"encoder": self.encoder.parameters(), "decoder": self.decoder.parameters(), "d": self.d.parameters()}

    def training_step(self, batch, ctx) -> dict[str, Tensor]:
        eps, prior_z = (torch.randn(len(batch.x), self.decoder.latent_dim, device=batch.x.device) for _ in range(2))
        out = {}
        for x, e, zp in ctx.chunks(batch.x, eps, prior_z):
            with ctx.autocast():
                mu, logvar = self.encode(x)
                recon = torch.sigmoid(self.decoder(mu + e * (0.5 * logvar).exp()).float())
                prior = torch.sigmoid(self.decoder(zp).float())
                # the discriminator sees each batch apart, so a backward pass runs only over the batches it needs
                h_real, h_recon, h_prior = (self.d.features(v * 2 - 1) for v in (x, recon, prior))
                real_logits, fake_logits = self.judged(x, recon, prior, h_real, torch.cat([h_recon, h_prior]))
                if hasattr(self.augment, "observe"):  # an adaptive augmentation learns how much the discriminator overfits
                    self.augment.observe(real_logits.detach(), ctx.step_index)
            feature = feature_error(h_real.float(), h_recon.float()).mean()
            kl = kl_normal(mu, logvar).mean()
            loss_d = self.loss.d(real_logits, fake_logits)
            if self.loss.gp_weight:
                with ctx.autocast():
                    loss_d = loss_d + self.loss.gp_weight * gradient_penalty(self.d, x * 2 - 1, prior.detach() * 2 - 1)
            loss_g = self.gamma * feature + self.loss.g(fake_logits, real_logits if self.loss.needs_real else None)
            ctx.backward(self.beta * kl + feature, "encoder", retain_graph=True)  # each into its own network's weights...
            ctx.backward(loss_g, "decoder", retain_graph=True)
            ctx.backward(loss_d, "d")
            ctx.tally(out, loss_d=loss_d, loss_g=loss_g, feature=feature, kl=kl)
        for name in ("encoder", "decoder", "d"):  # ...and only then any update
            ctx.step(name)
        return out

    def judged(self, x, recon, prior, h_real, h_fake) -> tuple[Tensor, Tensor]:
        """The discriminator's logits (fp32) on the real images and on the reconstructions and prior samples: from
        the features already taken, or, with an augmentation, from the augmented images' own."""
        if self.augment is None:
            return self.d.score(h_real).float(), self.d.score(h_fake).float()
        real = self.d.score(self.d.features(self.augment(x * 2 - 1)))
        fake = self.d.score(self.d.features(self.augment(torch.cat([recon, prior]) * 2 - 1)))
        return real.float(), fake.float()

    def features(self, x: Tensor) -> Tensor:
        """The discriminator's features of images ``x`` in [0, 1], in fp32: what the ``feature`` score compares."""
        return self.d.features(x * 2 - 1).float()
