"""Samplers: how a denoising model's path is walked from noise to an image, one class each.

A sampler asks the model for what it needs, never for its class: DDIM, ancestral sampling and DPM-Solver++ for
the model's prediction of the image and the noise (``denoise``) and the path's coefficients; Euler and Heun for its
velocity; the shortcut sampler for its mean velocity over a whole step (``jump``).
So one sampler serves DDPM and flow matching wherever the maths allows. `genlab sample sampler=heun`, `genlab
evaluate sampler=...` and the per-epoch grids (``trainer.sampling.sampler``) choose one by its name in
configs/sampler/; a sampler of your own is a class with the same ``__call__`` and a YAML file naming it.
"""

from genlab.samplers.base import Sampler, make_sampler, sampler_names
from genlab.samplers.ddim import DDIM, Ancestral
from genlab.samplers.dpm import DPMSolverPP
from genlab.samplers.ode import Euler, Heun, Shortcut

__all__ = ["Sampler", "DDIM", "Ancestral", "DPMSolverPP", "Euler", "Heun", "Shortcut", "make_sampler", "sampler_names"]
