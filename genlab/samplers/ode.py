"""Euler's and Heun's methods on the model's velocity: its path as an ordinary differential equation in its time."""

from genlab.samplers.base import Sampler


class Euler(Sampler):
    """x <- x + (t' - t) * v(x, t): one network evaluation a step."""

    name = "euler"
    needs = ("times", "velocity")

    def rate(self, model, x, t, t_next, labels, guidance):
        """How fast x moves on the step from t to t_next: here the velocity where it starts."""
        return model.velocity(x, t, labels, guidance)

    def __call__(self, model, x, steps, labels=None, guidance=1.0):
        ts = model.times(steps)
        x = x.float()
        for t, t_next in zip(ts, ts[1:]):
            x = x + (t_next - t) * self.rate(model, x, t, t_next, labels, guidance)
        return x


class Heun(Sampler):
    """Heun's method: an Euler step, then the mean of the velocities at both of its ends (two evaluations a step,
    one on the last, where the path ends)."""

    name = "heun"
    needs = ("times", "velocity")

    def evaluations(self, steps):
        return 2 * steps - 1

    def __call__(self, model, x, steps, labels=None, guidance=1.0):
        ts = model.times(steps)
        x = x.float()
        for i, (t, t_next) in enumerate(zip(ts, ts[1:])):
            v = model.velocity(x, t, labels, guidance)
            x_next = x + (t_next - t) * v
            if i + 2 < len(ts):
                x_next = x + (t_next - t) * 0.5 * (v + model.velocity(x_next, t_next, labels, guidance))
            x = x_next
        return x


class Shortcut(Euler):
    """x <- x + (t' - t) * jump(x, t, t'): the model's mean velocity over the whole step, which a shortcut model
    learns (genlab.models.FlowMatching with ``shortcut`` or ``mean_flow``), so 1 to 4 steps give an image; on a
    model trained without either, Euler's method. One network evaluation a step."""

    name = "shortcut"
    needs = ("times", "jump")

    def rate(self, model, x, t, t_next, labels, guidance):
        return model.jump(x, t, t_next, labels, guidance)
