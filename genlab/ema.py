"""An exponential moving average of a model's weights, the copy that samples best (Polyak averaging)."""

import copy

import torch
from torch import Tensor, nn

from genlab.errors import GenlabError


class EMA:
    """``model`` is a copy of the trained model, kept in eval mode, never trained and never compiled (make
    the EMA before compiling). After each applied step, ``update`` moves its parameters toward the trained
    ones: ``ema = d * ema + (1 - d) * weights`` with ``d = min(decay, (1 + t) / (10 + t))`` at the t-th update
    when ``warmup`` is on, so that the average follows the weights closely at first instead of holding on
    to its random start; buffers (batch-norm statistics) are copied as they are."""

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise GenlabError(f"trainer.ema.decay must be at least 0 and below 1 (e.g. 0.999), or null for none; "
                              f"got {decay}.")
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup = decay, warmup
        self.updates = 0

    def current_decay(self) -> float:
        t = self.updates
        return min(self.decay, (1 + t) / (10 + t)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, applied: bool | Tensor = True) -> None:
        """``applied``: under fp16 a device flag, false when the scaler skipped an update of this step; the
        average then stays as it was, and finding that out costs no host sync. (The warm-up counts the step.)"""
        weight = 1.0 - self.current_decay()
        mine, theirs = list(self.model.parameters()), list(model.parameters())
        if isinstance(applied, Tensor):  # ema += (weights - ema) * weight * applied, all on the device
            delta = torch._foreach_sub(theirs, mine)
            torch._foreach_mul_(delta, applied.float() * weight)
            torch._foreach_add_(mine, delta)
        else:
            torch._foreach_lerp_(mine, theirs, weight)
        for b, source in zip(self.model.buffers(), model.buffers()):
            b.copy_(source)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]
