"""What a hyperparameter search's sweeper needs from genlab: the metrics a run measures, the better direction
of each, and the Optuna storage a study lives in.

The search itself, Optuna's ask-and-tell over trials that are ordinary genlab runs, is the Hydra sweeper
``hydra/sweeper=optuna`` (hydra_plugins/genlab_optuna_sweeper). It names the objective, a metric of the run's
rows: one of ``METRICS`` below, or a training loss ``train/NAME`` of the model. Inside a trial, the measuring and
the pruning are callbacks of the loop (genlab.measures).
"""

# the metrics genlab.measures.Evaluation measures: key -> (the better direction, what it is)
METRICS = {
    "val/loss": ("minimize", "a VAE's negative ELBO per test image (beta 1, decoded at the posterior mean)"),
    "eval/fid": ("minimize", "genlab's FID of evaluation.n_samples samples against the test split"),
    "eval/kid": ("minimize", "genlab's KID of the same samples"),
    "eval/auroc": ("maximize", "the one-class AUROC on the test split (dataset.classes are the normal ones)"),
}


def direction(metric: str) -> str:
    """The better direction of a metric: a training loss is minimized."""
    return METRICS[metric][0] if metric in METRICS else "minimize"


def open_storage(spec: str):
    """An Optuna storage: a database URL (``sqlite:///search.db``, ``postgresql://...``; needs SQLAlchemy) or
    else the path of a journal file (Optuna's JournalFileBackend: no database, many processes and machines
    on a shared file system)."""
    import optuna  # an optional extra: pip install 'genlab[scale]'

    if "://" in spec:
        return optuna.storages.RDBStorage(spec)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(spec))
