"""Each part of a run built from its config node: the model (with its loss), the optimizers and their
schedules, a dataset and a run's test split, and a model rebuilt from a checkpoint alone. Everything built here
takes plain arguments; only these builders see the config."""

import functools
import inspect

from omegaconf import DictConfig, OmegaConf

from genlab import checkpoint
from genlab.config import CONFIG_DIR, check_settings, declaring, import_target, instantiate_checked, locate, type_hints
from genlab.data import ImageData, subset
from genlab.errors import GenlabError, first_line
from genlab.models import FlowMatching, GenerativeModel
from genlab.schedules import Constant, ScheduledLR


def build_model(cfg: DictConfig) -> GenerativeModel:
    """The model of ``cfg.model``, given the loss of ``cfg.loss`` when its constructor takes one."""
    cls = import_target(cfg.model._target_, "model")
    check_settings(cls, OmegaConf.to_container(cfg.model, resolve=True), "model", given={"loss"})
    if declaring(cls, "loss") is None:
        if cfg.get("loss") is not None:
            raise GenlabError(f"{cls.__name__} takes no loss= (it owns its objective); its model config sets "
                              "loss: null in its defaults list.")
        return instantiate_checked(cfg.model)
    if cfg.get("loss") is None:
        raise GenlabError(f"{cls.__name__} trains with a loss: choose one with loss=NAME.")
    return instantiate_checked(cfg.model, loss=build_loss(cfg.loss, cls))


def build_loss(node: DictConfig, model_cls: type):
    """The loss object of a ``loss/*.yaml`` config, checked against the type the model's constructor asks for."""
    target = import_target(node._target_, "loss")
    check_settings(target, OmegaConf.to_container(node, resolve=True), "loss")
    loss = instantiate_checked(node)
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
    cls = import_target(spec.pop("_target_"), what)
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


def build_dataset(cfg: DictConfig, train: bool = True, validation: bool = False) -> ImageData:
    """The dataset of ``cfg`` (its training or test split, or ``validation``: an inspection dataset's held-out
    defect-free images); ``fraction`` (any dataset's setting) keeps that share of the training split, the same
    images every time (genlab.data.subset)."""
    node = OmegaConf.to_container(cfg, resolve=True)
    fraction = node.pop("fraction", None)
    target = import_target(cfg._target_, "dataset")
    if validation and "validation" not in inspect.signature(target).parameters:
        raise GenlabError(f"{cfg._target_} has no validation split: only inspection datasets (dataset=mvtec) have "
                          "one.")
    check_settings(target, node, "dataset", given={"train", "validation"})
    data = instantiate_checked(OmegaConf.create(node), train=train, **({"validation": True} if validation else {}))
    return subset(data, fraction) if train and not validation and fraction is not None else data


def test_split(cfg: DictConfig, root=None, classes=None, train=False, validation=False) -> ImageData:
    """The test split (or ``train=True``: the training split; ``validation=True``: an inspection dataset's
    validation split) of a run's dataset, all classes unless ``classes``, optionally read from another root."""
    node = OmegaConf.create(OmegaConf.to_container(cfg.dataset))
    node.classes = list(classes) if classes is not None else None
    if root is not None:
        node.root = root
    return build_dataset(node, train=train, validation=validation)


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


def load_model(ckpt, device="cpu", ema: bool = True) -> tuple[GenerativeModel, DictConfig, dict]:
    """Rebuild a model from a checkpoint alone: its stored config, then its weights (eval mode): the moving
    average of the weights when the run kept one and ``ema``, else the trained weights. ``state["weights"]``
    says which: "ema" or "raw"."""
    state = checkpoint.load(ckpt)
    cfg = OmegaConf.create(state["config"])
    model = build_model(cfg)
    state["weights"] = state.get("exported") or ("ema" if ema and state.get("ema") else "raw")  # an export: as exported
    try:
        model.load_state_dict(state["ema"]["model"] if state["weights"] == "ema" and not state.get("exported")
                              else state["model"])
    except RuntimeError as e:
        raise GenlabError(f"the weights in {ckpt} do not fit the model its config describes: {first_line(e)}") from e
    return model.to(device).eval(), cfg, state


def load_teacher(model: GenerativeModel, node: DictConfig, device) -> FlowMatching:
    """The teacher of reflow, the flow model of run ``node.run`` (teacher.run=RUN), checked against ``model``, whose
    weights start from its own (the moving average's) when ``node.init``. The caller hands it to
    ``FlowMatching.reflow_from`` once the student's moving average is made (which would copy it)."""
    teacher, _, _ = load_model(node.run, device)
    if not isinstance(model, FlowMatching) or not isinstance(teacher, FlowMatching):
        raise GenlabError(f"teacher.run: reflow trains flow matching (model=flow) from a flow run; this is "
                          f"{type(model).__name__} from {type(teacher).__name__}.")
    if (teacher.unet.image_shape, teacher.num_classes) != (model.unet.image_shape, model.num_classes):
        raise GenlabError(f"teacher.run: the teacher makes {teacher.unet.image_shape} images of "
                          f"{teacher.num_classes} classes, this model {model.unet.image_shape} of {model.num_classes}.")
    if node.init:
        try:
            model.load_state_dict(teacher.state_dict())
        except RuntimeError as e:
            raise GenlabError(f"teacher.init: the teacher's network differs from this one ({first_line(e)}); train "
                              "with the teacher's model settings, or teacher.init=false to start afresh.") from e
    return teacher
