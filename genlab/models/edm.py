"""EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"): diffusion on the
path x = image + sigma * noise, with the network wrapped so that its input, output and target have unit variance
at every noise level, and noise levels drawn where training helps most."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genlab.errors import GenlabError
from genlab.models.diffusion import Denoiser
from genlab.samplers import Sampler


class EDM(Denoiser):
    """The denoiser D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), F the UNet (EDM's preconditioning, with
    ``sigma_data`` the data's standard deviation: 0.5 for images in [-1, 1]). Training draws ln sigma from
    N(``p_mean``, ``p_std``²) and asks F for (image - c_skip x) / c_out, which weights every noise level as EDM's
    loss does. Sampling walks sigma from ``sigma_max`` to 0 on Karras' schedule (``rho``), by default with Heun's
    method, as the paper does (``dpmpp_2m``, ``ddim`` and ``euler`` fit the path too).

    The network is told c_noise = ln(sigma) / 4 in thousandths, as DDPM's and flow's networks are told their
    times."""

    def __init__(self, unet: nn.Module, sigma_data: float = 0.5, p_mean: float = -1.2, p_std: float = 1.2,
                 sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, num_classes: int = 0,
                 p_uncond: float = 0.1, clip: float | None = 1.0, guidance: float = 1.0):
        super().__init__(unet, num_classes, p_uncond, clip, guidance)
        if not 0 < sigma_min < sigma_max:
            raise GenlabError(f"model.sigma_min and model.sigma_max must satisfy 0 < sigma_min < sigma_max; got "
                              f"{sigma_min} and {sigma_max}.")
        if sigma_data <= 0 or p_std <= 0 or rho <= 0:
            raise GenlabError(f"model.sigma_data, model.p_std and model.rho must be above 0; got {sigma_data}, {p_std} "
                              f"and {rho}.")
        self.sigma_data, self.p_mean, self.p_std = sigma_data, p_mean, p_std
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """c_skip, c_out, c_in and the network's time input at noise levels ``sigma`` [B], shaped to broadcast."""
        s2, d2 = sigma.pow(2), self.sigma_data ** 2
        c_skip = d2 / (s2 + d2)
        c_out = sigma * self.sigma_data / (s2 + d2).sqrt()
        c_in = 1 / (s2 + d2).sqrt()
        view = (-1, 1, 1, 1)
        return c_skip.view(view), c_out.view(view), c_in.view(view), 250 * sigma.log()

    def noised(self, x0, noise, sigma):
        """The network's input, its time input and its target at noise levels ``sigma`` [B]."""
        c_skip, c_out, c_in, t_in = self.scalings(sigma)
        x = x0 + sigma.view(-1, 1, 1, 1) * noise
        return c_in * x, t_in, (x0 - c_skip * x) / c_out

    def training_step(self, batch, ctx):
        x0 = batch.x * 2 - 1
        sigma = (self.p_mean + self.p_std * torch.randn(len(x0), device=x0.device)).exp()
        xt, t_in, target = self.noised(x0, torch.randn_like(x0), sigma)
        out = {}
        for xt, t_in, target, labels in ctx.chunks(xt, t_in, target, self.train_labels(batch.y)):
            with ctx.autocast():
                loss = F.mse_loss(self.unet(xt, t_in, labels).float(), target)
            ctx.backward(loss, "unet")
            ctx.tally(out, loss=loss)
        self.step_unet(ctx)
        return out

    def denoise_errors(self, x: Tensor, times, seed: int = 0, per_pixel: bool = False) -> Tensor:
        """As every denoiser's, with each fraction of the path read as a point on the sampling schedule."""
        return super().denoise_errors(x, [self.schedule_sigma(float(f)) for f in times], seed, per_pixel)

    def schedule_sigma(self, frac: float) -> float:
        """The noise level a fraction ``frac`` of the way from the clean image (0) to pure noise (1) on Karras'
        schedule."""
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (lo + frac * (hi - lo)) ** self.rho

    def generate(self, z, labels=None, *, sampler: str | Sampler = "heun", steps: int = 18, eta: float | None = None,
                 guidance: float | None = None):
        """18 Heun steps (35 network evaluations) by default, EDM's choice for 32-pixel images."""
        return self.walk(z * self.sigma_max, labels, sampler, steps, eta, guidance)

    def times(self, steps: int) -> list[float]:
        """``steps`` noise levels from sigma_max down to sigma_min on Karras' schedule, then 0: the image."""
        if steps == 1:
            return [self.sigma_max, 0.0]
        return [self.schedule_sigma(1 - i / (steps - 1)) for i in range(steps)] + [0.0]

    def coefficients(self, t: float):
        return 1.0, t

    def denoise(self, x: Tensor, t: float, labels, guidance: float) -> tuple[Tensor, Tensor]:
        """The predicted image, clamped to [-1, 1], and the noise that goes with it at noise level ``t``."""
        sigma = x.new_full(x.shape[:1], t, dtype=torch.float32)
        c_skip, c_out, c_in, t_in = self.scalings(sigma)
        x0 = (c_skip * x + c_out * self.predict(c_in * x, t_in, labels, guidance)).clamp(-1, 1)
        return x0, (x - x0) / t

    def velocity(self, x: Tensor, t: float, labels, guidance: float) -> Tensor:
        """dx/dsigma of the probability-flow ODE: (x - D(x; sigma)) / sigma, the noise the denoiser sees."""
        return self.denoise(x, t, labels, guidance)[1]

