"""The one place that turns config into objects. Everything it builds takes plain arguments."""

from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from genlab.data import ImageData
from genlab.errors import GenlabError
from genlab.models import GenerativeModel


def _instantiate(node: DictConfig, **kwargs):
    """hydra's instantiate, with genlab's own errors passed through and others made readable."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, GenlabError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise GenlabError(str(e).strip().replace("\n", " ")) from e


def build_model(cfg: DictConfig) -> GenerativeModel:
    """The model of ``cfg.model``, trained with ``cfg.loss`` (name and its settings)."""
    loss = OmegaConf.to_container(cfg.loss, resolve=True)
    name = loss.pop("name")
    try:
        cls = get_class(cfg.model._target_)
    except Exception as e:
        raise GenlabError(f"model: cannot import {cfg.model._target_}: {e}") from e
    if name not in cls.losses:
        raise GenlabError(
            f"{cls.__name__} models train with loss={'|'.join(cls.losses)}; loss={name} does not fit. "
            f"Choose one of those, or a model that takes {name}."
        )
    return _instantiate(cfg.model, loss=name, **loss)


def build_optimizers(cfg: DictConfig, model: GenerativeModel) -> dict:
    """One torch optimizer per network group of the model, with per-network overrides (``nets``)."""
    spec = OmegaConf.to_container(cfg, resolve=True)
    cls = get_class(spec.pop("_target_"))
    per_net = spec.pop("nets", None) or {}
    groups = model.optimizer_groups()
    unknown = sorted(set(per_net) - set(groups))
    if unknown:
        raise GenlabError(
            f"optimizer.nets names {', '.join(unknown)}, but this model's networks are {', '.join(groups)}."
        )

    def make(name, params):
        kwargs = {**spec, **per_net.get(name, {})}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
        try:
            return cls(params, **kwargs)
        except (TypeError, ValueError) as e:
            raise GenlabError(f"optimizer {cls.__name__} for network '{name}': {e}") from e

    return {name: make(name, params) for name, params in groups.items()}


def build_dataset(cfg: DictConfig, train: bool = True) -> ImageData:
    return _instantiate(cfg, train=train)


def load_model(ckpt, device="cpu") -> tuple[GenerativeModel, DictConfig, dict]:
    """Rebuild a model from a checkpoint alone: its stored config, then its weights (eval mode)."""
    from genlab import checkpoint

    state = checkpoint.load(ckpt)
    cfg = OmegaConf.create(state["config"])
    model = build_model(cfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise GenlabError(f"the weights in {ckpt} do not fit the model its config describes: {str(e).splitlines()[0]}") from e
    return model.to(device).eval(), cfg, state


def test_split(cfg: DictConfig, root=None, classes=None, train=False) -> ImageData:
    """The test split (or ``train=True``: the training split) of a run's dataset, all classes unless
    ``classes``, optionally read from another root."""
    node = OmegaConf.create(OmegaConf.to_container(cfg.dataset))
    node.classes = list(classes) if classes is not None else None
    if root is not None:
        node.root = root
    return build_dataset(node, train=train)
