"""What a hyperparameter search needs inside a training run, as callbacks of the loop: the objective measured
on the test split as training goes (``Evaluation``): one of ``METRICS`` below in the metrics rows.
"""

import logging

import numpy as np
import torch

from genlab import checkpoint, metrics
from genlab.callbacks import Callback

log = logging.getLogger(__name__)

# the metrics Evaluation measures: key -> (the better direction, what it is)
METRICS = {
    "val/loss": ("minimize", "a VAE's negative ELBO per test image (beta 1, decoded at the posterior mean)"),
    "eval/fid": ("minimize", "genlab's FID of evaluation.n_samples samples against the test split"),
    "eval/kid": ("minimize", "genlab's KID of the same samples"),
    "eval/auroc": ("maximize", "the one-class AUROC on the test split (dataset.classes are the normal ones)"),
}


def direction(metric: str) -> str:
    """The better direction of a metric: a training loss is minimized."""
    return METRICS[metric][0] if metric in METRICS else "minimize"


class ValidationLoss:
    """``val/loss``: the model's negative ELBO (its ``elbo`` anomaly score) averaged over ``images`` (uint8)."""

    def __init__(self, images: torch.Tensor, batch_size: int = 250):
        self.images, self.batch_size = images, batch_size

    def __call__(self, model, device, precision: str) -> dict:
        from genlab.evaluate import scores_of  # here, not above: genlab train imports this module

        return {"val/loss": float(scores_of(model, self.images, "elbo", self.batch_size, device).mean())}


class SampleQuality:
    """``eval/fid`` and ``eval/kid``: ``n`` samples against the ``reference`` images (uint8) in the features of
    genlab's ``classifier`` (genlab.classifier), with the model's sampling ``settings``; the same ``seed``, the
    same noise at every measurement."""

    def __init__(self, classifier, reference: torch.Tensor, n: int = 1000, seed: int = 0, settings: dict | None = None,
                 batch_size: int = 250):
        self.classifier, self.reference, self.n, self.seed = classifier, reference, n, seed
        self.settings, self.batch_size = settings or {}, batch_size
        self.real = None  # the reference features, computed once

    def __call__(self, model, device, precision: str) -> dict:
        from genlab.classifier import predict
        from genlab.sample import draw

        if self.real is None:
            self.real = predict(self.classifier, self.reference, device)[0]
        fake, _ = draw(model, self.n, seed=self.seed, precision=precision, compile="false", batch_size=self.batch_size,
                       command="train", **self.settings)
        fake = predict(self.classifier, fake, device)[0]
        return {"eval/fid": metrics.fid(self.real, fake), "eval/kid": metrics.kid(self.real, fake)[0]}


class OneClassAUROC:
    """``eval/auroc``: how well the model's anomaly ``score`` (its default when None) tells the test ``images``
    of the ``normal`` classes from the others, after it has seen the normal training images ``calibration``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, normal: list[int], calibration: torch.Tensor,
                 score: str | None = None, batch_size: int = 250):
        self.images, self.calibration, self.score, self.batch_size = images, calibration, score, batch_size
        self.anomalous = ~np.isin(labels.numpy(), list(normal))

    @torch.inference_mode()
    def __call__(self, model, device, precision: str) -> dict:
        from sklearn.metrics import roc_auc_score

        from genlab.evaluate import scores_of

        model.calibrate(self.calibration.to(device).float().div(255))
        s = scores_of(model, self.images, self.score or model.scores[0], self.batch_size, device)
        return {"eval/auroc": float(roc_auc_score(self.anomalous, s)) if np.isfinite(s).all() else float("nan")}


class Evaluation(Callback):
    """Runs each of ``measures`` (ValidationLoss, SampleQuality, OneClassAUROC) every ``every`` epochs and at the
    end of the run, and adds what they return to that epoch's metrics row, so that metrics.csv and a search see
    it. It must come before the writers, which write the row. It measures the moving average of the weights
    when the run keeps one, in eval mode, and leaves the random state of training as it was: a run measured
    trains exactly as one that is not."""

    def __init__(self, measures: list, every: int = 1):
        self.measures, self.every = measures, every

    def on_log(self, trainer, row):
        epoch_end = trainer.step % trainer.loader.steps_per_epoch == 0
        if trainer.signal is not None or not (trainer.done or (epoch_end and row["epoch"] % self.every == 0)):
            return
        model = trainer.ema.model if trainer.ema is not None else trainer.model
        was_training, rng = model.training, checkpoint.rng_state()
        model.eval()
        try:
            for measure in self.measures:
                row.update(measure(model, trainer.ctx.device, trainer.ctx.precision))
        finally:
            model.train(was_training)
            checkpoint.set_rng_state(rng)
        log.info("epoch %d: %s", row["epoch"],
                 ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k.startswith(("val/", "eval/"))))
