"""genlab evaluate task=anomaly: one-class anomaly detection. The classes a model was trained on are normal, the
other test images anomalous; the model's anomaly score (genlab.scores) ranks them (ROC curve, AUROC, AUPRC from
scikit-learn)."""

import csv
import json
import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from genlab import checkpoint, plots, runs, summary
from genlab.errors import GenlabError
from genlab.inspection import inspection_report, is_inspection
from genlab.parts import test_split
from genlab.sampling import check_sampling, from_checkpoint
from genlab.scores import name_of, score_for
from genlab.scoring import calibrate, scores_of

log = logging.getLogger(__name__)


def anomaly_report(ckpt, out_dir: Path, cfg: DictConfig, device) -> dict:
    """Score the whole test split; the classes the model was trained on are normal, the rest anomalous."""
    model, train_cfg, state, settings = from_checkpoint(ckpt, cfg, "evaluate", device)
    check_sampling(model, settings, command="evaluate")
    if settings:
        log.warning("sampling settings (%s) are for task=quality; task=anomaly does not sample", ", ".join(settings))
    if is_inspection(train_cfg):
        return inspection_report(ckpt, (model, train_cfg, state), out_dir, cfg, device)
    score = score_for(model, cfg.score)
    normal = normal_classes(ckpt, cfg, train_cfg)
    test = test_split(train_cfg, cfg.dataset_root)
    labels = test.labels.numpy()
    anomalous = ~np.isin(labels, normal)
    if anomalous.all():
        raise GenlabError(f"normal_classes={normal} names no test image of {test.name} (its labels: {sorted(set(labels.tolist()))}).")
    if not anomalous.any():
        raise GenlabError(f"normal_classes={normal} covers every test image of {test.name}: nothing is anomalous.")
    calibrate(score, model, train_cfg, normal, device, cfg.dataset_root)
    s = scores_of(model, test.images, score, cfg.batch_size, device)
    if not np.isfinite(s).all():
        raise GenlabError(f"the model gave non-finite anomaly scores on {int((~np.isfinite(s)).sum())} test images.")
    report = {
        "task": "anomaly", "auroc": float(roc_auc_score(anomalous, s)),
        "auprc": float(average_precision_score(anomalous, s)), "score": name_of(score), "normal_classes": normal,
        "n_normal": int((~anomalous).sum()), "n_anomalous": int(anomalous.sum()), "dataset": test.name,
        "split": "test", "model": type(model).__name__, "checkpoint": str(checkpoint.resolve(ckpt)),
        "step": int(state["step"]), "weights": state["weights"], "overrides": runs.overrides(runs.of_checkpoint(ckpt)),
        "per_class": {int(c): {"n": int((labels == c).sum()), "mean_score": float(s[labels == c].mean()),
                               "role": "normal" if c in normal else "anomalous"} for c in np.unique(labels)},
    }
    write(report, labels, anomalous, s, out_dir)
    return report


def normal_classes(ckpt, cfg: DictConfig, train_cfg: DictConfig) -> list[int]:
    """``normal_classes=``, else the classes the run was trained on."""
    normal = cfg.normal_classes if cfg.normal_classes is not None else train_cfg.dataset.get("classes")
    if normal is None:
        raise GenlabError(
            f"{ckpt} was trained on every class, so no test class counts as anomalous. Train on some "
            "classes (dataset.classes=[3]) or name the normal ones here: normal_classes=[3]."
        )
    return sorted(int(c) for c in normal)


def write(report: dict, labels: np.ndarray, anomalous: np.ndarray, s: np.ndarray, out_dir: Path) -> None:
    """roc.png, scores.csv, report.json and report.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fpr, tpr, _ = roc_curve(anomalous, s)
    plots.roc(fpr, tpr, report["auroc"], out_dir / "roc.png",
              f"{report['model']} on {report['dataset']}: normal {report['normal_classes']}, score {report['score']}")
    with open(out_dir / "scores.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "label", "anomalous", "score"])
        w.writerows(zip(range(len(s)), labels.tolist(), anomalous.astype(int).tolist(), s.tolist()))
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "report.md").write_text(summary.report_markdown(report))
