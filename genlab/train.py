"""genlab train: build the parts named by the config and run the shared loop."""

import contextlib
import csv
import logging
import os
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from genlab import bundle, checkpoint, dist, environment
from genlab.build import build_trainer
from genlab.config import seconds
from genlab.errors import GenlabError
from genlab.step import check_on_nan

log = logging.getLogger(__name__)

# what an override may change when a run is resumed: how long and where it trains, and how it reports;
# everything else (model, loss, data, optimizer, schedule, seed, batch size) must be the run's own
CHANGEABLE = ("resume", "device", "tags", "trainer.", "dataset.root", "dataset.download", "dataset.in_memory",
              "dataset.workers", "evaluation.", "callbacks.")
FIXED = ("trainer.batch_size", "trainer.accumulate")
SINCE = {"accumulate": 1}  # fixed settings added since: the value a run from before them trained with


def run(cfg: DictConfig, run_dir: Path, overrides: list[str] = ()) -> dict:
    """Train; returns the run's result: the last value of each metric of its rows (``train/...``, ``val/...``,
    ``eval/...``, step, epoch, ...), with ``stopped``: why a callback ended it early (a search's pruner), or None."""
    device = dist.setup(cfg.device)  # one process, or one of several started by torchrun / srun
    run_dir = Path(dist.broadcast(str(run_dir)))  # rank 0's run directory is the run's; only rank 0 writes there
    state, choices = None, hydra_choices()
    resume = cfg.get("resume")
    if resume == "auto":  # a requeued job continues from its own run directory, a new one starts
        resume = run_dir if (run_dir / "checkpoints" / "last.pt").is_file() else None
        if resume:  # a last.pt cut short by a hard kill: the newest intact kept copy
            path, state = checkpoint.load_intact(run_dir)
    elif resume:
        path = checkpoint.resolve(resume)
        if bundle.is_export(path.parent):
            raise GenlabError(f"resume={resume} is an export, which holds weights only (no optimizer state): resume "
                              "from the run it was exported from, or train a new run from it.")
        state = checkpoint.load(path)
    if resume:
        choices = state.get("choices")  # the run's own
        cfg = resumed_config(state["config"], cfg, overrides, choices)
    check_trainer(cfg.trainer)
    torch.manual_seed(cfg.seed)
    trainer = build_trainer(cfg, run_dir, device, choices)
    if dist.is_main():
        environment.record(run_dir, device, trainer.ctx.precision, dist.world())
    if state is not None:
        trainer.load_state_dict(state)
        trainer.saved = (path, state["step"])  # the last good checkpoint until this run writes one
        trainer.history = previous_metrics(path, state["step"])
        if trainer.done:
            more = "trainer.max_steps=N" if cfg.trainer.max_steps else "trainer.epochs=N or trainer.max_steps=N"
            log.warning("nothing to train: the run in %s has done %d steps, and this command asks for %d. Ask for "
                        "more with %s.", path.parent.parent, trainer.step, trainer.max_steps, more)
            return result(trainer.history)
        if trainer.max_time is not None and trainer.wall_time >= trainer.max_time:
            log.warning("nothing to train: the run in %s has trained for %.0f s, and trainer.max_time=%s. Ask for "
                        "more time with trainer.max_time=...", path.parent.parent, trainer.wall_time, cfg.trainer.max_time)
            return result(trainer.history)
        log.info("resuming from %s at step %d", path, state["step"])
    with debugging(cfg.trainer):
        trainer.fit()
    dist.finish()
    dist.teardown()  # the run is over: leave the group now, while the interpreter is whole
    if trainer.stopped is not None:
        log.info("stopped early: %s", trainer.stopped)
    if trainer.timed_out:
        log.info("trainer.max_time=%s reached after %d of %d steps", cfg.trainer.max_time, trainer.step, trainer.max_steps)
    log.info("done: %d steps; checkpoint %s", trainer.step, run_dir / "checkpoints" / "last.pt")
    return {**result(trainer.history), "stopped": trainer.stopped}


@contextlib.contextmanager
def debugging(t: DictConfig):
    """``trainer.detect_anomaly``: autograd names the operation that made a NaN or an infinity (slow);
    ``trainer.deterministic``: PyTorch's deterministic algorithms only, an error where an operation has none."""
    if t.get("deterministic"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic cuBLAS needs
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    try:
        with torch.autograd.set_detect_anomaly(bool(t.get("detect_anomaly")), check_nan=True):
            yield
    finally:
        if t.get("deterministic"):
            torch.use_deterministic_algorithms(False)


def result(rows: list[dict]) -> dict:
    """The last value of each metric of the metrics rows."""
    return {k: v for row in rows for k, v in row.items()}


def check_trainer(t: DictConfig) -> None:
    """Whole numbers where the loop counts things: a typo gives one clear line, not a traceback."""
    for key in ("epochs", "max_steps", "batch_size", "accumulate", "log_every", "n_samples", "keep_every", "keep_last"):
        value = t.get(key)
        if key == "max_steps" and value is None:
            continue
        zero_ok = key in ("keep_every", "keep_last")
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero_ok else 1):
            raise GenlabError(f"trainer.{key} must be a whole number{'' if zero_ok else ' above 0'}; got {value!r}.")
    every = t.get("checkpoint_every")  # epochs, or a duration with its unit
    if isinstance(every, str) and every.strip()[-1:].lower() in ("h", "m", "s"):
        seconds(every, "trainer.checkpoint_every")
    elif isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise GenlabError(f"trainer.checkpoint_every must be a number of epochs above 0 (1) or a duration with its "
                          f"unit (90s, 10m, 1h); got {every!r}.")
    check_on_nan(t.get("on_nan"))


def hydra_choices() -> dict | None:
    """The config groups' options this command was composed from ({"model": "vae_gan", ...}); None outside
    Hydra's app (genlab.api)."""
    if not HydraConfig.initialized():
        return None
    choices = OmegaConf.to_container(HydraConfig.get().runtime.choices)
    return {k: v for k, v in choices.items() if not k.startswith("hydra/")}


def resumed_config(stored: dict, cfg: DictConfig, overrides, choices: dict | None = None) -> DictConfig:
    """The stored run's config, with this command's overrides of what may change on resume (CHANGEABLE).
    The other overrides must give the values the run has: re-running the run's own command with resume=
    added (what a requeue script does) is accepted, a change of what it trains is refused. A config group on
    the command line (model=vae_gan) must name the option the run was composed from (``choices``, kept in its
    checkpoint); the run keeps its values, whatever genlab's defaults for that option have become since. A
    checkpoint without ``choices`` (written before genlab kept them) has the group's values compared instead."""
    # today's trainer defaults under the stored values: a setting added since the run started has a value
    merged = OmegaConf.merge({"trainer": OmegaConf.to_container(cfg.trainer)}, {"trainer": SINCE}, stored)
    composed = OmegaConf.to_container(cfg, resolve=True)
    changed = {}
    for o in overrides:
        key, _, value = o.partition("=")
        key = key.lstrip("+~")
        if key in ("resume", "launcher") or key.startswith("hydra"):  # launcher: where it runs
            continue
        if key == "callbacks" or key.startswith("callbacks."):  # what the run writes: this command's (below)
            continue
        if key == "logger" or key.startswith("logger."):  # what watches the run: this command's trackers
            OmegaConf.update(merged, "logger", OmegaConf.to_container(cfg, resolve=True).get("logger"), merge=False,
                             force_add=True)
            continue
        if choices is not None and key in choices:  # a config group: the run's own option, not today's values of it
            if value != ("null" if choices[key] is None else str(choices[key])):
                changed[key] = f"{key} (the run has {choices[key]}, this command {value})"
            continue
        named = "." in key  # a setting named on the command line, not a config group or preset
        root = "" if key == "experiment" else key  # a preset may set anything
        for path, new in leaves(composed if not root else OmegaConf.select(cfg, root), root):
            if path.startswith(CHANGEABLE) and not path.startswith(FIXED):
                OmegaConf.update(merged, path, new, force_add=True)
                continue
            old = OmegaConf.select(merged, path, default=MISSING_VALUE)
            if old is MISSING_VALUE and not named:
                continue  # a default added to genlab since the run started
            if old is MISSING_VALUE or old != new:
                changed[path] = f"{path} (the run has {'no such setting' if old is MISSING_VALUE else repr(old)}, " \
                                f"this command {new!r})"
    if changed:
        raise refusal(list(changed.values()))
    merged.resume = cfg.resume
    # the writers are this command's, each reading its settings from the run's trainer (trainer.keep_last=3 on
    # resume takes effect); a run from before they were a config group has none stored
    OmegaConf.update(merged, "callbacks", cfg.get("callbacks"), merge=False, force_add=True)
    return merged


MISSING_VALUE = object()


def refusal(changes: list[str]) -> GenlabError:
    return GenlabError(
        f"resume= continues a run as it was configured, and this command would change {', '.join(changes[:4])}"
        f"{' and more' if len(changes) > 4 else ''}. Start a new run for that, or drop the override. On resume "
        "you may change device, dataset.root, dataset.in_memory, logger, callbacks and trainer settings other than "
        "trainer.batch_size and trainer.accumulate."
    )


def leaves(node, prefix: str):
    """(dotted path, value) of every leaf under ``node``; lists count as leaves."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if isinstance(node, dict) and node:
        for k, v in node.items():
            yield from leaves(v, f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix, node


def previous_metrics(ckpt_path: Path, step: int) -> list[dict]:
    """The resumed run's metrics.csv rows up to its checkpoint, so the curves continue."""
    path = ckpt_path.parent.parent / "metrics.csv"
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        rows = [{k: float(v) if v not in ("", None) else None for k, v in r.items()} for r in csv.DictReader(fh)]
    for r in rows:
        r["step"], r["epoch"] = int(r["step"]), int(r["epoch"])
        for k in [k for k, v in r.items() if v is None]:  # a loss missing from a row (n_critic > 1, skipped steps)
            del r[k]
    return [r for r in rows if r["step"] <= step]
