"""Shortcut models (flow matching that learns jumps): the objective against a hand computation, the network's step
input, the sampler's default, and what is refused."""


import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from genlab.data import Batch
from genlab.errors import GenlabError
from genlab.models import FlowMatching
from genlab.nets import UNet
from genlab.parts import build_model

from conftest import StepRecorder, compose_train


class Affine(nn.Module):
    """out = A x + B t/1000 + C step/1000: a network whose every output can be written down by hand."""

    num_classes, image_shape, step_input = 0, (1, 2, 2), True
    A, B, C = 0.5, -0.3, 0.7

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))  # something for an optimizer; the output ignores it
        self.steps_seen = []

    def forward(self, x, t, labels=None, step=None):
        self.steps_seen.append(None if step is None else step.tolist())
        step = torch.zeros_like(t) if step is None else step
        return self.A * x + (self.B * t / 1000 + self.C * step / 1000).view(-1, 1, 1, 1)


def test_the_shortcut_loss_is_the_hand_computed_value():
    """shortcut_steps=2 leaves one jump to learn, the whole path from t=1: its target is the mean of two half
    jumps at the flow-matching input (step 0) from t=1 and t=1/2; the rest of the batch is plain flow matching."""
    net = Affine()
    model = FlowMatching(net, time_sampling="uniform", shortcut=0.5, shortcut_steps=2)
    x = torch.tensor([0.1, 0.9, 0.4, 0.6, 0.0, 1.0, 0.3, 0.2, 0.5, 0.5, 0.7, 0.8, 0.25, 0.75, 0.6, 0.1]).view(4, 1, 2, 2)
    ctx = StepRecorder()
    torch.manual_seed(0)
    model.training_step(Batch(x, torch.zeros(4, dtype=torch.long)), ctx)
    torch.manual_seed(0)  # the draws training_step makes, in its order
    noise, t = torch.randn(4, 1, 2, 2), torch.rand(2).view(-1, 1, 1, 1)
    x0 = x * 2 - 1
    A, B, C = Affine.A, Affine.B, Affine.C
    # the shortcut half (images 0 and 1): x_1 = noise; two half jumps, then the whole jump with step 1
    first = A * noise[:2] + B * 1.0
    second = A * (noise[:2] - 0.5 * first) + B * 0.5
    shortcut = ((A * noise[:2] + B + C) - (first + second) / 2).pow(2)
    # the flow-matching half (images 2 and 3): velocity noise - x0 at x_t = (1 - t) x0 + t noise, t ~ U(0, 1)
    xt = (1 - t) * x0[2:] + t * noise[2:]
    flow = ((A * xt + B * t) - (noise[2:] - x0[2:])).pow(2)
    expected = torch.cat([shortcut, flow]).mean()
    assert ctx.losses[0].item() == pytest.approx(expected.item(), rel=1e-6)
    # the targets' two calls at step 0 (flow matching's input), then one call with steps [1000, 1000, 0, 0]
    assert net.steps_seen == [[0.0, 0.0], [0.0, 0.0], [1000.0, 1000.0, 0.0, 0.0]]


def test_jumps_learnt_are_the_powers_of_two_and_start_on_their_grid():
    """Shortcut sizes 2/M .. 1, each a power of two, from times that are whole multiples of the size (the times a
    sampler of that many steps visits); steps finer than the finest shortcut are asked for as plain velocity."""
    model = FlowMatching(Affine(), shortcut=0.25, shortcut_steps=16)
    torch.manual_seed(0)
    x0 = torch.zeros(4000, 1, 2, 2)
    _, t_in, steps, _ = model.shortcut_targets(x0, torch.randn_like(x0), None)
    size, t = steps / 1000, t_in / 1000
    assert set(size.tolist()) == {0.125, 0.25, 0.5, 1.0}
    ratio = t / size
    assert torch.allclose(ratio, ratio.round(), atol=1e-5) and (t <= 1 + 1e-6).all() and (t >= size - 1e-6).all()
    assert model.step_input(torch.tensor([1 / 16, 0.1, 0.125, 1.0])).tolist() == [0.0, 0.0, 125.0, 1000.0]


def test_the_network_hears_the_step_and_a_shortcut_model_samples_with_jumps():
    torch.manual_seed(0)
    net = UNet(1, 28, width=8, mults=(1, 2), step_input=True)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([500.0, 500.0])
    assert torch.equal(net(x, t), net(x, t, None, torch.zeros(2)))
    assert not torch.allclose(net(x, t), net(x, t, None, torch.full((2,), 500.0)))
    model = FlowMatching(net, shortcut=0.25).eval()
    with torch.no_grad():
        z = torch.randn(2, 1, 28, 28)
        one = model.generate(z, steps=1)
        # one jump of the whole path: x_0 = z - jump(z, 1 -> 0), the network told step 1 (1000)
        expected = ((z - net(z, torch.full((2,), 1000.0), None, torch.full((2,), 1000.0))).clamp(-1, 1) + 1) / 2
        torch.testing.assert_close(one, expected)
        assert not torch.allclose(one, model.generate(z, sampler="euler", steps=1))


def test_a_shortcut_needs_a_network_told_the_step():
    with pytest.raises(GenlabError, match="model.shortcut needs a network told the step size: set model.unet.step_input=true"):
        FlowMatching(UNet(1, 28, width=8, mults=(1, 2)), shortcut=0.25)
    with pytest.raises(GenlabError, match="model.shortcut_steps must be a power of two, at least 2; got 100"):
        FlowMatching(Affine(), shortcut=0.25, shortcut_steps=100)
    with pytest.raises(GenlabError, match=r"model.shortcut is the share of each batch that learns shortcuts, in \[0, 1\)"):
        FlowMatching(Affine(), shortcut=1.0)


@pytest.mark.parametrize("name", ["ddpm", "flow"])
def test_a_run_from_before_shortcuts_still_loads_and_samples(name):
    """A checkpoint's config written before shortcuts existed (no unet.step_input, shortcut, shortcut_steps) builds
    the same network, which takes the same weights and samples the same images."""
    cfg = compose_train([f"model={name}", "model.unet.width=8", "dataset=synthetic"])
    torch.manual_seed(0)
    today = build_model(cfg).eval()
    old = OmegaConf.to_container(cfg, resolve=True)
    old["model"]["unet"].pop("step_input", None)
    old["model"].pop("shortcut", None), old["model"].pop("shortcut_steps", None)
    before = build_model(OmegaConf.create(old)).eval()
    before.load_state_dict(today.state_dict())  # strict: no key more or less
    assert set(before.state_dict()) == set(today.state_dict()) and not any(".steps." in k for k in today.state_dict())
    z = torch.randn(2, *today.unet.image_shape)
    with torch.no_grad():
        assert torch.equal(before.generate(z, steps=3), today.generate(z, steps=3))
