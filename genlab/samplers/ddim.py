"""DDIM (Song et al. 2021) and ancestral sampling (Ho et al. 2020), for any path x_t = alpha * x0 + sigma * noise."""

import torch

from genlab.samplers.base import Sampler


class DDIM(Sampler):
    """Each step moves to the next time along the model's predictions of the image and the noise; ``eta`` in [0, 1]
    adds fresh noise (0: deterministic, the probability-flow ODE; 1: ancestral sampling). For flow matching's
    straight path, eta 0 is Euler's method."""

    name = "ddim"
    needs = ("times", "coefficients", "denoise")

    def __init__(self, eta: float = 0.0):
        self.eta = eta

    def __call__(self, model, x, steps, labels=None, guidance=1.0):
        ts = model.times(steps)
        x = x.float()
        for i, (t, t_next) in enumerate(zip(ts, ts[1:])):
            x0, eps = model.denoise(x, t, labels, guidance)
            a_next, s_next = model.coefficients(t_next)
            if not self.eta:
                x = a_next * x0 + s_next * eps
                continue
            a, s = model.coefficients(t)
            # the std of q(x_t' | x_t, x0), times eta: for a variance-preserving path, DDIM's sigma
            sigma = self.eta * s_next * torch.as_tensor(1 - (a * s_next / (a_next * s)) ** 2).clamp(min=0).sqrt()
            x = a_next * x0 + torch.as_tensor(s_next**2 - sigma**2).clamp(min=0).sqrt() * eps
            if i + 2 < len(ts):  # no noise into the finished image
                x = x + sigma * torch.randn_like(x)
        return x


class Ancestral(DDIM):
    """Ancestral sampling: DDIM with eta 1, each step drawing from the model's posterior (with a thousand steps on
    DDPM's schedule, Ho et al.'s sampler)."""

    name = "ddpm"

    def __init__(self):
        super().__init__(eta=1.0)
