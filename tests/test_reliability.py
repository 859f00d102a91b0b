"""Exact resume, safe checkpoint loading, interruption and divergence: each shown failing without its guard."""

import os
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from genlab import callbacks, checkpoint
from genlab.callbacks import Callback
from genlab.errors import GenlabError, Interrupted
from genlab.parts import build_schedulers
from genlab.schedules import Cosine
from genlab.step import StepContext
from genlab.train import check_trainer, resumed_config
from genlab.trainer import SKIP_LIMIT

from conftest import compose_train, genlab, genlab_here, make_trainer

COMMON = ["dataset=synthetic", "dataset.n=96", "trainer.batch_size=32", "device=cpu", "trainer.precision=fp32",
          "trainer.log_every=1", "trainer.n_samples=4"]


def tensors(obj, prefix=""):
    """Every tensor in a nested checkpoint, by path."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{prefix}/{i}")


SMALL_STYLEGAN = ["augment=ada", "model.augment.interval=1", "model.augment.speed=200", "model.generator.width=8",
                  "model.discriminator.width=8", "model.generator.max_width=16", "model.discriminator.max_width=16",
                  "model.regularizers.r1.every=3"]


@pytest.mark.parametrize("model,precision", [("gan", "fp32"), ("vae", "fp32"),  # bf16: 20x slower without native bf16
                                             ("stylegan", "fp32"), pytest.param("dcgan", "bf16", marks=pytest.mark.slow)])
def test_resume_is_bit_identical(model, precision, tmp_path):
    """4 steps + resume + 4 steps == 8 steps in one go (3 steps an epoch: the cut is mid-epoch). The resumed run is a
    process of its own, as after a crash; the two before it run in this one, through the same entry. The StyleGAN
    carries an adaptive augmentation, whose strength and counts resume with it, and style mixing's draws."""
    args = [f"model={model}", *COMMON, f"trainer.precision={precision}", *(SMALL_STYLEGAN if model == "stylegan" else [])]
    for name, extra in (("whole", ["trainer.max_steps=8"]), ("half", ["trainer.max_steps=4"])):
        r = genlab_here("train", *args, *extra, f"hydra.run.dir={tmp_path / name}", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    r = genlab("train", f"resume={tmp_path / 'half'}", "trainer.max_steps=8", f"hydra.run.dir={tmp_path / 'resumed'}",
               cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    a, b = checkpoint.load(tmp_path / "whole"), checkpoint.load(tmp_path / "resumed")
    assert a["step"] == b["step"] == 8
    assert a["choices"]["model"] == b["choices"]["model"] == model  # the resumed run keeps the run's own record
    ta, tb = dict(tensors({k: a[k] for k in ("model", "optimizers")})), dict(tensors({k: b[k] for k in ("model", "optimizers")}))
    assert ta.keys() == tb.keys() and len(ta) > 10
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, different
    # and the 4-step run really differs from the 8-step one: the comparison can fail
    half = dict(tensors(checkpoint.load(tmp_path / "half")["model"]))
    assert any(not torch.equal(half[k], ta["/model" + k]) for k in half)


def test_resume_with_fewer_gpus_than_the_checkpoint_had(monkeypatch, tmp_path):
    """A checkpoint of a genlab that stored the random states of 2 GPUs, resumed where 1 is visible:
    torch.cuda.set_rng_state_all would fail on the second ("invalid device ordinal"). No random state is
    restored at all now (each step seeds its own draws), so the run goes on."""
    def set_rng_state(state, device=None):
        raise RuntimeError("CUDA error: invalid device ordinal")

    t = make_trainer(["model=gan", *COMMON, "trainer.max_steps=2"], tmp_path)
    t.fit()
    state = checkpoint.load(tmp_path)
    state["rng"] = {"torch": torch.get_rng_state(), "cuda": [torch.zeros(16, dtype=torch.uint8)] * 2}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)
    resumed = make_trainer(["model=gan", *COMMON, "trainer.max_steps=4"], tmp_path / "resumed")
    resumed.load_state_dict(state)
    assert resumed.step == 2


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/genlab-poison-marker")


def test_poisoned_checkpoint_runs_nothing(tmp_path):
    MARKER.unlink(missing_ok=True)
    path = tmp_path / "last.pt"
    torch.save({"format": checkpoint.FORMAT, "version": 1, "model": Payload()}, path)
    with pytest.raises(GenlabError, match="refused"):
        checkpoint.load(path)
    r = genlab("sample", f"ckpt={path}", cwd=tmp_path)
    assert r.returncode == 1 and "refused" in r.stderr and "Traceback" not in r.stderr
    assert not MARKER.exists()
    # the payload is live: unpickling it without weights_only would have run it
    with open(path, "rb") as fh:
        torch.load(fh, weights_only=False)
    assert MARKER.exists()
    MARKER.unlink()


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save({"step": 1}, path)

    def broken_save(obj, fh):
        fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(GenlabError, match="No space left on device.*the previous last.pt is intact"):
        checkpoint.save({"step": 2}, path)
    monkeypatch.undo()
    assert checkpoint.load(path)["step"] == 1  # the previous checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_a_checkpoint_and_says_how_to_resume(tmp_path, sig, code):
    exe = Path(sys.executable).parent / "genlab"
    run = tmp_path / "run"
    p = subprocess.Popen([str(exe), "train", "model=dcgan", *COMMON, "dataset.n=2048", "trainer.epochs=1000",
                          f"hydra.run.dir={run}"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "metrics.csv").exists() and time.time() < deadline:
        time.sleep(0.2)
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    assert p.returncode == code, err
    assert f"genlab train resume={run}" in err
    state = checkpoint.load(run)
    assert 0 < state["step"] < 1000 * 64


def signalled_trainer(tmp_path, signals: dict):
    """A GAN of 3 steps an epoch that sends itself ``signals[i]`` (a list) during step index i."""
    t = make_trainer(["model=gan", *COMMON, "trainer.max_steps=30", "trainer.write_share=1"], tmp_path)
    real_step = t.model.training_step

    def step(batch, ctx):
        for sig in signals.get(ctx.step_index, ()):
            os.kill(os.getpid(), sig)
        return real_step(batch, ctx)

    t.model.training_step = step
    return t


def test_a_signal_goes_on_to_the_handler_installed_before_genlabs(tmp_path):
    """submitit installs its handlers before the job runs: on SIGUSR2 it requeues the job and exits, SIGTERM it only
    logs. genlab finishes the step and saves first, then calls them; when the handler returns, the run goes on."""
    calls = []

    def requeue(signum, frame):
        calls.append((signal.Signals(signum).name, checkpoint.load(tmp_path)["step"]))
        sys.exit(-1)

    def bypass(signum, frame):
        calls.append((signal.Signals(signum).name, checkpoint.load(tmp_path)["step"]))

    t = signalled_trainer(tmp_path, {4: [signal.SIGTERM], 10: [signal.SIGTERM, signal.SIGUSR2]})
    earlier = {signal.SIGUSR2: signal.signal(signal.SIGUSR2, requeue), signal.SIGTERM: signal.signal(signal.SIGTERM, bypass)}
    try:
        with pytest.raises(SystemExit):
            t.fit()
        assert signal.getsignal(signal.SIGUSR2) is requeue and signal.getsignal(signal.SIGTERM) is bypass  # put back
    finally:
        for sig, handler in earlier.items():
            signal.signal(sig, handler)
    # each signal reaches its handler after the checkpoint of the step it came in (step 5 is mid-epoch)
    assert calls == [("SIGTERM", 5), ("SIGTERM", 11), ("SIGUSR2", 11)]
    assert (tmp_path / "samples" / "epoch_0002.png").is_file() and t.step == 11  # the run went on after SIGTERM


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGUSR2])
def test_a_user_signal_without_a_handler_stops_with_a_checkpoint(tmp_path, sig):
    """SIGUSR1/SIGUSR2 (a cluster's warning before a time limit) are SIGTERM's equal when nothing else handles them."""
    t = signalled_trainer(tmp_path, {4: [sig]})
    earlier = signal.signal(sig, signal.SIG_DFL)
    try:
        with pytest.raises(Interrupted) as e:
            t.fit()
    finally:
        signal.signal(sig, earlier)
    assert e.value.exit_code == 128 + sig and f"{signal.Signals(sig).name} at step 5: saved" in str(e.value)
    assert checkpoint.load(tmp_path)["step"] == 5


def test_old_periodic_checkpoints_are_pruned(tmp_path):
    r = genlab("train", "model=gan", *COMMON, "trainer.epochs=5", "trainer.keep_every=1", "trainer.keep_last=2",
               f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["epoch_0004.pt", "epoch_0005.pt", "last.pt"]
    assert checkpoint.load(tmp_path / "run" / "checkpoints" / "epoch_0004.pt")["step"] == 12


def test_kept_copies_are_files_of_their_own_and_resume_auto_takes_the_newest_intact_one(tmp_path):
    """A kept copy and last.pt are two files (a hard link shared their bytes, so an in-place edit of one changed
    the other); a temporary file that a killed write left behind is removed at the next start, where its process is
    gone; resume=auto takes the newest intact kept copy when last.pt is damaged (it stopped with the damage)."""
    run = tmp_path / "run"
    t = make_trainer(["model=gan", *COMMON, "trainer.max_steps=9", "trainer.keep_every=1", "trainer.keep_last=2"], run)
    t.fit()
    folder = run / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["epoch_0002.pt", "epoch_0003.pt", "last.pt"]
    last = (folder / "last.pt").read_bytes()
    assert (folder / "epoch_0003.pt").read_bytes() == last and (folder / "epoch_0003.pt").stat().st_nlink == 1
    with open(folder / "epoch_0003.pt", "r+b") as fh:  # an in-place edit, as a tool that rewrites files may make
        fh.seek(len(last) // 2)
        fh.write(bytes(b ^ 0xFF for b in last[len(last) // 2:len(last) // 2 + 64]))
    assert (folder / "last.pt").read_bytes() == last
    gone, living = folder / f".last.pt.tmp{2**22 + 12345}", folder / f".last.pt.tmp{os.getppid()}"
    gone.write_bytes(b"half a checkpoint"), living.write_bytes(b"another process's write")
    (folder / "last.pt").write_bytes(last[: len(last) // 2])  # last.pt cut short, the newest kept copy changed
    r = genlab_here("train", "model=gan", *COMMON, "trainer.max_steps=12", "trainer.keep_every=1",
                    "trainer.keep_last=2", "resume=auto", f"hydra.run.dir={run}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "resuming from the newest intact kept copy, epoch_0002.pt (step 6)" in r.stdout + r.stderr
    assert checkpoint.load(run)["step"] == 12 and not gone.exists() and living.exists()
    (folder / "last.pt").write_bytes((folder / "last.pt").read_bytes()[:1000])
    explicit = genlab_here("train", f"resume={run}", "trainer.max_steps=15", cwd=tmp_path)
    assert explicit.returncode == 1 and "cannot be read" in explicit.stderr  # named by the user: refused, not replaced


class Keeps(Callback):
    """A callback of a user's whose state holds values that pickle but that weights_only=True cannot read back."""

    def __init__(self, value):
        self.value = value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def test_what_a_checkpoint_cannot_hold_is_converted_or_refused_when_it_is_written(tmp_path):
    """numpy numbers, numpy arrays and paths in a callback's state, and a numpy learning rate in an optimizer's,
    are written as Python numbers, tensors and strings, and the run resumes from them; any other object is refused
    at the first checkpoint with one line naming its key. Before, the run wrote checkpoints that no resume could
    read: a numpy float made every one of them unreadable, found only at the resume."""
    import numpy as np

    state = {"best": np.float64(0.25), "count": np.int64(3), "where": Path("samples"), "mask": np.ones(2, np.float32)}
    t = make_trainer(["model=gan", *COMMON, "trainer.max_steps=3"], tmp_path / "run")
    keeps = Keeps(state)
    keeps.state_key = "keeps"
    t.callbacks.append(keeps)
    t.ctx.optimizers["g"].param_groups[0]["lr"] = np.float64(2e-4)
    t.fit()
    saved = checkpoint.load(tmp_path / "run")
    value = saved["callbacks"]["keeps"]["value"]
    assert value["best"] == 0.25 and type(value["best"]) is float and value["count"] == 3 and value["where"] == "samples"
    assert torch.equal(value["mask"], torch.ones(2)) and saved["optimizers"]["g"]["param_groups"][0]["lr"] == 2e-4
    t = make_trainer(["model=gan", *COMMON, "trainer.max_steps=3"], tmp_path / "bad")
    keeps = Keeps({"fitted": object()})
    keeps.state_key = "keeps"
    t.callbacks.append(keeps)
    with pytest.raises(GenlabError, match=r"could not write the checkpoint .*last.pt: callbacks/keeps/value/fitted is "
                                          r"a builtins.object, which a checkpoint cannot hold"):
        t.fit()


@pytest.mark.parametrize("every,saved", [("10m", [2, 4, 6, 8, 10, 12]), (1, [3, 6, 9, 12]), (2, [6, 12])])
def test_checkpoint_every_takes_epochs_or_training_time(tmp_path, monkeypatch, every, saved):
    """trainer.checkpoint_every=10m writes last.pt once 10 minutes have passed since the last write, mid-epoch too,
    so that a hard kill loses at most that; a number is epochs. Here a step takes 5 minutes, an epoch 3 steps."""
    clock, written = [0.0], []
    monkeypatch.setattr(callbacks.time, "monotonic", lambda: clock[0])
    real_save = checkpoint.save
    monkeypatch.setattr(checkpoint, "save", lambda state, path: written.append(state["step"]) or real_save(state, path))
    t = make_trainer(["model=gan", *COMMON, "trainer.max_steps=12", f"trainer.checkpoint_every={every}"], tmp_path)

    class FiveMinutes(Callback):
        def on_step_end(self, trainer):
            clock[0] += 300

    t.callbacks.insert(0, FiveMinutes())
    t.fit()
    assert written == saved


@pytest.mark.parametrize("every", ["0", "'10'", "1.5", "5x", "true", "1x5m"])
def test_checkpoint_every_that_is_neither_epochs_nor_a_duration(every):
    with pytest.raises(GenlabError, match="trainer.checkpoint_every must be"):
        check_trainer(compose_train([f"trainer.checkpoint_every={every}"]).trainer)


def poisoned_trainer(tmp_path, bad_steps, on_nan="stop", weights_at=None, max_steps=9, seed=0):
    """A VAE on 96 synthetic images, 3 steps an epoch; the batches of ``bad_steps`` (0-based) are NaN,
    and after step ``weights_at`` a weight is set to NaN while that step's loss stays finite."""
    t = make_trainer(["model=vae", "dataset=synthetic", "dataset.n=96", f"trainer.max_steps={max_steps}",
                      "trainer.batch_size=32", "trainer.n_samples=4", f"trainer.on_nan={on_nan}", "trainer.checkpoint_every=1"],
                     tmp_path, seed)
    m = t.model
    real_step = m.training_step

    def step(batch, ctx):
        if ctx.step_index in bad_steps:
            batch = batch._replace(x=batch.x * float("nan"))
        out = real_step(batch, ctx)
        if ctx.step_index == weights_at:
            with torch.no_grad():
                next(m.parameters())[0].fill_(float("nan"))
        return out

    m.training_step = step
    return t


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    t = poisoned_trainer(tmp_path, bad_steps={4})  # the 5th step, in the second epoch
    with pytest.raises(GenlabError) as e:
        t.fit()
    message = str(e.value)
    assert "loss, recon, kl became non-finite at step 5 (epoch 2)" in message
    assert f"{tmp_path / 'checkpoints' / 'last.pt'} (step 3), is kept" in message
    state = checkpoint.load(tmp_path)
    assert state["step"] == 3  # written at the end of epoch 1, not overwritten by the diverged run
    assert all(v.isfinite().all() for v in state["model"].values())


def test_nonfinite_weights_are_never_saved(tmp_path):
    t = poisoned_trainer(tmp_path, bad_steps=set(), weights_at=5)  # the epoch's last step: its loss is finite
    with pytest.raises(GenlabError, match="the weights became non-finite by step 6"):
        t.fit()
    assert checkpoint.load(tmp_path)["step"] == 3


def test_on_nan_skip_drops_exactly_the_bad_updates(tmp_path):
    clean = poisoned_trainer(tmp_path / "clean", bad_steps=set(), max_steps=3)
    clean.fit()
    skipping = poisoned_trainer(tmp_path / "skip", bad_steps={3, 4, 5}, on_nan="skip", max_steps=6)
    skipping.fit()  # finishes: the three NaN steps are dropped, so the weights are those after step 3
    a, b = clean.model.state_dict(), skipping.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in skipping.history] == [3, 6]
    assert "train/loss" not in skipping.history[1]  # a window of skipped steps has no loss to report
    stopping = poisoned_trainer(tmp_path / "stop", bad_steps={3, 4, 5}, max_steps=6)
    with pytest.raises(GenlabError, match="at step 4"):  # the same run under on_nan=stop
        stopping.fit()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_dropped_step_of_two_updates_of_one_optimizer_restores_its_start(precision):
    """A model of one optimizer that updates it twice in a training step (an inner critic loop): when its second
    loss turns NaN (on_nan=skip), or its second update's fp16 gradients overflow, the whole step is dropped, the
    first update and the optimizer state it made included. Before, a single optimizer's updates were never
    copied (nothing to undo), and two copies of one parameter were restored oldest-first: to after the first."""
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    ctx = StepContext({"main": torch.optim.Adam(net.parameters(), lr=0.1)}, precision, on_nan="skip")
    x = torch.randn(8, 4)

    def training_step(index, factor=1.0):
        ctx.begin(index)
        for i in range(2):
            with ctx.autocast():
                loss = net(x).float().pow(2).mean() * (factor if i == 1 else 1.0)
            ctx.backward(loss, "main")
            ctx.step("main")
        return bool(ctx.end())

    assert training_step(0)  # a clean step first: the optimizer's state exists (fp16: the undo on the device)
    start = [(k, t.clone()) for k, t in tensors({"net": net.state_dict(), "opt": ctx.state_dict()["optimizers"]})]
    assert not training_step(1, float("nan") if precision == "fp32" else 1e38)
    after = list(tensors({"net": net.state_dict(), "opt": ctx.state_dict()["optimizers"]}))
    assert [k for k, _ in start] == [k for k, _ in after]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(start, after)), "the dropped step left a trace"
    assert training_step(2) and not torch.equal(net.weight, start[0][1])  # a clean step moves on


def test_on_nan_skip_gives_up_when_every_step_is_bad(tmp_path):
    t = poisoned_trainer(tmp_path, bad_steps=set(range(3, 1000)), on_nan="skip", max_steps=200)
    with pytest.raises(GenlabError, match=f"the {SKIP_LIMIT} steps up to step {3 + SKIP_LIMIT} were all non-finite"):
        t.fit()


def test_divergence_through_the_command(tmp_path):
    r = genlab("train", "model=vae", *COMMON, "optimizer.lr=1000", "trainer.max_steps=20",
               f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 1
    assert "genlab train: error: training diverged" in r.stderr and "non-finite at step" in r.stderr
    assert "Traceback" not in r.stderr


def test_output_directory_that_cannot_be_made(tmp_path):
    (tmp_path / "a_file").write_text("")
    for args in ([f"hydra.run.dir={tmp_path / 'a_file' / 'run'}"], ["-m", f"hydra.sweep.dir={tmp_path / 'a_file' / 'x'}"]):
        r = genlab("train", *args, *COMMON, "trainer.max_steps=1", cwd=tmp_path)
        assert r.returncode == 1, r.stderr
        assert "cannot make the run directory" in r.stderr and "is a file, not a directory" in r.stderr
        assert "Traceback" not in r.stderr


@pytest.mark.slow  # left out of CI for time (pytest -m slow runs it)
def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path):
    """A file-size limit (ulimit -f) makes the checkpoint write fail the way a full disk does."""
    import resource

    run = tmp_path / "run"
    r = genlab("train", "model=vae", *COMMON, "trainer.epochs=1", f"hydra.run.dir={run}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    before = (run / "checkpoints" / "last.pt").read_bytes()
    exe = Path(sys.executable).parent / "genlab"
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 4, resource.RLIM_INFINITY))  # noqa: E731
    r = subprocess.run([str(exe), "train", f"resume={run}", "trainer.epochs=2", f"hydra.run.dir={run}"], cwd=tmp_path,
                       capture_output=True, text=True, preexec_fn=limit, timeout=300)
    assert r.returncode == 1
    assert "could not write the checkpoint" in r.stderr and "the previous last.pt is intact" in r.stderr
    assert "Traceback" not in r.stderr
    assert (run / "checkpoints" / "last.pt").read_bytes() == before
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt"]


# the DCGAN with its batch norm, a tenth of its width: fp16 on a CPU is emulated, and a step of the full one takes
# seconds, where what these tests check (which updates a dropped step leaves) is the same at any width
NARROW = ["model.generator.width=8", "model.discriminator.width=8"]


def test_on_nan_skip_with_fp16_and_batch_norm(tmp_path):
    """A gradient scaler (fp16) and a generator with batch norm: a step whose latents are infinite is dropped
    whole, batch-norm statistics included, and every tensor saved is finite."""
    t = make_trainer(["model=dcgan", *NARROW, "dataset=synthetic", "dataset.n=96", "trainer.precision=fp16",
                      "trainer.max_steps=6", "trainer.batch_size=32", "trainer.n_samples=4", "trainer.on_nan=skip"], tmp_path)
    t.model.g.register_forward_pre_hook(
        lambda net, args: (args[0] * float("inf"),) if net.training and t.ctx.step_index == 4 else None)
    t.fit()
    state = checkpoint.load(tmp_path)
    assert state["step"] == 6
    assert all(v.isfinite().all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("precision,on_nan,factor", [("fp32", "skip", float("nan")), ("fp16", "stop", 1e30)])
def test_a_gan_step_is_dropped_whole(precision, on_nan, factor, tmp_path):
    """The generator's loss turns NaN (on_nan=skip), or its fp16 gradients overflow while the loss stays finite
    (the scaler skips its update), after the discriminator has stepped: the whole training step is dropped,
    the discriminator's update, its optimizer state and the batch-norm statistics included."""
    t = make_trainer(["model=dcgan", *NARROW, "dataset=synthetic", "dataset.n=96", "trainer.batch_size=32",
                      "trainer.max_steps=4", f"trainer.on_nan={on_nan}", f"trainer.precision={precision}",
                      "trainer.log_every=1", "trainer.n_samples=4", "trainer.ema.decay=0.9"], tmp_path)
    real_g = t.model.loss.g
    t.model.loss.g = lambda fake, real=None: real_g(fake, real) * (factor if t.ctx.step_index == 2 else 1.0)
    states = {}

    class Snapshot(Callback):
        def on_step_end(self, trainer):
            states[trainer.step] = {k: v.clone() for k, v in tensors({"model": trainer.model.state_dict(),
                                                                        "opt": trainer.ctx.state_dict()["optimizers"],
                                                                        "ema": trainer.ema.state_dict()["model"]})}

    t.callbacks.append(Snapshot())
    t.fit()
    same = lambda a, b: a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert same(states[3], states[2])  # step 3 (index 2) left no trace
    assert not same(states[2], states[1]) and not same(states[4], states[3])  # the others did
    if on_nan == "skip":
        assert [("train/loss_d" in r) for r in t.history] == [True, True, False, True]


def test_a_dropped_step_keeps_the_schedules_learning_rate(tmp_path):
    """The schedule's clock moves on through a dropped step, and the next step trains at its rate."""
    t = poisoned_trainer(tmp_path, bad_steps={1}, on_nan="skip", max_steps=4)
    t.callbacks.clear()
    t.ctx.schedulers = build_schedulers(compose_train(["scheduler=linear"]).scheduler, t.ctx.optimizers, 4)
    rates = []
    real_step = t.model.training_step
    t.model.training_step = lambda batch, ctx: rates.append(ctx.optimizers["vae"].param_groups[0]["lr"]) or \
        real_step(batch, ctx)
    t.fit()
    lr = compose_train(["model=vae"]).optimizer.lr  # the VAE's own (model/vae.yaml)
    assert rates == pytest.approx([lr * f for f in (1.0, 2 / 3, 1 / 3, 0.0)])


def schedule_rates(overrides, total, first, last, state=None, tmp_path=None):
    """The learning rate (factor) at steps first..last-1 of a run of ``total`` steps, resumed from ``state``; and the
    state at ``last``, through a checkpoint file (as a resume reads it, weights_only)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    (s,) = build_schedulers(compose_train(overrides).scheduler, {"g": opt}, total).values()
    if state is not None:
        s.load_state_dict(state)
    rates = []
    for _ in range(first, last):
        rates.append(s.get_last_lr()[0])
        opt.step()
        s.step()
    checkpoint.save({"s": s.state_dict()}, tmp_path / "s.pt")
    return rates, checkpoint.load(tmp_path / "s.pt")["s"]


def test_a_resumed_run_of_another_length_stretches_what_is_left_of_the_schedule(tmp_path):
    """A cosine schedule over 8 steps, resumed after 4 as a run of 16: the rate goes on from where it was, what was
    left of the cosine (its steps 4 to 7) spreads over steps 4 to 15, and it ends at 0 on the last step. (It used to
    be recomputed over 16 steps from the start: at step 5 it jumped from 0.39 up to 0.75.)"""
    cosine = Cosine()
    before, state = schedule_rates(["scheduler=cosine"], 8, 0, 4, tmp_path=tmp_path)
    after, _ = schedule_rates(["scheduler=cosine"], 16, 4, 16, state, tmp_path)
    assert before == pytest.approx([cosine(k, 8) for k in range(4)])
    assert after == pytest.approx([cosine(4 + (k - 4) * 3 / 11, 8) for k in range(4, 16)])
    assert after[0] == pytest.approx(cosine(4, 8)) and after[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip([before[-1], *after], after))  # no jump: down all the way
    # a schedule planned with its own length (scheduler.steps) keeps its clock: nothing is stretched
    planned = ["scheduler=cosine", "scheduler.steps=16"]
    _, state = schedule_rates(planned, 8, 0, 4, tmp_path=tmp_path)
    after, _ = schedule_rates(planned, 16, 4, 16, state, tmp_path)
    assert after == pytest.approx([Cosine(steps=16)(k, 16) for k in range(4, 16)])


RUN = ["model=gan", "dataset=synthetic", "trainer.batch_size=32", "trainer.epochs=2"]


def resume_with(*overrides, choices=None, stored=None):
    stored = stored or OmegaConf.to_container(compose_train(RUN), resolve=True)
    args = [*RUN, *overrides, "resume=somewhere"]
    return resumed_config(stored, compose_train(args), args, choices)


def test_resume_takes_the_runs_own_command_again():
    """A requeue script re-runs the run's own command with resume= added: its group overrides give the stored
    values, and are accepted; trainer settings and the device may change."""
    merged = resume_with("trainer.epochs=9", "trainer.log_every=7", "device=cpu")
    assert (merged.trainer.epochs, merged.trainer.log_every, merged.device, merged.resume) == (9, 7, "cpu", "somewhere")
    assert merged.model._target_ == "genlab.models.GAN"


def test_resume_takes_this_commands_trackers():
    """What watches a run may change on resume: this command's logger replaces the run's, and without one on the
    command line the run keeps its own."""
    stored = OmegaConf.to_container(compose_train([*RUN, "logger=[tensorboard,mlflow]"]), resolve=True)
    assert sorted(resume_with("logger=wandb", stored=stored).logger) == ["wandb"]
    assert sorted(resume_with(stored=stored).logger) == ["mlflow", "tensorboard"]


@pytest.mark.parametrize("override,key", [
    ("trainer.batch_size=64", "trainer.batch_size"), ("seed=1", "seed"), ("dataset.classes=[1]", "dataset.classes"),
    ("loss.gp_weight=2.0", "loss.gp_weight"), ("model=vae", "model._target_"), ("optimizer.lr=0.1", "optimizer.lr"),
    ("scheduler=cosine", "scheduler._target_"), ("+optimizer.nets.d.lr=0.001", "optimizer.nets.d.lr"),
    ("optimizer.betas.0=0.9", "optimizer.betas.0"),
])
def test_resume_refuses_what_would_change_the_run(override, key):
    """What the data order or the objective depends on cannot change mid-run: the override would be silently
    ignored (the optimizer state brings its own learning rate) or make the resumed run another experiment."""
    with pytest.raises(GenlabError, match=f"would change {key} \\(the run has"):
        resume_with(override)


def test_resume_compares_a_group_by_the_option_the_run_was_composed_from():
    """A genlab upgrade changed a default of a group's option (as model/vae_gan.yaml's gamma went from 0.01 to 0.1;
    here adam's lr): the run's own command, group overrides included, still resumes the run, with the run's values.
    Another option of the group is refused. The checkpoint records the options (choices)."""
    stored = OmegaConf.to_container(compose_train(RUN), resolve=True)
    stored["optimizer"]["lr"] = 1e-3  # adam's default when the run started
    choices = {"model": "gan", "dataset": "synthetic", "optimizer": "adam", "loss": "bce", "scheduler": "constant",
               "launcher": None, "experiment": None}
    merged = resume_with("optimizer=adam", "model=gan", "launcher=submitit_local", choices=choices, stored=stored)
    assert merged.optimizer.lr == 1e-3 and merged.model._target_ == "genlab.models.GAN"
    with pytest.raises(GenlabError, match="would change optimizer \\(the run has adam, this command sgd\\)"):
        resume_with("optimizer=sgd", choices=choices, stored=stored)
    with pytest.raises(GenlabError, match="would change optimizer.lr"):  # a value named on the command line
        resume_with("optimizer=adam", "optimizer.lr=2e-4", choices=choices, stored=stored)
    with pytest.raises(GenlabError, match="would change optimizer.lr \\(the run has 0.001"):  # no record: each value
        resume_with("optimizer=adam", stored=stored)


def test_out_of_memory_is_one_line_with_what_to_try(tmp_path, monkeypatch, capsys):
    """A GPU that runs out of memory mid-run: one paragraph naming the batch size and what to try, exit 1."""
    from genlab import cli
    from genlab.trainer import Trainer

    def fit(self):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "fit", fit)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        cli.main(["train", "model=gan", *COMMON, "trainer.max_steps=1", f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "Traceback" not in err
    assert "genlab train: error: out of memory on the GPU" in err and "trainer.batch_size=16 (now 32)" in err


def test_a_frozen_parameter_in_an_optimizers_group(tmp_path):
    """A user freezes part of a network (requires_grad=False) that its optimizer still holds: the rest trains,
    the frozen part stays as it was; freezing all of it is one clear error."""
    t = make_trainer(["model=gan", *COMMON, "trainer.max_steps=2"], tmp_path)
    frozen = t.model.d.net[1].weight.requires_grad_(False)
    before = frozen.detach().clone()
    t.fit()
    assert torch.equal(frozen, before) and t.step == 2
    t = make_trainer(["model=gan", *COMMON, "trainer.max_steps=2"], tmp_path / "all")
    t.model.d.requires_grad_(False)
    with pytest.raises(GenlabError, match="every parameter of optimizer 'd' has requires_grad=False"):
        t.fit()


def flip_a_tensor_byte(path: Path, out: Path) -> None:
    """``path`` with one byte changed in the middle of its largest zip entry (a tensor's storage: stored, not
    compressed, and not checked by PyTorch's reader)."""
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    raw[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0x10
    out.write_bytes(raw)


def test_a_file_changed_on_disk_is_never_used_as_if_whole(tmp_path, fake_root, caplog):
    """A byte of a weight changed on disk: PyTorch loads the checkpoint silently; genlab refuses it by its
    checksum. A dataset cache changed on disk is decoded again, not used."""
    t = make_trainer(["model=gan", *COMMON, "trainer.max_steps=3"], tmp_path / "run")
    t.fit()
    good = tmp_path / "run" / "checkpoints" / "last.pt"
    flip_a_tensor_byte(good, tmp_path / "flipped.pt")
    loaded = dict(tensors(torch.load(tmp_path / "flipped.pt", weights_only=True)))  # no error: entries unchecked
    assert any(not torch.equal(v, loaded[k]) for k, v in tensors(torch.load(good, weights_only=True)))
    with pytest.raises(GenlabError, match="damaged: its content no longer matches the checksum"):
        checkpoint.load(tmp_path / "flipped.pt")
    r = genlab("sample", f"ckpt={tmp_path / 'flipped.pt'}", cwd=tmp_path)
    assert r.returncode == 1 and "no longer matches the checksum" in r.stderr and "Traceback" not in r.stderr
    checkpoint.load(good)  # the good one is untouched

    from genlab.data import cache_dir, mnist

    first = mnist(fake_root, download=False)
    cache = next((cache_dir() / "datasets").glob("mnist-train-*.pt"))
    flip_a_tensor_byte(cache, cache)
    with caplog.at_level("WARNING"):
        again = mnist(fake_root, download=False)
    assert "ignoring the unreadable dataset cache" in caplog.text and "checksum" in caplog.text
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)


def test_kept_checkpoints_are_pruned_by_epoch_number(tmp_path):
    """Past epoch 9,999 the names no longer sort by epoch: the newest copies are kept all the same."""
    from genlab.callbacks import Checkpoints

    saver = Checkpoints(tmp_path, {}, keep_every=10, keep_last=2)
    saver.dir.mkdir()
    for epoch in (9980, 9990, 10000, 10010):
        (saver.dir / f"epoch_{epoch:04d}.pt").write_bytes(b"")
    (saver.dir / "epoch_notes.pt").write_bytes(b"")  # not one of genlab's: left alone
    saver.prune()
    assert sorted(p.name for p in saver.dir.iterdir()) == ["epoch_10000.pt", "epoch_10010.pt", "epoch_notes.pt"]


def test_a_kept_copy_and_last_pt_are_serialized_once(tmp_path, monkeypatch):
    """At a kept copy's epoch last.pt becomes a copy of its file (one serialization, then a file copy): the same
    bytes, but a file of its own (it was a hard link, so an in-place edit of one changed the other); a later
    last.pt replaces it and leaves the kept copy as it was."""
    written = []
    real_save = checkpoint.save
    monkeypatch.setattr(checkpoint, "save", lambda state, path: written.append(Path(path).name) or real_save(state, path))
    t = make_trainer(["model=gan", *COMMON, "trainer.epochs=3", "trainer.keep_every=2", "trainer.checkpoint_every=1"],
                     tmp_path)
    files = {}

    class Look(Callback):
        def on_epoch_end(self, trainer):
            files[trainer.epoch + 1] = {p.name: (p.stat().st_ino, p.read_bytes()) for p in (tmp_path / "checkpoints").glob("*.pt")}

    t.callbacks.append(Look())
    t.fit()
    assert written == ["last.pt", "epoch_0002.pt", "last.pt"]  # epoch 2: serialized once, as its kept copy
    assert files[2]["epoch_0002.pt"][1] == files[2]["last.pt"][1] and files[2]["epoch_0002.pt"][0] != files[2]["last.pt"][0]
    assert files[3]["last.pt"][1] != files[3]["epoch_0002.pt"][1] and files[3]["epoch_0002.pt"] == files[2]["epoch_0002.pt"]
    assert checkpoint.load(tmp_path / "checkpoints" / "epoch_0002.pt")["step"] == 2 * t.loader.steps_per_epoch
    assert checkpoint.load(tmp_path)["step"] == 3 * t.loader.steps_per_epoch


@pytest.mark.parametrize("share,expected", [(0.05, ["epoch_0001.png", "epoch_0008.png"]), (1.0, None)])
def test_sample_grids_take_a_bounded_share_of_the_run(share, expected, tmp_path):
    """A grid that takes far longer than an epoch (a diffusion sampler on the digits): after the first epoch and
    the last only, so that writing stays within trainer.write_share of the run; write_share=1 draws every epoch."""
    t = make_trainer(["model=gan", *COMMON, "trainer.epochs=8", f"trainer.write_share={share}"], tmp_path)
    generate = t.model.generate
    t.model.generate = lambda *a, **kw: time.sleep(0.3) or generate(*a, **kw)
    t.fit()
    grids = sorted(p.name for p in (tmp_path / "samples").glob("*.png"))
    assert grids == (expected or [f"epoch_{e:04d}.png" for e in range(1, 9)])


def test_checkpoints_count_against_the_pictures_share(tmp_path, monkeypatch):
    """Slow checkpoint writes (a network disk) leave no share for the grids between the first and the last, and a
    run shorter than the loss curves' interval draws them once, at its end."""
    from genlab import callbacks

    drawn = []
    monkeypatch.setattr(callbacks.plots, "loss_curves", lambda *a, **kw: drawn.append(1))
    save = callbacks.checkpoint.save
    monkeypatch.setattr(callbacks.checkpoint, "save", lambda *a, **kw: time.sleep(0.3) or save(*a, **kw))
    t = make_trainer(["model=gan", *COMMON, "trainer.epochs=8", "trainer.checkpoint_every=1"], tmp_path)
    t.fit()
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.png")) == ["epoch_0001.png", "epoch_0008.png"]
    assert len(drawn) == 1
