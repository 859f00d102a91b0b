"""What the core gives a next model: the step API, schedules, EMA, sampling settings and labels, losses as
config targets, callbacks; and a model from outside genlab (examples/plugin), run through the
real commands."""

import csv
import math
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from genlab import checkpoint
from genlab.build import build_trainer
from genlab.callbacks import Callback
from genlab.data import Batch
from genlab.ema import EMA
from genlab.errors import GenlabError
from genlab.losses import BCE
from genlab.parts import build_model
from genlab.schedules import Constant, Cosine, Linear
from genlab.step import StepContext

from conftest import compose_train, genlab, genlab_here, make_trainer
from test_reliability import tensors

PLUGINS = Path(__file__).resolve().parent.parent / "examples" / "plugin"
PLUGIN_ENV = {"PYTHONPATH": str(PLUGINS)}
SEARCHPATH = f"hydra.searchpath=[file://{PLUGINS / 'configs'}]"
TOY = ["experiment=toy_cond", SEARCHPATH, "dataset=synthetic", "dataset.n=96", "trainer.batch_size=32",
       "trainer.log_every=1", "trainer.n_samples=20", "trainer.precision=fp32", "device=cpu"]


# --- the step API ----------------------------------------------------------------------------------


def two_layers(precision="fp32", on_nan="stop"):
    torch.manual_seed(0)
    a, b = nn.Linear(4, 4), nn.Linear(4, 1)
    opts = {"a": torch.optim.SGD(a.parameters(), lr=0.1), "b": torch.optim.SGD(b.parameters(), lr=0.1)}
    return a, b, StepContext(opts, precision, "cpu", on_nan=on_nan)


def test_backward_fills_only_the_named_optimizers_parameters():
    a, b, ctx = two_layers()
    loss = b(a(torch.randn(8, 4))).pow(2).mean()
    ctx.backward(loss, "b", retain_graph=True)
    assert all(p.grad is None for p in a.parameters()) and all(p.grad is not None for p in b.parameters())
    ctx.backward(loss, "a")
    assert all(p.grad is not None for p in a.parameters())
    ctx.step("a")
    assert all(p.grad is None for p in a.parameters())  # step clears what it used


def test_clip_under_fp16_clips_the_true_gradient():
    """The fp16 scaler multiplies the loss by 2**16; clipping must unscale first, or it clips a gradient 65,536
    times too large and the update comes out wrong."""
    results = {}
    for precision in ("fp32", "fp16"):
        a, b, ctx = two_layers(precision)
        ctx.begin(0)
        ctx.backward(100 * b(a(torch.ones(8, 4))).pow(2).mean(), "a")
        norm = ctx.clip("a", 0.5)
        ctx.step("a")
        assert ctx.applied("a") and bool(ctx.end())
        results[precision] = norm, torch.cat([p.detach().flatten() for p in a.parameters()])
    assert results["fp32"][0] > 0.5  # the clip bites
    assert results["fp16"][0] == pytest.approx(results["fp32"][0].item(), rel=1e-4)
    assert torch.allclose(results["fp16"][1], results["fp32"][1], atol=1e-6)


def test_applied_says_when_an_update_was_not_made():
    a, _, ctx = two_layers("fp16")
    before = [p.detach().clone() for p in a.parameters()]
    ctx.begin(0)
    ctx.backward(a.weight.sum() * float("inf"), "a")  # overflowing gradients: the scaler skips the update
    ctx.step("a")
    assert not ctx.applied("a") and not bool(ctx.end())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before))
    ctx.begin(1)
    ctx.backward(a.weight.sum(), "a")
    ctx.step("a")
    assert ctx.applied("a") and bool(ctx.end())
    a, _, ctx = two_layers(on_nan="skip")
    ctx.begin(0)
    ctx.backward(a.weight.sum() * float("nan"), "a")
    ctx.step("a")
    assert not ctx.applied("a") and ctx.end() is False  # on_nan=skip: the step is dropped


def test_a_dropped_step_leaves_the_fp16_scaler_ready(tmp_path):
    """fp16 and on_nan=skip: a step that clips (unscales) one optimizer and is then dropped on a NaN loss of
    another must leave the scaler ready for the next step, whose update is then of the true size."""
    a, b, ctx = two_layers("fp16", on_nan="skip")
    x = torch.ones(8, 4)
    ctx.begin(0)
    ctx.backward(b(a(x)).pow(2).mean(), "a")
    ctx.clip("a", 1.0)
    ctx.backward(b(a(x)).pow(2).mean() * float("nan"), "b")
    ctx.step("a")
    ctx.step("b")
    assert ctx.end() is False
    before = torch.cat([p.detach().flatten() for p in a.parameters()])
    ctx.begin(1)
    ctx.backward(b(a(x)).pow(2).mean(), "a")
    ctx.clip("a", 1.0)
    ctx.step("a")
    assert ctx.applied("a") and bool(ctx.end())
    moved = (torch.cat([p.detach().flatten() for p in a.parameters()]) - before).norm()
    assert 0 < moved <= 0.1 + 1e-6  # lr 0.1 times a gradient clipped to norm 1


def test_a_callback_sees_every_row_and_epoch(tmp_path):
    class Recorder(Callback):
        def __init__(self):
            self.events = []

        def on_log(self, trainer, row):
            self.events.append(("log", row["step"]))

        def on_epoch_end(self, trainer):
            self.events.append(("epoch", trainer.epoch + 1))

    t = make_trainer(["model=gan", "dataset=synthetic", "dataset.n=96", "trainer.batch_size=32", "trainer.max_steps=7",
                      "trainer.log_every=2"], tmp_path)
    t.callbacks.append(Recorder())
    t.fit()
    assert t.callbacks[-1].events == [("log", 2), ("log", 3), ("epoch", 1), ("log", 4), ("log", 6), ("epoch", 2),
                                      ("log", 7), ("epoch", 3)]


# --- schedules and EMA ---------------------------------------------------------------------------


class NoHostRead(TorchDispatchMode):
    """Fails on any read of a tensor's value by the host (.item(), bool(), float() of a tensor)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        assert func is not torch.ops.aten._local_scalar_dense.default, "a host sync"
        return func(*args, **(kwargs or {}))


def test_schedule_values():
    assert [Constant(warmup=4)(s, 100) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert Cosine(steps=11)(5, 1000) == pytest.approx(0.5)  # its own length, whatever the run's
    cos = Cosine(warmup=10, final=0.1)
    assert cos(0, 111) == pytest.approx(0.1) and cos(9, 111) == 1.0 and cos(10, 111) == 1.0
    assert cos(60, 111) == pytest.approx(0.55)  # half-way down: final + (1 - final) / 2
    assert cos(110, 111) == pytest.approx(0.1) and cos(500, 111) == pytest.approx(0.1)  # the last step, and beyond
    lin = Linear(final=0.0)
    assert [lin(s, 5) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    for bad in ({"final": -1.0}, {"warmup": -3}, {"steps": 0}):
        with pytest.raises(GenlabError, match="scheduler"):
            Cosine(**bad)


def half_life(step: int, total: int, every: int = 10) -> float:
    """A schedule written as a plain function: halve the learning rate every ``every`` steps."""
    return 0.5 ** (step // every)


def test_a_schedule_can_be_a_plain_function(tmp_path):
    cfg_dir = tmp_path / "configs" / "scheduler"
    cfg_dir.mkdir(parents=True)
    (cfg_dir / "half.yaml").write_text("_target_: test_core.half_life\nevery: 2\nnets: {}\n")
    t = make_trainer(["model=vae", "dataset=synthetic", "dataset.n=64", "trainer.batch_size=16", "trainer.max_steps=5",
                      "trainer.log_every=1", "scheduler=half", "optimizer.lr=2e-4",
                      f"hydra.searchpath=[file://{tmp_path / 'configs'}]"], tmp_path)
    t.fit()
    assert [r["lr/vae"] for r in t.history] == pytest.approx([2e-4 * 0.5 ** (s // 2) for s in range(1, 6)])


def test_ema_update_with_and_without_warmup():
    net = nn.Linear(3, 1)
    old = net.weight.detach().clone()
    ema = EMA(net, decay=0.9, warmup=False)
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    assert torch.allclose(ema.model.weight, 0.9 * old + 0.1 * (old + 1))
    ema.update(net, applied=torch.tensor(False))  # a step the fp16 scaler skipped leaves the average alone
    assert torch.allclose(ema.model.weight, 0.9 * old + 0.1 * (old + 1))
    with NoHostRead():  # under fp16 the step's verdict stays on the device
        ema.update(net, applied=torch.tensor(True))
    assert torch.allclose(ema.model.weight, 0.9 * (0.9 * old + 0.1 * (old + 1)) + 0.1 * (old + 1))
    warm = EMA(nn.Linear(3, 1), decay=0.999)
    decays = []
    for t in (0, 10, 1000, 100000):
        warm.updates = t
        decays.append(round(warm.current_decay(), 4))
    assert decays == [0.1, 0.55, 0.9911, 0.999]  # min(decay, (1 + t) / (10 + t))


# --- the plug-in model, through the real commands -------------------------------------------------


def test_plugin_model_takes_every_gradient_before_any_step():
    """Three optimizers over one forward pass: each loss's gradient goes into its own network, and nothing is
    stepped before the last backward (a VAE-GAN that steps early trains on stale or broken gradients)."""
    sys.path.insert(0, str(PLUGINS))
    from toy_cond import ToyCond

    torch.manual_seed(0)
    model = ToyCond(loss=BCE())
    ctx = StepContext({k: torch.optim.Adam(p, lr=1e-3) for k, p in model.optimizer_groups().items()})
    calls = []
    for name in ("backward", "clip", "step"):
        real = getattr(ctx, name)
        setattr(ctx, name, lambda *a, _real=real, _name=name, **k: calls.append((_name, a[1] if _name == "backward" else a[0]))
                or _real(*a, **k))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = model.training_step(Batch(torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))), ctx)
    assert calls == [("backward", "enc"), ("backward", "dec"), ("backward", "d"), ("clip", "dec"),
                     ("step", "enc"), ("step", "dec"), ("step", "d")]
    assert set(out) == {"loss_enc", "loss_dec", "loss_d"} and all(math.isfinite(v) for v in out.values())
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # every part moved


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
    """The plug-in model trained 8 steps in one go, and 4 steps then resumed to 8."""
    cwd = tmp_path_factory.mktemp("toy")
    sys.path.insert(0, str(PLUGINS))  # in this process, as PYTHONPATH puts it for the command below
    for name, steps in (("whole", 8), ("half", 4)):  # the schedule runs over 8 steps in both
        r = genlab_here("train", *TOY, "scheduler.steps=8", f"trainer.max_steps={steps}", f"hydra.run.dir={cwd / name}",
                        cwd=cwd)
        assert r.returncode == 0, r.stderr
    # the command again with resume= added, as a requeue script would run it: accepted
    r = genlab("train", *TOY, "scheduler.steps=8", "trainer.max_steps=8", f"resume={cwd / 'half'}",
               f"hydra.run.dir={cwd / 'resumed'}", cwd=cwd, env=PLUGIN_ENV)
    assert r.returncode == 0, r.stderr
    return cwd


def test_plugin_model_trains_with_schedule_and_ema(toy_runs):
    state = checkpoint.load(toy_runs / "whole")
    assert set(state["optimizers"]) == set(state["schedulers"]) == {"enc", "dec", "d"}
    assert state["ema"]["updates"] == 8
    with open(toy_runs / "whole" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    lrs = [float(r["lr/dec"]) for r in rows]  # the rate for the step after each row: cosine, 2 warm-up steps
    assert lrs == pytest.approx([2e-4 * Cosine(warmup=2)(s, 8) for s in range(1, 9)])
    assert lrs[0] == pytest.approx(2e-4) and lrs[-1] == 0.0 and lrs == sorted(lrs, reverse=True)
    assert (toy_runs / "whole" / "samples" / "epoch_0003.png").is_file()


def test_plugin_model_resumes_bit_identically(toy_runs):
    a, b = checkpoint.load(toy_runs / "whole"), checkpoint.load(toy_runs / "resumed")
    keys = ("model", "optimizers", "schedulers", "ema")
    ta, tb = dict(tensors({k: a[k] for k in keys})), dict(tensors({k: b[k] for k in keys}))
    assert ta.keys() == tb.keys() and len(ta) > 20
    assert not [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert [s["last_epoch"] for s in a["schedulers"].values()] == [s["last_epoch"] for s in b["schedulers"].values()]


def test_plugin_model_samples_chosen_labels_and_settings(toy_runs, tmp_path, monkeypatch):
    run = toy_runs / "whole"

    monkeypatch.syspath_prepend(str(PLUGINS))  # in this process, as PYTHONPATH puts it for a command

    def sample(name, *args):
        r = genlab_here("sample", f"ckpt={run}", *args, f"hydra.run.dir={tmp_path / name}", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        return torch.load(tmp_path / name / "samples.pt", weights_only=True), tmp_path / name

    x, out = sample("cold", "labels=[3,3,7]", "temperature=0")
    assert x.shape == (3, 1, 28, 28) and torch.load(out / "labels.pt", weights_only=True).tolist() == [3, 3, 7]
    assert torch.equal(x[0], x[1]) and not torch.equal(x[0], x[2])  # no noise: one image per class
    warm, _ = sample("warm", "labels=[3,3,7]")
    assert not torch.equal(warm[0], warm[1])
    grid, out = sample("grid")  # no labels: a row per class
    assert grid.shape[0] == 60 and torch.load(out / "labels.pt", weights_only=True).tolist()[::6] == list(range(10))
    raw, _ = sample("raw", "labels=[3,3,7]", "ema=false")
    assert not torch.equal(raw, warm)  # ema=true (the default) samples from the average, a different network

    for args, message in ((["temprature=0.5"], "temprature is not a setting of genlab sample nor a sampling setting "
                                               "of ToyCond (its sampling settings are: temperature)"),
                          (["temperature=hot"], "temperature must be float; got 'hot'"),
                          (["labels=[12]"], "labels [12] are not classes of this model"),
                          (["labels=[]"], "labels=[] names no class"), (["n=0"], "n must be at least 1")):
        r = genlab_here("sample", f"ckpt={run}", *args, cwd=tmp_path)
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_users_own_loss_by_target(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGINS))  # in this process, as PYTHONPATH puts it for a command
    r = genlab_here("train", "model=gan", "loss=user_softplus", SEARCHPATH, "dataset=synthetic", "dataset.n=64",
                    "trainer.batch_size=32", "trainer.max_steps=2", "device=cpu", f"hydra.run.dir={tmp_path / 'run'}",
                    cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert checkpoint.load(tmp_path / "run")["config"]["loss"]["_target_"] == "user_losses.Softplus"
    r = genlab_here("train", "model=vae", "loss=user_softplus", SEARCHPATH, "trainer.max_steps=1", cwd=tmp_path)
    assert r.returncode == 1 and "VAE takes a loss of type ELBO (loss=elbo); loss=user_losses.Softplus does not fit" \
        in r.stderr


def test_a_subclass_that_passes_kwargs_on_takes_genlabs_loss(monkeypatch):
    """class TinyGAN(GAN) with __init__(self, ..., **kwargs): the loss is GAN's to take, and its type is checked
    against GAN's annotation."""
    monkeypatch.syspath_prepend(str(PLUGINS))
    cfg = compose_train(["model=gan", "loss=hinge"])
    cfg.model = {"_target_": "tiny_gan.TinyGAN", "channels": 1, "image_size": 8, "z_dim": 4, "n_critic": 2}
    model = build_model(cfg)
    assert type(model).__name__ == "TinyGAN" and type(model.loss).__name__ == "Hinge" and model.n_critic == 2
    cfg.loss = {"_target_": "genlab.losses.ELBO"}
    with pytest.raises(GenlabError, match="TinyGAN takes a loss of type GANLoss"):
        build_model(cfg)


@pytest.mark.parametrize("overrides,labels", [(["model=cgan"], "up to 11"), (["model=flow", "model.num_classes=9"], "up to 9")])
def test_labels_beyond_the_models_classes_are_refused(overrides, labels, tmp_path):
    """A label equal to num_classes would be the UNet's "no class" token, a larger one an index error: the run
    is refused when it is built, with the number to set."""
    cfg = compose_train([*overrides, "dataset=synthetic", "dataset.n=64", "dataset.image_size=16",
                         f"dataset.n_classes={12 if 'cgan' in overrides[0] else 10}"])
    with pytest.raises(GenlabError, match=f"has labels {labels}, but the model is conditional on model.num_classes"):
        build_trainer(cfg, tmp_path, torch.device("cpu"))


def test_what_epoch_ends_take_is_not_training_time(tmp_path):
    """What the epoch ends take (here 0.5 s for a measurement in the epoch's last row, as Evaluation's, and 0.5 s for
    the writers after it) counts toward neither trainer.max_time nor the rows' wall_time: the budget buys training."""

    class Slow(Callback):
        def on_log(self, trainer, row):
            if trainer.step % trainer.loader.steps_per_epoch == 0:
                time.sleep(0.5)

        def on_epoch_end(self, trainer):
            time.sleep(0.5)

    trainer = make_trainer(["model=vae", "model.encoder.width=8", "dataset=synthetic", "dataset.n=64",
                            "trainer.batch_size=32", "trainer.epochs=3", "callbacks=none"], tmp_path)
    trainer.callbacks.append(Slow())
    start = time.perf_counter()
    trainer.fit()
    spent = time.perf_counter() - start
    assert trainer.history[-1]["wall_time"] < spent - 2.7  # the three seconds of sleep left out
