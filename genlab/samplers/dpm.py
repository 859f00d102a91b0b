"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models"), for any path x_t = alpha * x0 + sigma * noise: DDPM's and flow matching's alike."""

import math

from genlab.samplers.base import Sampler


def log_snr(alpha: float, sigma: float) -> float:
    """lambda = log(alpha / sigma): -inf at pure noise (flow matching's t = 1), +inf at the clean image."""
    if alpha == 0:
        return -math.inf
    if sigma == 0:
        return math.inf
    return math.log(alpha / sigma)


class DPMSolverPP(Sampler):
    """The probability-flow ODE solved exactly in its linear part, in log signal-to-noise time lambda, with the
    model's prediction of the image as the integrand: a first-order step is DDIM's; the multistep second-order
    correction extrapolates that prediction from the last two steps (one network evaluation a step). The last
    step, onto the clean image, is first order (the prediction itself), as DPM-Solver++ does for few steps.
    Guidance (``guidance`` > 1) stays stable here: that is what the data-prediction form is for."""

    name = "dpmpp_2m"
    needs = ("times", "coefficients", "denoise")

    def __call__(self, model, x, steps, labels=None, guidance=1.0):
        ts = model.times(steps)
        x = x.float()
        previous = None  # the last step's prediction of the image and its step in lambda
        for t, t_next in zip(ts, ts[1:]):
            x0, _ = model.denoise(x, t, labels, guidance)
            (a, s), (a_next, s_next) = (map(float, model.coefficients(u)) for u in (t, t_next))
            if s_next == 0:  # onto the clean image
                return x0
            h = log_snr(a_next, s_next) - log_snr(a, s)
            d = x0
            if previous is not None and math.isfinite(previous[1]):  # after flow's first step (h = inf): first order
                r = previous[1] / h
                d = x0 + (x0 - previous[0]) / (2 * r)
            decay = a * s_next / (a_next * s)  # exp(-h), 0 from pure noise
            x = (s_next / s) * x + a_next * (1 - decay) * d
            previous = (x0, h)
        return x
