"""The one training loop shared by every model.

The model owns its step (``model.training_step(x, ctx)``); the loop owns the rest: device,
precision, data order, progress bar, metrics, sample grids, loss curves and checkpoints.
"""

import contextlib
import csv
import logging
import math
import signal
import threading
import time
from pathlib import Path

import torch
from torchvision.utils import save_image
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from genlab import checkpoint, plots
from genlab.errors import GenlabError, Interrupted

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ON_NAN = ("stop", "skip")
SKIP_LIMIT = 50  # on_nan=skip gives up after this many skipped steps in a row


def check_on_nan(value: str) -> None:
    if value not in ON_NAN:
        raise GenlabError(f"trainer.on_nan={value} is not one of {', '.join(ON_NAN)}.")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then the CPU; a named device must be present."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise GenlabError(f"device={name} is not a device name: use auto, cpu, cuda, cuda:N or mps.") from e
    if device.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            raise GenlabError(f"device={name}, but this machine has no CUDA GPU that PyTorch can use; use device=auto or cpu.")
        if device.index is not None and device.index >= n:
            raise GenlabError(f"device={name}, but this machine has {n} CUDA GPU(s) (cuda:0..cuda:{n - 1}).")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise GenlabError("device=mps, but MPS is not available here; use device=auto or cpu.")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise GenlabError(f"device={name} is not supported: use auto, cpu, cuda, cuda:N or mps.")
    return device


def cpu_has_fast_bf16() -> bool:
    """True where the CPU has native bf16 arithmetic (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on GPUs and CPUs that run it natively, fp16 on older GPUs, else fp32."""
    if precision not in ("auto", *DTYPES):
        raise GenlabError(f"trainer.precision={precision} is not one of auto, fp32, bf16, fp16.")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return "fp32"


class Trainer:
    """Trains ``model`` on uint8 ``images`` [N, C, H, W]; writes everything into ``run_dir``.

    The trainer is also the step context a model's ``training_step`` receives:
    ``autocast()``, ``step(name, loss)`` and ``step_index``.

    ``on_nan``: what a non-finite loss does. ``stop`` (no host sync: the check rides on the metrics
    rows) ends the run naming the step and the loss, keeping the last good checkpoint. ``skip`` reads
    each loss and its gradients on the host (two syncs per optimizer step), drops that update, undoes
    the step's batch-norm statistics, and goes on; it stops too when ``SKIP_LIMIT`` steps in a row
    were skipped.
    """

    def __init__(self, model, optimizers: dict, images: torch.Tensor, run_dir, *, device="cpu",
                 precision="fp32", epochs=1, max_steps=None, batch_size=64, log_every=50, n_samples=64,
                 checkpoint_every=1, keep_every=0, keep_last=0, progress=True, seed=0, config=None, title="",
                 on_nan="stop", compile=False):
        check_on_nan(on_nan)
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device)
        self.model = model.to(self.device)
        if compile:
            self._compile()
        self.optimizers = optimizers
        self.run_dir = Path(run_dir)
        self.n = images.shape[0]
        if self.n == 0:
            raise GenlabError("the training split has no images.")
        if batch_size > self.n:
            log.warning("trainer.batch_size=%d is more than the %d training images; using %d", batch_size, self.n, self.n)
        self.batch_size = min(batch_size, self.n)
        self.steps_per_epoch = self.n // self.batch_size
        self.total_steps = max_steps if max_steps else epochs * self.steps_per_epoch
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.log_every, self.n_samples = max(1, log_every), n_samples
        self.checkpoint_every, self.keep_every, self.keep_last = max(1, checkpoint_every), keep_every, keep_last
        self.progress, self.seed, self.config, self.title = progress, seed, config or {}, title
        self.images = self._place(images)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.step_index = 0
        self.on_nan = on_nan
        self._skipped = False  # set by step() when on_nan=skip dropped an update in this training step
        self._scaled = False  # set by step() when the fp16 scaler stepped an optimizer in this training step
        self._saved = None  # (path, step) of the newest checkpoint this run wrote
        self.rows: list[dict] = []  # metrics.csv, also in memory for the loss curves
        self._columns: list[str] = []

    def _compile(self) -> None:
        """torch.compile each network in place: the state dict keys stay as they are, so checkpoints
        move freely between compiled and eager runs."""
        if not torch._dynamo.is_dynamo_supported():
            raise GenlabError("trainer.compile=true, but torch.compile is not supported with this Python/PyTorch; "
                              "use trainer.compile=false.")
        for net in self.model.children():
            net.compile()

    # --- the step context ---------------------------------------------------------------------

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.precision])

    def step(self, name: str, loss: torch.Tensor) -> None:
        opt = self.optimizers[name]
        opt.zero_grad(set_to_none=True)
        skip = self.on_nan == "skip"
        if skip and not torch.isfinite(loss):
            self._skipped = True
            return
        if self.scaler is None:
            loss.backward()
            if skip and not self._grads_finite(opt):
                opt.zero_grad(set_to_none=True)
                self._skipped = True
                return
            opt.step()
        else:  # the scaler skips steps with non-finite gradients itself
            self.scaler.scale(loss).backward()
            self.scaler.step(opt)
            self._scaled = True

    @staticmethod
    def _grads_finite(opt) -> bool:
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        return not grads or bool(torch.stack([g.isfinite().all() for g in grads]).all())

    # --- data -----------------------------------------------------------------------------------

    def _place(self, images: torch.Tensor) -> torch.Tensor:
        """Keep the whole uint8 dataset on the device when it fits easily; else pinned on the host."""
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if images.numel() < free // 4:
                return images.to(self.device)
            return images.pin_memory()
        return images.to(self.device)

    def _order(self, epoch: int) -> torch.Tensor:
        """The epoch's shuffle, a function of (seed, epoch) alone: resuming mid-epoch replays it."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g).to(self.images.device)

    def _batch(self, order: torch.Tensor, i: int) -> torch.Tensor:
        idx = order[i * self.batch_size:(i + 1) * self.batch_size]
        x = self.images.index_select(0, idx).to(self.device, non_blocking=True)
        return x.float().div_(255)  # [B, C, H, W] in [0, 1]

    # --- the loop -------------------------------------------------------------------------------

    def fit(self, resume: dict | None = None, resume_path=None) -> None:
        """Train to ``total_steps``, continuing from the checkpoint ``resume`` (read from ``resume_path``) if
        given. SIGINT/SIGTERM finish the current step, save, then raise Interrupted."""
        self._signal = None
        if resume is not None and resume_path is not None:
            self._saved = (resume_path, resume["step"])  # the last good checkpoint until this run writes one
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            self._fit(resume)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        if self._signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self._signal = signum

    def _fit(self, resume: dict | None) -> None:
        start_wall = 0.0
        if resume is not None:
            self._load_state(resume)
            start_wall = resume.get("wall_time", 0.0)
        (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
        fixed_z = self.model.latent(self.n_samples, torch.Generator().manual_seed(self.seed)).to(self.device)
        self.model.train()
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        self._first_bad = torch.tensor(-1, device=self.device)  # the first step with a non-finite loss
        skipped: list[int] = []  # on_nan=skip: steps dropped since the last metrics row
        in_a_row = 0
        t_start = time.perf_counter() - start_wall
        t_window, images_in_window, last_plot = time.perf_counter(), 0, 0.0
        bar = tqdm(total=self.total_steps, initial=self.step_index, unit="step", dynamic_ncols=True,
                   disable=None if self.progress else True)
        with bar, logging_redirect_tqdm():
            while self.step_index < self.total_steps:
                epoch, first = divmod(self.step_index, self.steps_per_epoch)
                bar.set_description(f"epoch {epoch + 1}/{self.epochs}")
                order = self._order(epoch)
                for i in range(first, self.steps_per_epoch):
                    stats = [b.clone() for b in self._buffers()] if self.on_nan == "skip" else None
                    out = self.model.training_step(self._batch(order, i), self)
                    if self._scaled:
                        self.scaler.update()
                        self._scaled = False
                    self.step_index += 1
                    if self._skipped:
                        self._skipped = False
                        for saved, now in zip(stats, self._buffers()):
                            now.copy_(saved)
                        skipped.append(self.step_index)
                        in_a_row += 1
                        if in_a_row >= SKIP_LIMIT:
                            raise self._diverged(f"the losses or gradients of the {in_a_row} steps up to step "
                                                 f"{self.step_index} were all non-finite (trainer.on_nan=skip)")
                    else:
                        in_a_row = 0
                        self._accumulate(out, sums, counts)
                    images_in_window += self.batch_size
                    bar.update(1)
                    end = self.step_index >= self.total_steps or self._signal is not None
                    if self.step_index % self.log_every == 0 or i == self.steps_per_epoch - 1 or end:
                        self._sync()  # the row reads the losses anyway; the window's time then counts its work
                        now = time.perf_counter()
                        row = self._log_row(sums, counts, epoch, images_in_window / (now - t_window), now - t_start)
                        bar.set_postfix({k.removeprefix("train/"): f"{v:.3g}" for k, v in row.items() if k.startswith("train/")})
                        if skipped:
                            log.warning("skipped %d update(s) with a non-finite loss or gradient: step(s) %s",
                                        len(skipped), ", ".join(map(str, skipped[:10])) + (" ..." if len(skipped) > 10 else ""))
                        sums, counts, images_in_window, skipped = {}, {}, 0, []
                        t_window = now
                    if end:
                        break
                if self._signal is not None:
                    last = self.run_dir / "checkpoints" / "last.pt"
                    self.save(last, epoch, time.perf_counter() - t_start)
                    name = signal.Signals(self._signal).name
                    raise Interrupted(
                        f"{name} at step {self.step_index}: saved {last}. Continue with: genlab train resume={self.run_dir}",
                        self._signal,
                    )
                # the end of an epoch (or of the run): pictures and checkpoints
                done_epochs = epoch + 1
                self._sample_grid(fixed_z, self.run_dir / "samples" / f"epoch_{done_epochs:04d}.png")
                last = self.step_index >= self.total_steps
                if last or time.perf_counter() - last_plot > 15:
                    plots.loss_curves(self.rows, self.run_dir / "loss_curves.png", self.title)
                    last_plot = time.perf_counter()
                if last or done_epochs % self.checkpoint_every == 0:
                    self.save(self.run_dir / "checkpoints" / "last.pt", epoch, time.perf_counter() - t_start)
                if self.keep_every and done_epochs % self.keep_every == 0 and self.step_index % self.steps_per_epoch == 0:
                    self.save(self.run_dir / "checkpoints" / f"epoch_{done_epochs:04d}.pt", epoch, time.perf_counter() - t_start)
                    self._prune()
                t_window = time.perf_counter()  # the window's speed counts training alone

    def _sync(self) -> None:
        """Wait for the work queued on a GPU (a no-op on the CPU, which runs each op as it is called)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()

    def _buffers(self) -> list[torch.Tensor]:
        """The model's floating-point buffers (batch-norm statistics): a skipped step puts them back."""
        return [b for b in self.model.buffers() if b.is_floating_point()]

    def _accumulate(self, out: dict, sums: dict, counts: dict) -> None:
        """Add the step's losses to the window's sums, on the device; note the first non-finite step."""
        for k, v in out.items():
            sums[k] = sums[k] + v if k in sums else v.float().clone()
            counts[k] = counts.get(k, 0) + 1
        if self.on_nan == "stop" and out:
            finite = torch.stack([v.float() for v in out.values()]).isfinite().all()
            self._first_bad = torch.where(finite | (self._first_bad >= 0), self._first_bad, self.step_index)

    def _diverged(self, what: str) -> GenlabError:
        if self._saved is not None:
            kept = f"The last good checkpoint, {self._saved[0]} (step {self._saved[1]}), is kept"
        else:
            kept = "This run wrote no checkpoint before it"
        tries = ["a lower optimizer.lr"] + (["trainer.precision=fp32"] if self.precision != "fp32" else []) + (
            ["trainer.on_nan=skip to drop such updates"] if self.on_nan != "skip" else [])
        hint = "Try " + ", or ".join(tries)
        return GenlabError(f"training diverged: {what}. {kept}. {hint}.")

    def _log_row(self, sums, counts, epoch, img_per_s, wall) -> dict:
        keys = list(sums)
        values = torch.stack([sums[k] for k in keys]).tolist() if keys else []  # the one host sync
        losses = {f"train/{k}": v / counts[k] for k, v in zip(keys, values)}
        bad = [k.removeprefix("train/") for k, v in losses.items() if not math.isfinite(v)]
        if bad:
            at = int(self._first_bad)
            raise self._diverged(f"{', '.join(bad)} became non-finite at step {at if at >= 0 else self.step_index} "
                                 f"(epoch {epoch + 1})")
        row = {"step": self.step_index, "epoch": epoch + 1, **losses, "img_per_s": round(img_per_s, 1),
               "wall_time": round(wall, 3)}
        self._write_row(row)
        return row

    def _write_row(self, row: dict) -> None:
        """Append to metrics.csv; rewrite it whole when a new column appears (e.g. n_critic > 1)."""
        self.rows.append(row)
        path = self.run_dir / "metrics.csv"
        losses = [k for k in self._columns if k.startswith("train/")]
        new = [k for k in row if k.startswith("train/") and k not in losses]
        if new or not path.exists():
            self._columns = ["step", "epoch", *losses, *new, "img_per_s", "wall_time"]
            with open(path, "w", newline="") as fh:
                writer = csv.DictWriter(fh, self._columns, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(self.rows)
        else:
            with open(path, "a", newline="") as fh:
                csv.DictWriter(fh, self._columns, extrasaction="ignore").writerow(row)

    @torch.no_grad()
    def _sample_grid(self, z: torch.Tensor, path: Path) -> None:
        self.model.eval()
        with self.autocast():
            images = self.model.generate(z).float().clamp(0, 1)
        self.model.train()
        save_image(images, path, nrow=int(math.ceil(math.sqrt(len(z)))), padding=2, pad_value=1.0)

    # --- checkpoints ----------------------------------------------------------------------------

    def save(self, path: Path, epoch: int, wall: float) -> None:
        """Write a checkpoint, unless the weights are no longer finite: then the last good one stays."""
        tensors = [t for t in self.model.state_dict().values() if t.is_floating_point()]  # weights and BN statistics
        if not torch.stack([t.isfinite().all() for t in tensors]).all():
            raise self._diverged(f"the weights became non-finite by step {self.step_index}")
        checkpoint.save({
            "config": self.config,
            "model": self.model.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "step": self.step_index,
            "epoch": epoch,
            "wall_time": wall,
            "rng": checkpoint.rng_state(),
        }, path)
        self._saved = (path, self.step_index)

    def _prune(self) -> None:
        """Keep only the newest ``keep_last`` periodic checkpoints (last.pt is never pruned)."""
        if self.keep_last:
            for old in sorted((self.run_dir / "checkpoints").glob("epoch_*.pt"))[: -self.keep_last]:
                old.unlink()

    def _load_state(self, state: dict) -> None:
        try:
            self.model.load_state_dict(state["model"])
            for k, o in self.optimizers.items():
                o.load_state_dict(state["optimizers"][k])
        except (KeyError, RuntimeError, ValueError) as e:
            raise GenlabError(f"the checkpoint does not fit this model: {str(e).splitlines()[0]}") from e
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step_index = state["step"]
        checkpoint.set_rng_state(state["rng"])
