"""The interface the shared training loop, `sample` and `evaluate` use."""

from typing import Iterable, Protocol

import torch
from torch import Tensor, nn


class StepContext(Protocol):
    """What the training loop hands a model each step (see genlab.trainer.Trainer)."""

    step_index: int  # optimisation steps done before this one

    def autocast(self): ...  # the run's mixed-precision context

    def step(self, name: str, loss: Tensor) -> None: ...  # backward + step for one optimizer


class GenerativeModel(nn.Module):
    """A model owns its training step; the loop owns everything else.

    Images cross this interface as floats in [0, 1], shape [B, C, H, W].
    """

    losses: tuple[str, ...] = ()  # the loss configs (loss=NAME) this model trains with
    scores: tuple[str, ...] = ()  # anomaly scores it offers (evaluate score=NAME); the first is the default

    def optimizer_groups(self) -> dict[str, Iterable[nn.Parameter]]:
        """The parameters each named optimizer steps, e.g. {"g": ..., "d": ...}."""
        raise NotImplementedError

    def training_step(self, x: Tensor, ctx: StepContext) -> dict[str, Tensor]:
        """One optimisation step on the batch ``x``; returns detached scalar losses by name."""
        raise NotImplementedError

    def latent(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws from the prior, on the CPU (move them to the model's device)."""
        raise NotImplementedError

    def generate(self, z: Tensor) -> Tensor:
        """Images in [0, 1] from latents ``z``."""
        raise NotImplementedError

    def anomaly_score(self, x: Tensor, score: str | None = None) -> Tensor:
        """How unusual each image of ``x`` is (higher: more anomalous): [B]."""
        raise NotImplementedError

    def calibrate(self, x: Tensor) -> None:
        """See normal training images ``x`` before scoring; for scores that need their scale. Optional."""

    @torch.inference_mode()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        device = next(self.parameters()).device
        return self.generate(self.latent(n, generator).to(device))
