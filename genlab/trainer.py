"""The one training loop shared by every model.

A model owns its step, ``model.training_step(batch, ctx)``, with the step context of genlab.step. The loop owns
the rest: the data order, the NaN policy, the moving average of the weights, the metrics rows and the clock.
Whatever writes (metrics.csv, pictures, checkpoints, the progress bar, loggers) is a callback
(genlab.callbacks), so the loop itself never touches a file.
"""

import contextlib
import logging
import math
import signal
import threading
import time

import torch
from torch import Tensor

from genlab import dist
from genlab.device import synchronize
from genlab.errors import GenlabError, Interrupted, first_line
from genlab.step import StepContext, step_seed

log = logging.getLogger(__name__)

# the signals that stop a run after its current step, with a checkpoint: Ctrl-C, a kill, and the user signals a
# cluster sends before a time limit or a preemption (submitit's SIGUSR2; SIGUSR1 in many sbatch scripts)
SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1", "SIGUSR2") if hasattr(signal, name))
SKIP_LIMIT = 50  # on_nan=skip gives up after this many dropped steps in a row


class Trainer:
    """Runs ``model.training_step`` on ``loader``'s batches until ``max_steps`` optimisation steps are done.

    ``ctx`` is the StepContext the model steps with, ``ema`` an optional genlab.ema.EMA updated after each
    applied step, ``callbacks`` the writers (genlab.callbacks). Every ``log_every`` steps, at the end of
    each epoch and at the end, the loop reads the window's mean losses from the device (its one host sync)
    into a metrics row. ``on_nan=stop`` (the StepContext's) ends the run there if a loss is not finite.
    """

    def __init__(self, model, loader, ctx: StepContext, max_steps: int, *, callbacks=(), ema=None, log_every: int = 50,
                 max_time: float | None = None, seed: int = 0):
        self.model, self.loader, self.ctx, self.ema = model, loader, ctx, ema
        self.max_steps, self.log_every, self.max_time, self.seed = max_steps, max(1, log_every), max_time, seed
        self.callbacks = list(callbacks)
        self.step = 0  # optimisation steps done
        self.wall_time = 0.0  # seconds of training, earlier runs of a resumed one included
        self.history: list[dict] = []  # the metrics rows so far
        self.saved = None  # (path, step) of the newest checkpoint written: the last good one
        self.signal = None  # a signal (SIGINT, SIGTERM, ...) the ranks agreed to stop for, at the last metrics row
        self.timed_out = False  # max_time (seconds of training) is spent: the run ends here
        self.stopped = None  # why a callback ended the run early (request_stop), once the ranks agree
        self.status = None  # how fit() went: running, finished, interrupted, diverged or failed
        self._received: list[int] = []  # the signals this process received, not yet agreed
        self._requested = None  # a callback's request_stop on this process, not yet agreed
        self._dropped_in_a_row = 0  # on_nan=skip
        self._failure = None  # a callback's error on this rank, not yet shared with the others (_call)
        self._warned = False  # trainer.accumulate with a model that does not split its batch: said once

    @property
    def epochs(self) -> int:
        return math.ceil(self.max_steps / self.loader.steps_per_epoch)

    @property
    def epoch(self) -> int:
        """The epoch in progress (0-based); at an epoch's end, the one just finished."""
        return max(0, self.step - 1) // self.loader.steps_per_epoch

    @property
    def done(self) -> bool:
        return self.step >= self.max_steps or self.timed_out or self.stopped is not None

    def request_stop(self, reason: str) -> None:
        """A callback ends the run early (a search's pruner, say): asked from ``on_log``, the run ends at that metrics
        row (the ranks agree there: callbacks run on rank 0 alone), else at the next; the writers then save as at
        any run's end."""
        self._requested = reason

    def fit(self) -> None:
        """Train to ``max_steps``. A signal (SIGNALS) finishes the current step and lets the callbacks save; then
        the signal's earlier handler takes over (submitit's requeues the job), or Interrupted is raised."""
        self.model.train()
        self._window = Window(self.ctx.device, self.wall_time)
        self.status = "running"
        try:
            with self._signals():
                self._call("on_fit_start", settle=True)
                while not self.done:
                    epoch, first = divmod(self.step, self.loader.steps_per_epoch)
                    for batch in self.loader.epoch(epoch, first):
                        self._window.add(self._train_step(batch), self.step, len(batch.x))
                        self.step += 1
                        self._call("on_step_end")
                        if self._row_due():
                            self._log()  # the one sync point: the ranks agree on the losses, the clock, a signal
                            if self.done or self.signal is not None:
                                break
                    if self.signal is not None:
                        self._call("on_interrupt", settle=True)
                        if not self._hand_over():
                            dist.finish()  # the ranks leave together, once rank 0 has saved
                            raise self._interrupted()
                        if self.step % self.loader.steps_per_epoch and not self.done:  # on with the rest of the epoch
                            continue
                    paused = time.perf_counter()
                    self._call("on_epoch_end", settle=True)  # rank 0 may take long: the others wait on the store
                    self._window.pause(time.perf_counter() - paused)  # measurements, pictures, checkpoints
            self.status = "finished"
        except BaseException as e:
            self.status = ("interrupted" if isinstance(e, (Interrupted, KeyboardInterrupt, SystemExit)) else
                           "diverged" if getattr(e, "diverged", False) else "failed")
            raise
        finally:
            self._end()

    def _end(self) -> None:
        """Every callback's on_fit_end, even when one fails: the first failure is raised afterwards when the loop
        itself went well, and only logged when the loop's own error is on its way."""
        failed = None
        for cb in self.callbacks:
            try:
                cb.on_fit_end(self)
            except Exception as e:
                if self.status != "finished":
                    log.warning("%s could not finish: %s", type(cb).__name__, first_line(e))
                failed = failed or e
        if self.status == "finished":  # every rank got here: they learn together whether rank 0's writers finished
            dist.settle(failed, "finishing the run")

    def _row_due(self) -> bool:
        """A metrics row every ``log_every`` steps, at each epoch's end and at the last step. One process also
        writes one at once when it must stop (a signal, the time budget); several agree on that at the next
        row, so that every rank stops after the same step."""
        if self.step % self.log_every == 0 or self.step % self.loader.steps_per_epoch == 0 or self.step >= self.max_steps:
            return True
        alone = dist.world() == 1
        return alone and (bool(self._received) or self._requested is not None or self._time_spent(self._window.elapsed()))

    def _time_spent(self, elapsed: float) -> bool:
        return self.max_time is not None and elapsed >= self.max_time

    def _train_step(self, batch) -> dict | None:
        """One training step; its losses, or None when on_nan=skip dropped it."""
        before = [b.clone() for b in self.model.buffers()] if self.ctx.on_nan == "skip" or self.ctx.scaler else None
        torch.manual_seed(step_seed(self.seed, dist.rank(), self.step))
        self.ctx.begin(self.step)
        out = self.model.training_step(batch, self.ctx)
        applied = self.ctx.end()  # a dropped step's updates are undone there
        if self.ctx.accumulate > 1 and not self.ctx.chunked and not self._warned:
            self._warned = True
            log.warning("trainer.accumulate=%d: %s's training_step does not split its batch (ctx.chunks), so each step "
                        "computes its %d images at once: the same updates, without the memory saved",
                        self.ctx.accumulate, type(self.model).__name__, len(batch.x))
        if before is not None and applied is not True:  # and its batch-norm statistics here
            self._restore_buffers(before, applied)
        if applied is False:
            self._dropped_in_a_row += 1
            if self._dropped_in_a_row >= SKIP_LIMIT:
                raise self.diverged(f"the losses or gradients of the {SKIP_LIMIT} steps up to step {self.step + 1} "
                                    "were all non-finite (trainer.on_nan=skip)")
            return None
        self._dropped_in_a_row = 0
        if self.ema is not None:
            self.ema.update(self.model, applied)
        return out

    def _log(self) -> None:
        synchronize(self.ctx.device)  # the row reads the losses anyway; the window's time then counts its work
        row, received = self._window.row(self.step, self.epoch, self._received[0] if self._received else None)
        self.timed_out = self._time_spent(row["wall_time"])
        self.signal = received
        if dist.world() > 1:
            dist.broadcast_tensors(list(self.model.buffers()))  # batch-norm statistics: rank 0's (SyncBatchNorm on GPUs)
        bad = [k.removeprefix("train/") for k, v in row.items() if k.startswith("train/") and not math.isfinite(v)]
        if bad:
            at = self._window.first_bad()
            raise self.diverged(f"{', '.join(bad)} became non-finite at step {at or self.step} (epoch {self.epoch + 1})")
        if self._window.dropped:
            steps = self._window.dropped
            log.warning("skipped %d update(s) with a non-finite loss or gradient: step(s) %s", len(steps),
                        ", ".join(map(str, steps[:10])) + (" ..." if len(steps) > 10 else ""))
        row.update({f"lr/{k}": s.get_last_lr()[0] for k, s in self.ctx.schedulers.items()})
        self.wall_time = row["wall_time"]
        self.history.append(row)
        paused = time.perf_counter()
        self._call("on_log", row)  # measurements (evaluation.metrics) and writers: not training time
        requested, failed = self._agree(self._requested is not None, self._failure is not None)
        self._window.pause(time.perf_counter() - paused)  # on every rank: the others wait for rank 0 in the agreement
        if failed:  # a callback failed on some rank, at this row or at a step since the last
            dist.settle(self._failure, "in a callback")
        if requested and self.stopped is None:  # a callback (rank 0's) asked to stop
            self.stopped = self._requested or "stopped by rank 0"
        self._window.clear()

    def _agree(self, *flags: bool) -> bool | list[bool]:
        """Whether each flag holds on any rank (alone: on this one), in one all-reduce."""
        if dist.world() > 1:
            flags = [v > 0 for v in dist.all_reduce(torch.tensor(flags, dtype=torch.float, device=self.ctx.device),
                                                     "max").tolist()]
        return flags[0] if len(flags) == 1 else list(flags)

    def _call(self, hook: str, *args, settle: bool = False) -> None:
        """Each callback's ``hook``. Under several processes a failing one does not end its rank at once, which
        would strand the others in their next collective (for as long as its timeout: 30 minutes): its error is
        kept, the rank's callbacks rest, and every rank learns of it where they next agree, and stops with its
        message: at once where ``settle`` (after the hooks where rank 0 writes: on_fit_start, on_epoch_end,
        on_interrupt), else at the next metrics row."""
        if self._failure is None:
            try:
                for cb in self.callbacks:
                    getattr(cb, hook)(self, *args)
            except Exception as e:
                if dist.world() == 1:
                    raise
                self._failure = e
        if settle:
            dist.settle(self._failure, hook)

    @torch.no_grad()
    def _restore_buffers(self, before: list, applied: bool | Tensor) -> None:
        """The batch-norm statistics of a dropped step's start (under fp16: where the device flag says so)."""
        for b, old in zip(self.model.buffers(), before):
            b.copy_(old if applied is False else torch.where(applied, b, old))

    # --- signals, errors ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _signals(self):
        """SIGINT, SIGTERM, SIGUSR1 and SIGUSR2 finish the current step and save (fit); the handlers that were
        installed before genlab's are put back at the end, and meanwhile take over after the save (_hand_over)."""
        self.signal, self._received, self._earlier = None, [], {}
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_signal(signum, frame):
            if signum in self._received:  # the same signal again: stop now
                raise KeyboardInterrupt
            self._received.append(signum)

        self._earlier = {sig: signal.signal(sig, on_signal) for sig in SIGNALS}
        try:
            yield
        finally:
            for sig, handler in self._earlier.items():
                if handler is not None:  # None: a handler not installed from Python, which cannot be put back
                    signal.signal(sig, handler)

    def _hand_over(self) -> bool:
        """After a signal's checkpoint, each signal received goes on to the Python handler installed before genlab's,
        where there is one: submitit's requeues the job on SIGUSR2 and exits, and only logs SIGTERM. True when all
        of them returned (their owner keeps the process running, and so does the run); False when genlab owns one
        of the signals: the run stops. Under several processes the ranks agree: one rank's own signal stops all
        (a rank whose earlier handler ended its process ends the others' next collective)."""
        received, self._received = self._received, []
        theirs = [s for s in received  # Python's own SIGINT handler (KeyboardInterrupt) is no owner: genlab stops
                  if callable(self._earlier.get(s)) and self._earlier[s] is not signal.default_int_handler]
        for s in theirs:
            log.info("%s: checkpoint saved at step %d; handing the signal on", signal.Signals(s).name, self.step)
            self._earlier[s](s, None)
        mine = [s for s in received if s not in theirs]
        stop = self._agree(bool(mine))
        self.signal = (mine[0] if mine else self.signal) if stop else None
        return not stop

    def _interrupted(self) -> Interrupted:
        name = signal.Signals(self.signal).name
        if self.saved is not None and self.saved[1] == self.step:
            path = self.saved[0]
            how = f"saved {path}. Continue with: genlab train resume={path.parent.parent}"
        else:
            how = "nothing was saved"
        return Interrupted(f"{name} at step {self.step}: {how}", self.signal)

    def diverged(self, what: str) -> GenlabError:
        if self.saved is not None:
            kept = f"The last good checkpoint, {self.saved[0]} (step {self.saved[1]}), is kept"
        else:
            kept = "This run wrote no checkpoint before it"
        tries = ["a lower optimizer.lr"] + (["trainer.precision=fp32"] if self.ctx.precision != "fp32" else []) + (
            ["trainer.on_nan=skip to drop such updates"] if self.ctx.on_nan != "skip" else [])
        error = GenlabError(f"training diverged: {what}. {kept}. Try {', or '.join(tries)}.")
        error.shared = True  # the ranks agree on the losses, so they diverge together
        error.diverged = True
        return error

    # --- what a checkpoint holds ----------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to go on training; refused when the weights are no longer finite, so that a
        checkpoint is always a good one."""
        tensors = [t for t in self.model.state_dict().values() if t.is_floating_point()]  # weights, BN statistics
        if not torch.stack([t.isfinite().all() for t in tensors]).all():
            raise self.diverged(f"the weights became non-finite by step {self.step}")
        return {"model": self.model.state_dict(), **self.ctx.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "step": self.step, "epoch": self.epoch, "wall_time": self.wall_time, "processes": dist.world(),
                "callbacks": {key_of(c): s for c in self.callbacks if (s := c.state_dict()) is not None}}

    def load_state_dict(self, state: dict) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.ctx.load_state_dict(state)
            if self.ema is not None:
                self.ema.load_state_dict(state.get("ema") or {"model": state["model"], "updates": 0})
        except (KeyError, RuntimeError, ValueError) as e:
            raise GenlabError(f"the checkpoint does not fit this model: {first_line(e)}") from e
        self.step, self.wall_time = state["step"], state.get("wall_time", 0.0)
        kept = state.get("callbacks") or {}
        for c in self.callbacks:
            if key_of(c) in kept:
                c.load_state_dict(kept[key_of(c)])
        if state.get("processes", 1) != dist.world():
            log.warning("this run trained on %d process(es) and continues on %d: the same batch of %d a step, but each "
                        "process now draws other noise than before, so it will not match an uninterrupted run bit for "
                        "bit.", state.get("processes", 1), dist.world(), self.loader.batch_size)


def key_of(callback) -> str:
    """A callback's name in a checkpoint's ``callbacks``: its ``state_key`` (genlab.callbacks.Callback's: its name in
    the config), else its class's."""
    return getattr(callback, "state_key", None) or type(callback).__name__


class Window:
    """The losses of the steps since the last metrics row, summed on the device, and the clock."""

    def __init__(self, device, wall_time: float = 0.0):
        self.device = device
        self.start = time.perf_counter() - wall_time
        self.first = torch.tensor(-1, device=device)  # the first step with a non-finite loss (on_nan=stop)
        self.clear()

    def clear(self) -> None:
        self.sums, self.counts, self.images, self.dropped = {}, {}, 0, []
        self.t0 = time.perf_counter()

    def pause(self, seconds: float) -> None:
        """Leave ``seconds`` out of the training time (trainer.max_time, wall_time) and start a new rate window."""
        self.start += seconds
        self.t0, self.images = time.perf_counter(), 0

    def elapsed(self) -> float:
        """Seconds of training, earlier runs of a resumed one included."""
        return time.perf_counter() - self.start

    def add(self, out: dict | None, step: int, images: int) -> None:
        self.images += images
        if out is None:
            self.dropped.append(step + 1)
            return
        for k, v in out.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v.float().clone()
            self.counts[k] = self.counts.get(k, 0) + 1
        if out:
            finite = torch.stack([v.float() for v in out.values()]).isfinite().all()
            self.first = torch.where(finite | (self.first >= 0), self.first, step + 1)

    def first_bad(self) -> int | None:
        at = int(self.first)
        return at if at >= 0 else None

    def row(self, step: int, epoch: int, received: int | None = None) -> tuple[dict, int | None]:
        """The metrics row of the window, and the signal to stop for. Under several processes the ranks agree
        here: the losses and images summed over them, the clock the slowest one's, a signal any one received."""
        keys = list(self.sums)
        now = time.perf_counter()
        total = torch.stack([*(self.sums[k] for k in keys), torch.tensor(float(self.images), device=self.device)])
        first = torch.where(self.first >= 0, -self.first, -2**31).double().view(1)  # max over ranks: the earliest
        peak = torch.cat([torch.tensor([now - self.start, received or 0], dtype=torch.float64, device=self.device), first])
        values = dist.all_reduce(total).tolist()  # the one host sync
        elapsed, signal, first = dist.all_reduce(peak, "max").tolist()
        self.first.fill_(int(-first) if first > -2**31 else -1)
        n = dist.world()
        row = {"step": step, "epoch": epoch + 1, **{f"train/{k}": v / (n * self.counts[k]) for k, v in zip(keys, values)},
               "img_per_s": round(values[-1] / max(now - self.t0, 1e-9), 1), "wall_time": round(elapsed, 3)}
        return row, int(signal) or None
