"""genlab export ckpt=RUN format=safetensors|torchscript|onnx out=DIR: a run as a folder others can use without
genlab's checkpoints: the weights as safetensors, the config, a model card (README.md) with samples, and for
TorchScript and ONNX the generator and the anomaly scorer as standalone graphs, each checked against the model.

`genlab sample`, `genlab evaluate`, `genlab predict` and `genlab.api.load` take the folder as they take a run.
"""

import logging
import shutil
from pathlib import Path

import torch
import yaml
from omegaconf import DictConfig

from genlab import bundle, card, environment, runs, schema
from genlab.errors import GenlabError, first_line
from genlab.graphs import (Generator, Scorer, check_onnx_installed, export_graph, generator_inputs, scorer_inputs,
                           SUFFIX)
from genlab.images import grid_of, save_image
from genlab.inspection import THRESHOLD
from genlab.parts import load_model
from genlab.sampling import check_sampling
from genlab.scores import name_of, score_for
from genlab.scoring import calibrate

log = logging.getLogger(__name__)

FORMATS = ("safetensors", "torchscript", "onnx")
GRID = "samples.png"


def run(cfg: DictConfig, run_dir: Path, overrides=()) -> dict:
    if cfg.format not in FORMATS:
        raise GenlabError(f"format={cfg.format} is not one of {', '.join(FORMATS)}.")
    if cfg.format == "onnx":
        check_onnx_installed()
    out = Path(cfg.out).expanduser() if cfg.out else run_dir
    if bundle.is_export(out):
        raise GenlabError(f"{out} already holds an export: choose another out=, or remove it first.")
    if cfg.out and out.is_dir() and any(out.iterdir()):
        raise GenlabError(f"out={out} is a folder with files in it: give a new or empty folder for the export.")
    environment.record(run_dir, "cpu", "fp32")
    model, train_cfg, state = load_model(cfg.ckpt, "cpu", ema=cfg.ema)  # exported in fp32 on the CPU
    source = runs.of_checkpoint(cfg.ckpt)
    settings = schema.sampling_overrides(cfg, "export")
    check_sampling(model, settings, command="export")
    out.mkdir(parents=True, exist_ok=True)
    bundle.save_weights(model.state_dict(), out / bundle.WEIGHTS)
    (out / bundle.CONFIG).write_text(yaml.safe_dump(state["config"], sort_keys=False))
    files = [bundle.WEIGHTS, bundle.CONFIG]
    if (source / THRESHOLD).is_file():  # an inspection run's threshold goes with it: predict uses it
        shutil.copyfile(source / THRESHOLD, out / THRESHOLD)
        files.append(THRESHOLD)
    graphs, skipped = [], {}
    if cfg.format != "safetensors":
        graphs, skipped = export_graphs(model, train_cfg, settings, cfg, out)
    grid = None
    if model.generates:
        with torch.inference_mode():
            z = generator_inputs(model, 64, 0)
            save_image(grid_of(Generator(model, settings)(*z), 8), out / GRID)
        grid = GRID
    (out / "README.md").write_text(card.render(model, state, source, graphs, skipped, settings, grid))
    files += [g["file"] for g in graphs] + ([GRID] if grid else []) + ["README.md"]
    about = {"model": type(model).__name__, "source": str(source), "step": state["step"],
             "epoch": state.get("epoch", 0), "wall_time": state.get("wall_time", 0.0), "weights": state["weights"],
             "choices": state.get("choices"), "overrides": runs.overrides(source), "sampling": settings,
             "graphs": graphs, "not_exported": skipped}
    bundle.write_manifest(out, about, files)
    log.info("exported %s (step %d, %s weights) to %s: %s", type(model).__name__, state["step"], state["weights"], out,
             ", ".join(files))
    for what, why in skipped.items():
        log.warning("not exported: the %s, which %s", what, why)
    return {"out": str(out), "files": files}


def export_graphs(model, train_cfg, settings: dict, cfg: DictConfig, out: Path) -> tuple[list[dict], dict]:
    """The generator (a model that generates) and the anomaly scorer (a model with a score), as ``cfg.format``
    graphs in ``out``: ({file, what, inputs, parity} of each written, {what: why} of each that could not be)."""
    graphs, skipped = [], {}
    suffix = SUFFIX[cfg.format]
    if model.untraceable:
        return graphs, {"generator and the anomaly scorer": model.untraceable}
    if model.generates:
        names = ["z"] if not model.num_classes else ["z", "labels"]
        try:
            g = export_graph(Generator(model, settings), lambda n, seed: generator_inputs(model, n, seed), names,
                             cfg.format, out / f"generator{suffix}")
            graphs.append({**g, "what": "latents (and labels) to images in [0, 1]"})
        except GenlabError as e:
            skipped["generator"] = str(e)
    scorer = scorer_of(model, train_cfg, cfg, skipped)
    if scorer is not None:
        shape = tuple(int(train_cfg.dataset.get(k, 0)) for k in ("channels", "image_size", "image_size"))
        try:
            g = export_graph(scorer, lambda n, seed: scorer_inputs(model, shape, n, seed), ["images"], cfg.format,
                             out / f"scorer{suffix}")
            graphs.append({**g, "what": f"images in [0, 1] to anomaly scores ({name_of(scorer.score)}, higher is "
                                        "more anomalous)"})
        except GenlabError as e:
            skipped[f"anomaly scorer ({name_of(scorer.score)})"] = str(e)
    return graphs, skipped


def scorer_of(model, train_cfg, cfg: DictConfig, skipped: dict) -> Scorer | None:
    """The model's anomaly score (``cfg.score``, else its default) as a module, calibrated on the run's normal
    training images where it needs them; None (and why, in ``skipped``) where there is none."""
    try:
        score = score_for(model, cfg.score)
    except GenlabError:
        if cfg.score is not None:  # asked for, and it does not fit
            raise
        return None  # a model with no anomaly score at all: nothing to say
    if score.untraceable:
        skipped[f"anomaly scorer ({name_of(score)})"] = score.untraceable
        return None
    try:
        calibrate(score, model, train_cfg, train_cfg.dataset.get("classes"), torch.device("cpu"), cfg.dataset_root)
    except (GenlabError, OSError) as e:
        skipped[f"anomaly scorer ({name_of(score)})"] = (f"needs the run's training images for its calibration "
                                                         f"({first_line(e)}; dataset_root=PATH)")
        return None
    return Scorer(model, score)
