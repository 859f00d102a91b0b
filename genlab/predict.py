"""genlab predict ckpt=RUN images=DIR: score a folder of new images with a trained model and decide, at the
threshold stored with the run (by `genlab evaluate` on an inspection run) or one given here, which are defective.
Writes predictions.csv (file, score, decision) and, per image, its anomaly map over it as a PNG (maps/). A file
that cannot be read is named in one line and left out; the rest are scored."""

import csv
import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from tqdm import tqdm

from genlab import detection, environment, plots, runs, schema
from genlab.data.mvtec import read_image
from genlab.device import resolve_device
from genlab.errors import GenlabError
from genlab.images import IMAGE_SUFFIXES
from genlab.inspection import is_inspection, stored_threshold
from genlab.parts import load_model, test_split
from genlab.scores import name_of, score_for
from genlab.scoring import calibrate, maps_of

log = logging.getLogger(__name__)


def run(cfg: DictConfig, run_dir: Path, overrides=()) -> dict:
    unknown = schema.sampling_overrides(cfg, "predict")
    if unknown:
        raise GenlabError(f"{', '.join(unknown)} is not a setting of genlab predict (genlab predict --help).")
    folder = Path(cfg.images).expanduser()
    files = image_files(folder)
    device = resolve_device(cfg.device)
    environment.record(run_dir, device, "fp32")  # predict scores in fp32
    model, train_cfg, _ = load_model(cfg.ckpt, device, ema=cfg.ema)
    stored = stored_threshold(runs.of_checkpoint(cfg.ckpt)) or {}
    score = score_for(model, cfg.score if cfg.score is not None else stored.get("score"))
    calibrate(score, model, train_cfg, train_cfg.dataset.get("classes"), device, cfg.dataset_root)  # its training images
    threshold, how = choose_threshold(cfg, stored, score, model, train_cfg, device)
    log.info("scoring %d images of %s with score %s; defective where the score is at least %.5g (%s)",
             len(files), folder, name_of(score), threshold, how)
    sigma = None  # the maps' blur: evaluate's, else its default
    if cfg.maps and score.has_map(model):
        sigma = stored["map_sigma"] if stored.get("map_sigma") is not None else 4.0
    elif cfg.maps:
        log.warning("score=%s has no anomaly map: no maps are written", name_of(score))
    data = train_cfg.dataset
    size, channels, fit = int(data.image_size), int(data.get("channels", 1)), str(data.get("fit", "resize"))
    rows, skipped = [], []
    maps_dir = run_dir / "maps"
    with tqdm(total=len(files), unit="img", dynamic_ncols=True, desc="predict") as bar:
        for chunk in [files[i:i + cfg.batch_size] for i in range(0, len(files), cfg.batch_size)]:
            images, names = [], []
            for f in chunk:
                try:
                    images.append(read_image(f, size, channels, fit))
                    names.append(f)
                except GenlabError as e:
                    log.warning("skipped %s", e)
                    skipped.append(f)
            if images:
                batch = torch.stack(images)
                s, maps = maps_of(model, batch, score, len(batch), device, sigma)
                for i, (f, v) in enumerate(zip(names, s.tolist())):
                    rows.append((f.relative_to(folder).as_posix(), v, "defective" if v >= threshold else "good"))
                    if maps is not None:
                        write_map(f, maps[i], stored.get("map_range"), maps_dir / f.relative_to(folder))
            bar.update(len(chunk))
    if not rows:
        raise GenlabError(f"none of the {len(files)} image files under {folder} could be read.")
    write_predictions(rows, threshold, run_dir / "predictions.csv")
    flagged = sum(r[2] == "defective" for r in rows)
    log.info("%d images scored: %d defective, %d good%s; predictions.csv%s in %s", len(rows), flagged,
             len(rows) - flagged, f"; {len(skipped)} unreadable, left out" if skipped else "",
             " and maps/" if sigma is not None else "", run_dir)
    return {"n": len(rows), "defective": flagged, "skipped": len(skipped), "threshold": threshold}


def image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise GenlabError(f"images={folder} is not a directory: give a folder of images to score.")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise GenlabError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}.")
    return files


def choose_threshold(cfg: DictConfig, stored: dict, score, model, train_cfg, device) -> tuple[float, str]:
    """``threshold=`` (a number, or a rule applied to the run's validation images), else the run's stored
    threshold when it is for this score, else quantile:0.99 of the validation images' scores."""
    rule = cfg.threshold
    if rule is None and stored and stored.get("score") == name_of(score):
        return float(stored["value"]), f"stored by genlab evaluate: {stored['rule']}"
    rule = "quantile:0.99" if rule is None else rule
    kind, value = detection.parse_rule(rule)
    if kind == "fixed":
        return float(value), "given"
    if not is_inspection(train_cfg):
        raise GenlabError(f"threshold={rule} is chosen on a validation split, which only inspection runs "
                          "(dataset=mvtec) have: give a number, threshold=VALUE.")
    val = test_split(train_cfg, cfg.dataset_root, validation=True)
    s, _ = maps_of(model, val.images, score, cfg.batch_size, device, None)
    normal = val.labels.numpy() == 0
    return detection.threshold(rule, s[normal], s, ~normal), f"{rule} of {len(val)} validation images"


def write_map(source: Path, m: np.ndarray, span, path: Path) -> None:
    """The anomaly map (at the model's resolution) stretched over the image file ``source`` at the file's own size,
    as a PNG at ``path`` (where the image sat in the folder)."""
    if span is None:
        span = [float(m.min()), float(m.max())]
    with Image.open(source) as im:
        image = np.asarray(im.convert("L" if im.mode in ("1", "L", "I", "I;16", "F") else "RGB"))
    h, w = image.shape[:2]
    stretched = np.asarray(Image.fromarray(m.astype(np.float32)).resize((w, h), Image.Resampling.BILINEAR))
    pixels = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(plots.heat_overlay(pixels, stretched, span)).save(path.with_suffix(".png"), compress_level=1)


def write_predictions(rows: list[tuple], threshold: float, path: Path) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "score", "decision", "threshold"])
        w.writerows((f, repr(v), d, repr(threshold)) for f, v, d in rows)


def read_predictions(path: Path) -> list[dict]:
    """predictions.csv back as rows: file, score (float), decision, threshold (float)."""
    with open(path, newline="") as fh:
        return [{**r, "score": float(r["score"]), "threshold": float(r["threshold"])} for r in csv.DictReader(fh)]
