"""Regularizers of a GAN's discriminator: each adds a term to its loss (genlab.models.GAN's ``regularizers``).

A regularizer is called as ``regularizer(critic, real, fake, step)``: ``critic`` maps images in [-1, 1] to the
discriminator's logits as it sees them in training (augmented, conditioned), ``real`` and ``fake`` are this
step's batches and ``step`` the optimisation steps done before this one. It returns the term to add, or None on
a step where it adds nothing (a lazy one). A regularizer of your own is such a callable and a YAML file in
configs/regularizer/ naming it.
"""

import torch
from torch import Tensor

from genlab.errors import GenlabError
from genlab.losses import gradient_penalty


class GradientPenalty:
    """WGAN-GP (Gulrajani et al. 2017): ``weight`` * (||grad critic(x)|| - 1)^2 at random points between real and
    fake images (genlab.losses.gradient_penalty). ``loss.gp_weight`` adds one to any GAN loss."""

    def __init__(self, weight: float = 10.0):
        if weight < 0:
            raise GenlabError(f"the gradient penalty's weight must be at least 0; got {weight}.")
        self.weight = weight

    def __call__(self, critic, real: Tensor, fake: Tensor, step: int) -> Tensor:
        return self.weight * gradient_penalty(critic, real, fake)


class R1:
    """R1 (Mescheder et al. 2018): ``gamma`` / 2 * ||grad critic(x)||^2 on real images, which keeps the
    discriminator flat where the data is. Lazily, as in StyleGAN2: every ``every`` steps, weighted by ``every``,
    so that on average it weighs what it would every step, at a fraction of the cost."""

    def __init__(self, gamma: float = 10.0, every: int = 16):
        if gamma < 0 or every < 1:
            raise GenlabError(f"{type(self).__name__} needs gamma >= 0 and every >= 1; got gamma={gamma}, every={every}.")
        self.gamma, self.every = gamma, every

    def images(self, real: Tensor, fake: Tensor) -> Tensor:
        return real

    def __call__(self, critic, real: Tensor, fake: Tensor, step: int) -> Tensor | None:
        if step % self.every:
            return None
        x = self.images(real, fake).detach().float().requires_grad_(True)
        (grad,) = torch.autograd.grad(critic(x).float().sum(), x, create_graph=True)
        return 0.5 * self.gamma * self.every * grad.pow(2).flatten(1).sum(1).mean()


class R2(R1):
    """R1's penalty on the fake images instead (Roth et al. 2017; R3GAN pairs it with R1): the discriminator kept
    flat where the generator's images are too."""

    def images(self, real: Tensor, fake: Tensor) -> Tensor:
        return fake
