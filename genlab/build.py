"""The one place that turns config into objects. Everything it builds takes plain arguments."""

import inspect
import types
import typing

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_method, instantiate
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


def check_settings(target, settings: dict, where: str, given=()) -> None:
    """Every setting must be a parameter of ``target`` (a class or function) and fit its type annotation;
    nested ``_target_`` nodes are checked too. A typo or a wrong type is one clear line here, not a
    traceback from deep inside a constructor. ``given``: parameters genlab passes itself (or another
    config node sets), which this node may not."""
    params = {k: p for k, p in inspect.signature(target).parameters.items() if k not in given}
    try:
        hints = typing.get_type_hints(target.__init__ if isinstance(target, type) else target)
    except Exception:  # annotations this Python cannot evaluate: names are still checked
        hints = {}
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params.values())
    name = getattr(target, "__qualname__", str(target))
    for key, value in settings.items():
        if key.startswith("_"):  # _target_, _partial_, ...
            continue
        if key not in params and not open_ended:
            known = ", ".join(k for k, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD or p.kind is p.KEYWORD_ONLY)
            raise GenlabError(f"{where}.{key} is not a setting of {name}; its settings are: {known}.")
        allowed = _plain_types(hints.get(key))
        if allowed and not any(_fits(value, t) for t in allowed):
            wanted = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise GenlabError(f"{where}.{key} must be {wanted}; got {value!r}.")
        if isinstance(value, dict) and "_target_" in value:
            check_settings(_import(value["_target_"], f"{where}.{key}"), value, f"{where}.{key}")


def _plain_types(annotation) -> tuple:
    """The config-representable types an annotation allows (int, float, bool, str, None), or () when it
    allows anything else too (lists, modules, ...) and so is not checked."""
    plain = (int, float, bool, str, type(None))
    if annotation in plain:
        return (annotation,)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not torch.Tensor]  # a tensor cannot come from YAML
        if all(a in plain for a in args):
            return tuple(args)
    return ()


def _fits(value, t) -> bool:
    if t is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, t)


def _import(path: str, where: str):
    try:
        return get_method(path)  # a class or a function
    except Exception as e:
        raise GenlabError(f"{where}: cannot import {path}: {e}") from e


def build_model(cfg: DictConfig) -> GenerativeModel:
    """The model of ``cfg.model``, trained with ``cfg.loss`` (name and its settings)."""
    loss = OmegaConf.to_container(cfg.loss, resolve=True)
    name = loss.pop("name")
    cls = _import(cfg.model._target_, "model")
    model = OmegaConf.to_container(cfg.model, resolve=True)
    check_settings(cls, model, "model", given={"loss"})
    if name not in cls.losses:
        raise GenlabError(
            f"{cls.__name__} models train with loss={'|'.join(cls.losses)}; loss={name} does not fit. "
            f"Choose one of those, or a model that takes {name}."
        )
    check_settings(cls, loss, "loss", given={"loss", *model})
    return _instantiate(cfg.model, loss=name, **loss)


def build_optimizers(cfg: DictConfig, model: GenerativeModel) -> dict:
    """One torch optimizer per network group of the model, with per-network overrides (``nets``)."""
    spec = OmegaConf.to_container(cfg, resolve=True)
    cls = _import(spec.pop("_target_"), "optimizer")
    per_net = spec.pop("nets", None) or {}
    check_settings(cls, spec, "optimizer", given={"params"})
    for net, settings in per_net.items():
        check_settings(cls, settings, f"optimizer.nets.{net}", given={"params"})
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
    check_settings(_import(cfg._target_, "dataset"), OmegaConf.to_container(cfg, resolve=True), "dataset",
                   given={"train"})
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
