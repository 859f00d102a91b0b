"""What a training run writes, as callbacks of the loop: the progress bar, metrics.csv, the loss curves,
the per-epoch sample grids and the checkpoints.

The loop (genlab.trainer.Trainer) calls each callback at a few named moments, with itself as the
argument. Each writer is named by a YAML file of the ``callbacks`` config group (configs/callbacks/), and the
trackers (genlab.trackers) by the ``logger`` group; a writer of your own is a Callback subclass and a YAML file,
and nothing in the loop changes. Under several processes only rank 0 gets the writers.
"""

import csv
import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from genlab import checkpoint, plots
from genlab.config import seconds
from genlab.errors import GenlabError, first_line
from genlab.images import grid_of, save_gif, save_image
from genlab.models.base import grid_labels
from genlab.search import direction

log = logging.getLogger(__name__)


class Callback:
    """Each hook does nothing unless a subclass overrides it. ``state_key``: the name its ``state_dict`` is kept
    under in the checkpoints (its name in the config, else its class's)."""

    @property
    def state_key(self) -> str:
        return self.__dict__.get("_state_key") or type(self).__name__

    @state_key.setter
    def state_key(self, key: str) -> None:
        self._state_key = key

    def on_fit_start(self, trainer) -> None:
        """Before the first step (of this process: after a resume, the resumed step)."""

    def on_step_end(self, trainer) -> None:
        """After each training step. Keep it cheap: no host sync."""

    def on_log(self, trainer, row: dict) -> None:
        """A metrics row: step, epoch, the window's mean losses (``train/...``), img_per_s, wall_time."""

    def on_epoch_end(self, trainer) -> None:
        """After an epoch's last step, and after the run's last step even mid-epoch (``trainer.done``)."""

    def on_interrupt(self, trainer) -> None:
        """SIGINT/SIGTERM: the current step has finished; save what is needed to resume."""

    def on_image(self, trainer, name: str, image: torch.Tensor) -> None:
        """A picture another callback drew: ``image`` [C, H, W] in [0, 1] on the CPU (``samples``: the epoch's
        grid), so that a tracker logs it without drawing it again."""

    def on_fit_end(self, trainer) -> None:
        """After the loop, whether it finished or stopped with an error (``trainer.status``: finished,
        interrupted, diverged or failed): release what on_fit_start took."""

    def state_dict(self) -> dict | None:
        """What this callback needs to go on after a resume (a tracker's run id), kept in the checkpoints."""
        return None

    def load_state_dict(self, state: dict) -> None:
        """Take back what ``state_dict`` gave, before ``on_fit_start`` of the resumed run."""


class ProgressBar(Callback):
    """A tqdm bar over the steps, with the latest losses; log lines are printed above it. ``enabled=false``
    (``trainer.progress=false``): none."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def on_fit_start(self, trainer):
        self.bar = tqdm(total=trainer.max_steps, initial=trainer.step, unit="step", dynamic_ncols=True,
                        disable=None if self.enabled else True)
        self.redirect = logging_redirect_tqdm()
        self.redirect.__enter__()
        self._describe(trainer)

    def _describe(self, trainer):
        self.bar.set_description(f"epoch {min(trainer.step // trainer.loader.steps_per_epoch + 1, trainer.epochs)}"
                                 f"/{trainer.epochs}")

    def on_step_end(self, trainer):
        self.bar.update(1)

    def on_log(self, trainer, row):
        self.bar.set_postfix({k.removeprefix("train/"): f"{v:.3g}" for k, v in row.items() if k.startswith("train/")})

    def on_epoch_end(self, trainer):
        self._describe(trainer)

    def on_fit_end(self, trainer):
        if hasattr(self, "bar"):  # on_fit_start ran
            self.bar.close()
            self.redirect.__exit__(None, None, None)


class MetricsCSV(Callback):
    """``metrics.csv``: step, epoch, the mean losses (``train/...``), measurements on the test split (``val/...``,
    ``eval/...``: genlab.measures.Evaluation), each scheduled learning rate (``lr/NAME``), img_per_s and wall_time;
    rewritten whole when a new column appears (e.g. n_critic > 1)."""

    def __init__(self, run_dir):
        self.path = Path(run_dir) / "metrics.csv"
        self.columns: list[str] = []

    def on_fit_start(self, trainer):
        if trainer.history:  # a resumed run: the earlier rows first
            self._rewrite(trainer.history)

    def on_log(self, trainer, row):
        if not self.path.exists() or any(k not in self.columns for k in row):
            self._rewrite(trainer.history)
        else:
            with open(self.path, "a", newline="") as fh:
                csv.DictWriter(fh, self.columns, extrasaction="ignore").writerow(row)

    def _rewrite(self, rows):
        values = list(dict.fromkeys(k for r in rows for k in r if k.startswith(("train/", "val/", "eval/", "lr/"))))
        self.columns = ["step", "epoch", *values, "img_per_s", "wall_time"]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)


class WriteClock:
    """The seconds a run's writers spend, against the run's own: the pictures a run can do without (the loss
    curves and sample grids between the first and the last) are drawn only while everything written so far,
    checkpoints included, one more such picture, and what the run's last writes will take (one more of each
    kind written so far) stay within ``share`` of the time since the run started. So writing takes about that
    share whether an epoch is 22 short steps on the digits and a grid is a diffusion model's 50 sampling steps,
    or the other way round. ``share=1``: every picture, every epoch."""

    def __init__(self, share: float = 0.05):
        if not 0 < share <= 1:
            raise GenlabError(f"trainer.write_share is the most of a run's time that writing may take, in (0, 1]; "
                              f"got {share}.")
        self.share, self.spent, self.started = share, 0.0, None
        self.last: dict[str, float] = {}  # what the last write of each kind took

    def begin(self) -> None:
        if self.started is None:
            self.started = time.perf_counter()

    def allows(self, cost: float | None) -> bool:
        """Whether a picture that took ``cost`` seconds last time (None: never drawn) may be drawn now."""
        if self.share >= 1 or cost is None:
            return True
        return self.spent + cost + sum(self.last.values()) <= self.share * (time.perf_counter() - self.started)

    @contextmanager
    def timing(self, kind: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.last[kind] = time.perf_counter() - start
            self.spent += self.last[kind]


class LossCurves(Callback):
    """``loss_curves.png``, redrawn at epoch ends at most every ``every`` seconds and as ``clock`` allows, and
    at the end."""

    def __init__(self, run_dir, title: str = "", every: float = 15.0, clock: WriteClock | None = None):
        self.path, self.title, self.every, self.clock = Path(run_dir) / "loss_curves.png", title, every, clock or WriteClock()
        self.last, self.cost = 0.0, None

    def on_fit_start(self, trainer):
        self.clock.begin()
        self.last = time.perf_counter()  # the first drawing after ``every`` seconds: a short run draws once

    def on_epoch_end(self, trainer):
        start = time.perf_counter()
        if trainer.done or (start - self.last > self.every and self.clock.allows(self.cost)):
            with self.clock.timing("curves"):
                plots.loss_curves(trainer.history, self.path, self.title)
            self.last = time.perf_counter()
            self.cost = self.last - start


class SampleGrids(Callback):
    """``samples/epoch_NNNN.png``: ``n`` images from one fixed noise batch (seeded), so that progress can be
    watched; from the moving average of the weights when the run keeps one. A class-conditional model draws
    one class per row. ``settings``: the model's sampling settings, and ``sampler`` (a diffusion or flow model's:
    a name, or a node of the ``sampler`` config group) one of them. At the end (and on an interrupt)
    ``samples/progress.gif`` shows them all as one animation.

    A grid is drawn after the first epoch and the last, and between them at an epoch's end as ``clock``
    (WriteClock) allows."""

    def __init__(self, run_dir, n: int = 64, seed: int = 0, settings: dict | None = None, sampler=None,
                 clock: WriteClock | None = None):
        self.dir, self.n, self.seed = Path(run_dir) / "samples", n, seed
        self.settings = {**(settings or {}), **({"sampler": sampler} if sampler is not None else {})}
        self.clock, self.cost = clock or WriteClock(), None  # what the last grid took

    def on_fit_start(self, trainer):
        self.clock.begin()
        self.dir.mkdir(parents=True, exist_ok=True)
        model, self.z = trainer.model, None
        if not model.generates:  # an anomaly detector draws no images
            return
        self.labels, self.nrow = grid_labels(self.n, model.num_classes)
        n = len(self.labels) if self.labels is not None else self.n
        self.z = model.latent(n, torch.Generator().manual_seed(self.seed)).to(trainer.ctx.device)
        if self.labels is not None:
            self.labels = self.labels.to(trainer.ctx.device)

    @torch.inference_mode()
    def on_epoch_end(self, trainer):
        if self.z is None or (not trainer.done and not self.clock.allows(self.cost)):
            return
        start = time.perf_counter()
        with self.clock.timing("grid"):
            model = trainer.ema.model if trainer.ema is not None else trainer.model
            was_training = model.training
            model.eval()
            with trainer.ctx.autocast():
                images = model.generate(self.z, self.labels, **self.settings).float()
            model.train(was_training)
            grid = grid_of(images, self.nrow)
            save_image(grid, self.dir / f"epoch_{trainer.epoch + 1:04d}.png")
            for callback in trainer.callbacks:  # the trackers log this same picture
                callback.on_image(trainer, "samples", grid)
        self.cost = time.perf_counter() - start

    def on_fit_end(self, trainer):
        """``samples/progress.gif``: this run's grids as one animation, at the end and on an interrupt."""
        frames = sorted(self.dir.glob("epoch_*.png"), key=lambda f: int(f.stem.removeprefix("epoch_")))
        if frames:
            with self.clock.timing("gif"):
                try:
                    save_gif(frames, self.dir / "progress.gif")
                except (OSError, ValueError) as e:  # a grid damaged on disk: the run itself is whole
                    log.warning("could not write %s: %s", self.dir / "progress.gif", first_line(e))


class Checkpoints(Callback):
    """``checkpoints/last.pt`` every ``every`` epochs, or, when ``every`` is a duration (``10m``), after that much
    time since the last write (checked after each step, so that a hard kill loses at most that much), at the end
    and on an interrupt; a kept copy ``epoch_NNNN.pt`` every ``keep_every`` whole epochs (0: none), of which the
    newest ``keep_last`` stay (0: all). A checkpoint holds the trainer's state, the run's resolved ``config`` and
    the ``choices`` of config groups it was composed from ({"model": "vae_gan", ...}, when known).

    ``best`` (a metric of the rows: eval/fid, val/loss, train/loss, ...): ``best.pt`` at each row where it is better
    than before, in its own direction (genlab.search.direction), holding ``best`` = {metric, value, step}. It is
    never resumed from: a resume continues from last.pt."""

    def __init__(self, run_dir, config: dict, every: int | str | None = 1, keep_every: int = 0, keep_last: int = 0,
                 choices: dict | None = None, clock: WriteClock | None = None, best: str | None = None):
        self.dir, self.config, self.choices, self.clock = Path(run_dir) / "checkpoints", config, choices, clock or WriteClock()
        by_time = isinstance(every, str)
        self.every = None if by_time else every
        self.every_s = seconds(every, "trainer.checkpoint_every") if by_time else None
        self.keep_every, self.keep_last = keep_every, keep_last
        self.written = time.monotonic()  # when last.pt was last written
        self.best, self.best_so_far = best, None  # the metric, and {metric, value, step} of best.pt

    def save(self, trainer, name: str, **extra) -> None:
        path = self.dir / name
        with self.clock.timing("checkpoint"):
            checkpoint.save({"config": self.config, "choices": self.choices, **trainer.state_dict(), **extra}, path)
        if name == "best.pt":  # not what a resume or a divergence's message points at
            return
        trainer.saved = (path, trainer.step)
        if name == "last.pt":
            self.written = time.monotonic()

    def on_log(self, trainer, row):
        value = row.get(self.best)
        if self.best is None or value is None or not math.isfinite(value):
            return
        kept = self.best_so_far
        if kept is None or (value < kept["value"] if direction(self.best) == "minimize" else value > kept["value"]):
            self.best_so_far = {"metric": self.best, "value": value, "step": trainer.step}
            self.save(trainer, "best.pt", best=self.best_so_far)

    def on_fit_end(self, trainer):
        if self.best is not None and self.best_so_far is None and trainer.status == "finished":
            log.warning("trainer.best=%s: no metrics row of this run had it, so no best.pt was kept (measured metrics: "
                        "%s)", self.best, ", ".join(k for k in trainer.history[-1] if "/" in k) if trainer.history else "none")

    def state_dict(self):
        return {"best": self.best_so_far} if self.best_so_far is not None else None

    def load_state_dict(self, state):
        kept = state.get("best")
        self.best_so_far = kept if kept and kept.get("metric") == self.best else None  # another metric: start again

    def on_fit_start(self, trainer):
        self.clock.begin()
        self.written = time.monotonic()
        for tmp in checkpoint.clean(self.dir):  # an earlier run of this directory killed while writing
            log.info("removed %s, left by a write that was cut short", tmp.name)

    def on_step_end(self, trainer):
        if self.every_s is not None and time.monotonic() - self.written >= self.every_s:
            self.save(trainer, "last.pt")

    def on_epoch_end(self, trainer):
        epochs = trainer.epoch + 1
        due = trainer.done or (self.every and epochs % self.every == 0)
        whole = trainer.step % trainer.loader.steps_per_epoch == 0
        kept = f"epoch_{epochs:04d}.pt" if self.keep_every and epochs % self.keep_every == 0 and whole else None
        if kept:  # a kept copy, and last.pt a copy of it (serialized once)
            self.save(trainer, kept)
            self.copy(kept, "last.pt")
            trainer.saved = (self.dir / "last.pt", trainer.step)
            self.prune()
        elif due and trainer.saved != (self.dir / "last.pt", trainer.step):  # not again at the same step
            self.save(trainer, "last.pt")

    def copy(self, name: str, to: str) -> None:
        """``to`` as a copy of ``name``: a file of its own, so that changing one leaves the other (a hard link
        shared the bytes: an in-place edit of a kept copy changed last.pt too)."""
        with self.clock.timing("copy"):
            checkpoint.copy(self.dir / name, self.dir / to)
        self.written = time.monotonic()

    def prune(self) -> None:
        """Keep the newest ``keep_last`` kept copies, newest by epoch number (epoch_10000.pt sorts before
        epoch_9990.pt by name)."""
        for path in checkpoint.kept(self.dir.parent)[self.keep_last:] if self.keep_last else ():
            path.unlink()

    def on_interrupt(self, trainer):
        self.save(trainer, "last.pt")
