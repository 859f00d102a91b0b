"""Learning-rate schedules: the factor each optimizer's learning rate is multiplied by at a step.

A schedule is any callable ``schedule(step, total) -> factor``, where ``step`` counts the run's
training steps from 0 and ``total`` is the run's number of steps; a ``scheduler/*.yaml`` config
names one by ``_target_``. genlab wraps it in a ScheduledLR (a torch LambdaLR) per optimizer, stepped
once per training step, whose state goes into the checkpoint.

genlab's own take ``warmup`` (steps of linear warm-up) and ``steps``: the length the schedule runs
over, by default the run's. Set it to plan a schedule longer than one run: a resumed run given
more epochs otherwise stretches what is left of the schedule over its new length (ScheduledLR; the
``step`` it passes is then fractional).
"""

import math

from torch.optim.lr_scheduler import LambdaLR

from genlab.errors import GenlabError


class Schedule:
    """A linear warm-up from lr/warmup to lr over ``warmup`` steps, then ``shape(t)`` for t from 0 (the first
    step after the warm-up) to 1 (the last step of ``steps``, or of the run when it is None)."""

    def __init__(self, warmup: int = 0, steps: int | None = None):
        if warmup < 0 or (steps is not None and steps < 1):
            raise GenlabError(f"scheduler.warmup must be at least 0 and scheduler.steps at least 1 (or null); got "
                              f"warmup={warmup}, steps={steps}.")
        self.warmup, self.steps = warmup, steps

    def __call__(self, step: int, total: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        last = (self.steps or total) - 1
        return self.shape(min(1.0, (step - self.warmup) / max(1, last - self.warmup)))

    def shape(self, t: float) -> float:
        raise NotImplementedError


class Constant(Schedule):
    """The configured learning rate throughout, after the warm-up."""

    def shape(self, t):
        return 1.0


class Decay(Schedule):
    """Down from the configured learning rate to ``final`` times it at the last step."""

    def __init__(self, warmup: int = 0, steps: int | None = None, final: float = 0.0):
        super().__init__(warmup, steps)
        if final < 0:
            raise GenlabError(f"scheduler.final is a fraction of the learning rate, at least 0; got {final}.")
        self.final = final


class Cosine(Decay):
    """Half a cosine from 1 down to ``final``."""

    def shape(self, t):
        return self.final + (1 - self.final) * 0.5 * (1 + math.cos(math.pi * t))


class Linear(Decay):
    """A straight line from 1 down to ``final``."""

    def shape(self, t):
        return 1 + (self.final - 1) * t


class ScheduledLR(LambdaLR):
    """torch's LambdaLR following ``schedule(step, total)`` over a run of ``total`` steps. Its state holds the run's
    length, so that a run resumed with another length takes the schedule up where it was and stretches what is left
    of it over what is left of the run; a schedule with its own ``steps`` keeps its own clock."""

    def __init__(self, optimizer, schedule, total: int):
        self.schedule, self.total = schedule, total
        # from run step `anchor` on, the schedule's clock goes from `at` to the last step of a run of `length` steps
        self.anchor, self.at, self.length = 0, 0.0, total
        super().__init__(optimizer, lambda step: self.schedule(self.position(step), self.length))

    def position(self, step: int) -> float:
        """Where the schedule's clock is at run step ``step``."""
        return self.at + (step - self.anchor) * (self.length - 1 - self.at) / max(1, self.total - 1 - self.anchor)

    def state_dict(self) -> dict:
        state = super().state_dict()
        del state["schedule"]  # code, not data: the config rebuilds it
        return state

    def load_state_dict(self, state: dict) -> None:
        total = self.total
        super().load_state_dict(state)  # the stored run's length and clock (an older checkpoint has neither: recomputed)
        if getattr(self.schedule, "steps", None) is not None:  # its own length: nothing to stretch
            self.anchor, self.at, self.length = 0, 0.0, total
        elif self.total != total:
            self.at, self.anchor = self.position(self.last_epoch), self.last_epoch
        self.total = total
