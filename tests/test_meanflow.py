"""MeanFlow (flow matching that learns mean velocities through its own derivative): the objective against a hand
computation, the derivative against finite differences, sampling with jumps, and what is refused."""


import warnings

import pytest
import torch

from genlab.data import Batch
from genlab.errors import GenlabError
from genlab.models import FlowMatching
from genlab.nets import UNet

from conftest import StepRecorder

from test_shortcut import Affine as Thousandths


class Affine(Thousandths):
    """out = A x + B t + C step: MeanFlow's network is told times and steps as they are, in [0, 1]."""

    def forward(self, x, t, labels=None, step=None):
        return super().forward(x, t * 1000, labels, None if step is None else step * 1000)


def test_the_mean_flow_loss_is_the_hand_computed_value():
    """Affine's u = A x + B t + C (t - r) moves along the path at du/dt = A v + B + C, so MeanFlow's target for the
    first half is v - (t - r)(A v + B + C), with t > r drawn from sigmoid(N(-0.4, 1)); the second half is plain
    flow matching. The loss reported is the mean squared error; the one stepped divides each image's by itself."""
    net = Affine()
    model = FlowMatching(net, time_sampling="uniform", mean_flow=0.5)
    x = torch.linspace(0, 1, 16).view(4, 1, 2, 2)
    ctx = StepRecorder()
    torch.manual_seed(0)
    reported = model.training_step(Batch(x, torch.zeros(4, dtype=torch.long)),
                                   ctx)["loss"]
    torch.manual_seed(0)  # the draws training_step makes, in its order
    noise, t_flow, pair = torch.randn(4, 1, 2, 2), torch.rand(2), torch.sigmoid(torch.randn(2, 2) - 0.4)
    A, B, C = Affine.A, Affine.B, Affine.C
    x0 = x * 2 - 1
    t, r = pair.max(0).values.view(-1, 1, 1, 1), pair.min(0).values.view(-1, 1, 1, 1)
    v = noise[:2] - x0[:2]
    xt = (1 - t) * x0[:2] + t * noise[:2]
    mean = (A * xt + B * t + C * (t - r) - (v - (t - r) * (A * v + B + C))).pow(2).mean((1, 2, 3))
    tf = t_flow.view(-1, 1, 1, 1)
    xf = (1 - tf) * x0[2:] + tf * noise[2:]
    flow = (A * xf + B * tf - (noise[2:] - x0[2:])).pow(2).mean((1, 2, 3))
    errors = torch.cat([mean, flow])
    assert reported.item() == pytest.approx(errors.mean().item(), rel=1e-6)
    assert ctx.losses[0].item() == pytest.approx((errors / (errors + 1e-3)).mean().item(), rel=1e-6)
    # the first half told its step t - r, the rest 0: flow matching's input
    seen = torch.tensor(net.steps_seen[-1]) / 1000
    torch.testing.assert_close(seen, torch.cat([(t - r).flatten(), torch.zeros(2)]))


def test_the_derivative_along_the_path_matches_finite_differences():
    """On a real UNet (in float64, with a smooth time input), the target's du/dt is the change of u when x_t, t and
    the step move together along the path, measured by central differences."""
    torch.manual_seed(0)
    net = UNet(1, 8, width=8, mults=(1, 2), step_input=True).double()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    model = FlowMatching(net, mean_flow=0.25)
    x0, noise = torch.rand(3, 1, 8, 8, dtype=torch.float64) * 2 - 1, torch.randn(3, 1, 8, 8, dtype=torch.float64)
    torch.manual_seed(1)
    xt, t_in, size, target = model.mean_flow_targets(x0, noise, None)
    torch.manual_seed(1)
    a, b = torch.sigmoid(torch.randn(2, 3) - 0.4)
    t, r = torch.maximum(a, b).double(), torch.minimum(a, b).double()

    def u(s):  # u along the path at time s, with r held
        ts = s.view(-1, 1, 1, 1)
        with torch.no_grad():
            return net((1 - ts) * x0 + ts * noise, s, None, s - r).double()

    h = 1e-5
    step_term = (t - r).view(-1, 1, 1, 1) * (u(t + h) - u(t - h)) / (2 * h)
    # within 3e-5 here; leaving out any of the three directions (x_t, t, the step) is off by 8e-3 or more
    torch.testing.assert_close((noise - x0) - target, step_term, rtol=0, atol=2e-4)
    assert step_term.abs().mean() > 5e-3
    torch.testing.assert_close(size.double(), t - r)
    torch.testing.assert_close(t_in.double(), t)


def test_a_mean_flow_model_samples_with_jumps_of_any_size():
    torch.manual_seed(0)
    net = UNet(1, 28, width=8, mults=(1, 2), step_input=True)
    model = FlowMatching(net, mean_flow=0.25).eval()
    # no rounding of small steps to 0, as a shortcut model's: each step's size reaches the network as it is
    assert model.step_input(torch.tensor([0.01, 0.3, 1.0])).tolist() == pytest.approx([0.01, 0.3, 1.0])
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
        z = torch.randn(2, 1, 28, 28)
        two = model.generate(z, steps=2)
        half = torch.full((2,), 0.5)
        x = z - 0.5 * net(z, torch.ones(2), None, half)
        x = x - 0.5 * net(x, half, None, half)
        torch.testing.assert_close(two, (x.clamp(-1, 1) + 1) / 2)


def test_mean_flow_is_refused_without_a_step_input_or_beside_shortcuts():
    with pytest.raises(GenlabError, match="model.mean_flow needs a network told the step size"):
        FlowMatching(UNet(1, 28, width=8, mults=(1, 2)), mean_flow=0.25)
    with pytest.raises(GenlabError, match="model.shortcut and model.mean_flow are two ways to learn jumps"):
        FlowMatching(Affine(), shortcut=0.25, mean_flow=0.25)
    with pytest.raises(GenlabError, match=r"model.mean_flow is the share of each batch .* in \[0, 1\); got 1.5"):
        FlowMatching(Affine(), mean_flow=1.5)


def test_the_derivative_is_taken_in_float32_under_bf16_autocast():
    """precision=bf16 (the default on a CPU with bf16): autocast does not cast the tangents of forward mode, so the
    derivative runs in float32, and its targets are those of a float32 step."""
    torch.manual_seed(0)
    net = UNet(1, 8, width=8, mults=(1, 2), step_input=True)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    model = FlowMatching(net, mean_flow=0.25)
    x0, noise = torch.rand(3, 1, 8, 8) * 2 - 1, torch.randn(3, 1, 8, 8)
    torch.manual_seed(1)
    plain = model.mean_flow_targets(x0, noise, None)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model.mean_flow_targets(x0, noise, None)
    for a, b in zip(plain, mixed):
        torch.testing.assert_close(a, b)


def test_the_derivative_prints_no_deprecation_warning_of_torch():
    """torch scripts its forward-mode decompositions on first use and warns that scripting is deprecated: torch's
    matter, not the user's, so no such warning reaches a MeanFlow run's log."""
    net = UNet(1, 8, width=8, mults=(1, 2), step_input=True)
    x0, noise = torch.rand(2, 1, 8, 8) * 2 - 1, torch.randn(2, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        FlowMatching(net, mean_flow=0.25).mean_flow_targets(x0, noise, None)
