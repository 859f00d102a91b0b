"""GANs: a generator and a discriminator (or critic) trained with a genlab.losses.GANLoss."""

import contextlib

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from genlab.errors import GenlabError
from genlab.losses import GANLoss
from genlab.models.base import GenerativeModel
from genlab.regularizers import GradientPenalty


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

    Class-conditional with ``num_classes`` > 0 (a cGAN): both networks take the labels, ``g(z, y)`` and
    ``d(x, y)``; fakes are drawn for the real batch's labels, so each class is as common among them as in the data.

    The discriminator's step is open: ``augment`` (a differentiable function of a batch of images in [-1, 1], such
    as DiffAugment's) is applied to real and fake images alike wherever the discriminator sees them in training,
    and each of ``regularizers`` (genlab.regularizers: R1, the gradient penalty; ``loss.gp_weight`` adds the
    latter) adds its term to the discriminator's loss. The anomaly score ``critic`` asks ``discriminate``.
    """

    default_score = "critic"

    def __init__(self, generator: nn.Module, discriminator: nn.Module, loss: GANLoss, n_critic: int = 1,
                 num_classes: int = 0, augment=None, regularizers: dict | None = None):
        super().__init__()
        if n_critic < 1:
            raise GenlabError(f"model.n_critic must be at least 1; got {n_critic}.")
        for name, net in (("generator", generator), ("discriminator", discriminator)):
            if getattr(net, "num_classes", 0) != num_classes:
                raise GenlabError(f"model.num_classes={num_classes} but the {name} has num_classes="
                                  f"{getattr(net, 'num_classes', 0)}; the model config passes ${{..num_classes}} to both "
                                  "networks (model=cgan), and only the DCGAN networks take labels.")
        self.g, self.d = generator, discriminator
        self.z_dim = generator.z_dim
        self.loss, self.n_critic, self.num_classes = loss, n_critic, num_classes
        self.joint = per_sample(discriminator)
        self.augment = augment
        self.regularizers = {**({"gp": GradientPenalty(loss.gp_weight)} if loss.gp_weight else {}), **(regularizers or {})}

    def optimizer_groups(self):
        return {"g": self.g.parameters(), "d": self.d.parameters()}

    def fakes(self, z: Tensor, y: Tensor | None) -> Tensor:
        """The generator's images in [-1, 1]; a conditional one given no labels draws every class in turn."""
        if not self.num_classes:
            return self.g(z)
        return self.g(z, torch.arange(len(z), device=z.device) % self.num_classes if y is None else y)

    def logits(self, x: Tensor, y: Tensor | None) -> Tensor:
        """The discriminator's logits [B] in fp32 (given the labels when conditional)."""
        return (self.d(x, y) if self.num_classes else self.d(x)).float()

    def seen(self, x: Tensor) -> Tensor:
        """Images as the discriminator sees them in training: augmented, when the model has an ``augment``."""
        return x if self.augment is None else self.augment(x)

    def critic(self, real: Tensor, fake: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The discriminator's logits on real and fake images (both of labels ``y``) as it sees them in training,
        in fp32."""
        if self.joint:
            return self.logits(self.seen(torch.cat([real, fake])), None if y is None else torch.cat([y, y])).chunk(2)
        return self.logits(self.seen(real), y), self.logits(self.seen(fake), y)

    def training_step(self, batch, ctx) -> dict[str, Tensor]:
        x = batch.x * 2 - 1  # the generator's Tanh range
        y = batch.y if self.num_classes else None
        z = torch.randn(x.shape[0], self.z_dim, device=x.device)
        out = {}
        for xc, zc, yc in ctx.chunks(x, z, y):
            with ctx.autocast():
                fake = self.fakes(zc, yc)
                real_logits, fake_logits = self.critic(xc, fake.detach(), yc)
                if hasattr(self.augment, "observe"):  # an adaptive augmentation learns how much the discriminator overfits
                    self.augment.observe(real_logits.detach(), ctx.step_index)
                loss_d = self.loss.d(real_logits, fake_logits)
                for regularizer in self.regularizers.values():
                    term = regularizer(lambda v: self.logits(self.seen(v), yc), xc, fake.detach(), ctx.step_index)
                    if term is not None:  # a lazy one adds its term every few steps only
                        loss_d = loss_d + term
            ctx.backward(loss_d, "d")
            ctx.tally(out, loss_d=loss_d)
        ctx.step("d")
        if getattr(self.augment, "target", None) is not None:  # an adaptive augmentation's strength, for metrics.csv
            out["aug_p"] = self.augment.p.clone()
        if ctx.step_index % self.n_critic == 0:
            for xc, zc, yc in ctx.chunks(x, z, y):
                with ctx.autocast(), frozen_statistics(self.d):
                    if ctx.share != 1:  # micro-batches: each one's fakes again (the generator has not changed)
                        fake = self.fakes(zc, yc)
                    if self.loss.needs_real:
                        real_logits, fake_logits = self.critic(xc, fake, yc)
                    else:
                        real_logits, fake_logits = None, self.logits(self.seen(fake), yc)
                    loss_g = self.loss.g(fake_logits, real_logits)
                ctx.backward(loss_g, "g")  # into the generator's weights only
                ctx.tally(out, loss_g=loss_g)
            ctx.step("g")
        return out

    def latent(self, n, generator=None):
        return torch.randn(n, self.z_dim, generator=generator)

    def generate(self, z, labels=None):
        return (self.fakes(z, labels).float() + 1) / 2

    def discriminate(self, x: Tensor) -> Tensor:
        """The discriminator's logit [B] of each image of ``x`` in [0, 1], unaugmented (conditional: its highest over
        the classes, the class the image looks most like): how real it finds them."""
        x = x * 2 - 1
        if not self.num_classes:
            return self.logits(x, None)
        y = torch.arange(self.num_classes, device=x.device)
        return torch.stack([self.logits(x, c.expand(x.shape[0])) for c in y]).amax(0)
