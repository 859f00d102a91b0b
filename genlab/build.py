"""The one place that turns config into objects. Everything it builds takes plain arguments."""

import functools
import importlib
import inspect
import logging
import os
import re
import sys
import types
import typing

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from genlab import callbacks, dist
from genlab.data import ImageData, Loader
from genlab.ema import EMA
from genlab.errors import GenlabError, first_line
from genlab.models import GenerativeModel
from genlab.schedules import Constant, ScheduledLR
from genlab.trainer import StepContext, Trainer

log = logging.getLogger(__name__)


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
    hints = type_hints(target.__init__ if isinstance(target, type) else target)
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params.values())
    name = getattr(target, "__qualname__", str(target))
    for key, value in settings.items():
        if key.startswith("_"):  # _target_, _partial_, ...
            continue
        if key not in params and not open_ended:
            known = ", ".join(k for k, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD or p.kind is p.KEYWORD_ONLY)
            raise GenlabError(f"{where}.{key} is not a setting of {name}; its settings are: {known}.")
        check_type(value, hints.get(key), f"{where}.{key}")
        if isinstance(value, dict) and "_target_" in value:
            check_settings(_import(value["_target_"], f"{where}.{key}"), value, f"{where}.{key}")


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


def _import(path: str, where: str):
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


def build_model(cfg: DictConfig) -> GenerativeModel:
    """The model of ``cfg.model``, given the loss of ``cfg.loss`` when its constructor takes one."""
    cls = _import(cfg.model._target_, "model")
    check_settings(cls, OmegaConf.to_container(cfg.model, resolve=True), "model", given={"loss"})
    if declaring(cls, "loss") is None:
        if cfg.get("loss") is not None:
            raise GenlabError(f"{cls.__name__} takes no loss= (it owns its objective); its model config sets "
                              "loss: null in its defaults list.")
        return _instantiate(cfg.model)
    if cfg.get("loss") is None:
        raise GenlabError(f"{cls.__name__} trains with a loss: choose one with loss=NAME.")
    return _instantiate(cfg.model, loss=build_loss(cfg.loss, cls))


def build_loss(node: DictConfig, model_cls: type):
    """The loss object of a ``loss/*.yaml`` config, checked against the type the model's constructor asks for."""
    target = _import(node._target_, "loss")
    check_settings(target, OmegaConf.to_container(node, resolve=True), "loss")
    loss = _instantiate(node)
    wanted = type_hints(declaring(model_cls, "loss").__init__).get("loss")
    if isinstance(wanted, type) and not isinstance(loss, wanted):
        options = loss_options()
        fits = [name for name, t in options.items() if isinstance(t, type) and issubclass(t, wanted)]
        name = next((n for n, t in options.items() if t is target), node._target_)
        raise GenlabError(
            f"{model_cls.__name__} takes a loss of type {wanted.__name__} (loss={'|'.join(fits) or '...'}); "
            f"loss={name} does not fit. Choose one of those, or a model that takes {name}."
        )
    return loss


def loss_options() -> dict:
    """genlab's own loss configs: name -> the class or function each names."""
    from genlab.cli import CONFIG_DIR

    options = {}
    for path in sorted((CONFIG_DIR / "loss").glob("*.yaml")):
        try:
            options[path.stem] = locate(OmegaConf.load(path)["_target_"])
        except Exception:  # a loss config that does not import is reported where it is used
            continue
    return options


def per_network(node: DictConfig, what: str, networks, given=()) -> tuple[object, dict[str, dict]]:
    """A config naming one class for every network of a model (optimizers, schedules), with per-network
    values under ``nets``: (the class, {network: its settings})."""
    spec = OmegaConf.to_container(node, resolve=True)
    cls = _import(spec.pop("_target_"), what)
    per_net = spec.pop("nets", None) or {}
    check_settings(cls, spec, what, given=given)
    for net, settings in per_net.items():
        check_settings(cls, settings, f"{what}.nets.{net}", given=given)
    unknown = sorted(set(per_net) - set(networks))
    if unknown:
        raise GenlabError(f"{what}.nets names {', '.join(unknown)}, but this model's networks are {', '.join(networks)}.")
    return cls, {name: {**spec, **per_net.get(name, {})} for name in networks}


def build_optimizers(cfg: DictConfig, model: GenerativeModel) -> dict:
    """One torch optimizer per network group of the model, with per-network overrides (``nets``)."""
    groups = model.optimizer_groups()
    cls, settings = per_network(cfg, "optimizer", groups, given={"params"})

    def make(name, params):
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in settings[name].items()}
        try:
            return cls(params, **kwargs)
        except (TypeError, ValueError) as e:
            raise GenlabError(f"optimizer {cls.__name__} for network '{name}': {e}") from e

    return {name: make(name, params) for name, params in groups.items()}


def build_schedulers(cfg: DictConfig | None, optimizers: dict, total_steps: int) -> dict:
    """A ScheduledLR per optimizer following the schedule of ``cfg`` (genlab.schedules) over ``total_steps``;
    none where the schedule is constant."""
    if cfg is None:
        return {}
    target, settings = per_network(cfg, "scheduler", optimizers, given={"step", "total"})
    schedulers = {}
    for name, opt in optimizers.items():  # a class is built with the settings; a function takes them per call
        schedule = target(**settings[name]) if isinstance(target, type) else functools.partial(target, **settings[name])
        if isinstance(schedule, Constant) and not schedule.warmup:
            continue
        schedulers[name] = ScheduledLR(opt, schedule, total_steps)
    return schedulers


def build_trainer(cfg: DictConfig, run_dir, device, choices: dict | None = None) -> Trainer:
    """Everything a training run needs: the model on ``device``, its optimizers and schedules, the data,
    the step context, the moving average of the weights, and the writers into ``run_dir``. ``choices``: the config
    groups' options the run was composed from, kept in its checkpoints."""
    t = cfg.trainer
    model = build_model(cfg).to(device)  # first: config mistakes show before any data is read
    if dist.world() > 1:
        dist.broadcast_tensors(model.state_dict().values())  # every rank starts from rank 0's weights
        if device.type == "cuda":  # batch statistics over the whole batch, as one process would have them
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizers = build_optimizers(cfg.optimizer, model)
    check_sampling(model, t.sampling, where="trainer.sampling.")
    data = build_dataset(cfg.dataset, train=True)
    check_labels(model, data)
    loader = Loader(data.images, data.labels, t.batch_size, device, cfg.seed, dist.rank(), dist.world())
    max_steps = t.max_steps or t.epochs * loader.steps_per_epoch
    ctx = StepContext(optimizers, t.precision, device, build_schedulers(cfg.get("scheduler"), optimizers, max_steps),
                      t.on_nan)
    main = dist.is_main()  # only rank 0 writes, and keeps the moving average it samples from
    ema = EMA(model, t.ema.decay, t.ema.warmup) if t.ema.decay is not None and main else None  # before compiling
    if t.compile:
        compile_networks(model)
    loss = f", loss {type(model.loss).__name__}" if getattr(model, "loss", None) is not None else ""
    by_time = isinstance(t.checkpoint_every, str)  # trainer.checkpoint_every: a duration (10m), or epochs
    clock = callbacks.WriteClock(t.write_share)  # one share of the run's time for all that is written
    writers = [
        *([callbacks.ProgressBar()] if t.progress else []),
        callbacks.MetricsCSV(run_dir),
        callbacks.LossCurves(run_dir, f"{type(model).__name__} on {data.name}{loss}", clock=clock),
        callbacks.SampleGrids(run_dir, t.n_samples, cfg.seed, OmegaConf.to_container(t.sampling), clock),
        callbacks.Checkpoints(run_dir, OmegaConf.to_container(cfg, resolve=True), None if by_time else t.checkpoint_every,
                              t.keep_every, t.keep_last, every_s=seconds(t.checkpoint_every) if by_time else None,
                              choices=choices, clock=clock),
    ]
    # the in-loop measurements first (they add to the rows the writers write), pruning last (after the epoch's writers)
    loggers = build_loggers(cfg, run_dir)  # on every rank: a mistake in them stops them all, here
    writers = [*build_evaluation(cfg, model, data, device), *writers, *loggers, *build_pruning(cfg)] if main else []
    trainer = Trainer(model, loader, ctx, max_steps, callbacks=writers, ema=ema, log_every=t.log_every,
                      max_time=seconds(t.max_time), seed=cfg.seed)
    ranks = f" x {dist.world()} processes ({dist.backend()})" if dist.world() > 1 else ""
    log.info("%s (%.2fM parameters): %d images %s of %s, device %s%s, precision %s, %d steps (%d epochs of %d, batch %d)",
             type(model).__name__, sum(p.numel() for p in model.parameters()) / 1e6, len(data),
             "x".join(map(str, data.image_shape)), data.name, device, ranks, ctx.precision, max_steps, trainer.epochs,
             loader.steps_per_epoch, loader.batch_size)
    return trainer


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


def compile_for_sampling(model: GenerativeModel, n: int, settings: dict, choice) -> bool:
    """``compile=auto|true|false`` of sample and evaluate. auto compiles where it pays: an iterative sampler
    (a ``steps`` setting) making ``n`` samples at 100,000 network evaluations or more."""
    choice = str(choice).lower()
    if choice not in ("auto", "true", "false"):
        raise GenlabError(f"compile={choice} is not one of auto, true, false.")
    if choice == "auto":
        steps = settings.get("steps", model.sampling_settings().get("steps"))
        choice = "true" if isinstance(steps, int) and n * steps >= 100_000 else "false"
    if choice == "true":
        compile_networks(model)
        log.info("compiling the network for sampling (compile=false to skip)")
    return choice == "true"


def compile_networks(model: GenerativeModel) -> None:
    """torch.compile each network in place: the state dict keys stay as they are, so checkpoints move freely
    between compiled and eager runs."""
    if not torch._dynamo.is_dynamo_supported():
        raise GenlabError("trainer.compile=true, but torch.compile is not supported with this Python/PyTorch; "
                          "use trainer.compile=false.")
    for net in model.children():
        net.compile()


def build_dataset(cfg: DictConfig, train: bool = True) -> ImageData:
    check_settings(_import(cfg._target_, "dataset"), OmegaConf.to_container(cfg, resolve=True), "dataset",
                   given={"train"})
    return _instantiate(cfg, train=train)


def load_model(ckpt, device="cpu", ema: bool = True) -> tuple[GenerativeModel, DictConfig, dict]:
    """Rebuild a model from a checkpoint alone: its stored config, then its weights (eval mode): the moving
    average of the weights when the run kept one and ``ema``, else the trained weights. ``state["weights"]``
    says which: "ema" or "raw"."""
    from genlab import checkpoint

    state = checkpoint.load(ckpt)
    cfg = OmegaConf.create(state["config"])
    model = build_model(cfg)
    state["weights"] = "ema" if ema and state.get("ema") else "raw"
    try:
        model.load_state_dict(state["ema"]["model"] if state["weights"] == "ema" else state["model"])
    except RuntimeError as e:
        raise GenlabError(f"the weights in {ckpt} do not fit the model its config describes: {first_line(e)}") from e
    return model.to(device).eval(), cfg, state


def check_labels(model: GenerativeModel, data: ImageData) -> None:
    """A class-conditional model must know every class of its data: a label of ``num_classes`` or more would be
    its "no class" token (the UNet) or out of its range (an index error deep inside a network)."""
    if not model.num_classes or not len(data):
        return
    top = int(data.labels.max())
    if top >= model.num_classes:
        raise GenlabError(f"{data.name} has labels up to {top}, but the model is conditional on model.num_classes="
                          f"{model.num_classes} classes (0..{model.num_classes - 1}); set model.num_classes={top + 1} "
                          "(or more).")


def check_sampling(model: GenerativeModel, settings: dict, labels=None, where: str = "", command: str = "") -> None:
    """Sampling settings must be ones the model's ``generate`` declares, of its types; labels need a
    class-conditional model and must be its classes."""
    known = model.sampling_settings()
    hints = type_hints(type(model).generate)
    name = type(model).__name__
    for key, value in settings.items():
        if key not in known:
            theirs = f"its sampling settings are: {', '.join(known)}" if known else "it has no sampling settings"
            also = f"a setting of genlab {command} nor " if command else ""
            raise GenlabError(f"{where}{key} is not {also}a sampling setting of {name} ({theirs}).")
        check_type(value, hints.get(key), f"{where}{key}")
    if labels is not None:
        if not model.num_classes:
            raise GenlabError(f"labels= needs a class-conditional model; {name} is unconditional.")
        bad = [int(c) for c in labels if not 0 <= int(c) < model.num_classes]
        if bad:
            raise GenlabError(f"labels {bad} are not classes of this model: it has classes 0..{model.num_classes - 1}.")


def test_split(cfg: DictConfig, root=None, classes=None, train=False) -> ImageData:
    """The test split (or ``train=True``: the training split) of a run's dataset, all classes unless
    ``classes``, optionally read from another root."""
    node = OmegaConf.create(OmegaConf.to_container(cfg.dataset))
    node.classes = list(classes) if classes is not None else None
    if root is not None:
        node.root = root
    return build_dataset(node, train=train)


def build_evaluation(cfg: DictConfig, model: GenerativeModel, data: ImageData, device) -> list:
    """The in-loop measurements on the test split that ``cfg.evaluation.metrics`` asks for, and a search's objective
    (``cfg.trial.objective``) when genlab measures it: a genlab.search.Evaluation, or nothing."""
    from genlab import search
    from genlab.classifier import classifier_for

    node = cfg.get("evaluation") or {}
    objective = (cfg.get("trial") or {}).get("objective")
    wanted = list(dict.fromkeys([*(node.get("metrics") or []), *([objective] if objective in search.METRICS else [])]))
    for name in wanted:
        if name not in search.METRICS:
            raise GenlabError(f"evaluation.metrics: {name} is not a metric genlab measures; they are: "
                              f"{', '.join(search.METRICS)}.")
    if not wanted:
        return []
    every, n = node.get("every"), node.get("n_samples")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise GenlabError(f"evaluation.every must be a whole number of epochs above 0; got {every!r}.")
    classes = cfg.dataset.get("classes")
    name = type(model).__name__
    measures = []
    if "val/loss" in wanted:
        if "elbo" not in model.scores:
            raise GenlabError(f"val/loss is the negative ELBO on the test split, and {name} has none (a VAE has); "
                              "measure eval/fid instead.")
        measures.append(search.ValidationLoss(test_split(cfg, classes=classes).images))
    if {"eval/fid", "eval/kid"} & set(wanted):
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise GenlabError(f"evaluation.n_samples must be a whole number above 1; got {n!r}.")
        net, _ = classifier_for(cfg.dataset, device)
        measures.append(search.SampleQuality(net, test_split(cfg, classes=classes).images, n, cfg.seed,
                                             OmegaConf.to_container(cfg.trainer.sampling)))
    if "eval/auroc" in wanted:
        if not model.scores or not classes:
            raise GenlabError("eval/auroc is the one-class AUROC: it needs a model with an anomaly score, trained on "
                              f"some classes (dataset.classes=[3]) so that the others are anomalies; {name} "
                              f"{'has no anomaly score' if not model.scores else 'is trained on every class'}.")
        test = test_split(cfg)
        pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:2000]  # as evaluate calibrates
        measures.append(search.OneClassAUROC(test.images, test.labels, list(classes), data.images[pick]))
    return [search.Evaluation(measures, every)]


def build_loggers(cfg: DictConfig, run_dir) -> list:
    """The callbacks ``logger`` names (logger=[tensorboard,mlflow], or a YAML file of your own with a ``_target_``
    class): each built with the run directory and the resolved config, and the settings its node gives."""
    callbacks = []
    for name, node in (cfg.get("logger") or {}).items():
        where = f"logger.{name}"
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise GenlabError(f"{where} needs a _target_: the callback class to build (configs/logger/*.yaml).")
        settings = OmegaConf.to_container(node, resolve=True)
        target = _import(node._target_, where)
        check_settings(target, settings, where, given=("run_dir", "config"))
        settings = {k: v for k, v in settings.items() if not k.startswith("_")}
        callback = target(run_dir=run_dir, config=OmegaConf.to_container(cfg, resolve=True), **settings)
        callback.state_key = name  # its state in the checkpoints, under this name
        callbacks.append(callback)
    return callbacks


def build_pruning(cfg: DictConfig) -> list:
    """For a trial of hydra/sweeper=optuna (``cfg.trial``, which the sweeper sets): a genlab.search.Pruning that
    reports the objective to the trial's study, or nothing."""
    from genlab import search

    trial = cfg.get("trial") or {}
    if trial.get("number") is None:
        return []
    missing = [k for k in ("storage", "study", "objective") if not trial.get(k)]
    if missing:
        raise GenlabError(f"trial.number is set, and trial.{missing[0]} is not: the trial settings come from "
                          "hydra/sweeper=optuna, which sets them all.")
    return [search.Pruning(trial.storage, trial.study, trial.number, trial.objective)]
