"""genlab evaluate task=quality: how good and how varied samples are, in the features of genlab's own
per-dataset classifier (FID, KID, precision/recall, Inception Score, classes covered), plus the standard Inception
FID when the user gives the Inception weights."""

import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from genlab import checkpoint, metrics, plots, runs, summary
from genlab.classifier import NoClassifier, classifier_for, predict
from genlab.errors import GenlabError
from genlab.images import as_float, read_images, save_grid
from genlab.inception import inception_features
from genlab.parts import test_split
from genlab.sampling import draw, from_checkpoint

log = logging.getLogger(__name__)


def quality_report(ckpt, out_dir: Path, cfg: DictConfig, device, inception=None) -> dict:
    """How good and how varied a checkpoint's samples are, against the test split of its run's dataset.
    ``inception``: genlab.inception.load_inception's (net, info), to add the standard FID. A conditional
    model draws every class equally often, and the report says how often the classifier sees the class asked for."""
    model, train_cfg, state, settings = from_checkpoint(ckpt, cfg, "evaluate", device)
    if cfg.dataset_root is not None:
        train_cfg.dataset.root = cfg.dataset_root
    fake, labels = draw(model, cfg.n_samples, None, cfg.seed, cfg.precision, cfg.compile, cfg.batch_size,
                        command="evaluate", settings=settings)
    about = {"model": type(model).__name__, "checkpoint": str(checkpoint.resolve(ckpt)), "step": int(state["step"]),
             "weights": state["weights"], "sampling": settings, "overrides": runs.overrides(runs.of_checkpoint(ckpt))}
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
    fake = as_float(read_images(folder, node.channels, node.image_size))
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
    (out_dir / "report.md").write_text(summary.report_markdown(report))
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
