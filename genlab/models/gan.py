"""GANs: a generator and a discriminator (or critic) trained with one of genlab.losses' pairs."""

import torch
from torch import Tensor, nn

from genlab.errors import GenlabError
from genlab.losses import GAN_LOSSES, gradient_penalty
from genlab.models.base import GenerativeModel


class GAN(GenerativeModel):
    """Generator ``g(z)`` with outputs in [-1, 1]; discriminator ``d(x)`` returning logits [B].

    Each step updates the discriminator once; the generator is updated every ``n_critic`` steps.
    """

    losses = tuple(GAN_LOSSES)
    scores = ("critic",)

    def __init__(self, generator: nn.Module, discriminator: nn.Module, loss: str = "bce",
                 gp_weight: float = 0.0, n_critic: int = 1):
        super().__init__()
        if loss not in GAN_LOSSES:
            raise GenlabError(f"a GAN trains with loss={'|'.join(GAN_LOSSES)}; got loss={loss}.")
        if n_critic < 1:
            raise GenlabError(f"model.n_critic must be at least 1; got {n_critic}.")
        self.g, self.d = generator, discriminator
        self.z_dim = generator.z_dim
        self.loss, self.gp_weight, self.n_critic = loss, gp_weight, n_critic
        self.d_loss, self.g_loss = GAN_LOSSES[loss]

    def optimizer_groups(self):
        return {"g": self.g.parameters(), "d": self.d.parameters()}

    def training_step(self, x: Tensor, ctx) -> dict[str, Tensor]:
        x = x * 2 - 1  # the generator's Tanh range
        z = torch.randn(x.shape[0], self.z_dim, device=x.device)
        with ctx.autocast():
            fake = self.g(z)
            # one discriminator pass over real and fake together: half the kernel launches
            real_logits, fake_logits = self.d(torch.cat([x, fake.detach()])).float().chunk(2)
            loss_d = self.d_loss(real_logits, fake_logits)
            if self.gp_weight:
                loss_d = loss_d + self.gp_weight * gradient_penalty(self.d, x, fake.detach())
        ctx.step("d", loss_d)
        out = {"loss_d": loss_d.detach()}
        if ctx.step_index % self.n_critic == 0:
            self.d.requires_grad_(False)  # no discriminator weight gradients in the generator step
            with ctx.autocast():
                loss_g = self.g_loss(self.d(fake).float())
            ctx.step("g", loss_g)
            self.d.requires_grad_(True)
            out["loss_g"] = loss_g.detach()
        return out

    def latent(self, n, generator=None):
        return torch.randn(n, self.z_dim, generator=generator)

    def generate(self, z):
        return (self.g(z).float() + 1) / 2

    def anomaly_score(self, x: Tensor, score: str | None = None) -> Tensor:
        """``critic``: minus the discriminator's logit, so images it finds unreal score high."""
        return -self.d(x * 2 - 1).float()
