"""What a run measures as it trains, as callbacks of the loop: the test-split measurements of
``evaluation.metrics`` (``Evaluation``, running ValidationLoss, SampleQuality, OneClassAUROC), and a search
trial's pruning (``Pruning``: each measurement reported to the trial's Optuna study, which may stop the run
early). The metrics and their directions are genlab.search's."""

import logging

import numpy as np
import torch
from hydra.utils import instantiate

from genlab import metrics
from genlab.callbacks import Callback
from genlab.classifier import predict
from genlab.images import as_float
from genlab.sampling import draw
from genlab.scores import score_for
from genlab.scoring import calibration_sample, scores_of
from genlab.search import open_storage

log = logging.getLogger(__name__)


class ValidationLoss:
    """``val/loss``: the model's negative ELBO (its ``elbo`` anomaly score) averaged over ``images`` (uint8)."""

    def __init__(self, images: torch.Tensor, batch_size: int = 250):
        self.images, self.batch_size = images, batch_size

    def __call__(self, model, device, precision: str) -> dict:
        return {"val/loss": float(scores_of(model, self.images, score_for(model, "elbo"), self.batch_size, device).mean())}


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
        if self.real is None:
            self.real = predict(self.classifier, self.reference, device)[0]
        fake, _ = draw(model, self.n, seed=self.seed, precision=precision, compile="false", batch_size=self.batch_size,
                       command="train", settings=self.settings)
        fake = predict(self.classifier, fake, device)[0]
        return {"eval/fid": metrics.fid(self.real, fake), "eval/kid": metrics.kid(self.real, fake)[0]}


class OneClassAUROC:
    """``eval/auroc``: how well the model's anomaly ``score`` (its default when None) tells the test ``images``
    of the ``normal`` classes from the others, after it has seen its calibration sample of the normal training
    images (genlab.scoring.calibration_sample of ``train``, uint8)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, normal: list[int], train: torch.Tensor,
                 score: str | None = None, batch_size: int = 250):
        self.images, self.calibration, self.score, self.batch_size = images, calibration_sample(train), score, batch_size
        self.anomalous = ~np.isin(labels.numpy(), list(normal))

    @torch.inference_mode()
    def __call__(self, model, device, precision: str) -> dict:
        from sklearn.metrics import roc_auc_score  # here: scikit-learn's import costs every `genlab train` half a second

        score = score_for(model, self.score)
        score.calibrate(model, as_float(self.calibration, device))
        s = scores_of(model, self.images, score, self.batch_size, device)
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
        was_training = model.training
        model.eval()
        try:  # its random draws change no training step's: each step seeds its own (genlab.trainer.step_seed)
            for measure in self.measures:
                row.update(measure(model, trainer.ctx.device, trainer.ctx.precision))
        finally:
            model.train(was_training)
        log.info("epoch %d: %s", row["epoch"],
                 ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k.startswith(("val/", "eval/"))))


class Pruning(Callback):
    """Reports ``objective`` to trial ``number`` of the Optuna study ``study`` in ``storage`` once an epoch: its
    value in the epoch's last metrics row (the run's last row too, mid-epoch), the step reported being the epoch.
    A ``train/`` loss is in every row (the mean of that row's window of steps): the epoch's last row's is
    reported, not its first (Optuna ignores a step reported again); ``val/`` and ``eval/`` are measured there
    alone. The run stops there when the study's pruner says so (trainer.request_stop: the epoch's writers then
    save as at a run's end; genlab.train's result names why it stopped). The pruner is the one the sweeper
    stored in the study (its user attribute ``pruner``, a ``_target_`` node)."""

    def __init__(self, storage: str, study: str, number: int, objective: str):
        self.storage, self.study, self.number, self.objective = storage, study, number, objective

    def on_fit_start(self, trainer):
        import optuna  # an optional extra: pip install 'genlab[scale]'

        storage = open_storage(self.storage)
        spec = optuna.load_study(study_name=self.study, storage=storage).user_attrs.get("pruner")
        study = optuna.load_study(study_name=self.study, storage=storage,
                                  pruner=instantiate(spec) if spec else optuna.pruners.NopPruner())
        trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(self.study),
                                                                   self.number)
        self.trial = optuna.trial.Trial(study, trial_id)

    def on_log(self, trainer, row):
        last = trainer.done or trainer.step % trainer.loader.steps_per_epoch == 0  # the epoch's last row
        if self.objective not in row or not last:  # val/, eval/: measured there (Evaluation, earlier in the list)
            return
        self.trial.report(row[self.objective], row["epoch"])
        if not trainer.done and self.trial.should_prune():
            trainer.request_stop(f"pruned: trial {self.number} after epoch {row['epoch']}, {self.objective} "
                                 f"{row[self.objective]:.4g}")
