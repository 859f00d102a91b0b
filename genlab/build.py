"""A training run assembled from its config: the parts (genlab.parts), the loop (genlab.trainer) and what the run
writes and measures, the callbacks of the ``callbacks`` and ``logger`` config groups and the measurements of
``evaluation``."""

import inspect
import logging

import torch
from omegaconf import DictConfig, OmegaConf

from genlab import dist
from genlab.callbacks import WriteClock
from genlab.classifier import classifier_for
from genlab.config import import_target, locate, make, seconds
from genlab.data import ImageData, Loader
from genlab.device import compile_networks
from genlab.ema import EMA
from genlab.errors import GenlabError
from genlab.measures import Evaluation, OneClassAUROC, Pruning, SampleQuality, ValidationLoss
from genlab.models import GenerativeModel
from genlab.parts import (build_dataset, build_model, build_optimizers, build_schedulers, check_labels, load_teacher,
                          test_split)
from genlab.sampling import check_sampling
from genlab.scores import score_names
from genlab.search import METRICS
from genlab.step import StepContext
from genlab.trackers import Tracker
from genlab.trainer import Trainer

log = logging.getLogger(__name__)


def build_trainer(cfg: DictConfig, run_dir, device, choices: dict | None = None) -> Trainer:
    """Everything a training run needs: the model on ``device``, its optimizers and schedules, the data,
    the step context, the moving average of the weights, and the callbacks that write into ``run_dir``.
    ``choices``: the config groups' options the run was composed from, kept in its checkpoints."""
    t = cfg.trainer
    model = build_model(cfg).to(device)  # first: config mistakes show before any data is read
    node = cfg.get("teacher")  # reflow's (a run from before genlab had it has none)
    teacher = load_teacher(model, node, device) if node and node.run else None
    if dist.world() > 1:
        dist.broadcast_tensors(model.state_dict().values())  # every rank starts from rank 0's weights
        if device.type == "cuda":  # batch statistics over the whole batch, as one process would have them
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizers = build_optimizers(cfg.optimizer, model)
    check_sampling(model, sampling_settings(cfg), where="trainer.sampling.")
    data = build_dataset(cfg.dataset, train=True)
    check_labels(model, data)
    accumulate = t.get("accumulate", 1)  # a step's batch: that many micro-batches of batch_size
    loader = Loader(data.images, data.labels, t.batch_size * accumulate, device, cfg.seed, dist.rank(), dist.world())
    max_steps = t.max_steps or t.epochs * loader.steps_per_epoch
    ctx = StepContext(optimizers, t.precision, device, build_schedulers(cfg.get("scheduler"), optimizers, max_steps),
                      t.on_nan, accumulate)
    main = dist.is_main()  # only rank 0 writes, and keeps the moving average it samples from
    ema = EMA(model, t.ema.decay, t.ema.warmup) if t.ema.decay is not None and main else None  # before compiling
    if teacher is not None:
        model.reflow_from(teacher, node.steps, node.sampler)
    if t.compile:
        compile_networks(model)
    callbacks = run_callbacks(cfg, run_dir, model, data, device, choices)
    trainer = Trainer(model, loader, ctx, max_steps, callbacks=callbacks if main else [], ema=ema,
                      log_every=t.log_every, max_time=seconds(t.max_time), seed=cfg.seed)
    ranks = f" x {dist.world()} processes ({dist.backend()})" if dist.world() > 1 else ""
    batch = f"{loader.batch_size // accumulate} x {accumulate} micro-batches" if accumulate > 1 else str(loader.batch_size)
    log.info("%s (%.2fM parameters): %d images %s of %s, device %s%s, precision %s, %d steps (%d epochs of %d, batch %s)",
             type(model).__name__, sum(p.numel() for p in model.parameters()) / 1e6, len(data),
             "x".join(map(str, data.image_shape)), data.name, device, ranks, ctx.precision, max_steps, trainer.epochs,
             loader.steps_per_epoch, batch)
    return trainer


def run_callbacks(cfg: DictConfig, run_dir, model: GenerativeModel, data: ImageData, device, choices) -> list:
    """The run's callbacks in the order the loop calls them: the in-loop measurements first (they add to the rows
    the writers write), then the writers (``callbacks``), the trackers (``logger``), and a search's pruning last
    (after the epoch's writers). Built on every rank, so that a mistake in them stops every rank here."""
    loss = f", loss {type(model.loss).__name__}" if getattr(model, "loss", None) is not None else ""
    config = OmegaConf.to_container(cfg, resolve=True)
    config["dataset"].update({"split": data.split} if data.split else {})  # a folder's test images, checked later
    context = {"run_dir": run_dir, "config": config, "choices": choices,
               "clock": WriteClock(cfg.trainer.write_share),  # one share of the run's time for all that is written
               "title": f"{type(model).__name__} on {data.name}{loss}"}
    writers = build_callbacks(cfg.get("callbacks"), "callbacks", context)
    trackers = build_callbacks(cfg.get("logger"), "logger", context)
    error, callbacks = None, []
    if dist.is_main():  # alone: the first run on a dataset trains its yardstick classifier here, which may take minutes
        try:
            callbacks = [*build_evaluation(cfg, model, data, device), *writers, *trackers, *build_pruning(cfg)]
        except Exception as e:
            error = e
    dist.settle(error, "building the measurements")  # the others wait for it, with no timeout
    return callbacks


def build_callbacks(nodes, group: str, context: dict) -> list:
    """The callbacks a config group names (``callbacks``: the writers; ``logger=[tensorboard,mlflow]``: the
    trackers; or YAML files of your own with a ``_target_`` class): each built with the settings its node gives,
    checked against its constructor, and with those of ``context`` (run_dir, config, choices, clock, title) that
    the constructor takes. Each keeps its state in the checkpoints under its name in the group."""
    built = []
    for name, node in (nodes or {}).items():
        where = f"{group}.{name}"
        if not isinstance(node, (dict, DictConfig)) or "_target_" not in node:
            raise GenlabError(f"{where} needs a _target_: the callback class to build (configs/{group}/*.yaml).")
        params = inspect.signature(import_target(node["_target_"], where)).parameters
        callback = make(node, where, **{k: v for k, v in context.items() if k in params})
        callback.state_key = name  # its state in the checkpoints, under this name
        built.append(callback)
    return built


def trackers_of(state: dict, run_dir) -> list:
    """The trackers a run logged to (its ``logger`` nodes whose state its checkpoint ``state`` kept), built again
    and put back in their runs, so that `genlab evaluate` adds its numbers there. One that cannot be built here
    (its package is not installed, a callback of the user's that does not import) is left out with a warning."""
    kept, found = state.get("callbacks") or {}, []
    for name, node in (state["config"].get("logger") or {}).items():
        try:
            cls = locate(node["_target_"])
            if not (isinstance(cls, type) and issubclass(cls, Tracker)) or name not in kept:
                continue
            tracker = build_callbacks({name: node}, "logger", {"run_dir": run_dir, "config": state["config"]})[0]
            tracker.load_state_dict(kept[name])
            found.append(tracker)
        except Exception as e:  # the report is written: a tracker out of reach now costs only its copy
            log.warning("could not reach logger.%s of %s: %s", name, run_dir, e)
    return found


def build_evaluation(cfg: DictConfig, model: GenerativeModel, data: ImageData, device) -> list:
    """The in-loop measurements on the test split that ``cfg.evaluation.metrics`` asks for, a search's objective
    (``cfg.trial.objective``) and the metric of best.pt (``cfg.trainer.best``) when genlab measures them: a
    genlab.measures.Evaluation, or nothing."""
    node = cfg.get("evaluation") or {}
    objective = (cfg.get("trial") or {}).get("objective")
    best = cfg.trainer.get("best")  # checkpoints/best.pt by this metric: measured for it
    if best is not None and best not in METRICS and not str(best).startswith("train/"):
        raise GenlabError(f"trainer.best={best} is not a metric of the run's rows: one of {', '.join(METRICS)}, or a "
                          "training loss train/NAME (train/loss, train/loss_g, ...).")
    wanted = list(dict.fromkeys([*(node.get("metrics") or []), *(m for m in (objective, best) if m in METRICS)]))
    for name in wanted:
        if name not in METRICS:
            raise GenlabError(f"evaluation.metrics: {name} is not a metric genlab measures; they are: "
                              f"{', '.join(METRICS)}.")
    if not wanted:
        return []
    every = node.get("every")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise GenlabError(f"evaluation.every must be a whole number of epochs above 0; got {every!r}.")
    measures = [measure(cfg, model, data, device, name) for name in ("val/loss", "eval/fid", "eval/auroc")
                if name in wanted or (name == "eval/fid" and "eval/kid" in wanted)]
    return [Evaluation(measures, every)]


def measure(cfg: DictConfig, model: GenerativeModel, data: ImageData, device, metric: str):
    """The measurement of ``metric`` (val/loss, eval/fid with eval/kid, eval/auroc) on the run's test split."""
    classes, name, n = cfg.dataset.get("classes"), type(model).__name__, (cfg.get("evaluation") or {}).get("n_samples")
    offered = score_names(model)
    if metric == "val/loss":
        if "elbo" not in offered:
            raise GenlabError(f"val/loss is the negative ELBO on the test split, and {name} has none (a VAE has); "
                              "measure eval/fid instead.")
        return ValidationLoss(test_split(cfg, classes=classes).images)
    if metric == "eval/fid":
        if not model.generates:
            raise GenlabError(f"{name} draws no images, so it has no eval/fid; measure eval/auroc instead.")
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise GenlabError(f"evaluation.n_samples must be a whole number above 1; got {n!r}.")
        net, _ = classifier_for(cfg.dataset, device)
        return SampleQuality(net, test_split(cfg, classes=classes).images, n, cfg.seed, sampling_settings(cfg))
    if not offered or not classes:
        raise GenlabError("eval/auroc is the one-class AUROC: it needs a model with an anomaly score, trained on "
                          f"some classes (dataset.classes=[3]) so that the others are anomalies; {name} "
                          f"{'has no anomaly score' if not offered else 'is trained on every class'}.")
    test = test_split(cfg)
    return OneClassAUROC(test.images, test.labels, list(classes), data.images)


def sampling_settings(cfg: DictConfig) -> dict:
    """The model's sampling settings in a training run, for its grids and its in-training FID: ``trainer.sampling``,
    and ``sampler=`` (a node of the sampler config group) when it names one."""
    sampler = OmegaConf.to_container(cfg.sampler, resolve=True) if cfg.get("sampler") is not None else None
    return {**OmegaConf.to_container(cfg.trainer.sampling, resolve=True), **({"sampler": sampler} if sampler else {})}


def build_pruning(cfg: DictConfig) -> list:
    """For a trial of hydra/sweeper=optuna (``cfg.trial``, which the sweeper sets): a genlab.measures.Pruning that
    reports the objective to the trial's study, or nothing."""
    trial = cfg.get("trial") or {}
    if trial.get("number") is None:
        return []
    missing = [k for k in ("storage", "study", "objective") if not trial.get(k)]
    if missing:
        raise GenlabError(f"trial.number is set, and trial.{missing[0]} is not: the trial settings come from "
                          "hydra/sweeper=optuna, which sets them all.")
    return [Pruning(trial.storage, trial.study, trial.number, trial.objective)]
