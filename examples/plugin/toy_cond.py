"""A model that lives only in the test suite, to show that a next model is one file plus one config.

ToyCond is a tiny class-conditional VAE-GAN: an encoder E(x), a decoder G(z, y) and a discriminator
D(x, y), with three optimizers stepped from one shared forward pass (every gradient is taken before
any weight changes), the decoder's gradient clipped, and one sampling setting, ``temperature``.
"""

import torch
import torch.nn.functional as F
from torch import nn

from genlab.errors import GenlabError
from genlab.losses import GANLoss, kl_normal
from genlab.models import GenerativeModel


class ToyCond(GenerativeModel):
    scores = ("recon",)

    def __init__(self, loss: GANLoss, channels: int = 1, image_size: int = 28, num_classes: int = 10, z_dim: int = 8,
                 width: int = 32, clip: float = 1.0):
        super().__init__()
        pixels = channels * image_size * image_size
        self.shape, self.num_classes, self.z_dim, self.clip, self.loss = (channels, image_size, image_size), num_classes, z_dim, clip, loss
        self.enc = nn.Sequential(nn.Flatten(), nn.Linear(pixels, width), nn.ReLU(), nn.Linear(width, 2 * z_dim))
        self.dec = nn.Sequential(nn.Linear(z_dim + num_classes, width), nn.ReLU(), nn.Linear(width, pixels))
        self.d = nn.Sequential(nn.Linear(pixels + num_classes, width), nn.LeakyReLU(0.2), nn.Linear(width, 1))

    def optimizer_groups(self):
        return {"enc": self.enc.parameters(), "dec": self.dec.parameters(), "d": self.d.parameters()}

    def decode(self, z, y):
        return torch.sigmoid(self.dec(torch.cat([z, F.one_hot(y, self.num_classes).to(z.dtype)], 1))).view(-1, *self.shape)

    def critic(self, x, y):
        return self.d(torch.cat([x.flatten(1), F.one_hot(y, self.num_classes).to(x.dtype)], 1)).squeeze(1).float()

    def training_step(self, batch, ctx):
        x, y = batch
        with ctx.autocast():
            mu, logvar = self.enc(x).float().chunk(2, dim=1)
            recon = self.decode(mu + torch.randn_like(mu) * (0.5 * logvar).exp(), y)
            fake = self.decode(torch.randn_like(mu), y)
            real_logits, fake_logits = self.critic(x, y), self.critic(fake, y)
        rec = ((recon.float() - x) ** 2).flatten(1).sum(1).mean()
        loss_enc = rec + kl_normal(mu, logvar).mean()
        loss_dec = rec + self.loss.g(fake_logits, real_logits)
        loss_d = self.loss.d(real_logits, fake_logits)
        ctx.backward(loss_enc, "enc", retain_graph=True)
        ctx.backward(loss_dec, "dec", retain_graph=True)
        ctx.backward(loss_d, "d")
        ctx.clip("dec", self.clip)
        for name in ("enc", "dec", "d"):
            ctx.step(name)
        return {"loss_enc": loss_enc.detach(), "loss_dec": loss_dec.detach(), "loss_d": loss_d.detach()}

    def latent(self, n, generator=None):
        return torch.randn(n, self.z_dim, generator=generator)

    def generate(self, z, labels=None, *, temperature: float = 1.0):
        if labels is None:
            raise GenlabError("ToyCond is class-conditional: it needs labels")
        return self.decode(z * temperature, labels)

    def anomaly_score(self, x, score=None):
        return ((self.decode(self.enc(x).chunk(2, dim=1)[0], torch.zeros(len(x), dtype=torch.long, device=x.device)) - x) ** 2).flatten(1).sum(1)
