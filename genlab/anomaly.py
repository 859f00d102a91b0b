"""genlab evaluate task=anomaly: one-class anomaly detection. The classes a model was trained on are normal, the
other test images anomalous; the model's anomaly score ranks them (ROC curve, AUROC, AUPRC from scikit-learn)."""

import csv
import json
import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from genlab import checkpoint, plots, runs, schema, summary
from genlab.build import check_sampling, load_model, test_split
from genlab.errors import GenlabError

log = logging.getLogger(__name__)


@torch.inference_mode()
def scores_of(model, images: torch.Tensor, score, batch_size: int, device) -> np.ndarray:
    out = [model.anomaly_score(b.to(device).float().div(255), score).float().cpu() for b in images.split(batch_size)]
    return torch.cat(out).numpy()


def anomaly_report(ckpt, out_dir: Path, cfg: DictConfig, device) -> dict:
    """Score the whole test split; the classes the model was trained on are normal, the rest anomalous."""
    model, train_cfg, state = load_model(ckpt, device, ema=cfg.ema)
    settings = schema.sampling_overrides(cfg, "evaluate")
    check_sampling(model, settings, command="evaluate")
    if settings:
        log.warning("sampling settings (%s) are for task=quality; task=anomaly does not sample", ", ".join(settings))
    score = cfg.score or model.scores[0]
    if score not in model.scores:
        raise GenlabError(f"score={score} is not offered by {type(model).__name__}: use {' | '.join(model.scores)}.")
    normal = cfg.normal_classes if cfg.normal_classes is not None else train_cfg.dataset.get("classes")
    if normal is None:
        raise GenlabError(
            f"{ckpt} was trained on every class, so no test class counts as anomalous. Train on some "
            "classes (dataset.classes=[3]) or name the normal ones here: normal_classes=[3]."
        )
    normal = sorted(int(c) for c in normal)
    test = test_split(train_cfg, cfg.dataset_root)
    labels = test.labels.numpy()
    anomalous = ~np.isin(labels, normal)
    if anomalous.all():
        raise GenlabError(f"normal_classes={normal} names no test image of {test.name} (its labels: {sorted(set(labels.tolist()))}).")
    if not anomalous.any():
        raise GenlabError(f"normal_classes={normal} covers every test image of {test.name}: nothing is anomalous.")
    calibrate(model, train_cfg, cfg, normal, device)
    s = scores_of(model, test.images, score, cfg.batch_size, device)
    if not np.isfinite(s).all():
        raise GenlabError(f"the model gave non-finite anomaly scores on {int((~np.isfinite(s)).sum())} test images.")

    out_dir.mkdir(parents=True, exist_ok=True)
    fpr, tpr, _ = roc_curve(anomalous, s)
    auroc = float(roc_auc_score(anomalous, s))
    report = {
        "task": "anomaly",
        "auroc": auroc,
        "auprc": float(average_precision_score(anomalous, s)),
        "score": score,
        "normal_classes": normal,
        "n_normal": int((~anomalous).sum()),
        "n_anomalous": int(anomalous.sum()),
        "dataset": test.name,
        "split": "test",
        "model": type(model).__name__,
        "checkpoint": str(checkpoint.resolve(ckpt)),
        "step": int(state["step"]),
        "weights": state["weights"],
        "overrides": runs.overrides(runs.of_checkpoint(ckpt)),
        "per_class": {int(c): {"n": int((labels == c).sum()), "mean_score": float(s[labels == c].mean()),
                               "role": "normal" if c in normal else "anomalous"} for c in np.unique(labels)},
    }
    plots.roc(fpr, tpr, auroc, out_dir / "roc.png",
              f"{report['model']} on {test.name}: normal {normal}, score {score}")
    with open(out_dir / "scores.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "label", "anomalous", "score"])
        w.writerows(zip(range(len(s)), labels.tolist(), anomalous.astype(int).tolist(), s.tolist()))
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "report.md").write_text(summary.report_markdown(report))
    return report


@torch.inference_mode()
def calibrate(model, train_cfg: DictConfig, cfg: DictConfig, normal: list[int], device, n: int = 2000) -> None:
    """Show the model up to ``n`` normal training images (never test images) before it scores."""
    train = test_split(train_cfg, cfg.dataset_root, classes=normal, train=True)
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n]
    model.calibrate(train.images[pick].to(device).float().div(255))
