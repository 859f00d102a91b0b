"""The interface the shared training loop, `sample` and `evaluate` use."""

import inspect
import math
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from genlab.data import Batch
from genlab.scores import Score, score_for, score_names


class GenerativeModel(nn.Module):
    """A model owns its training step; the loop owns everything else.

    Images cross this interface as floats in [0, 1], shape [B, C, H, W]; labels as int64 [B].
    ``num_classes`` > 0 marks a class-conditional model: it samples the classes it is given.
    Sampling settings (a diffusion model's ``steps``, say) are the keyword-only parameters of
    ``generate``, with their defaults; `genlab sample`, `evaluate` and the per-epoch grids pass them.

    Anomaly scores are parts (genlab.scores): a score works for any model that offers what it needs (a
    reconstruction, the ELBO's terms, a denoising error, a discriminator), and ``default_score`` names the one
    used when none is chosen. A model of your own may instead compute its scores itself: list their names in
    ``scores`` and override ``anomaly_score`` (and ``calibrate``, where they need normal images first).
    """

    num_classes: int = 0
    generates: bool = True  # False: a model that only scores images (an anomaly detector): no sample grids, no FID
    default_score: str | None = None  # a name in configs/score/, or one of ``scores``
    scores: tuple[str, ...] = ()  # the scores this model's own ``anomaly_score`` computes (a model of your own)
    untraceable: str | None = None  # why `genlab export` cannot make graphs of its networks, where it cannot

    def optimizer_groups(self) -> dict[str, Iterable[nn.Parameter]]:
        """The parameters each named optimizer steps, e.g. {"g": ..., "d": ...}."""
        raise NotImplementedError

    def training_step(self, batch: Batch, ctx) -> dict[str, Tensor]:
        """One optimisation step on ``batch`` (``batch.x`` images, ``batch.y`` labels) with the step context
        ``ctx`` (genlab.step.StepContext); returns detached scalar losses by name."""
        raise NotImplementedError

    def latent(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws from the prior, on the CPU (move them to the model's device)."""
        raise NotImplementedError

    def generate(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        """Images in [0, 1] from latents ``z`` (and, for a conditional model, their ``labels``)."""
        raise NotImplementedError

    def anomaly_score(self, x: Tensor, score: str | None = None) -> Tensor:
        """How unusual each image of ``x`` is (higher: more anomalous), [B]: genlab's score ``score`` (its name in
        configs/score/; None: ``default_score``), calibrated by the last ``calibrate``."""
        return self._score(score)(self, x)

    def calibrate(self, x: Tensor) -> None:
        """Show the scores that need their scale (blur_kl, corrected) normal training images ``x``."""
        for name in score_names(self, own=False):
            self._score(name).calibrate(self, x)

    def _score(self, name: str | None) -> Score:
        """genlab's score ``name`` for this model, kept with its calibration."""
        kept = self.__dict__.setdefault("_calibrated", {})
        name = name or self.default_score
        if name not in kept:
            kept[name] = score_for(self, name, own=False)
        return kept[name]

    @classmethod
    def sampling_settings(cls) -> dict[str, Any]:
        """The settings ``generate`` takes, with their defaults."""
        params = inspect.signature(cls.generate).parameters.values()
        return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}

    @torch.inference_mode()
    def sample(self, n: int, labels: Tensor | None = None, generator: torch.Generator | None = None,
               **settings) -> Tensor:
        device = next(self.parameters()).device
        if labels is not None:
            labels = labels.to(device)
        return self.generate(self.latent(n, generator).to(device), labels, **settings)


def balanced_labels(n: int, num_classes: int) -> Tensor | None:
    """``n`` labels taking every class in turn (None for an unconditional model)."""
    return torch.arange(n) % num_classes if num_classes else None


def grid_labels(n: int, num_classes: int) -> tuple[Tensor | None, int]:
    """Labels and images per row for a grid of about ``n`` samples: a conditional model's grid shows one
    class per row (``n`` rounded to whole rows); an unconditional one is a square of ``n``."""
    if not num_classes:
        return None, math.ceil(math.sqrt(n))
    per_class = max(1, round(n / num_classes))
    return torch.arange(num_classes).repeat_interleave(per_class), per_class
