"""The StyleGAN networks: modulation's variances, the sizes they draw, style mixing, truncation, and training steps
through the commands' parts."""

import math

import pytest
import torch
from PIL import Image

from genlab.errors import GenlabError
from genlab.models import StyleGAN
from genlab.nets import StyleGANDiscriminator, StyleGANGenerator
from genlab.nets.stylegan import ModulatedConv, minibatch_std

from conftest import first_batch, genlab_here, make_trainer


@pytest.mark.parametrize("kernel", [1, 3])
def test_demodulation_keeps_unit_variance_whatever_the_style(kernel):
    """Inputs of unit variance give outputs of unit variance (within 5 %) for any style, since each output
    channel's modulated weights are renormalised to unit norm; without demodulation the variance follows the
    style's scale (here about 10 times larger). Training's way (the input scaled) and sampling's (grouped
    weights) agree."""
    torch.manual_seed(0)
    conv = ModulatedConv(64, 32, kernel, w_dim=16)
    with torch.no_grad():
        conv.affine.bias.fill_(3.0)  # styles 3 + N(0, 1): the plain convolution's variance times E[s^2] = 10
    x, w = torch.randn(32, 64, 16, 16), torch.randn(32, 16)
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))  # away from the zero padding
    for demodulate, variance, tolerance in ((True, 1.0, 0.05), (False, 10.0, 0.2)):
        conv.demodulate = demodulate
        scaled, grouped = conv.train()(x, w), conv.eval()(x, w)  # the two ways: input scaled, or grouped weights
        torch.testing.assert_close(scaled, grouped, atol=1e-4, rtol=1e-4)
        assert scaled[inner].var().item() == pytest.approx(variance, rel=tolerance)


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3), (64, 3)])
def test_the_networks_draw_and_judge_the_datasets_sizes(size, channels):
    torch.manual_seed(0)
    g = StyleGANGenerator(channels, size, z_dim=16, w_dim=16, mapping_layers=2, width=8, max_width=16, num_classes=10)
    d = StyleGANDiscriminator(channels, size, width=8, max_width=16, num_classes=10)
    labels = torch.arange(4)
    x = g(torch.randn(4, 16), labels)
    assert x.shape == (4, channels, size, size) and x.abs().max() <= 1
    assert d(x, labels).shape == (4,)
    assert g.num_ws == 1 + 2 * int(math.log2(size // (7 if size == 28 else 4)))


def test_a_side_that_does_not_halve_to_4_to_7_pixels_is_refused():
    with pytest.raises(GenlabError, match="halves to 4 to 7 pixels .* got dataset.image_size=30"):
        StyleGANGenerator(3, 30)


def test_styles_mix_in_training_only_and_eval_is_deterministic():
    torch.manual_seed(0)
    g = StyleGANGenerator(1, 28, z_dim=16, w_dim=16, mapping_layers=2, width=8, max_width=16, mixing=1.0)
    seen = []
    g.synthesis = lambda ws: seen.append(ws) or torch.zeros(len(ws), 1, 28, 28)
    z = torch.randn(64, 16)
    g.train()(z)
    g.eval()(z)
    trained, evaluated = seen
    # in training every image switches to a second latent's style at some layer after the first
    assert not torch.equal(trained[:, 0], trained[:, -1]) and torch.equal(trained[:, 0], evaluated[:, 0])
    assert (evaluated == evaluated[:, :1]).all()  # one style for every layer
    del g.synthesis
    assert torch.equal(g(z[:4]), g(z[:4]))  # fixed noise in eval mode: a latent always gives the same image


def test_minibatch_std_is_the_spread_within_each_group():
    """Groups are consecutive images: with 8 images in groups of 4, images 0 to 3 and 4 to 7. Each image gets its
    group's standard deviation (population), averaged over channels and pixels."""
    x = torch.zeros(8, 2, 3, 3)
    x[4:] = torch.arange(4.0).view(4, 1, 1, 1)  # images 4 to 7 hold 0, 1, 2, 3
    out = minibatch_std(x, 4)
    assert out.shape == (8, 3, 3, 3) and torch.equal(out[:, :2], x)
    spread = torch.tensor([0.0, 1.0, 2.0, 3.0]).std(unbiased=False).item()
    torch.testing.assert_close(out[:, 2, 0, 0], torch.tensor([0.0] * 4 + [spread] * 4), atol=2e-4, rtol=0)  # sqrt(1e-8)
    assert minibatch_std(torch.randn(6, 2, 3, 3), 4).shape == (6, 3, 3, 3)  # groups of 2, dividing 6


def test_truncation_draws_every_latent_towards_the_mean_style():
    torch.manual_seed(0)
    g = StyleGANGenerator(1, 28, z_dim=16, w_dim=16, mapping_layers=2, width=8, max_width=16, num_classes=3)
    d = StyleGANDiscriminator(1, 28, width=8, max_width=16, num_classes=3)
    from genlab.losses import BCE

    model = StyleGAN(g, d, BCE(), num_classes=3).eval()
    z, labels = torch.randn(6, 16), torch.tensor([0, 0, 1, 1, 2, 2])
    with torch.no_grad():
        zero = model.generate(z, labels, truncation=0.0)
        assert torch.allclose(zero[0], zero[1]) and not torch.allclose(zero[0], zero[2])  # one image per class
        torch.testing.assert_close(model.generate(z, labels, truncation=1.0), (g(z, labels) + 1) / 2)
        spread = [(lambda x: (x[::2] - x[1::2]).abs().mean().item())(model.generate(z, labels, truncation=t))
                  for t in (0.0, 0.5, 1.0)]  # between the two images of each class
    assert spread[0] < 1e-6 < spread[1] < spread[2]
    with pytest.raises(GenlabError, match="truncation is psi in"):
        model.generate(z, labels, truncation=1.5)


def test_a_training_step_changes_every_part_with_r1_from_the_model_config(tmp_path):
    t = make_trainer(["model=stylegan", "dataset=synthetic", "dataset.n=16", "dataset.image_size=32",
                      "dataset.channels=3", "model.generator.width=8", "model.discriminator.width=8",
                      "model.generator.max_width=16", "model.discriminator.max_width=16", "trainer.batch_size=8",
                      "model.regularizers.r1.every=2"], tmp_path)
    m = t.model
    assert set(m.regularizers) == {"r1"} and m.regularizers["r1"].gamma == 0.01 and not m.joint
    before = {k: p.detach().clone() for k, p in m.named_parameters()}
    for i in range(4):
        t.ctx.begin(i)
        out = m.training_step(first_batch(t), t.ctx)
        t.ctx.end()
    assert math.isfinite(out["loss_d"].item()) and math.isfinite(out["loss_g"].item())
    # the noise strengths start at 0 and the mapping learns at a hundredth of the rate: every part still moves
    assert not [k for k, p in m.named_parameters() if torch.equal(p, before[k])]
    x = m.eval().sample(4, None, torch.Generator().manual_seed(0), truncation=0.7)
    assert x.shape == (4, 3, 32, 32) and x.min() >= 0 and x.max() <= 1


def test_sample_writes_the_style_mixing_grid_and_walks_straight_in_w(tmp_path):
    """genlab sample on a StyleGAN run at truncation 0.7: its grid, interpolation and a style-mixing grid of 7 x 7
    cells (a blank corner, 6 columns, 6 rows)."""
    run = tmp_path / "run"
    r = genlab_here("train", "model=stylegan", "dataset=synthetic", "dataset.n=32", "dataset.image_size=32",
               "dataset.channels=3", "model.generator.width=8", "model.discriminator.width=8",
               "model.generator.max_width=16", "model.discriminator.max_width=16", "trainer.batch_size=16",
               "trainer.max_steps=2", "trainer.progress=false", f"hydra.run.dir={run}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "s"
    r = genlab_here("sample", f"ckpt={run}", "truncation=0.7", "n=8", f"hydra.run.dir={out}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    width, height = Image.open(out / "style_mixing.png").size
    assert width == height == 7 * 32 + 8 * 2 and (out / "interpolation.png").exists()


def test_interpolation_walks_straight_in_w_and_mixing_takes_coarse_styles_from_the_rows():
    torch.manual_seed(0)
    g = StyleGANGenerator(1, 28, z_dim=16, w_dim=16, mapping_layers=2, width=8, max_width=16)
    from genlab.losses import BCE

    model = StyleGAN(g, StyleGANDiscriminator(1, 28, width=8, max_width=16), BCE()).eval()
    z0, z1 = torch.randn(2, 16), torch.randn(2, 16)
    with torch.no_grad():
        walk = model.interpolate(z0, z1, torch.tensor([0.0, 0.5, 1.0]), truncation=0.7).view(2, 3, 1, 28, 28)
        torch.testing.assert_close(walk[:, 0], model.generate(z0, truncation=0.7))
        torch.testing.assert_close(walk[:, 2], model.generate(z1, truncation=0.7))
        middle = (model.styles(z0, None, 0.7) + model.styles(z1, None, 0.7)) / 2
        torch.testing.assert_close(walk[:, 1], (g.synthesis(middle) + 1) / 2)
        grid = model.style_mix(z0, z1)  # 2 rows, 2 columns
        seen = []
        g.synthesis = lambda ws: seen.append(ws) or torch.zeros(len(ws), 1, 28, 28)
        model.style_mix(z0, z1)
    assert grid.shape == (9, 1, 28, 28) and torch.equal(grid[0], torch.ones(1, 28, 28))
    ws = seen[0][4:].view(2, 2, g.num_ws, 16)  # after the 2 columns and 2 rows: row r, column c
    coarse = g.num_ws // 2
    torch.testing.assert_close(ws[1, 0, :coarse], model.styles(z0, None)[1, :coarse])
    torch.testing.assert_close(ws[1, 0, coarse:], model.styles(z1, None)[0, coarse:])


def test_the_path_length_penalty_is_the_brute_force_jacobians():
    torch.manual_seed(0)
    g = StyleGANGenerator(1, 28, z_dim=8, w_dim=8, mapping_layers=2, width=4, max_width=8)
    from genlab.losses import BCE

    model = StyleGAN(g, StyleGANDiscriminator(1, 28, width=4, max_width=8), BCE(), path_length=2.0).eval()
    with torch.no_grad():
        for layer in g.layers:
            layer.strength.fill_(0.3)  # the fixed noise of eval mode in play
    z = torch.randn(3, 8)
    torch.manual_seed(1)
    penalty = model.path_length_penalty(z)
    torch.manual_seed(1)
    y = torch.randn(3, 1, 28, 28) / 28  # the random directions in image space, drawn first
    ws = g.mapping(z)[:, None].expand(-1, g.num_ws, -1).detach()
    lengths = []
    for i in range(3):  # the whole Jacobian of each image with respect to its styles, then J^T y
        jac = torch.autograd.functional.jacobian(g.synthesis, ws[i:i + 1])  # [1, 1, 28, 28, 1, num_ws, w_dim]
        jty = (jac[0] * y[i][..., None, None, None]).sum((0, 1, 2))  # [1, num_ws, w_dim]
        lengths.append(jty.square().sum(-1).mean().sqrt())
    lengths = torch.stack(lengths)
    torch.testing.assert_close(model.pl_mean, 0.01 * lengths.mean())  # the running mean from 0, decay 0.99
    torch.testing.assert_close(penalty, (lengths - 0.01 * lengths.mean()).square().mean(), rtol=1e-4, atol=1e-6)
    with pytest.raises(GenlabError, match="path_length >= 0"):
        StyleGAN(g, StyleGANDiscriminator(1, 28, width=4, max_width=8), BCE(), path_length=-1.0)


def test_path_length_regularisation_updates_the_generator_lazily(tmp_path):
    t = make_trainer(["model=stylegan", "dataset=synthetic", "dataset.n=16", "dataset.image_size=32",
                      "dataset.channels=3", "model.generator.width=8", "model.discriminator.width=8",
                      "model.generator.max_width=16", "model.discriminator.max_width=16", "trainer.batch_size=8",
                      "model.path_length=2", "model.path_length_every=2"], tmp_path)
    m, seen = t.model, []
    for i in range(4):
        t.ctx.begin(i)
        out = m.training_step(first_batch(t), t.ctx)
        t.ctx.end()
        seen.append("loss_pl" in out)
        assert "loss_pl" not in out or (math.isfinite(out["loss_pl"].item()) and out["loss_pl"].item() > 0)
    assert seen == [True, False, True, False] and m.pl_mean.item() > 0
    assert "pl_mean" in m.state_dict()  # in checkpoints, so that a resumed run goes on from it
