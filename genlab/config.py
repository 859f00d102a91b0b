"""Config into objects: where genlab's configs are, how a ``_target_`` is found and checked, and a duration.

A part named in config (a model, a loss, a sampler, an anomaly score, a callback) is a ``_target_``: the dotted
path of a class or function, built with the other keys of its node as keyword arguments. ``make`` checks those
keys against the target's signature first, so that a typo or a wrong type is one clear line rather than a
traceback from inside a constructor. The config groups are genlab's registry: ``option("sampler", "heun")`` is
the node of configs/sampler/heun.yaml, and ``options("sampler")`` lists that group.
"""

import importlib
import importlib.resources
import inspect
import os
import re
import sys
import types
import typing
from pathlib import Path

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from genlab.errors import GenlabError, first_line


def _config_dir() -> Path:
    """configs/ of the checkout (an editable install maps genlab.configs to it), or of the wheel."""
    try:
        return Path(str(importlib.resources.files("genlab.configs")))
    except ModuleNotFoundError:  # an editable install from before configs became genlab.configs, or a bare checkout
        return Path(__file__).resolve().parent.parent / "configs"


CONFIG_DIR = _config_dir()


def options(group: str) -> list[str]:
    """The names genlab's config group ``group`` offers on the command line (its YAML files)."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def option(group: str, name: str) -> DictConfig:
    """The node of genlab's ``group/name.yaml``; one clear line naming the group's options when there is none."""
    path = CONFIG_DIR / group / f"{name}.yaml"
    if not path.is_file():
        raise GenlabError(f"{group}={name} is not one of genlab's: {', '.join(options(group))}.")
    return OmegaConf.load(path)


def make(node, where: str, **given):
    """The object a ``_target_`` node describes, its settings checked first; ``given``: arguments genlab passes
    itself, which the node may not set."""
    spec = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    if "_target_" not in spec:
        raise GenlabError(f"{where} needs a _target_: the class or function to build.")
    check_settings(import_target(spec["_target_"], where), spec, where, given=set(given))
    return instantiate_checked(OmegaConf.create({**spec, "_partial_": True}))(**given)  # given as they are, not as config


def instantiate_checked(node: DictConfig, **kwargs):
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
    nested ``_target_`` nodes are checked too, and so are the values of a dict of them (a GAN's regularizers). A
    typo or a wrong type is one clear line here, not a traceback from deep inside a constructor. ``given``:
    parameters genlab passes itself (or another config node sets), which this node may not."""
    params = {k: p for k, p in inspect.signature(target).parameters.items() if k not in given}
    hints = type_hints(target.__init__ if isinstance(target, type) else target)
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params.values())
    name = getattr(target, "__qualname__", str(target))
    for key, value in settings.items():
        if key.startswith("_"):  # _target_, _partial_, ...
            continue
        if key not in params and not open_ended:
            known = ", ".join(k for k, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD or p.kind is p.KEYWORD_ONLY)
            theirs = f"its settings are: {known}" if known else "it has no settings"
            raise GenlabError(f"{where}.{key} is not a setting of {name}; {theirs}.")
        check_type(value, hints.get(key), f"{where}.{key}")
        nodes = {key: value} if isinstance(value, dict) and "_target_" in value else \
            {f"{key}.{k}": v for k, v in value.items() if isinstance(v, dict) and "_target_" in v} \
            if isinstance(value, dict) else {}
        for path, node in nodes.items():
            check_settings(import_target(node["_target_"], f"{where}.{path}"), node, f"{where}.{path}")


def type_hints(fn) -> dict:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # annotations this Python cannot evaluate: names are still checked
        return {}


def check_type(value, annotation, name: str) -> None:
    """A value from the command line or a YAML file against a plain annotation (int, float, str, bool, None)."""
    allowed = _plain_types(annotation)
    if allowed and not any(_fits(value, t) for t in allowed):
        wanted = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise GenlabError(f"{name} must be {wanted}; got {value!r}.")


def _plain_types(annotation) -> tuple:
    """The config-representable types an annotation allows (int, float, bool, str, None), or () when it
    allows anything else too (lists, modules, ...) and so is not checked."""
    plain = (int, float, bool, str, type(None))
    if annotation in plain:
        return (annotation,)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        # a tensor cannot come from YAML (torch is not imported here: the command line's --help stays fast)
        args = [a for a in typing.get_args(annotation) if getattr(a, "__module__", "").split(".")[0] != "torch"]
        if all(a in plain for a in args):
            return tuple(args)
    return ()


def _fits(value, t) -> bool:
    if t is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, t)


def locate(path: str):
    """The class or function a dotted path names (``genlab.models.GAN``, ``my_module.MyModel``): from the
    installed packages, PYTHONPATH, or the current directory."""
    if os.getcwd() not in sys.path:  # the user's own modules, after the standard library and installed ones
        sys.path.append(os.getcwd())
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name is None or not (module == e.name or module.startswith(e.name + ".")):
                raise  # the module exists but needs one that does not
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(f"No module named '{parts[0]}'", name=parts[0])


def import_target(path: str, where: str):
    """``locate``, with one clear line when the target cannot be imported."""
    try:
        return locate(path)
    except Exception as e:
        raise GenlabError(
            f"{where}: cannot import {path} ({type(e).__name__}: {first_line(e)}). "
            f"genlab looks for it in the current directory ({os.getcwd()}), on PYTHONPATH and among the installed "
            "packages."
        ) from e


def declaring(cls: type, name: str) -> type | None:
    """The class whose constructor takes the argument ``name`` when ``cls(...)`` is called: ``cls`` itself, or,
    through constructors that pass ``**kwargs`` on (``class TinyGAN(GAN)`` with ``__init__(self, ..., **kw)``),
    the first base in the MRO that names it; None when no constructor on that path takes it."""
    for klass in cls.__mro__:
        if klass is object:
            return None
        params = inspect.signature(klass.__init__).parameters
        if name in params:
            return klass
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return None
    return None


def seconds(duration, key: str = "trainer.max_time") -> float | None:
    """A duration setting (``trainer.max_time``): 90 (seconds), "90s", "30m", "2h", "1h30m", or null."""
    if duration is None:
        return None
    text = str(duration).strip().lower()
    match = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?", text)
    if not text or not match or not any(match.groups()):
        raise GenlabError(f"{key} must be a duration such as 90s, 30m, 2h or 1h30m; got {duration!r}.")
    h, m, s = (float(g) if g else 0.0 for g in match.groups())
    total = 3600 * h + 60 * m + s
    if total <= 0:
        raise GenlabError(f"{key} must be more than 0; got {duration!r}.")
    return total
