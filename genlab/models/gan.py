"""GANs: a generator and a discriminator (or critic) trained with a genlab.losses.GANLoss."""

import contextlib

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from genlab.errors import GenlabError
from genlab.losses import GANLoss, gradient_penalty
from genlab.models.base import GenerativeModel


def per_sample(net: nn.Module) -> bool:
    """Whether each image's output depends on that image alone in training mode: not with batch norm.
    A network with another batch statistic says so with an attribute ``per_sample = False``."""
    return getattr(net, "per_sample", not any(isinstance(m, _BatchNorm) for m in net.modules()))


@contextlib.contextmanager
def frozen_statistics(net: nn.Module):
    """Batch norm normalises with the batch's statistics as in training, but leaves the running ones alone."""
    norms = [m for m in net.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


class GAN(GenerativeModel):
    """Generator ``g(z)`` with outputs in [-1, 1]; discriminator ``d(x)`` returning logits [B].

    Each step updates the discriminator once; the generator is updated every ``n_critic`` steps. The
    discriminator sees real and fake images in one pass when it is per-sample (half the kernel launches);
    with batch norm, in separate passes, so that its generator-step pass (on fakes alone, batch statistics
    frozen) normalises as its discriminator-step pass on fakes did.
    """

    scores = ("critic",)

    def __init__(self, generator: nn.Module, discriminator: nn.Module, loss: GANLoss, n_critic: int = 1):
        super().__init__()
        if n_critic < 1:
            raise GenlabError(f"model.n_critic must be at least 1; got {n_critic}.")
        self.g, self.d = generator, discriminator
        self.z_dim = generator.z_dim
        self.loss, self.n_critic = loss, n_critic
        self.joint = per_sample(discriminator)

    def optimizer_groups(self):
        return {"g": self.g.parameters(), "d": self.d.parameters()}

    def critic(self, real: Tensor, fake: Tensor) -> tuple[Tensor, Tensor]:
        """The discriminator's logits on real and fake images, in fp32."""
        if self.joint:
            return self.d(torch.cat([real, fake])).float().chunk(2)
        return self.d(real).float(), self.d(fake).float()

    def training_step(self, batch, ctx) -> dict[str, Tensor]:
        x = batch.x * 2 - 1  # the generator's Tanh range
        z = torch.randn(x.shape[0], self.z_dim, device=x.device)
        with ctx.autocast():
            fake = self.g(z)
            real_logits, fake_logits = self.critic(x, fake.detach())
            loss_d = self.loss.d(real_logits, fake_logits)
            if self.loss.gp_weight:
                loss_d = loss_d + self.loss.gp_weight * gradient_penalty(self.d, x, fake.detach())
        ctx.backward(loss_d, "d")
        ctx.step("d")
        out = {"loss_d": loss_d.detach()}
        if ctx.step_index % self.n_critic == 0:
            with ctx.autocast(), frozen_statistics(self.d):
                if self.loss.needs_real:
                    real_logits, fake_logits = self.critic(x, fake)
                else:
                    real_logits, fake_logits = None, self.d(fake).float()
                loss_g = self.loss.g(fake_logits, real_logits)
            ctx.backward(loss_g, "g")  # into the generator's weights only
            ctx.step("g")
            out["loss_g"] = loss_g.detach()
        return out

    def latent(self, n, generator=None):
        return torch.randn(n, self.z_dim, generator=generator)

    def generate(self, z, labels=None):
        return (self.g(z).float() + 1) / 2

    def anomaly_score(self, x: Tensor, score: str | None = None) -> Tensor:
        """``critic``: minus the discriminator's logit, so images it finds unreal score high."""
        return -self.d(x * 2 - 1).float()
