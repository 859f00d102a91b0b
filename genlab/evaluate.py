"""genlab evaluate: one-class anomaly detection reports (ROC/AUC), for one run or a whole sweep,
and generation-quality reports (task=quality) measured with genlab's own per-dataset classifier,
plus the standard Inception FID when the user gives the Inception weights."""

import csv
import functools
import json
import logging
import statistics
from pathlib import Path

import numpy as np
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from genlab import checkpoint, metrics, plots, schema
from genlab.build import check_sampling, load_model, test_split
from genlab.classifier import NoClassifier, classifier_for, predict
from genlab.device import resolve_device
from genlab.errors import GenlabError
from genlab.images import read_images, save_grid
from genlab.inception import inception_features, load_inception
from genlab.sample import draw
from genlab.trackers import after_evaluation

log = logging.getLogger(__name__)


def run(cfg: DictConfig, run_dir: Path, overrides=()) -> None:
    if cfg.task not in ("anomaly", "quality"):
        raise GenlabError(f"task={cfg.task} is not a genlab evaluate task: use task=anomaly or task=quality.")
    device = resolve_device(cfg.device)
    if cfg.task == "quality":
        inception = load_inception(cfg.inception_weights, device) if cfg.inception_weights else None
        report_of = functools.partial(quality_report, inception=inception)
    else:
        if cfg.inception_weights:
            log.warning("inception_weights= is for task=quality; task=anomaly does not use it")
        report_of, inception = anomaly_report, None
    if cfg.samples is not None:
        if cfg.task != "quality":
            raise GenlabError("samples=DIR is measured with task=quality.")
        if cfg.ckpt is not None:
            raise GenlabError("give ckpt=RUN (genlab draws the samples) or samples=DIR (a folder of images), not both.")
        log.info("%s", headline(folder_report(cfg.samples, run_dir, cfg, device, inception)))
        return
    if cfg.ckpt is None:
        raise GenlabError("genlab evaluate needs ckpt=RUN (a run, a checkpoint or a multirun directory), or "
                          "task=quality samples=DIR dataset=NAME for a folder of images.")
    if cfg.get("dataset") is not None:
        raise GenlabError("dataset= names the test split for samples=DIR; with ckpt= the run's own dataset is used "
                          "(dataset_root=PATH if it has moved).")
    runs = sweep_runs(Path(cfg.ckpt).expanduser())
    if runs is None:
        report = report_of(cfg.ckpt, run_dir, cfg, device)
        log.info("%s", headline(report))
        after_evaluation(cfg.ckpt, report)
        return
    rows = []
    for sub in runs:
        report = report_of(sub, run_dir / sub.name, cfg, device)
        log.info("%s (%s): %s", sub.name, " ".join(report["overrides"]), headline(report))
        after_evaluation(sub, report)
        rows.append(report)
    write_summary(rows, run_dir)


def headline(r: dict) -> str:
    if r["task"] == "anomaly":
        return (f"AUROC {r['auroc']:.4f}  AUPRC {r['auprc']:.4f}  (score {r['score']}, "
                f"normal classes {r['normal_classes']})")
    parts = []
    if "fid" in r:
        parts.append(f"FID {r['fid']:.3f}  KID {r['kid']:.5f}  precision {r['precision']:.3f}  recall {r['recall']:.3f}  "
                     f"IS {r['inception_score']:.2f}  classes covered {r['classes_covered']}/{len(r['class_histogram'])}")
    if "class_accuracy" in r:
        parts.append(f"class asked for {r['class_accuracy']:.3f}")
    if "fid_inception" in r:
        parts.append(f"FID (standard Inception) {r['fid_inception']:.3f}")
    return "  ".join(parts)


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


@torch.inference_mode()
def calibrate(model, train_cfg: DictConfig, cfg: DictConfig, normal: list[int], device, n: int = 2000) -> None:
    """Show the model up to ``n`` normal training images (never test images) before it scores."""
    train = test_split(train_cfg, cfg.dataset_root, classes=normal, train=True)
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n]
    model.calibrate(train.images[pick].to(device).float().div(255))


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


# the columns of summary.csv / summary.md for each task: (report key, heading, format in summary.md)
SUMMARY = {
    "anomaly": [("auroc", "AUROC", ".4f"), ("auprc", "AUPRC", ".4f")],
    "quality": [("fid", "FID", ".2f"), ("fid_inception", "FID (Inception)", ".2f"), ("kid", "KID", ".4g"),
                ("precision", "precision", ".3f"), ("recall", "recall", ".3f"), ("inception_score", "IS", ".2f"),
                ("classes_covered", "classes covered", ".1f"), ("class_accuracy", "class asked for", ".3f")],
}


def write_summary(rows: list[dict], out_dir: Path) -> None:
    """summary.csv and summary.md: one row per run, then the mean and sample standard deviation over
    all runs and, when some setting of the sweep was run with several seeds, over each setting's seeds.
    summary.png: the first metric of each run, one column per setting."""
    task = rows[0]["task"]
    cols = [c for c in SUMMARY[task] if all(c[0] in r for r in rows)]
    extra = ["normal_classes", "score"] if task == "anomaly" else []
    # (setting, runs, [(mean, std or None) per column]): all runs first, then each setting
    settings = settings_of(rows)
    by_seed = len(settings) > 1 and max(map(len, settings.values())) > 1  # some setting has several seeds
    groups = [("", rows), *(settings.items() if by_seed else ())]
    stats = [(setting, len(group), mean_std([[float(r[key]) for r in group] for key, _, _ in cols]))
             for setting, group in groups]

    with open(out_dir / "summary.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["run", "overrides", "runs", *extra, *(key for key, _, _ in cols)])
        for r in rows:
            w.writerow([run_name(r), " ".join(r["overrides"]), 1, *(cell(r[k]) for k in extra),
                        *(f"{float(r[key]):.6f}" for key, _, _ in cols)])
        for setting, n, ms in stats:
            w.writerow(["mean", setting, n, *[""] * len(extra), *(f"{m:.6f}" for m, _ in ms)])
            w.writerow(["std", setting, n, *[""] * len(extra), *("" if s is None else f"{s:.6f}" for _, s in ms)])

    def pm(ms):
        return [f"{m:{f}}" if s is None else f"{m:{f}} ± {s:{f}}" for (_, _, f), (m, s) in zip(cols, ms)]

    heads = [head for _, head, _ in cols]
    normal = ["normal"] if extra else []
    lines = [f"# {rows[0]['model']} on {rows[0]['dataset']}, {title(rows[0])}: {plural(len(rows), 'run')}", "",
             md_row(["run", "overrides", *normal, *heads]), md_row(["---"] * (2 + len(normal) + len(heads)))]
    for r in rows:
        lines.append(md_row([run_name(r), f"`{' '.join(r['overrides'])}`", *([cell(r["normal_classes"])] if extra else []),
                             *(number(r[key], f) for key, _, f in cols)]))
    lines.append(md_row(["**mean ± std**", "", *[""] * len(normal), *(f"**{v}**" for v in pm(stats[0][2]))]))
    if len(stats) > 1:
        lines += ["", "Over the seeds of each setting (mean ± sample standard deviation):", "",
                  md_row(["setting", "runs", *heads]), md_row(["---"] * (2 + len(heads)))]
        lines += [md_row([setting, str(n), *pm(ms)]) for setting, n, ms in stats[1:]]
    lines += ["", "std: the sample standard deviation (n - 1)."]
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    key, head, _ = cols[0]
    plots.sweep({setting: [float(r[key]) for r in group] for setting, group in settings.items()}, head,
                out_dir / "summary.png", f"{rows[0]['model']} on {rows[0]['dataset']}, {title(rows[0])}")
    for setting, n, ms in stats:
        log.info("%s%s over %s: %s", f"{setting}: " if setting else "", heads[0], plural(n, "run"), pm(ms)[0])


def mean_std(columns: list[list[float]]) -> list[tuple[float, float | None]]:
    """Each column's mean and sample standard deviation (None for a single value)."""
    return [(statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else None) for v in columns]


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def number(v, spec: str) -> str:
    return str(v) if isinstance(v, int) else f"{v:{spec}}"


def md_row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def settings_of(rows: list[dict]) -> dict[str, list[dict]]:
    """The runs grouped by the overrides that vary across the sweep, leaving out seed=. A group
    whose runs have no overrides of their own is "(none)", or "all runs" when it is the only one."""
    common = set.intersection(*(set(r["overrides"]) for r in rows))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        setting = " ".join(o for o in r["overrides"] if o not in common and not o.startswith("seed="))
        groups.setdefault(setting, []).append(r)
    if "" in groups:
        groups = {(s or ("(none)" if len(groups) > 1 else "all runs")): g for s, g in groups.items()}
    return groups


def run_name(r: dict) -> str:
    return Path(r["checkpoint"]).parent.parent.name


def cell(v) -> str:
    return " ".join(map(str, v)) if isinstance(v, list) else str(v)


def title(r: dict) -> str:
    return f"score {r['score']}" if r["task"] == "anomaly" else f"sample quality ({r['protocol']['n_samples']} samples)"


def quality_report(ckpt, out_dir: Path, cfg: DictConfig, device, inception=None) -> dict:
    """How good and how varied a checkpoint's samples are, against the test split of its run's dataset.
    ``inception``: genlab.inception.load_inception's (net, info), to add the standard FID. A conditional
    model draws every class equally often, and the report says how often the classifier sees the class asked for."""
    model, train_cfg, state = load_model(ckpt, device, ema=cfg.ema)
    settings = schema.sampling_overrides(cfg, "evaluate")
    check_sampling(model, settings, command="evaluate")  # before draw: a key may be named like its arguments
    if cfg.dataset_root is not None:
        train_cfg.dataset.root = cfg.dataset_root
    fake, labels = draw(model, cfg.n_samples, None, cfg.seed, cfg.precision, cfg.compile, cfg.batch_size,
                        command="evaluate", **settings)
    about = {"model": type(model).__name__, "checkpoint": str(checkpoint.resolve(ckpt)), "step": int(state["step"]),
             "weights": state["weights"], "sampling": settings, "overrides": run_overrides(ckpt)}
    return measure(fake, labels, train_cfg.dataset, about, out_dir, cfg, device, inception)


def folder_report(folder, out_dir: Path, cfg: DictConfig, device, inception=None) -> dict:
    """``samples=DIR``: the images in a folder, made by any generator, measured as genlab measures its own
    samples, against the test split of ``dataset=``."""
    if cfg.get("dataset") is None:
        raise GenlabError("samples=DIR is measured against a dataset's test split: name it, e.g. dataset=mnist "
                          "dataset.root=PATH.")
    node = cfg.dataset.copy()
    if cfg.dataset_root is not None:
        node.root = cfg.dataset_root
    fake = read_images(folder, node.channels, node.image_size).float().div(255)
    about = {"model": f"images in {Path(folder).name}", "samples": str(Path(folder).resolve()), "weights": "-",
             "sampling": {}, "overrides": []}
    return measure(fake, None, node, about, out_dir, cfg, device, inception)


def measure(fake: torch.Tensor, labels, dataset: DictConfig, about: dict, out_dir: Path, cfg: DictConfig, device,
            inception=None) -> dict:
    """The quality report of images ``fake`` [N, C, H, W] in [0, 1] (drawn for ``labels`` when conditional)
    against the test split of ``dataset``: report.json, report.md, classes.png, samples.png."""
    try:
        stick = classifier_for(dataset, device)
    except NoClassifier as e:
        if inception is None:
            raise GenlabError(f"{e} Give inception_weights=PATH (see README) for the standard Inception FID, "
                              "which needs no labels.") from e
        log.warning("%s Reporting the Inception FID alone.", e)
        stick = None
    classes = dataset.get("classes")
    ref = test_split(OmegaConf.create({"dataset": dataset}), classes=classes)
    report = {"task": "quality", **about, "dataset": ref.name,
              "protocol": {"n_samples": len(fake), "seed": cfg.seed,
                           "reference": f"{ref.name} test split, {len(ref)} images" + (f", classes {list(classes)}" if classes else "")}}
    if stick is not None:
        net, info = stick
        report.update(classifier_metrics(net, ref.images, fake, labels, device))
        report["protocol"].update({
            "feature_extractor": f"genlab classifier: {info['architecture']}, trained on the {info['dataset']} "
                                 f"training split ({info['n_train']} images), test accuracy {info['test_accuracy']:.4f}",
            "kid": "cubic polynomial kernel, 20 subsets of up to 1000",
            "precision_recall": "Kynkaanniemi et al. 2019, k=3",
            "inception_score": "classifier-based, 10 splits",
            "classes_covered": "classes predicted for at least 1% of the samples",
        })
    if inception is not None:
        net, info = inception
        report["fid_inception"] = inception_fid(net, ref.images, fake, device)
        report["protocol"]["fid_inception"] = (
            f"torch-fidelity InceptionV3, 2048-d pool features, weights {info['weights']} (sha256 {info['sha256']}...); "
            "uint8 images, grayscale repeated to 3 channels, resized to 299x299 by torch-fidelity")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "report.md").write_text(quality_markdown(report))
    if stick is not None:
        plots.class_histogram(report["class_histogram"], report["reference_class_histogram"], out_dir / "classes.png",
                              f"{report['model']} vs {ref.name} test images")
    save_grid(fake[:64], out_dir / "samples.png", 8)
    return report


def classifier_metrics(net, real: torch.Tensor, fake: torch.Tensor, labels, device) -> dict:
    """FID, KID, precision/recall, IS and class coverage in the classifier's features; with ``labels`` (the
    classes a conditional model was asked for) the share the classifier assigns to them."""
    real_f, real_p = predict(net, real, device)
    fake_f, fake_p = predict(net, fake, device)
    kid_mean, kid_std = metrics.kid(real_f, fake_f)
    precision, recall = metrics.precision_recall(real_f, fake_f, k=3)
    is_mean, is_std = metrics.inception_score(fake_p)
    covered, histogram = metrics.class_coverage(fake_p)
    out = {"fid": metrics.fid(real_f, fake_f), "kid": kid_mean, "kid_std": kid_std,
           "precision": precision, "recall": recall, "inception_score": is_mean, "inception_score_std": is_std,
           "classes_covered": covered, "class_histogram": histogram,
           "reference_class_histogram": metrics.class_coverage(real_p)[1]}
    if labels is not None:
        hit = fake_p.argmax(1) == labels
        out["class_accuracy"] = float(hit.float().mean())
        out["class_accuracy_per_class"] = [float(hit[labels == c].float().mean()) for c in labels.unique().tolist()]
    return out


def inception_fid(net, real: torch.Tensor, fake: torch.Tensor, device) -> float:
    """The standard FID between two image sets, with the Inception ``net`` of genlab.inception."""
    log.info("Inception features of %d reference images and %d samples", len(real), len(fake))
    if min(len(real), len(fake)) < 2048:
        log.warning("Inception FID from fewer than 2048 images a side is biased high: compare it only with FIDs "
                    "from the same numbers of images")
    return metrics.fid(inception_features(net, real, device), inception_features(net, fake, device))


def quality_markdown(r: dict) -> str:
    p = r["protocol"]
    rows = []
    if "fid" in r:
        rows += [("FID", f"{r['fid']:.3f}"), ("KID", f"{r['kid']:.5f} ± {r['kid_std']:.5f}"),
                 ("precision", f"{r['precision']:.4f}"), ("recall", f"{r['recall']:.4f}"),
                 ("Inception Score (classifier)", f"{r['inception_score']:.3f} ± {r['inception_score_std']:.3f}"),
                 ("classes covered", f"{r['classes_covered']} of {len(r['class_histogram'])}")]
    if "class_accuracy" in r:
        rows.append(("samples of the class asked for", f"{r['class_accuracy']:.4f}"))
    if "fid_inception" in r:
        rows.insert(1, ("FID (standard Inception, 2048-d)", f"{r['fid_inception']:.3f}"))
    lines = [f"# Sample quality: {r['model']} on {r['dataset']} ({r['weights']} weights)", "", "| metric | value |",
             "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    if "class_histogram" in r:
        asked = r.get("class_accuracy_per_class")  # conditional: of the samples asked for class c, the share seen as c
        lines += ["", "| class | samples | reference images |" + (" drawn as the class asked for |" if asked else ""),
                  "|---|---|---|" + ("---|" if asked else "")]
        lines += [f"| {c} | {a} | {b} |" + (f" {asked[c]:.3f} |" if asked and c < len(asked) else "")
                  for c, (a, b) in enumerate(zip(r["class_histogram"], r["reference_class_histogram"]))]
    if r["sampling"]:
        lines += ["", "Sampling settings: " + ", ".join(f"{k}={v}" for k, v in r["sampling"].items())]
    lines += ["", "Protocol:", ""] + [f"- {k}: {v}" for k, v in p.items()]
    lines += ["", f"Checkpoint: `{r['checkpoint']}` (step {r['step']})" if "checkpoint" in r else f"Images: `{r['samples']}`"]
    return "\n".join(lines) + "\n"
