"""Diffusion and flow matching: the samplers' arithmetic against an oracle network, guidance, training steps,
the UNet's shapes, the anomaly score, and the commands."""

import math

import pytest
import torch
from torch import nn

from genlab import checkpoint
from genlab.errors import GenlabError
from genlab.models import DDPM, FlowMatching
from genlab.models.diffusion import noise_schedule, trailing_steps
from genlab.nets import UNet
from genlab.samplers import make_sampler

from conftest import first_batch, genlab, genlab_here, make_trainer

X0 = torch.linspace(-0.9, 0.9, 2 * 4 * 4).view(2, 1, 4, 4)  # the one pair of images the oracle's data holds


class Oracle(nn.Module):
    """The exact denoiser for a dataset of the single batch X0: what a perfectly trained network predicts."""

    num_classes, image_shape = 0, (1, 4, 4)

    def __init__(self):
        super().__init__()
        self.owner = []  # the model this network serves (a list: not a submodule)
        self.calls = []

    def forward(self, x, t, labels=None):
        self.calls.append(len(x))
        x0 = X0.repeat(len(x) // len(X0), 1, 1, 1)
        model = self.owner[0]
        if isinstance(model, FlowMatching):
            tt = (t / 1000).view(-1, 1, 1, 1)
            return (x - x0) / tt  # the velocity noise - x0, from x_t = (1 - t) x0 + t noise
        ab = model.alpha_bar[t.long()].view(-1, 1, 1, 1)
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        return eps if model.prediction == "eps" else ab.sqrt() * eps - (1 - ab).sqrt() * x0


def with_oracle(cls, **kwargs):
    oracle = Oracle()
    model = cls(oracle, **kwargs)
    oracle.owner.append(model)
    return model, oracle


@pytest.mark.parametrize("cls,kwargs,settings", [
    (DDPM, {"prediction": "eps"}, {"steps": 10}),
    (DDPM, {"prediction": "v", "schedule": "linear"}, {"steps": 7}),
    (DDPM, {"prediction": "eps"}, {"steps": 10, "eta": 1.0}),
    (DDPM, {"prediction": "v"}, {"sampler": "ddpm", "steps": 25}),
    (FlowMatching, {}, {"steps": 5}),
    (FlowMatching, {}, {"sampler": "heun", "steps": 3}),
    (FlowMatching, {}, {"sampler": "ddim", "steps": 4}),  # the samplers fit either path
    (FlowMatching, {}, {"sampler": "ddpm", "steps": 20}),
    (DDPM, {"prediction": "v"}, {"sampler": "ddim", "eta": 0.5, "steps": 12}),
    (DDPM, {"prediction": "eps"}, {"sampler": "dpmpp_2m", "steps": 6}),
    (FlowMatching, {}, {"sampler": "dpmpp_2m", "steps": 6}),
    (FlowMatching, {}, {"sampler": "shortcut", "steps": 1}),  # the straight path's mean velocity is its velocity
])
def test_samplers_recover_the_data_from_an_exact_denoiser(cls, kwargs, settings):
    """With the exact denoiser of a one-batch dataset, every sampler must land on that batch from any noise:
    a sign, a square root or a time index off in the sampler's arithmetic moves it away."""
    torch.manual_seed(0)
    model, oracle = with_oracle(cls, **kwargs)
    x = model.generate(torch.randn(2, 1, 4, 4), **settings)
    torch.testing.assert_close(x, (X0 + 1) / 2, atol=2e-4, rtol=0)
    evaluations = settings["steps"] * (2 if settings.get("sampler") == "heun" else 1) - (settings.get("sampler") == "heun")
    assert len(oracle.calls) == evaluations == make_sampler(settings.get("sampler", "ddim")).evaluations(settings["steps"])


class Gaussian:
    """A path (DDPM's linear or cosine schedule, or flow matching's straight one) whose data are N(MU, VAR) in
    every dimension, with its exact denoiser: E[x0 | x_t] is linear in x_t, and the probability-flow ODE keeps
    (x_t - alpha MU) / sqrt(alpha^2 VAR + sigma^2) constant, so where it ends from any noise is known exactly."""

    MU, VAR = 0.3, 0.25

    def __init__(self, kind: str):
        self.path = FlowMatching if kind == "flow" else DDPM
        if kind != "flow":
            self.timesteps, self.alpha_bar = 1000, noise_schedule(kind, 1000)

    def times(self, steps):
        return self.path.times(self, steps)

    def coefficients(self, t):
        return self.path.coefficients(self, t)

    def denoise(self, x, t, labels, guidance):
        a, s = (float(c) for c in self.coefficients(t))
        x0 = self.MU + a * self.VAR / (a * a * self.VAR + s * s) * (x - a * self.MU)
        return x0, (x - a * x0) / s

    def velocity(self, x, t, labels, guidance):
        x0, noise = self.denoise(x, t, labels, guidance)
        return noise - x0

    def jump(self, x, t, t_next, labels, guidance):
        """The exact mean velocity from t to t_next: where the ODE lands, less where it starts, over the time."""
        return (self.end(x, t, t_next) - x) / (t_next - t)

    def end(self, x, t, t_next):
        """Where the probability-flow ODE from x at t is at t_next."""
        (a, s), (a2, s2) = ((float(c) for c in self.coefficients(u)) for u in (t, t_next))
        return a2 * self.MU + (a2 * a2 * self.VAR + s2 * s2) ** 0.5 * (x - a * self.MU) / (a * a * self.VAR + s * s) ** 0.5

    def error(self, sampler, x, steps) -> float:
        """The root-mean-square distance of the sampler's images from the ODE's exact end."""
        a, s = (float(c) for c in self.coefficients(self.times(steps)[0]))
        exact = self.MU + self.VAR ** 0.5 * (x - a * self.MU) / (a * a * self.VAR + s * s) ** 0.5
        return (sampler(self, x, steps) - exact).pow(2).mean().sqrt().item()


@pytest.mark.parametrize("kind", ["linear", "cosine", "flow"])
def test_dpm_solver_pp_solves_the_flow_ode_to_second_order(kind):
    """DPM-Solver++(2M) against DDIM (first order) on a path whose ODE has a known end: closer at 10 steps, over 2.5
    times closer at 20, and its error falls at least 4-fold from 16 steps to 64 (DDIM's: 4-fold at most); on the
    straight path, at 10 evaluations it beats Heun's at 9. A sign or a log-SNR off in the sampler breaks these."""
    from genlab.samplers import DDIM, DPMSolverPP, Heun

    path, x = Gaussian(kind), torch.randn(2000, 4, generator=torch.Generator().manual_seed(0))
    dpm, ddim = DPMSolverPP(), DDIM()
    assert path.error(dpm, x, 10) < path.error(ddim, x, 10)
    assert path.error(dpm, x, 20) < path.error(ddim, x, 20) / 2.5
    assert path.error(dpm, x, 64) < path.error(dpm, x, 16) / 4 and path.error(ddim, x, 64) > path.error(ddim, x, 16) / 4.2
    if kind == "flow":
        assert path.error(dpm, x, 10) < path.error(Heun(), x, 5) / 5


@pytest.mark.parametrize("kind,name,steps", [
    ("cosine", "ddim", 200), ("linear", "ddim", 500), ("cosine", "ddpm", 500), ("cosine", "dpmpp_2m", 20),
    ("linear", "dpmpp_2m", 50), ("flow", "euler", 200), ("flow", "heun", 20), ("flow", "ddim", 200),
    ("flow", "dpmpp_2m", 20), ("flow", "shortcut", 1)])
def test_each_sampler_draws_the_gaussian_datas_mean_and_variance(kind, name, steps):
    """From N(0, 1) noise, with the exact denoiser of data N(MU, VAR), each sampler at the step count stated draws
    samples whose mean is within 0.01 of MU and variance within 3 % of VAR (80,000 draws: sampling error alone is
    about 0.002 and 0.5 %). The first-order samplers (DDIM, ancestral, Euler) shrink the variance by about 1/steps
    and need 200 to 500 steps for it; DPM-Solver++ and Heun 20 to 50; the shortcut sampler, given the exact mean
    velocity, a single step."""
    path = Gaussian(kind)
    x = make_sampler(name)(path, torch.randn(20000, 4, generator=torch.Generator().manual_seed(0)), steps)
    assert x.mean().item() == pytest.approx(Gaussian.MU, abs=0.01)
    assert x.var().item() == pytest.approx(Gaussian.VAR, rel=0.03)


def test_ddim_on_the_straight_path_is_euler_and_a_sampler_asks_for_what_it_needs():
    """On flow matching's straight path DDIM (eta 0) is Euler's method; Heun needs a velocity, which DDPM does not
    offer: one clear line naming the samplers it has. A sampler of one's own is an object of the same protocol."""
    from genlab.samplers import DDIM, Euler

    torch.manual_seed(0)
    model = FlowMatching(UNet(1, 28, width=8, mults=(1, 2))).eval()
    with torch.no_grad():
        for p in model.parameters():  # the UNet's output layer starts at zero: a velocity of zero everywhere
            p.normal_(0, 0.05)
        z = torch.randn(2, 1, 28, 28)
        euler, ddim = model.generate(z, steps=4), model.generate(z, sampler=DDIM(), steps=4)
    torch.testing.assert_close(ddim, euler, atol=1e-5, rtol=0)
    assert torch.equal(euler, model.generate(z, sampler=Euler(), steps=4))
    with pytest.raises(GenlabError, match=r"sampler=heun needs a model that offers velocity.*DDPM does not\. "
                                          r"Its samplers: ddim, ddpm, dpmpp_2m\."):
        with_oracle(DDPM)[0].generate(torch.randn(2, 1, 4, 4), sampler="heun", steps=2)
    with pytest.raises(GenlabError, match="sampler.eta is not a setting of Ancestral"):
        with_oracle(DDPM)[0].generate(torch.randn(2, 1, 4, 4), sampler="ddpm", eta=0.5, steps=2)


@pytest.mark.parametrize("cls,kwargs", [(DDPM, {"prediction": "v"}), (DDPM, {"prediction": "eps"}), (FlowMatching, {})])
def test_denoise_score_is_zero_on_the_data_and_grows_off_it(cls, kwargs):
    """The exact denoiser of a one-batch dataset restores that batch from any noise level, so its images
    score zero; the same images mirrored are not what it learned and score clearly above zero, more so
    the further they are from the data."""
    model, _ = with_oracle(cls, **kwargs)
    data = (X0 + 1) / 2
    assert model.anomaly_score(data).abs().max() < 1e-6
    near, far = data * 0.9 + data.flip(-1) * 0.1, data.flip(-1)
    s_near, s_far = model.anomaly_score(near), model.anomaly_score(far)
    assert (s_near > 1e-5).all() and (s_far > 4 * s_near).all()
    assert model.denoise_errors(far, (0.6, 0.9)).shape == (2, 2)


def test_guidance_is_one_batched_forward():
    class Split(nn.Module):
        num_classes, image_shape = 3, (1, 4, 4)

        def __init__(self):
            super().__init__()
            self.calls = []

        def forward(self, x, t, labels):
            self.calls.append(labels.tolist())
            return torch.where((labels == 3).view(-1, 1, 1, 1), torch.zeros_like(x), torch.ones_like(x))  # uncond 0, cond 1

    net = Split()
    model = DDPM(net, num_classes=3)
    out = model.predict(torch.zeros(2, 1, 4, 4), torch.tensor([5.0, 5.0]), torch.tensor([0, 2]), guidance=3.0)
    assert net.calls == [[0, 2, 3, 3]]  # conditional and unconditional halves in one forward
    assert torch.equal(out, torch.full_like(out, 3.0))  # uncond + 3 * (cond - uncond)
    assert torch.equal(model.predict(torch.zeros(2, 1, 4, 4), torch.tensor([5.0, 5.0]), torch.tensor([0, 2]), 1.0),
                       torch.ones(2, 1, 4, 4))
    with pytest.raises(GenlabError, match="guidance needs a class-conditional model"):
        with_oracle(DDPM)[0].generate(torch.randn(2, 1, 4, 4), steps=2, guidance=2.0)


def test_the_models_own_guidance_is_the_default():
    torch.manual_seed(0)
    model = DDPM(UNet(1, 28, width=8, mults=(1, 2), num_classes=3), num_classes=3, guidance=2.5).eval()
    with torch.no_grad():
        for p in model.parameters():  # the UNet's output layer starts at zero: every class would predict alike
            p.normal_(0, 0.1)
    z, labels = torch.randn(2, 1, 28, 28), torch.tensor([0, 2])
    with torch.no_grad():
        default, chosen, plain = (model.generate(z, labels, steps=2, guidance=g) for g in (None, 2.5, 1.0))
    assert torch.equal(default, chosen) and not torch.allclose(default, plain)
    assert DDPM(UNet(1, 28, width=8, mults=(1, 2)), guidance=2.5).guidance == 1.0  # nothing to guide without classes


def test_noise_schedules_and_steps():
    for kind in ("linear", "cosine"):
        ab = noise_schedule(kind, 1000)
        assert ab[0] > 0.99 and ab[-1] < 0.01 and (ab[1:] < ab[:-1]).all()
    assert trailing_steps(1000, 50)[:3] == (999, 979, 959) and trailing_steps(1000, 50)[-1] == 19
    assert len(trailing_steps(1000, 3)) == 3 and trailing_steps(1000, 1000) == tuple(range(999, -1, -1))


@pytest.mark.parametrize("size,channels,levels", [(28, 1, 3), (32, 3, 3), (64, 3, 4)])
def test_unet_is_sized_from_the_images(size, channels, levels):
    net = UNet(channels=channels, image_size=size, width=16, num_classes=10)
    assert len(net.down) == levels
    x = torch.randn(2, channels, size, size)
    assert net(x, torch.tensor([3.0, 900.0]), torch.tensor([1, 10])).shape == x.shape


@pytest.mark.parametrize("model,extra", [("ddpm", []), ("flow", ["model.num_classes=10"]),
                                         ("ddpm", ["model.prediction=v", "model.num_classes=10"]),
                                         ("flow", ["model.shortcut=0.5", "model.unet.step_input=true", "model.num_classes=10"]),
                                         ("edm", ["model.num_classes=10"])])
def test_a_training_step_changes_every_part_and_samples_fit(model, extra, tmp_path):
    t = make_trainer([f"model={model}", *extra, "model.unet.width=16", "dataset=synthetic", "dataset.n=16",
                      "trainer.batch_size=8"], tmp_path)
    m = t.model
    before = {k: p.detach().clone() for k, p in m.named_parameters()}
    # the UNet's output layers start at zero (each block starts as the identity), so the gradient reaches
    # the layers behind them step by step: a few steps move every part
    for i in range(6):
        t.ctx.begin(i)
        out = m.training_step(first_batch(t), t.ctx)
        t.ctx.end()
    assert math.isfinite(out["loss"].item())
    assert not [k for k, p in m.named_parameters() if torch.equal(p, before[k])]
    m.eval()
    labels = torch.tensor([1, 2, 3]) if m.num_classes else None
    x = m.sample(3, labels, torch.Generator().manual_seed(0), steps=2, guidance=2.0 if m.num_classes else 1.0)
    assert x.shape == (3, 1, 28, 28) and x.min() >= 0 and x.max() <= 1
    scores = m.anomaly_score(first_batch(t).x)
    assert scores.shape == (8,) and torch.equal(scores, m.anomaly_score(first_batch(t).x))  # deterministic


def test_train_sample_evaluate_through_the_commands(tmp_path):
    r = genlab("train", "model=flow", "model.num_classes=10", "model.unet.width=16", "dataset=synthetic",
               "dataset.n=64", "trainer.batch_size=32", "trainer.max_steps=4", "trainer.sampling.steps=2",
               "trainer.n_samples=10", "trainer.ema.decay=0.9", "device=cpu", f"hydra.run.dir={tmp_path / 'run'}",
               cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run" / "samples" / "epoch_0002.png").is_file()
    r = genlab("sample", f"ckpt={tmp_path / 'run'}", "labels=[3,3,7]", "guidance=3", "steps=3", "sampler=heun",
               f"hydra.run.dir={tmp_path / 's'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert torch.load(tmp_path / "s" / "samples.pt", weights_only=True).shape == (3, 1, 28, 28)
    r = genlab("evaluate", f"ckpt={tmp_path / 'run'}", "normal_classes=[0]", f"hydra.run.dir={tmp_path / 'e'}",
               cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = genlab_here("sample", f"ckpt={tmp_path / 'run'}", "sampler=nope", cwd=tmp_path)
    assert r.returncode == 1 and "Could not find 'sampler/nope'" in r.stderr and "ddim, ddpm, dpmpp_2m, euler, heun" in r.stderr


def test_max_time_ends_the_run_with_a_checkpoint(tmp_path):
    r = genlab("train", "model=gan", "dataset=synthetic", "dataset.n=64", "trainer.batch_size=32", "trainer.epochs=100000",
               "trainer.max_time=1s", "device=cpu", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    state = checkpoint.load(tmp_path / "run")
    assert 0 < state["step"] < 200000 and state["wall_time"] >= 1.0
    assert "trainer.max_time=1s reached after" in r.stdout + r.stderr
    r = genlab_here("train", "trainer.max_time=soon", cwd=tmp_path)
    assert r.returncode == 1 and "trainer.max_time must be a duration such as 90s, 30m" in r.stderr


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_weights_cap_the_nearly_clean_steps(prediction):
    """Min-SNR-gamma: an image's error at signal-to-noise ratio SNR weighs min(SNR, gamma) / SNR (eps) or
    / (SNR + 1) (v): the nearly clean steps (SNR far above gamma) weigh gamma / SNR, the noisy ones 1 (eps) or
    SNR / (SNR + 1) (v); without min_snr the loss is the plain mean."""
    model = DDPM(UNet(1, 28, width=8, mults=(1, 2)), prediction=prediction, min_snr=5.0)
    t = torch.tensor([0, 100, 500, 900, 999])
    snr = model.alpha_bar[t] / (1 - model.alpha_bar[t])
    assert snr[0] > 5 > snr[-1]  # both sides of gamma on the cosine schedule
    expected = snr.clamp(max=5) / (snr if prediction == "eps" else snr + 1)
    torch.testing.assert_close(model.snr_weights(t), expected)
    w = model.snr_weights(t)
    assert w[0] < 0.01 and (w <= 1).all() and w[0] == pytest.approx(5 / (snr[0] + (prediction == "v")).item(), rel=1e-5)
    if prediction == "eps":
        assert w[-1] == 1
    with pytest.raises(GenlabError, match="model.min_snr is the weight's cap gamma, above 0"):
        DDPM(UNet(1, 28, width=8, mults=(1, 2)), min_snr=0)


def test_a_ddpm_trains_with_min_snr(tmp_path):
    t = make_trainer(["model=ddpm", "model.min_snr=5", "model.unet.width=8", "dataset=synthetic", "dataset.n=32",
                      "dataset.image_size=16", "trainer.batch_size=16", "trainer.max_steps=2", "trainer.log_every=1",
                      "trainer.n_samples=4", "++trainer.sampling.steps=2"], tmp_path)
    assert t.model.min_snr == 5
    t.fit()
    assert [r["step"] for r in t.history] == [1, 2] and all(0 < r["train/loss"] < 10 for r in t.history)
