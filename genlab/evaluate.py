"""genlab evaluate: one-class anomaly detection reports (ROC/AUC), for one run or a whole sweep."""

import csv
import json
import logging
import statistics
from pathlib import Path

import numpy as np
import torch
import yaml
from omegaconf import DictConfig
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from genlab import checkpoint, plots
from genlab.build import load_model, test_split
from genlab.errors import GenlabError
from genlab.trainer import resolve_device

log = logging.getLogger(__name__)


def run(cfg: DictConfig, run_dir: Path, overrides=()) -> None:
    if cfg.task != "anomaly":
        raise GenlabError(f"task={cfg.task} is not a genlab evaluate task: use task=anomaly.")
    device = resolve_device(cfg.device)
    runs = sweep_runs(Path(cfg.ckpt).expanduser())
    if runs is None:
        report = anomaly_report(cfg.ckpt, run_dir, cfg, device)
        log.info("AUROC %.4f  AUPRC %.4f  (score %s, normal classes %s)", report["auroc"], report["auprc"],
                 report["score"], report["normal_classes"])
        return
    rows = []
    for sub in runs:
        report = anomaly_report(sub, run_dir / sub.name, cfg, device)
        log.info("%s: AUROC %.4f (%s)", sub.name, report["auroc"], " ".join(report["overrides"]))
        rows.append(report)
    write_summary(rows, run_dir)


def sweep_runs(path: Path) -> list[Path] | None:
    """The run directories of a multirun directory, or None when ``path`` is one run or a file."""
    if not path.is_dir() or (path / "checkpoints" / "last.pt").is_file():
        return None
    runs = [p for p in path.iterdir() if (p / "checkpoints" / "last.pt").is_file()]
    if not runs:
        raise GenlabError(f"no checkpoint in {path}: give a run directory, a .pt file or a multirun directory.")
    return sorted(runs, key=lambda p: (len(p.name), p.name))


@torch.inference_mode()
def scores_of(model, images: torch.Tensor, score, batch_size: int, device) -> np.ndarray:
    out = [model.anomaly_score(b.to(device).float().div(255), score).float().cpu() for b in images.split(batch_size)]
    return torch.cat(out).numpy()


def anomaly_report(ckpt, out_dir: Path, cfg: DictConfig, device) -> dict:
    """Score the whole test split; the classes the model was trained on are normal, the rest anomalous."""
    model, train_cfg, state = load_model(ckpt, device)
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
        "overrides": run_overrides(ckpt),
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
    (out_dir / "report.md").write_text(report_markdown(report))
    return report


def run_overrides(ckpt) -> list[str]:
    """The command-line overrides of the run that wrote ``ckpt`` (from its .hydra/overrides.yaml)."""
    path = checkpoint.resolve(ckpt).parent.parent / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    return [o for o in yaml.safe_load(path.read_text()) or [] if not o.startswith("hydra.")]


def report_markdown(r: dict) -> str:
    lines = [
        f"# Anomaly detection: {r['model']} on {r['dataset']} ({r['split']} split)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| AUROC | {r['auroc']:.4f} |",
        f"| AUPRC (anomalous = positive) | {r['auprc']:.4f} |",
        f"| score | {r['score']} |",
        f"| normal classes | {', '.join(map(str, r['normal_classes']))} |",
        f"| normal / anomalous images | {r['n_normal']} / {r['n_anomalous']} |",
        f"| checkpoint | `{r['checkpoint']}` (step {r['step']}) |",
        "",
        "| class | role | images | mean score |",
        "|---|---|---|---|",
    ]
    lines += [f"| {c} | {v['role']} | {v['n']} | {v['mean_score']:.4f} |" for c, v in r["per_class"].items()]
    return "\n".join(lines) + "\n"


def write_summary(rows: list[dict], out_dir: Path) -> None:
    """summary.csv and summary.md: one row per run, then the mean and standard deviation."""
    aurocs = [r["auroc"] for r in rows]
    mean, std = statistics.fmean(aurocs), statistics.pstdev(aurocs)
    with open(out_dir / "summary.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["run", "overrides", "normal_classes", "score", "auroc", "auprc"])
        for r in rows:
            w.writerow([Path(r["checkpoint"]).parent.parent.name, " ".join(r["overrides"]),
                        " ".join(map(str, r["normal_classes"])), r["score"], f"{r['auroc']:.6f}", f"{r['auprc']:.6f}"])
        w.writerow(["mean", "", "", "", f"{mean:.6f}", f"{statistics.fmean(r['auprc'] for r in rows):.6f}"])
        w.writerow(["std", "", "", "", f"{std:.6f}", f"{statistics.pstdev([r['auprc'] for r in rows]):.6f}"])
    lines = ["| run | overrides | normal | AUROC | AUPRC |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {Path(r['checkpoint']).parent.parent.name} | `{' '.join(r['overrides'])}` | "
                     f"{', '.join(map(str, r['normal_classes']))} | {r['auroc']:.4f} | {r['auprc']:.4f} |")
    lines.append(f"| **mean ± std** | | | **{mean:.4f} ± {std:.4f}** | |")
    (out_dir / "summary.md").write_text(f"# {rows[0]['model']} on {rows[0]['dataset']}, score {rows[0]['score']}: "
                                        f"{len(rows)} runs\n\n" + "\n".join(lines) + "\n")
    log.info("mean AUROC over %d runs: %.4f ± %.4f", len(rows), mean, std)
