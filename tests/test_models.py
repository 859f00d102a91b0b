"""One concern per test, across every model: a training step on CPU changes every trainable part."""

import contextlib
import math

import pytest
import torch

from genlab.data import Batch
from genlab.errors import GenlabError
from genlab.losses import BCE, gradient_penalty, kl_normal
from genlab.models import GAN
from genlab.nets import MLPDiscriminator, MLPGenerator
from genlab.parts import build_model, load_model
from genlab.scores import score_names
from genlab.step import StepContext

from conftest import compose_train, first_batch, make_trainer

CASES = [
    ("gan", "bce"), ("gan", "minimax"), ("gan", "wasserstein"), ("gan", "hinge"), ("gan", "lsgan"),
    ("dcgan", "bce"), ("dcgan", "wasserstein"), ("dcgan", "hinge"), ("cgan", "bce"), ("cgan", "wasserstein"),
    ("vae", "elbo"), ("vae", "elbo mse"),
]
SHAPES = [(1, 28), (3, 32)]


def setup(model, loss, channels, size, tmp_path, precision="fp32", *extra):
    """A trainer for ``model`` with ``loss`` on 16 synthetic images in batches of 8, and its first batch."""
    loss_name, *recon = loss.split()
    overrides = [f"model={model}", f"loss={loss_name}", "dataset=synthetic", "dataset.n=16",
                 f"dataset.channels={channels}", f"dataset.image_size={size}", f"trainer.precision={precision}",
                 "trainer.batch_size=8", *extra]
    if recon:
        overrides.append(f"loss.recon={recon[0]}")
    trainer = make_trainer(overrides, tmp_path)
    return trainer.model, trainer, first_batch(trainer)


@pytest.mark.parametrize("channels,size", SHAPES)
@pytest.mark.parametrize("model,loss", CASES)
def test_training_step_changes_every_part(model, loss, channels, size, tmp_path):
    m, trainer, batch = setup(model, loss, channels, size, tmp_path)
    before = {k: p.detach().clone() for k, p in m.named_parameters() if p.requires_grad}
    out = m.training_step(batch, trainer.ctx)
    assert out and all(v.dim() == 0 and math.isfinite(v.item()) for v in out.values())
    unchanged = [k for k, p in m.named_parameters() if torch.equal(p, before[k])]
    if loss in ("wasserstein", "hinge"):
        # E[D(fake)] - E[D(real)] does not depend on the critic's last bias; hinge reduces to it
        # while every logit is inside the margin, as at initialisation
        last_bias = [k for k, _ in m.d.named_parameters() if k.endswith("bias")][-1]
        assert unchanged == [f"d.{last_bias}"]
    else:
        assert not unchanged, f"not updated by one step: {unchanged}"
    assert all(p.grad is None or p.requires_grad for p in m.parameters())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("model,loss", [("gan", "bce"), ("dcgan", "wasserstein"), ("vae", "elbo")])
def test_low_precision_training_is_finite(model, loss, precision, tmp_path):
    # dcgan + wasserstein has the gradient penalty: with fp16 the gradient scaler starts at 2^16
    # the DCGAN at a quarter of its width: fp16 on a CPU is emulated, and 4 steps of the full one take 20 s
    narrow = ["model.generator.width=16", "model.discriminator.width=16"] if model == "dcgan" else []
    _, trainer, _ = setup(model, loss, 1, 28, tmp_path, precision, "trainer.max_steps=4", "trainer.log_every=1",
                          *narrow)
    trainer.fit()  # on_nan=stop: a non-finite loss raises
    losses = [v for row in trainer.history for k, v in row.items() if k.startswith("train/")]
    assert len(losses) >= 4 and all(math.isfinite(v) for v in losses)


def test_gradient_penalty_of_a_linear_critic():
    # the gradient of x -> w.x + b is w everywhere, so the penalty is (||w|| - 1)^2 exactly
    w = torch.randn(3 * 8 * 8)
    real, fake = torch.rand(5, 3, 8, 8), torch.rand(5, 3, 8, 8)
    penalty = gradient_penalty(lambda x: x.flatten(1) @ w + 0.5, real, fake)
    assert penalty.item() == pytest.approx(((w.norm() - 1) ** 2).item(), rel=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("model", ["gan", "dcgan"])
def test_gradient_penalty_under_autocast_matches_fp32(model, precision, tmp_path):
    m, trainer, batch = setup(model, "wasserstein", 1, 28, tmp_path, precision)
    x = batch.x
    m.d.eval()  # no dropout: both passes must see the same critic
    fake = m.g(torch.randn(8, m.z_dim)).detach()

    def penalty_and_grads(autocast):
        torch.manual_seed(1)  # the same interpolation points
        m.d.zero_grad()
        with autocast:
            penalty = gradient_penalty(m.d, x * 2 - 1, fake)
        penalty.backward()  # through the input gradient: a double backward
        return penalty.item(), torch.cat([p.grad.flatten() for p in m.d.parameters() if p.grad is not None])

    exact, exact_grads = penalty_and_grads(contextlib.nullcontext())
    low, low_grads = penalty_and_grads(trainer.ctx.autocast())
    assert low == pytest.approx(exact, rel=1e-2)
    assert torch.nn.functional.cosine_similarity(low_grads, exact_grads, dim=0) > 0.999
    assert (low_grads.norm() / exact_grads.norm()).item() == pytest.approx(1, rel=1e-2)


@pytest.mark.parametrize("model", ["gan", "dcgan", "vae"])
def test_sample_shape_and_range(model, tmp_path):
    m, _, _ = setup(model, "elbo" if model == "vae" else "bce", 3, 32, tmp_path)
    m.eval()
    g = torch.Generator().manual_seed(1)
    x = m.sample(5, generator=g)
    assert x.shape == (5, 3, 32, 32)
    assert x.min() >= 0 and x.max() <= 1
    assert torch.equal(x, m.sample(5, generator=torch.Generator().manual_seed(1)))  # reproducible


def test_generator_step_only_every_n_critic(tmp_path):
    m, trainer, batch = setup("gan", "wasserstein", 1, 28, tmp_path)
    m.n_critic = 3
    keys = []
    for i in range(4):
        trainer.ctx.begin(i)
        keys.append(sorted(m.training_step(batch, trainer.ctx)))
        trainer.ctx.end()
    assert keys == [["loss_d", "loss_g"], ["loss_d"], ["loss_d"], ["loss_d", "loss_g"]]


@pytest.mark.parametrize("model,size", [("dcgan", 30), ("vae", 26)])
def test_image_size_a_network_cannot_take(model, size):
    cfg = compose_train([f"model={model}", f"dataset.image_size={size}"])
    with pytest.raises(GenlabError, match="multiple of 4"):
        build_model(cfg)


def test_loss_that_does_not_fit_the_model():
    with pytest.raises(GenlabError, match="loss=hinge does not fit"):
        build_model(compose_train(["model=vae", "loss=hinge"]))
    with pytest.raises(GenlabError, match="loss=elbo does not fit"):
        build_model(compose_train(["model=dcgan", "loss=elbo"]))


@pytest.mark.parametrize("batch_norm", [False, True])
def test_discriminator_passes_fit_its_batch_statistics(batch_norm):
    """With batch norm, each image's logit depends on the rest of its batch: the discriminator then sees real and
    fake images in separate passes, so that its generator-step pass (fakes alone) normalises as its
    discriminator-step pass on fakes did, and that generator-step pass leaves the running statistics alone. A
    per-sample discriminator keeps the one joint pass (half the kernel launches)."""
    torch.manual_seed(0)
    if batch_norm:
        d = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 32), torch.nn.BatchNorm1d(32),
                                torch.nn.LeakyReLU(0.2), torch.nn.Linear(32, 1), torch.nn.Flatten(0))
    else:
        d = MLPDiscriminator()
    model = GAN(MLPGenerator(), d, BCE())
    ctx = StepContext({k: torch.optim.Adam(p, lr=1e-3) for k, p in model.optimizer_groups().items()})
    sizes, stats = [], {}
    d.register_forward_hook(lambda net, args, out: sizes.append(len(args[0])))
    real_step = ctx.step

    def step(name):  # the discriminator's statistics when its update is applied
        stats[name] = [b.clone() for b in d.buffers()]
        real_step(name)

    ctx.step = step
    model.training_step(Batch(torch.rand(8, 1, 28, 28), torch.zeros(8, dtype=torch.long)), ctx)
    if batch_norm:
        assert sizes == [8, 8, 8]  # real, fake; then fake in the generator step
        assert all(torch.equal(a, b) for a, b in zip(stats["d"], d.buffers()))  # not moved by the generator step
        assert not torch.equal(stats["d"][0], torch.zeros(32))  # while the discriminator step did move them
    else:
        assert sizes == [16, 8]


def test_cgan_draws_each_label_and_its_critic_reads_the_label(tmp_path):
    """The conditional DCGAN: samples of the right shape and range for given labels, the class changes the
    image, the discriminator's logit depends on the label through its projection head, and its checkpoint
    rebuilds a model that draws the same pictures."""
    m, trainer, batch = setup("cgan", "bce", 1, 28, tmp_path, "fp32", "trainer.max_steps=2")
    trainer.fit()
    m.eval()
    labels = torch.tensor([0, 1, 2, 3])
    x = m.sample(4, labels, torch.Generator().manual_seed(0))
    assert x.shape == (4, 1, 28, 28) and x.min() >= 0 and x.max() <= 1
    same_z = m.generate(torch.randn(1, m.z_dim).expand(2, -1), torch.tensor([0, 1]))
    assert not torch.allclose(same_z[0], same_z[1])
    d = m.logits(batch.x[:1].expand(2, -1, -1, -1) * 2 - 1, torch.tensor([0, 1]))
    assert d.shape == (2,) and d[0] != d[1]
    loaded, _, _ = load_model(tmp_path)
    assert torch.equal(loaded.sample(4, labels, torch.Generator().manual_seed(0)), x)
    with pytest.raises(GenlabError, match="num_classes"):
        build_model(compose_train(["model=cgan", "model.generator.num_classes=0"]))


@pytest.mark.parametrize("channels,size", [(3, 64), (1, 32)])
def test_dcgan64_trains_at_powers_of_two_and_refuses_28(channels, size, tmp_path):
    """Radford et al.'s DCGAN: a step changes every part (batch norm in the discriminator: separate passes),
    samples fit; 28x28 is one clear error."""
    m, trainer, batch = setup("dcgan64", "bce", channels, size, tmp_path)
    assert not m.joint and sum(p.numel() for p in m.g.parameters()) > 0
    before = {k: p.detach().clone() for k, p in m.named_parameters()}
    out = m.training_step(batch, trainer.ctx)
    assert all(math.isfinite(v.item()) for v in out.values())
    assert not [k for k, p in m.named_parameters() if torch.equal(p, before[k])]
    m.eval()
    x = m.sample(3, generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, channels, size, size) and 0 <= x.min() and x.max() <= 1
    with pytest.raises(GenlabError, match="power of two"):
        build_model(compose_train(["model=dcgan64", "dataset.image_size=28"]))


def test_vae_gan_takes_every_gradient_before_any_update(tmp_path):
    """Larsen et al.'s three updates: each loss backpropagated into its own network only, all three before the
    first optimizer step; one step changes every part; samples and both anomaly scores fit; a checkpoint
    rebuilds the same model."""
    m, trainer, batch = setup("vae_gan", "bce", 1, 28, tmp_path, "fp32", "trainer.max_steps=2")
    ctx, calls = trainer.ctx, []
    before = {k: p.detach().clone() for k, p in m.named_parameters()}

    def spy(method):
        def wrapped(*args, **kwargs):
            name = args[1] if method.__name__ == "backward" else args[0]
            still = all(torch.equal(p, before[k]) for k, p in m.named_parameters())
            grads = {k: all(p.grad is not None for p in ps) for k, ps in ctx.params.items()}
            calls.append((method.__name__, name, still, grads))
            return method(*args, **kwargs)
        return wrapped

    ctx.backward, ctx.step = spy(ctx.backward), spy(ctx.step)
    ctx.begin(0)
    out = m.training_step(batch, ctx)
    ctx.end()
    assert [c[:2] for c in calls] == [("backward", "encoder"), ("backward", "decoder"), ("backward", "d"),
                                      ("step", "encoder"), ("step", "decoder"), ("step", "d")]
    _, _, no_weight_moved, every_gradient = calls[3]  # at the first update
    assert no_weight_moved and all(every_gradient.values())
    assert calls[1][3] == {"encoder": True, "decoder": False, "d": False}  # the encoder's loss reached it alone
    assert all(math.isfinite(v.item()) for v in out.values()) and out["feature"] > 0 and out["kl"] > 0
    assert not [k for k, p in m.named_parameters() if torch.equal(p, before[k])]
    m.eval()
    x = m.sample(4, generator=torch.Generator().manual_seed(0))
    assert x.shape == (4, 1, 28, 28) and 0 <= x.min() and x.max() <= 1
    assert score_names(m) == ["feature", "mse", "mse_blur"]  # those whose needs it offers, its default first
    for score in score_names(m):
        s = m.anomaly_score(batch.x, score)
        assert s.shape == (len(batch.x),) and (s >= 0).all()
    trainer.fit()
    loaded, _, _ = load_model(tmp_path)
    assert torch.equal(loaded.reconstruct(batch.x), m.eval().reconstruct(batch.x))


def test_vae_gan_beta_weighs_the_kl_in_the_encoders_objective(tmp_path):
    """The encoder's gradient is that of beta * KL + feature error: raising beta from 1 to 3 adds twice the KL's
    gradient and nothing else; a negative beta is refused."""
    m, trainer, batch = setup("vae_gan", "bce", 1, 28, tmp_path, "fp32")
    ctx = trainer.ctx
    ctx.step = lambda name: None  # gradients only: the weights stay put between the two steps
    grads = {}
    for beta in (1.0, 3.0):
        m.beta = beta
        m.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same z and prior draws in both steps
        m.training_step(batch, ctx)
        grads[beta] = [p.grad.clone() for p in m.encoder.parameters()]
    m.zero_grad(set_to_none=True)
    kl_normal(*m.encode(batch.x)).mean().backward()
    for g1, g3, p in zip(grads[1.0], grads[3.0], m.encoder.parameters()):
        torch.testing.assert_close(g3 - g1, 2 * p.grad, atol=1e-5, rtol=1e-4)
    with pytest.raises(GenlabError, match="model.beta"):
        build_model(compose_train(["model=vae_gan", "model.beta=-1"]))


def test_corrected_score_expects_more_error_of_a_detailed_image(monkeypatch):
    """``corrected`` fits each error's log against the log total variation of normal images, and takes the KL
    term against its mean: images as hard as their detail predicts score alike, plain or detailed; more error
    than that, or an odd latent code, scores higher."""
    from genlab import scores
    from genlab.losses import ELBO, total_variation
    from genlab.models import VAE
    from genlab.nets import ConvDecoder, ConvEncoder

    vae = VAE(ConvEncoder(1, 28, 4, 8), ConvDecoder(1, 28, 4, 8), ELBO())
    worse, odd = torch.ones(1), torch.ones(1)  # factors on every image's error and KL term

    def terms(x):  # errors that grow as the square of the detail, give or take 30 %, as reconstructions' do
        tv, h = total_variation(x), 1e3 * x.flatten(1).sum(1)
        err = tv**2 * (1.3 + 0.3 * torch.sin(h)) * worse
        return err, 2 * err, torch.exp(0.2 * torch.cos(h)) * odd  # KL: an ordinary latent code, give or take 20 %

    monkeypatch.setattr(scores, "error_terms", lambda model, x: terms(x))  # the terms the scores read from a model
    def images(seed, n=200):  # from plain (dim) to detailed (bright noise)
        g = torch.Generator().manual_seed(seed)
        return torch.rand(n, 1, 28, 28, generator=g) * torch.linspace(0.02, 1, n).view(-1, 1, 1, 1)
    with pytest.raises(GenlabError, match="calibrate"):
        vae.anomaly_score(images(0)[:2], "corrected")
    vae.calibrate(images(0))
    new = images(1)
    s = vae.anomaly_score(new)  # the default
    assert torch.equal(s, vae.anomaly_score(new, "corrected"))
    assert abs(s[:100].mean() - s[100:].mean()) < 1.0  # the detail alone is not anomalous
    assert abs(s.mean()) < 1.0 and 1.0 < s.std() < 4.0  # in units of the normal images' spread: about 2.2 here
    blur_kl = vae.anomaly_score(new, "blur_kl")
    assert blur_kl[100:].mean() > 2.5 * blur_kl[:100].mean()  # blur_kl, uncorrected, calls detailed images odd
    odd.fill_(5.0)  # five times the usual KL term
    assert vae.anomaly_score(new[:100], "corrected").min() > s.max()
    odd.fill_(1.0)
    worse.fill_(5.0)  # five times the error their detail predicts
    assert vae.anomaly_score(new[:100], "corrected").min() > s.max()
    worse.fill_(1.0)
    for n in (1, 2, 9):  # too few normal images to fit a slope on: each term against its mean, never NaN or 1e8
        vae.calibrate(images(0, n))
        s = vae.anomaly_score(new, "corrected")
        assert torch.isfinite(s).all() and s.abs().max() < 1e4 and torch.isfinite(vae.anomaly_score(new, "blur_kl")).all()
