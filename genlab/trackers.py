"""Experiment trackers as callbacks of the loop: TensorBoard, MLflow and Weights & Biases.

`genlab train logger=[tensorboard,mlflow,wandb]` (any of them) adds them beside metrics.csv, the loss curves,
the grids and the checkpoints. Each receives every metrics row at its step (losses, ``lr/*``, img/s, the
in-loop measurements), the sample grid the grid callback drew (no second sampling), the resolved config as
hyperparameters, and at the end the checkpoint's path and how the run ended. Its run's id and folder (relative to
the run directory, so that a moved run goes on where it now is) are kept in the checkpoints, so that a resumed run
goes on in the same tracker run from the checkpoint's step: what the tracker holds past that step belongs to an
abandoned timeline, and TensorBoard drops it, W&B rewinds its run, and MLflow, which cannot delete a point, goes on
in a new run holding a copy of the history up to that step (a warning names it). Each tool is an optional extra:
`pip install 'genlab[tensorboard]'` ('[mlflow]', '[wandb]', '[track]' for all three).
"""

import importlib
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import yaml

from genlab.callbacks import Callback
from genlab.errors import GenlabError, first_line

log = logging.getLogger(__name__)


def need(module: str, extra: str, what: str):
    """``module`` imported, or one line naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise GenlabError(f"logger={extra} needs {what}, which is not installed: pip install 'genlab[{extra}]'") from e


def flat(config: dict, prefix: str = "") -> dict:
    """A nested config as {"model.z_dim": 100, ...}; lists and nulls as text."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def metrics_of(row: dict) -> dict:
    """A metrics row's numbers, but its step."""
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))}


def relative(folder, run_dir) -> str:
    """A tracker's folder as a checkpoint keeps it: relative to the run directory when inside it ("tensorboard", "."),
    so that the run can be moved, else absolute (a place of the user's own)."""
    folder = Path(folder).resolve()
    try:
        return str(folder.relative_to(Path(run_dir).resolve()))
    except ValueError:
        return str(folder)


def relocated(kept: str, home: Path, default: str) -> Path:
    """A folder a checkpoint kept, for the run whose directory is now ``home``: a relative one under ``home``; an
    absolute one (genlab kept them so before) as it is while it is there, else (the run was moved) the shortest tail
    of it that is under ``home`` ("tensorboard"), else ``home / default``."""
    path = Path(kept)
    if not path.is_absolute():
        return home / path
    if path.exists():
        return path
    tails = (home / Path(*path.parts[-n:]) for n in range(1, len(path.parts)))
    return next((tail for tail in tails if tail.exists()), home / default)


class Tracker(Callback):
    """What every tracker shares: the run directory and resolved config it was built with, the last step its run
    already holds (rows and images up to it are not sent again after a resume), and its failures: a run that
    cannot be started is one clear error before training; one that fails later (a server gone) is a warning,
    and training goes on without that tracker. A subclass opens and closes its run and sends what it is given."""

    hint = ""  # what to try when the run cannot be started

    def __init__(self, run_dir, config: dict):
        self.run_dir, self.config = Path(run_dir), config
        self.home = self.run_dir  # the directory of the run whose checkpoint is resumed: kept folders are under it
        self.held = -1  # the last step the tracker's run holds
        self.live = False  # its run is open and has not failed

    def on_fit_start(self, trainer):
        resumed = Path(trainer.saved[0]) if trainer.saved else None  # at the start: the checkpoint resumed from
        if resumed is not None and resumed.parent.name == "checkpoints":
            self.home = resumed.parent.parent
        try:
            self.open(trainer)
        except GenlabError:
            raise
        except Exception as e:
            raise GenlabError(f"logger.{self.state_key} could not start its run: {first_line(e)}.{self.hint}") from e
        self.resumed_through, self.live = self.held, True

    def on_log(self, trainer, row):
        if self.live and row["step"] > self.held:
            self.guarded(self.log_metrics, metrics_of(row), row["step"])
            self.held = row["step"]

    def on_image(self, trainer, name, image):
        if self.live and trainer.step > self.resumed_through:
            self.guarded(self.log_image, name, image, trainer.step)

    def on_fit_end(self, trainer):
        if self.live:
            self.guarded(self.close, trainer)
            self.live = False

    def guarded(self, send, *args) -> None:
        try:
            send(*args)
        except Exception as e:  # the run's own files are whole: training goes on without this tracker
            log.warning("logger.%s failed and is left out of the rest of this run: %s", self.state_key, first_line(e))
            self.live = False

    def open(self, trainer) -> None:
        raise NotImplementedError

    def close(self, trainer) -> None:
        raise NotImplementedError

    def log_metrics(self, metrics: dict, step: int) -> None:
        raise NotImplementedError

    def log_image(self, name: str, image, step: int) -> None:
        raise NotImplementedError

    def log_evaluation(self, metrics: dict, step: int) -> None:
        """`genlab evaluate`'s numbers, later, into this tracker's run (its state loaded from the checkpoint)."""
        raise NotImplementedError

    def ending(self, trainer) -> dict:
        """What is said at the end: how the run ended, its step, and its newest checkpoint."""
        return {"status": trainer.status, "step": trainer.step,
                "checkpoint": str(trainer.saved[0]) if trainer.saved else ""}


class TensorBoard(Tracker):
    """Event files in ``log_dir`` (default: the run directory's ``tensorboard/``); a resumed run writes into the
    first run's folder (where it is now), and events past the step it resumed from are dropped (``purge_step``).
    `tensorboard --logdir outputs` shows every run."""

    def __init__(self, run_dir, config: dict, log_dir: str | None = None):
        super().__init__(run_dir, config)
        need("tensorboard", "tensorboard", "TensorBoard")
        self.log_dir = str(Path(log_dir).expanduser().resolve() if log_dir else Path(run_dir) / "tensorboard")
        self.kept = None  # the folder as the checkpoint resumed from kept it

    def state_dict(self):
        return {"log_dir": relative(self.log_dir, self.run_dir)}

    def load_state_dict(self, state):
        self.kept = state["log_dir"]
        self.log_dir = str(relocated(self.kept, self.home, "tensorboard"))

    def open(self, trainer):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        resumed = self.kept is not None
        if resumed:
            self.log_dir = str(relocated(self.kept, self.home, "tensorboard"))
        self.held = trainer.step if resumed else -1
        self.writer = SummaryWriter(self.log_dir, purge_step=trainer.step + 1 if resumed else None)
        if not resumed:
            self.writer.add_text("config", "```\n" + yaml.safe_dump(self.config, sort_keys=False) + "```", 0)
            self.writer.add_text("tags", ", ".join(self.config.get("tags") or []) or "none", 0)
            for summary in hparams(flat(self.config), {}):  # the HPARAMS tab, in this run's own folder
                self.writer.file_writer.add_summary(summary)

    def log_metrics(self, metrics, step):
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def log_image(self, name, image, step):
        self.writer.add_image(name, image, step)

    def log_evaluation(self, metrics, step):
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(self.log_dir) as writer:
            for k, v in metrics.items():
                writer.add_scalar(k, v, step)

    def close(self, trainer):
        self.writer.add_text("end", ", ".join(f"{k}: {v}" for k, v in self.ending(trainer).items()), trainer.step)
        self.writer.close()


class MLflow(Tracker):
    """An MLflow run in ``experiment``, named after the run directory, in the store ``tracking_uri``: by default
    ``sqlite:///mlflow.db`` in the folder genlab runs from (current MLflow refuses a plain ./mlruns folder unless
    told to), its images beside it in ``mlartifacts/``. `mlflow ui --backend-store-uri sqlite:///mlflow.db`
    (the full ``mlflow`` package) shows the runs. ``tracking_uri=http://HOST:5000`` logs to a server."""

    hint = " Check logger.mlflow.tracking_uri (or MLFLOW_TRACKING_URI)."

    def __init__(self, run_dir, config: dict, tracking_uri: str | None = None, experiment: str = "genlab"):
        super().__init__(run_dir, config)
        need("mlflow", "mlflow", "MLflow")
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or \
            f"sqlite:///{Path('mlflow.db').resolve()}"
        self.experiment, self.run_id = experiment, None

    def state_dict(self):
        return {"run_id": self.run_id, "tracking_uri": self.tracking_uri}

    def load_state_dict(self, state):
        self.run_id, self.tracking_uri = state["run_id"], state["tracking_uri"]

    @contextmanager
    def store_lock(self):
        """One process at a time opens a SQLite store: MLflow creates and migrates its tables on first use, which
        the jobs of a parallel sweep (hydra/launcher=joblib) must not do together."""
        if not self.tracking_uri.startswith("sqlite:///"):
            yield
            return
        import fcntl

        lock = Path(self.tracking_uri.removeprefix("sqlite:///")).with_suffix(".lock")
        with open(lock, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def open(self, trainer):
        with self.store_lock():
            self.start(trainer.step)

    def start(self, step: int) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient(self.tracking_uri)
        if self.run_id is None:
            self.run_id = self.create(self.run_dir.name)
            return
        held = max((m.step for m in self.client.get_metric_history(self.run_id, "epoch")), default=-1)
        if held > step:  # resumed from an older checkpoint than the run's newest
            self.fork(step, held)
        else:  # resumed: the same run, on from the last step it holds
            self.client.update_run(self.run_id, status="RUNNING")
            self.held = held

    def create(self, name: str, tags: dict | None = None) -> str:
        """A new run in ``experiment`` with the config as its params; its id."""
        from mlflow.entities import Param

        run = self.client.create_run(self.experiment_id(), run_name=name,
                                     tags={"genlab.run_dir": str(self.run_dir.resolve()), **(tags or {}),
                                           **{t: "true" for t in self.config.get("tags") or []}})
        params = [Param(k, str(v)[:6000]) for k, v in flat(self.config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(run.info.run_id, params=params[i:i + 100])
        return run.info.run_id

    def fork(self, step: int, held: int) -> None:
        """The run holds steps past ``step``, the checkpoint's, from a timeline the resume abandons, and MLflow cannot
        delete a point: the resumed timeline goes on in a new run that starts with a copy of the metric history up to
        ``step`` (tagged ``genlab.resumed_from``), and the old run is tagged ``genlab.superseded_by`` the new one."""
        old = self.client.get_run(self.run_id)
        new = self.create(old.info.run_name, {"genlab.resumed_from": self.run_id, "genlab.resumed_at_step": str(step)})
        history = [m for key in old.data.metrics for m in self.client.get_metric_history(self.run_id, key)
                   if m.step <= step]
        for i in range(0, len(history), 1000):  # MLflow takes at most 1000 metrics a batch
            self.client.log_batch(new, metrics=history[i:i + 1000])
        self.client.set_tag(self.run_id, "genlab.superseded_by", new)
        log.warning("logger.mlflow: run %s holds steps %d to %d of the timeline this resume abandons, and MLflow "
                    "cannot delete them: the run goes on in MLflow run %s, with the history up to step %d copied (the "
                    "earlier images stay in %s)", self.run_id, step + 1, held, new, step, self.run_id)
        self.run_id, self.held = new, step

    def experiment_id(self) -> str:
        """``experiment``'s id, made when it is new (another job of a sweep may make it at the same moment)."""
        for attempt in range(2):
            found = self.client.get_experiment_by_name(self.experiment)
            if found is not None:
                return found.experiment_id
            artifacts = None
            if self.tracking_uri.startswith("sqlite:///"):  # the images beside the store, not in the working folder
                artifacts = (Path(self.tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
            try:
                return self.client.create_experiment(self.experiment, artifact_location=artifacts)
            except Exception:
                if attempt:
                    raise

    def log_metrics(self, metrics, step):
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_image(self, name, image, step):
        pixels = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).squeeze(-1).numpy()
        self.client.log_image(self.run_id, pixels, key=name, step=step)

    def log_evaluation(self, metrics, step):
        from mlflow import MlflowClient

        with self.store_lock():
            self.client = MlflowClient(self.tracking_uri)
            self.log_metrics(metrics, step)

    def close(self, trainer):
        end = self.ending(trainer)
        self.client.set_tag(self.run_id, "genlab.status", end["status"])
        self.client.set_tag(self.run_id, "genlab.checkpoint", end["checkpoint"])
        self.client.set_terminated(self.run_id, {"finished": "FINISHED", "interrupted": "KILLED"}.get(end["status"],
                                                                                                     "FAILED"))


def has_wandb_key() -> bool:
    """Whether W&B has an API key here (WANDB_API_KEY, or `wandb login`'s entry in ~/.netrc), asked offline."""
    import netrc

    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandB(Tracker):
    """A Weights & Biases run in ``project``, its files in the run directory's ``wandb/``. Without an API key
    (`wandb login` or ``WANDB_API_KEY``) it runs offline: `wandb sync RUN_DIR/wandb/offline-run-*` uploads it
    later. A resumed run continues the same W&B run, rewound to the checkpoint's step (``resume_from``; offline,
    the rewind is in its files and done when they are synced)."""

    hint = " Without a network, logger.wandb.mode=offline."

    def __init__(self, run_dir, config: dict, project: str = "genlab", entity: str | None = None,
                 mode: str | None = None):
        super().__init__(run_dir, config)
        need("wandb", "wandb", "Weights & Biases (wandb)")
        self.project, self.entity, self.mode, self.run_id = project, entity, mode, None
        self.dir, self.kept = self.run_dir, None  # its files in dir/wandb/; that folder as a checkpoint kept it

    def state_dict(self):
        return {"run_id": self.run_id, "dir": relative(self.dir, self.run_dir)}

    def load_state_dict(self, state):
        self.run_id, self.kept = state["run_id"], state["dir"]
        self.dir = relocated(self.kept, self.home, ".")

    def chosen_mode(self) -> str:
        return self.mode or os.environ.get("WANDB_MODE") or ("online" if has_wandb_key() else "offline")

    def init(self, **how):
        import wandb

        return wandb.init(project=self.project, entity=self.entity, dir=str(self.dir), mode=self.chosen_mode(),
                          config=self.config, settings=wandb.Settings(silent=True, console="off"),
                          tags=self.config.get("tags") or None, **how)

    def open(self, trainer):
        step = trainer.step
        if self.run_id is None:
            self.run = self.init(name=self.run_dir.name)
            self.run_id = self.run.id
            return
        self.dir = relocated(self.kept, self.home, ".")
        try:  # rewound: what the run holds past the checkpoint's step is dropped (offline: when it is synced)
            self.run = self.init(resume_from=f"{self.run_id}?_step={step}")
        except Exception as e:  # a server without W&B's rewind (a preview): on after the last step the run holds
            self.run = self.init(id=self.run_id, resume="allow")
            if self.run.step - 1 > step:
                log.warning("logger.wandb: W&B could not rewind run %s to step %d (%s): it keeps its steps up to %d "
                            "from the timeline this resume abandons, and this run's rows up to there are not sent",
                            self.run_id, step, first_line(e), self.run.step - 1)
        self.held = max(step, self.run.step - 1)

    def log_metrics(self, metrics, step):
        self.run.log(metrics, step=step)

    def log_evaluation(self, metrics, step):
        with self.init(id=self.run_id, resume="allow") as run:
            run.summary.update(metrics)

    def log_image(self, name, image, step):
        import wandb

        pixels = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).squeeze(-1).numpy()
        self.run.log({name: wandb.Image(pixels)}, step=step)

    def close(self, trainer):
        end = self.ending(trainer)
        self.run.summary.update({"genlab/status": end["status"], "genlab/checkpoint": end["checkpoint"]})
        self.run.finish(exit_code=0 if end["status"] == "finished" else 1)
