"""genlab train: build the parts named by the config and run the shared loop."""

import csv
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from genlab import checkpoint
from genlab.build import build_dataset, build_model, build_optimizers
from genlab.errors import GenlabError
from genlab.trainer import Trainer, check_on_nan, resolve_device

log = logging.getLogger(__name__)

GROUPS = ("model", "dataset", "loss", "optimizer", "experiment")


def run(cfg: DictConfig, run_dir: Path, overrides: list[str] = ()) -> None:
    state = None
    if cfg.get("resume"):
        state = checkpoint.load(cfg.resume)
        cfg = resumed_config(state["config"], cfg, overrides)
    check_trainer(cfg.trainer)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    model = build_model(cfg)  # first: config mistakes show before any data is read
    optimizers = build_optimizers(cfg.optimizer, model)
    data = build_dataset(cfg.dataset, train=True)
    t = cfg.trainer
    title = f"{type(model).__name__} on {data.name}, loss {cfg.loss.name}"
    trainer = Trainer(
        model, optimizers, data.images, run_dir, device=device, precision=t.precision, epochs=t.epochs,
        max_steps=t.max_steps, batch_size=t.batch_size, log_every=t.log_every, n_samples=t.n_samples,
        checkpoint_every=t.checkpoint_every, keep_every=t.keep_every, keep_last=t.keep_last, progress=t.progress, seed=cfg.seed,
        on_nan=t.on_nan, compile=t.compile, config=OmegaConf.to_container(cfg, resolve=True), title=title,
    )
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "%s (%.2fM parameters): %d images %s, device %s, precision %s, %d steps (%d epochs of %d, batch %d)",
        title, n_params / 1e6, len(data), "x".join(map(str, data.image_shape)), trainer.device,
        trainer.precision, trainer.total_steps, trainer.epochs, trainer.steps_per_epoch, trainer.batch_size,
    )
    if state is not None:
        trainer.rows = previous_metrics(checkpoint.resolve(cfg.resume), state["step"])
        log.info("resuming from %s at step %d", checkpoint.resolve(cfg.resume), state["step"])
    trainer.fit(state, checkpoint.resolve(cfg.resume) if state is not None else None)
    log.info("done: %d steps; checkpoint %s", trainer.step_index, run_dir / "checkpoints" / "last.pt")


def check_trainer(t: DictConfig) -> None:
    """Whole numbers where the loop counts things: a typo gives one clear line, not a traceback."""
    for key in ("epochs", "max_steps", "batch_size", "log_every", "n_samples", "checkpoint_every", "keep_every", "keep_last"):
        value = t.get(key)
        if key == "max_steps" and value is None:
            continue
        zero_ok = key in ("keep_every", "keep_last")
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero_ok else 1):
            raise GenlabError(f"trainer.{key} must be a whole number{'' if zero_ok else ' above 0'}; got {value!r}.")
    check_on_nan(t.get("on_nan"))


def resumed_config(stored: dict, cfg: DictConfig, overrides) -> DictConfig:
    """The stored run's config, with this command's plain overrides (trainer.epochs=..., device=...)."""
    # today's trainer defaults under the stored values: a setting added since the run started has a value
    merged = OmegaConf.merge({"trainer": OmegaConf.to_container(cfg.trainer)}, stored)
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if key == "resume" or key.startswith("hydra."):
            continue
        if key in GROUPS:
            raise GenlabError(
                f"resume= continues a run with its stored config; '{o}' would change its {key}. "
                "Start a new run for that, or drop the override."
            )
        OmegaConf.update(merged, key, OmegaConf.select(cfg, key), force_add=True)
    merged.resume = cfg.resume
    return merged


def previous_metrics(ckpt_path: Path, step: int) -> list[dict]:
    """The resumed run's metrics.csv rows up to its checkpoint, so the curves continue."""
    path = ckpt_path.parent.parent / "metrics.csv"
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        rows = [{k: float(v) if v not in ("", None) else None for k, v in r.items()} for r in csv.DictReader(fh)]
    for r in rows:
        r["step"], r["epoch"] = int(r["step"]), int(r["epoch"])
    return [r for r in rows if r["step"] <= step]
