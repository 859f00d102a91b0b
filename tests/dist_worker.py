"""Training runs inside one process of a (torchrun) process group, for tests/test_dist.py.

    python tests/dist_worker.py OUT [--arranged]                   (one process)
    torchrun --nproc_per_node=2 tests/dist_worker.py OUT [--arranged] [--accumulate]
    torchrun --nproc_per_node=2 tests/dist_worker.py OUT --decisions

Each family trains a few steps with genlab's own builder and loop; every rank then saves its weights as
OUT/<family>-rank<r>.pt. ``--arranged`` makes the runs of different world sizes comparable: every random
draw of a step is taken for the whole (global) batch from a stream that does not depend on the rank, and
each rank keeps its slice of it; batch norm normalises with the statistics of the whole batch (as
SyncBatchNorm does on GPUs). Then N processes with a batch of B/N each compute what one process computes
with B, up to the order of floating-point sums.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed.nn.functional as dist_fn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

sys.path.insert(0, str(Path(__file__).parent))

from genlab import build as build_module, dist, trainer as trainer_module  # noqa: E402
from genlab.build import build_trainer  # noqa: E402
from genlab.callbacks import Callback  # noqa: E402
from genlab.errors import GenlabError  # noqa: E402
from genlab.models.base import GenerativeModel  # noqa: E402

from conftest import compose_train  # noqa: E402

COMMON = ["dataset=synthetic", "dataset.n=64", "trainer.batch_size=16", "trainer.max_steps=6", "trainer.log_every=2",
          "trainer.precision=fp32", "optimizer=sgd", "optimizer.lr=0.01"]
FAMILIES = {
    "gan_bce": ["model=gan"],
    "wgan_gp": ["model=gan", "loss=wasserstein", "model.n_critic=2"],
    "cgan": ["model=cgan", "model.discriminator.dropout=0", "model.generator.width=8", "model.discriminator.width=8"],
    "vae": ["model=vae", "model.encoder.width=8"],
    "vae_gan": ["model=vae_gan", "model.encoder.width=8", "model.discriminator.width=8"],
    "ddpm": ["model=ddpm", "model.unet.width=8", "model.num_classes=10", "dataset.image_size=16"],
    "flow": ["model=flow", "model.unet.width=8", "dataset.image_size=16"],
    "stylegan": ["model=stylegan", "dataset.image_size=16", "model.generator.width=8", "model.generator.max_width=8",
                 "model.discriminator.width=8", "model.discriminator.max_width=8", "model.regularizers.r1.every=2"],
    "two_updates": ["model=flow", "dataset.image_size=8"],  # the model replaced by TwoUpdates (family_config)
}


class TwoUpdates(GenerativeModel):
    """A plug-in model that updates its one optimizer twice in a training step (an inner loop, as a critic's),
    with a head that only the images of class 0 reach: a branch that a rank whose slice holds none never takes,
    so the ranks disagree on which parameters have gradients."""

    def __init__(self, channels: int = 1, image_size: int = 8, width: int = 8):
        super().__init__()
        self.shape = (channels, image_size, image_size)
        self.body = nn.Linear(channels * image_size * image_size, width)
        self.head = nn.Linear(width, 1)

    def optimizer_groups(self):
        return {"main": self.parameters()}

    def training_step(self, batch, ctx):
        x, zeros = batch.x.flatten(1), batch.y == 0
        for _ in range(2):
            h = torch.tanh(self.body(x))
            loss = (h - 0.5).pow(2).mean()
            if zeros.any():  # summed over the batch's zeros, divided by the whole batch: as one process computes it
                loss = loss + self.head(h[zeros]).pow(2).sum() / len(x)
            ctx.backward(loss, "main")
            ctx.step("main")
        return {"loss": loss.detach()}

    def latent(self, n, generator=None):
        return torch.randn(n, self.body.out_features, generator=generator)

    def generate(self, z, labels=None):
        return torch.sigmoid(z @ self.body.weight).view(-1, *self.shape)


# what gradient accumulation keeps exact: no batch norm (cgan), no statistic over the batch (StyleGAN's minibatch
# standard deviation and path-length mean), no draw inside a micro-batch (the gradient penalty's mixing weights: the
# same distribution, other values)
PER_SAMPLE = [f for f in FAMILIES if f not in ("cgan", "stylegan", "wgan_gp")]
ACCUMULATE = ["trainer.batch_size=8", "trainer.accumulate=2"]  # a step's batch of 16, as COMMON's, in two


def family_config(family: str, extra=()):
    cfg = compose_train([*COMMON, *FAMILIES[family], "trainer.progress=false", "callbacks=none", *extra])  # weights alone
    if family == "two_updates":
        cfg.model, cfg.loss = {"_target_": "dist_worker.TwoUpdates", "image_size": 8}, None
    return cfg


class GlobalBatchNorm(_BatchNorm):
    """Batch norm over the whole batch of every rank, differentiable through the all-reduce (a CPU stand-in for
    SyncBatchNorm, which runs on GPUs only). One process computes the same formula, so that both agree."""

    def _check_input_dim(self, x):
        pass

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype)
        stats = torch.cat([x.sum(dims), x.pow(2).sum(dims), count])
        if dist.world() > 1:
            stats = dist_fn.all_reduce(stats)
        c = x.shape[1]
        n = stats[-1]
        mean, var = stats[:c] / n, stats[c:2 * c] / n - (stats[:c] / n) ** 2
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach() * n / (n - 1), self.momentum)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) / (var.view(shape) + self.eps).sqrt()
        return y * self.weight.view(shape) + self.bias.view(shape)


def global_batch_norm(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, _BatchNorm):
            new = GlobalBatchNorm(child.num_features, child.eps, child.momentum)
            new.load_state_dict(child.state_dict())
            new.weight, new.bias = child.weight, child.bias  # the parameters the optimizer already holds
            setattr(module, name, new)
        else:
            global_batch_norm(child)
    return module


def arrange_noise() -> None:
    """Every draw without an explicit generator: the global batch's draw, from a stream the rank does not
    change, sliced to this rank's rows (the first dimension is the batch in every training step)."""
    step_seed = trainer_module.step_seed
    trainer_module.step_seed = lambda seed, rank, step: step_seed(seed, 0, step)

    def sliced(draw):
        def f(*size, generator=None, device=None, dtype=None, **kw):
            if generator is not None:
                return draw(*size, generator=generator, device=device, dtype=dtype, **kw)
            size = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
            g = torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))
            full = draw((size[0] * dist.world(), *size[1:]), generator=g, dtype=dtype)
            return full[dist.rank() * size[0]:(dist.rank() + 1) * size[0]].to(device)
        return f

    torch.randn, torch.rand = sliced(torch.randn), sliced(torch.rand)
    torch.randn_like = lambda t, **kw: torch.randn(t.shape, device=t.device, dtype=t.dtype)
    torch.rand_like = lambda t, **kw: torch.rand(t.shape, device=t.device, dtype=t.dtype)


class OneRank(Callback):
    """Something that happens to rank ``rank`` alone after step ``step``: a signal, or its clock running out."""

    def __init__(self, what: str, rank: int = 1, step: int = 3):
        self.what, self.rank, self.at = what, rank, step

    def on_step_end(self, trainer):
        if dist.rank() != self.rank or trainer.step != self.at:
            return
        if self.what == "signal":
            os.kill(os.getpid(), signal.SIGTERM)
        elif self.what == "clock":
            trainer._window.start -= 3600  # an hour later, for this rank alone
        elif self.what == "request":  # a search's pruner, say: a callback of rank 0 ends the run
            trainer.request_stop("asked by a callback")
        elif self.what == "crash":
            raise GenlabError(f"rank {self.rank} broke at step {self.at}")


def poisoned(loader, rank: int, steps: set):
    """The loader's batches, with NaN images on ``rank`` at the global ``steps``."""
    epoch = loader.epoch

    def batches(e, start=0):
        for i, batch in enumerate(epoch(e, start), start=e * loader.steps_per_epoch + start):
            yield batch._replace(x=batch.x.fill_(float("nan"))) if dist.rank() == rank and i in steps else batch
    loader.epoch = batches


def decisions(out: Path) -> None:
    """What every rank must decide together when only one rank meets it: a non-finite loss (on_nan=skip and
    stop), the time budget, a signal. Each rank writes where it stopped, how, and a checksum of its weights."""
    device = dist.setup("cpu")
    cases = {"skip": ["trainer.on_nan=skip"], "stop": ["trainer.on_nan=stop"], "clock": ["trainer.max_time=1h"],
             "signal": [], "request": []}
    for case, overrides in cases.items():
        cfg = compose_train(["model=gan", *COMMON, "trainer.max_steps=8", "trainer.log_every=4", *overrides])
        torch.manual_seed(cfg.seed)
        trainer = build_trainer(cfg, out / case, device)
        if case in ("skip", "stop"):
            poisoned(trainer.loader, rank=1, steps={2} if case == "skip" else {5})
        else:
            trainer.callbacks.append(OneRank(case, rank=0 if case == "request" else 1))
        try:
            trainer.fit()
            error = None
        except GenlabError as e:
            error = type(e).__name__ + ": " + str(e)
        weights = sum(float(p.detach().double().sum()) for p in trainer.model.parameters())
        result = {"step": trainer.step, "error": error, "weights": weights, "history": len(trainer.history),
                  "stopped": trainer.stopped}
        (out / f"{case}-rank{dist.rank()}.json").write_text(json.dumps(result))


class Stall(Callback):
    """On rank 0 alone: sleep ``sleep`` seconds in ``hook``, then raise ``error`` (None: go on)."""

    def __init__(self, hook: str, sleep: float, error: str | None = None):
        self.hook, self.sleep, self.error = hook, sleep, error

    def __getattribute__(self, name):
        if name == object.__getattribute__(self, "hook") and dist.is_main():
            return self._stall
        return object.__getattribute__(self, name)

    def _stall(self, trainer, *args):
        time.sleep(self.sleep)
        if self.error:
            raise OSError(28, self.error)


def stranded(out: Path) -> None:
    """Work that rank 0 does alone, slow (longer than the collectives' timeout, GENLAB_DIST_TIMEOUT) or failing:
    in on_fit_start (a tracker), in a checkpoint written at an epoch's end or mid-epoch, and while the measurements
    are built (the yardstick classifier). Each rank writes how each case ended."""
    device = dist.setup("cpu")
    slow = float(os.environ["GENLAB_DIST_TIMEOUT"]) * 2
    # (hook, error): a mid-epoch checkpoint (on_step_end) fails at once; a slow one must end within the timeout
    cases = {"slow_start": ("on_fit_start", None), "failed_start": ("on_fit_start", "tracker unreachable"),
             "full_disk": ("on_epoch_end", "No space left on device"), "slow_build": (None, None),
             "failed_step": ("on_step_end", "No space left on device")}
    build = build_module.build_evaluation
    for case, (hook, error) in cases.items():
        cfg = compose_train(["model=gan", *COMMON, "trainer.max_steps=8", "trainer.log_every=4"])
        build_module.build_evaluation = build if hook else lambda *a: (time.sleep(slow) if dist.is_main() else None, [])[1]
        try:
            trainer = build_trainer(cfg, out / case, device)
            trainer.callbacks.append(Stall(hook or "on_fit_start", 0 if hook in (None, "on_step_end") else slow, error))
            trainer.fit()
            result = {"step": trainer.step, "error": None}
        except GenlabError as e:
            result = {"step": trainer.step, "error": f"{type(e).__name__}: {e}"}
        except OSError as e:
            result = {"step": trainer.step, "error": f"OSError: {e}"}
        (out / f"{case}-rank{dist.rank()}.json").write_text(json.dumps(result))
    dist.finish()


def main(out: Path, arranged: bool, accumulate: bool = False) -> None:
    device = dist.setup("cpu")
    if arranged:
        arrange_noise()
    for family in PER_SAMPLE if accumulate else FAMILIES:
        cfg = family_config(family, ACCUMULATE if accumulate else ())
        torch.manual_seed(cfg.seed)
        run_dir = out / f"{family}-world{dist.world()}{'-acc' if accumulate else ''}"
        trainer = build_trainer(cfg, run_dir, device)
        if arranged:
            global_batch_norm(trainer.model)
        trainer.fit()
        torch.save(trainer.model.state_dict(), out / f"{run_dir.name}-rank{dist.rank()}.pt")


if __name__ == "__main__":
    if "--decisions" in sys.argv[2:]:
        decisions(Path(sys.argv[1]))
    elif "--stranded" in sys.argv[2:]:
        stranded(Path(sys.argv[1]))
    elif "--crash" in sys.argv[2:]:  # rank 1 fails mid-run: rank 0 must not wait for it forever
        cfg = compose_train(["model=gan", *COMMON, "trainer.max_steps=8"])
        trainer = build_trainer(cfg, Path(sys.argv[1]), dist.setup("cpu"))
        trainer.callbacks.append(OneRank("crash"))
        try:
            trainer.fit()
        except GenlabError as e:
            print(f"rank {dist.rank()}: {type(e).__name__}: {e}", file=sys.stderr)
            sys.exit(1)
    else:
        main(Path(sys.argv[1]), "--arranged" in sys.argv[2:], "--accumulate" in sys.argv[2:])
