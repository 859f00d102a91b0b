"""A sampler of your own: the explicit midpoint method on a model's velocity (second order, two network
evaluations a step). `configs/sampler/midpoint.yaml` names it; `genlab sample --config-dir configs ckpt=RUN
sampler=midpoint steps=10` uses it on any model that offers what it asks for (flow matching does)."""

from genlab.samplers import Sampler


class Midpoint(Sampler):
    name = "midpoint"
    needs = ("times", "velocity")  # the model's methods it calls; one without them is refused in one line

    def evaluations(self, steps):
        return 2 * steps

    def __call__(self, model, x, steps, labels=None, guidance=1.0):
        ts = model.times(steps)  # from noise to the image
        x = x.float()
        for t, t_next in zip(ts, ts[1:]):
            half = (t_next - t) / 2
            x_mid = x + half * model.velocity(x, t, labels, guidance)
            x = x + (t_next - t) * model.velocity(x_mid, t + half, labels, guidance)
        return x
