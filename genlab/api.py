"""genlab from Python, for notebooks: the functions the commands are built on.

    import genlab.api as gl
    run = gl.train(["model=ddpm", "dataset=mnist", "dataset.root=data", "trainer.max_time=5m"])
    model = gl.load(run)                      # the moving average of the weights, when the run kept one
    images, labels = gl.sample(model, n=16, steps=20)
    report = gl.evaluate(run, ["task=quality", "n_samples=2000"])
    rows = gl.predict(run, "new_parts/")       # an inspection run (dataset=mvtec): a score and decision a file
    folder = gl.export(run, ["format=onnx"])  # safetensors, a model card, ONNX graphs; gl.load(folder) reads it
"""

import itertools
import json
import time
from pathlib import Path

import torch
import yaml
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from genlab import runs, schema
from genlab.cli import execute
from genlab.config import CONFIG_DIR
from genlab.device import resolve_device
from genlab.models import GenerativeModel
from genlab.parts import load_model
from genlab.predict import read_predictions
from genlab.sampling import draw


def compose(verb: str = "train", overrides=(), config_dir=None) -> DictConfig:
    """The config `genlab VERB OVERRIDES...` runs, composed the same way. ``config_dir``: a folder of your own
    configs, as `--config-dir DIR` gives it (searched after genlab's: give your files names of their own)."""
    schema.register()
    overrides = [schema.free_keys(verb, o) for o in overrides]
    if config_dir is not None:
        overrides.append(f"hydra.searchpath=[file://{Path(config_dir).expanduser().resolve()}]")
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(verb, overrides=overrides)


def train(overrides=(), run_dir=None, config_dir=None) -> Path:
    """`genlab train OVERRIDES...`: trains, writes the run directory (default outputs/train/DATE/TIME) and
    returns it."""
    return _run("train", overrides, run_dir, config_dir)


def evaluate(ckpt, overrides=(), run_dir=None) -> dict:
    """`genlab evaluate ckpt=CKPT OVERRIDES...` for one run or checkpoint; returns its report."""
    run_dir = _run("evaluate", [f"ckpt={ckpt}", *overrides], run_dir, None)
    return json.loads((run_dir / "report.json").read_text())


def predict(ckpt, images, overrides=(), run_dir=None) -> list[dict]:
    """`genlab predict ckpt=CKPT images=DIR OVERRIDES...`; returns predictions.csv's rows (file, score, decision,
    threshold)."""
    run_dir = _run("predict", [f"ckpt={ckpt}", f"images={images}", *overrides], run_dir, None)
    return read_predictions(run_dir / "predictions.csv")


def export(ckpt, overrides=(), run_dir=None) -> Path:
    """`genlab export ckpt=CKPT OVERRIDES...` (format=onnx, out=DIR, ...); returns the export folder."""
    run_dir = _run("export", [f"ckpt={ckpt}", *overrides], run_dir, None)
    out = next((o.split("=", 1)[1] for o in overrides if o.startswith("out=")), None)
    return Path(out).expanduser() if out else run_dir


def load(ckpt, device: str = "auto", ema: bool = True) -> GenerativeModel:
    """The model of a run directory, checkpoint file or export folder, in eval mode: the moving average of its weights
    when the run kept one and ``ema``."""
    return load_model(ckpt, resolve_device(device), ema=ema)[0]


def sample(model, n: int | None = None, labels=None, seed: int = 0, precision: str = "auto", compile: str = "auto",
           batch_size: int = 250, **settings):
    """(images [n, C, H, W] in [0, 1], labels or None) from a model or a run, as `genlab sample` draws them;
    ``settings``: the model's sampling settings (steps=20, guidance=3, ...)."""
    if not isinstance(model, torch.nn.Module):
        model = load(model)
    return draw(model, n, labels, seed, precision, compile, batch_size, settings=settings)


def _run(verb: str, overrides, run_dir, config_dir) -> Path:
    cfg = compose(verb, overrides, config_dir)
    if run_dir is None:  # outputs/VERB/DATE/TIME, as the command names it; a second run in the same second gets _1
        run_dir = base = Path("outputs") / verb / time.strftime("%Y-%m-%d/%H-%M-%S")
        for i in itertools.count(1):
            if not run_dir.exists():
                break
            run_dir = base.with_name(f"{base.name}_{i}")
    run_dir = Path(run_dir).expanduser()
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)  # as the command writes it: evaluate reads the overrides
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    runs.mark_latest(run_dir, verb)  # outputs/VERB/latest, when the run lies there
    execute(verb, cfg, run_dir, list(overrides))
    return run_dir
