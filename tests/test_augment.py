"""DiffAugment's transforms and ADA's adaptive strength: what each does to an image, that the generator learns
through them, that real and fake images are augmented alike, and that p rises on a discriminator that overfits."""

import pytest
import torch
from torch import nn

from genlab.augment import Color, Cutout, DiffAugment
from genlab.data import Batch
from genlab.errors import GenlabError
from genlab.losses import BCE
from genlab.models import GAN
from genlab.step import StepContext

from conftest import compose_train, genlab_here


def test_color_moves_brightness_saturation_and_contrast_per_image():
    """A grey image keeps its greyness (saturation acts on colour only), and its brightness and contrast move by
    per-image draws within DiffAugment's ranges: mean shift in [-0.5, 0.5], spread scaled by [0.5, 1.5]."""
    torch.manual_seed(0)
    x = torch.linspace(-0.5, 0.5, 16).view(1, 1, 4, 4).repeat(512, 3, 1, 1)
    y = Color()(x)
    torch.testing.assert_close(y[:, 0], y[:, 2])  # a grey image stays grey
    shift, scale = y.mean((1, 2, 3)), y.std((1, 2, 3)) / x.std((1, 2, 3))
    assert shift.min() >= -0.5 and shift.max() <= 0.5 and shift.std() > 0.2
    assert scale.min() >= 0.5 - 1e-5 and scale.max() <= 1.5 + 1e-5 and scale.std() > 0.2
    colour = torch.randn(256, 3, 4, 4)
    saturation = (Color()(colour) - Color()(colour)).abs().mean()
    assert saturation > 0.1


def test_cutout_zeroes_one_square_of_the_stated_side_or_its_part_in_the_frame():
    torch.manual_seed(0)
    x = torch.ones(256, 1, 16, 16)
    cut = (Cutout(0.5)(x) == 0).flatten(1).sum(1)
    assert cut.max() == 64 and cut.min() >= 16  # 8 x 8 inside the frame; at least a quarter of it at a corner
    assert (cut == 64).float().mean() > 0.2
    with pytest.raises(GenlabError, match="cutout's ratio"):
        Cutout(1.5)


def test_the_generator_learns_through_every_transform():
    x = torch.randn(8, 3, 16, 16, requires_grad=True)
    torch.manual_seed(0)
    DiffAugment().forward(x).pow(2).sum().backward()
    assert x.grad is not None and (x.grad.flatten(1).abs().sum(1) > 0).all()


def test_p_chooses_how_many_images_each_transform_touches():
    torch.manual_seed(0)
    x = torch.ones(2000, 1, 8, 8)
    touched = lambda p: (DiffAugment("cutout", p=p)(x) != x).flatten(1).any(1).float().mean().item()  # noqa: E731
    assert touched(0.0) == 0.0 and touched(1.0) == 1.0 and touched(0.3) == pytest.approx(0.3, abs=0.04)
    with pytest.raises(GenlabError, match="augment.policy names transforms among color, translation, cutout"):
        DiffAugment("colour")


class Counting(nn.Module):
    """A per-image discriminator that keeps the batches it is shown."""

    def __init__(self):
        super().__init__()
        self.w, self.seen = nn.Parameter(torch.full((48,), 0.01)), []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return (x.flatten(1) * self.w).sum(1)


def gan_with(augment, d):
    torch.manual_seed(0)
    g = nn.Sequential(nn.Linear(4, 48), nn.Tanh(), nn.Unflatten(1, (3, 4, 4)))
    g.z_dim = 4
    model = GAN(g, d, BCE(), augment=augment)
    return model, StepContext({k: torch.optim.Adam(p, lr=1e-2) for k, p in model.optimizer_groups().items()})


def test_real_and_fake_images_are_augmented_alike_in_one_step():
    """The discriminator's step sees real and fake images through one augmentation, in one batch: cutout zeroes a
    square in both halves at the same rate."""
    d = Counting()
    model, ctx = gan_with(DiffAugment("cutout"), d)
    real = torch.ones(64, 3, 4, 4)
    ctx.begin(0)
    model.training_step(Batch(real, torch.zeros(64, dtype=torch.long)), ctx)
    ctx.end()
    both = d.seen[0]  # the discriminator's step: real and fake together
    assert len(both) == 128
    cut = (both == 0).flatten(1).sum(1)
    assert (cut[:64] > 0).all() and (cut[64:] > 0).all()


def test_the_adaptive_probability_rises_on_a_discriminator_that_overfits_and_is_kept():
    """A discriminator that learns 8 real images apart from its generator soon calls every real image real: p rises
    from 0 in steps of the images seen over speed, every interval steps, and goes into the state dict."""
    augment = DiffAugment(p=0.0, target=0.6, interval=4, speed=2_000)
    model, ctx = gan_with(augment, Counting())
    real = torch.rand(8, 3, 4, 4)
    ps = []
    for step in range(40):
        ctx.begin(step)
        out = model.training_step(Batch(real, torch.zeros(8, dtype=torch.long)), ctx)
        ctx.end()
        ps.append(out["aug_p"].item())
    assert ps[2] == 0.0 and ps[3] == pytest.approx(32 / 2_000)  # the first adjustment, after 4 steps of 8
    assert ps[-1] > 0.1 and ps[-1] > ps[20]
    assert model.state_dict()["augment.p"].item() == pytest.approx(ps[-1])
    fresh = DiffAugment(p=0.0, target=0.6)
    fresh.load_state_dict(augment.state_dict())
    assert fresh.p.item() == pytest.approx(ps[-1])


def test_the_adaptive_probability_falls_when_the_discriminator_is_fooled():
    augment = DiffAugment(p=0.5, target=0.6, interval=1, speed=100)
    augment.observe(-torch.ones(10), 0)  # every real image called fake
    assert augment.p.item() == pytest.approx(0.4)
    augment.observe(torch.ones(10), 1)
    assert augment.p.item() == pytest.approx(0.5)



def test_the_vae_gans_discriminator_judges_augmented_images_and_compares_plain_ones(tmp_path):
    """augment=ada reaches the VAE-GAN: its GAN loss sees augmented images (p moves with the discriminator's
    signs), while the feature error compares each image with its reconstruction as they are."""
    from conftest import first_batch, make_trainer

    t = make_trainer(["model=vae_gan", "augment=ada", "model.augment.interval=2", "dataset=synthetic",
                      "dataset.n=32", "trainer.batch_size=16", "model.encoder.width=8",
                      "model.discriminator.width=8"], tmp_path)
    m = t.model
    seen = []
    features = m.d.features
    m.d.features = lambda x: seen.append(x.detach().clone()) or features(x)
    t.ctx.begin(0)
    out = m.training_step(first_batch(t), t.ctx)
    t.ctx.end()
    batch = first_batch(t).x * 2 - 1
    assert torch.equal(seen[0], batch)  # the feature error's pass: the images as they are
    assert len(seen) == 5 and seen[3].shape == batch.shape  # then the real images again, augmented (p starts at 0)
    assert m.augment.signs[1].item() == 16 and {"loss_d", "loss_g", "feature", "kl"} <= set(out)  # it was shown them


def test_augment_none_turns_off_a_presets_augmentation_and_null_is_told_how(tmp_path):
    assert compose_train(["experiment=stylegan_cifar10"]).model.augment._target_ == "genlab.augment.DiffAugment"
    assert compose_train(["experiment=stylegan_cifar10", "augment=none"]).model.augment is None
    r = genlab_here("train", "experiment=stylegan_cifar10", "augment=null", cwd=tmp_path)
    assert r.returncode == 1 and "~augment" in r.stderr and "Traceback" not in r.stderr, r.stderr
