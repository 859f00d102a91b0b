"""genlab evaluate on an inspection dataset (dataset=mvtec: good parts to train on, defects with pixel masks to
test on): image metrics (AUROC, AUPRC, F1-max) over all defects and per defect type, pixel metrics (AUROC and
AUPRO) of the anomaly maps where masks exist, the decision threshold chosen on the validation images and the
confusion at it, and overlays of the images the model found hardest. The threshold is stored with the run
(``threshold.json`` in its directory), where `genlab predict` reads it."""

import csv
import json
import logging
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from sklearn.metrics import roc_curve

from genlab import bundle, checkpoint, detection, plots, runs, summary
from genlab.errors import GenlabError
from genlab.parts import test_split
from genlab.scores import name_of, score_for
from genlab.scoring import calibrate, maps_of

log = logging.getLogger(__name__)

THRESHOLD = "threshold.json"  # in the run directory: the threshold `genlab predict` decides with
SHOWN = 6  # images in each overlay figure


def is_inspection(train_cfg: DictConfig) -> bool:
    """Whether a run was trained on an inspection dataset (one with a validation split and defect masks)."""
    return str(train_cfg.dataset.get("_target_", "")).endswith(".mvtec")


def inspection_report(ckpt, loaded: tuple, out_dir: Path, cfg: DictConfig, device) -> dict:
    """Score the validation and test images of inspection run ``ckpt`` (``loaded``: its model, config and
    checkpoint state); metrics, threshold, overlays."""
    model, train_cfg, state = loaded
    score = score_for(model, cfg.score)
    with_maps = score.has_map(model)
    if not with_maps:
        log.warning("score=%s has no anomaly map: the pixel metrics and overlays are left out", name_of(score))
    calibrate(score, model, train_cfg, [0], device, cfg.dataset_root)
    val = test_split(train_cfg, cfg.dataset_root, validation=True)
    test = test_split(train_cfg, cfg.dataset_root)
    val_scores, _ = maps_of(model, val.images, score, cfg.batch_size, device, None)
    t0 = time.perf_counter()
    s, maps = maps_of(model, test.images, score, cfg.batch_size, device, cfg.map_sigma if with_maps else None)
    scoring_s = time.perf_counter() - t0
    labels = test.labels.numpy()
    anomalous = labels > 0
    if anomalous.all() or not anomalous.any():
        raise GenlabError(f"the test split of {test.name} needs good images and defective ones; it has "
                          f"{int((~anomalous).sum())} good and {int(anomalous.sum())} defective.")
    threshold = detection.threshold(cfg.threshold, val_scores[val.labels.numpy() == 0], val_scores,
                                    val.labels.numpy() > 0)
    names = test.class_names
    report = {
        "task": "anomaly", "kind": "inspection", "dataset": test.name, "split": "test", "score": name_of(score),
        "model": type(model).__name__, "checkpoint": str(checkpoint.resolve(ckpt)), "step": int(state["step"]),
        "weights": state["weights"], "overrides": runs.overrides(runs.of_checkpoint(ckpt)),
        "n_normal": int((~anomalous).sum()), "n_anomalous": int(anomalous.sum()), "n_validation": len(val),
        **detection.image_metrics(anomalous, s),
        "threshold": {"rule": str(cfg.threshold), "value": threshold,
                      **detection.at_threshold(anomalous, s, threshold)},
        "per_defect": {}, "scoring_seconds": round(scoring_s, 2), "map_sigma": cfg.map_sigma if with_maps else None,
    }
    known = test.mask_known.numpy() if test.mask_known is not None else np.zeros(len(test), bool)
    t0 = time.perf_counter()
    if with_maps and known[anomalous].any():
        report.update(pixel_metrics(test.masks.numpy()[:, 0] > 0, maps, known, cfg.pro_limit))
        report["pixel_seconds"] = round(time.perf_counter() - t0, 2)
    for k in range(1, len(names)):
        one = (labels == 0) | (labels == k)
        row = {"n": int((labels == k).sum()), **detection.image_metrics(anomalous[one], s[one])}
        row["recall_at_threshold"] = float((s[labels == k] >= threshold).mean())
        if with_maps and known[labels == k].any():
            row.update(pixel_metrics(test.masks.numpy()[one, 0] > 0, maps[one], known[one], cfg.pro_limit))
        report["per_defect"][names[k]] = row
    write(report, test, s, maps, threshold, out_dir)
    store_threshold(runs.of_checkpoint(ckpt), report)
    return report


def pixel_metrics(masks: np.ndarray, maps: np.ndarray, known: np.ndarray, limit: float) -> dict:
    """Pixel AUROC and AUPRO (up to the false-positive rate ``limit``) over the images whose masks are known."""
    return {"pixel_auroc": detection.pixel_auroc(masks[known], maps[known]),
            "aupro": detection.aupro(masks[known], maps[known], limit), "pro_limit": limit}


def store_threshold(run_dir: Path, report: dict) -> None:
    """The threshold and the score it is for, in the run directory, for `genlab predict`."""
    if bundle.is_export(run_dir):  # its checksummed threshold.json stays as exported
        log.info("the threshold stays in this report: %s is an export, which genlab leaves as it was written", run_dir)
        return
    entry = {"score": report["score"], "rule": report["threshold"]["rule"], "value": report["threshold"]["value"],
             "map_range": report.get("map_range"), "map_sigma": report["map_sigma"], "checkpoint": report["checkpoint"], "step": report["step"]}
    try:
        (run_dir / THRESHOLD).write_text(json.dumps(entry, indent=2) + "\n")
    except OSError as e:
        log.warning("could not store the threshold in %s (%s): genlab predict will choose it again", run_dir, e)


def stored_threshold(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / THRESHOLD).read_text())
    except (OSError, ValueError):
        return None


def write(report: dict, test, s: np.ndarray, maps, threshold: float, out_dir: Path) -> None:
    """roc.png, scores.csv, overlays_*.png, report.json and report.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = test.labels.numpy()
    fpr, tpr, _ = roc_curve(labels > 0, s)
    plots.roc(fpr, tpr, report["auroc"], out_dir / "roc.png",
              f"{report['model']} on {report['dataset']}: good against every defect, score {report['score']}")
    paths = test.paths or [str(i) for i in range(len(s))]
    with open(out_dir / "scores.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "type", "anomalous", "score", "decision"])
        for p, c, v in zip(paths, labels.tolist(), s.tolist()):
            w.writerow([p, test.class_names[c], int(c > 0), v, "defective" if v >= threshold else "good"])
    if maps is not None:
        report["map_range"] = [float(np.percentile(maps, 1)), float(np.percentile(maps, 99.9))]
        good, bad = np.flatnonzero(labels == 0), np.flatnonzero(labels > 0)
        for name, chosen, about in (
                ("overlays_good_highest.png", good[np.argsort(-s[good])][:SHOWN], "good images scored highest"),
                ("overlays_defect_highest.png", bad[np.argsort(-s[bad])][:SHOWN], "defects scored highest"),
                ("overlays_defect_lowest.png", bad[np.argsort(s[bad])][:SHOWN], "defects scored lowest")):
            plots.overlays(test.images[chosen].numpy(), maps[chosen], test.masks[chosen, 0].numpy() > 0,
                           [f"{paths[i]}\nscore {s[i]:.4g}" for i in chosen], report["map_range"], out_dir / name,
                           f"{report['model']}: {about} (threshold {threshold:.4g})")
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "report.md").write_text(summary.report_markdown(report))
