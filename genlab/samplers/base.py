"""What every sampler shares, and how one is made from its name, its config node or itself."""

from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from genlab.config import make, option, options
from genlab.errors import GenlabError

# what a denoising model may offer a sampler (genlab.models.diffusion.Denoiser offers all but velocity for DDPM)
OFFERS = {
    "times": "times(steps): its path's times from noise to the image, steps + 1 of them",
    "coefficients": "coefficients(t): (alpha, sigma), where x_t = alpha * image + sigma * noise",
    "denoise": "denoise(x, t, labels, guidance): its predictions of the image and of the noise",
    "velocity": "velocity(x, t, labels, guidance): dx/dt along its path",
    "jump": "jump(x, t, t_next, labels, guidance): its mean velocity from t to t_next (a shortcut or MeanFlow model's)",
}


class Sampler:
    """Walks a model's path from noise ``x`` to an image in ``steps`` steps: ``sampler(model, x, steps, labels,
    guidance)`` returns the image in the model's own range (the model clamps and rescales it). ``needs``: the
    methods of the model it calls (OFFERS)."""

    name = ""  # its name in configs/sampler/, for messages
    needs: tuple[str, ...] = ()

    def evaluations(self, steps: int) -> int:
        """Network evaluations for ``steps`` steps."""
        return steps

    def check(self, model) -> None:
        missing = [n for n in self.needs if not callable(getattr(model, n, None))]
        if missing:
            what = "; ".join(OFFERS.get(n, n) for n in missing)
            raise GenlabError(f"sampler={self.name or type(self).__name__} needs a model that offers {what}; "
                              f"{type(model).__name__} does not. Its samplers: {', '.join(sampler_names(model))}.")

    def __call__(self, model, x: Tensor, steps: int, labels: Tensor | None = None, guidance: float = 1.0) -> Tensor:
        raise NotImplementedError


def sampler_names(model) -> list[str]:
    """genlab's samplers (configs/sampler/) that ``model`` offers what they need for."""
    fitting = []
    for name in options("sampler"):
        sampler = make(option("sampler", name), f"sampler={name}")
        if all(callable(getattr(model, n, None)) for n in sampler.needs):
            fitting.append(name)
    return fitting


def make_sampler(choice, **settings) -> Sampler:
    """The sampler ``choice`` names: a name of genlab's (``heun``), a ``_target_`` node (a config group's choice, a
    sampler of your own), or a Sampler. ``settings`` (a model's sampling settings that belong to its sampler, such
    as DDIM's ``eta``) go to the sampler's constructor, which must take them."""
    if isinstance(choice, Sampler):
        if settings:
            raise GenlabError(f"{', '.join(settings)}: give {type(choice).__name__} its settings when you make it.")
        return choice
    node = option("sampler", choice) if isinstance(choice, str) else choice
    spec = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    return make({**spec, **settings}, "sampler")
