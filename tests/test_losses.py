"""Each loss against torch's own functions, and each GAN loss pushing the right way."""

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from genlab.losses import BCE, ELBO, LSGAN, Hinge, Minimax, RaLSGAN, RpGAN, Wasserstein, total_variation

GAN_LOSSES = [BCE, Minimax, Wasserstein, Hinge, LSGAN, RaLSGAN, RpGAN]


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, generator=g) * 2 + 0.5, torch.randn(64, generator=g) * 2 - 0.5  # real, fake


def test_gan_loss_values(logits):
    real, fake = logits
    ones, zeros = torch.ones_like(real), torch.zeros_like(real)
    bce = F.binary_cross_entropy_with_logits
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # noqa: E731
    close(BCE().d(real, fake), bce(real, ones) + bce(fake, zeros))
    close(BCE().g(fake), bce(fake, ones))  # non-saturating: -log D(G(z))
    close(Minimax().g(fake), -bce(fake, zeros))  # log(1 - D(G(z))), minimised
    close(Wasserstein().d(real, fake), fake.mean() - real.mean())
    close(Wasserstein().g(fake), -fake.mean())
    close(Hinge().d(real, fake), F.hinge_embedding_loss(real, -ones) + F.hinge_embedding_loss(-fake, -ones))
    close(Hinge().g(fake), -fake.mean())
    close(LSGAN().d(real, fake), 0.5 * F.mse_loss(real, ones) + 0.5 * F.mse_loss(fake, zeros))
    close(LSGAN().g(fake), 0.5 * F.mse_loss(fake, ones))
    close(RaLSGAN().d(real, fake), 0.5 * F.mse_loss(real - fake.mean(), ones) + 0.5 * F.mse_loss(fake - real.mean(), -ones))
    close(RaLSGAN().g(fake, real), 0.5 * F.mse_loss(fake - real.mean(), ones) + 0.5 * F.mse_loss(real - fake.mean(), -ones))
    close(RpGAN().d(real, fake), bce(real - fake, ones))  # -log sigmoid(D(real) - D(fake)), pair by pair
    close(RpGAN().g(fake, real), bce(fake - real, ones))


def test_elbo_terms_against_torch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 1, 6, 6, generator=g)
    logits, mu, logvar = torch.randn(5, 1, 6, 6, generator=g), torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    recon, kl = ELBO().terms(x, logits, mu, logvar)
    expected = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
    torch.testing.assert_close(recon, expected)
    torch.testing.assert_close(kl, kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(1))
    mse, _ = ELBO(recon="mse").terms(x, logits, mu, logvar)
    torch.testing.assert_close(mse, F.mse_loss(torch.sigmoid(logits), x, reduction="none").flatten(1).sum(1))


@pytest.mark.parametrize("loss_cls", GAN_LOSSES)
def test_each_gan_loss_pushes_the_right_way(loss_cls):
    """Fakes as free parameters and a linear critic that mildly prefers real images: one generator step must
    raise D(fake). From a critic that cannot tell them apart yet, one discriminator step must open a gap
    D(real) - D(fake) > 0. A sign flipped in either loss fails here."""
    torch.manual_seed(0)
    real = torch.randn(32, 16) + 1.0
    fake = torch.nn.Parameter(torch.randn(32, 16) - 1.0)
    critic = torch.nn.Linear(16, 1)
    loss = loss_cls()
    with torch.no_grad():
        critic.weight.fill_(0.02)  # D(real) is about +0.3, D(fake) about -0.3
        critic.bias.zero_()
    score = lambda x: critic(x).squeeze(1)  # noqa: E731
    before = score(fake).mean().item()
    g_loss = loss.g(score(fake), score(real).detach() if loss.needs_real else None)
    (grad,) = torch.autograd.grad(g_loss, fake)
    with torch.no_grad():
        assert score(fake - 0.1 * grad).mean().item() > before

    with torch.no_grad():
        critic.weight.zero_()
    d_loss = loss.d(score(real), score(fake.detach()))
    grads = torch.autograd.grad(d_loss, list(critic.parameters()))
    with torch.no_grad():
        for p, g in zip(critic.parameters(), grads):
            p -= 0.01 * g
        assert (score(real).mean() - score(fake).mean()).item() > 0


def test_total_variation_counts_the_steps_between_neighbours():
    x = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 0.5]]).view(1, 1, 2, 3)
    # across: |1-0| + |1-1| + |0-0| + |0.5-0| = 1.5; down: |0-0| + |0-1| + |0.5-1| = 1.5
    assert total_variation(x).tolist() == [3.0]
    flat, noisy = torch.full((1, 3, 8, 8), 0.4), torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert total_variation(flat).item() == 0.0 and total_variation(noisy).item() > 10
    assert total_variation(torch.cat([x, 2 * x])).tolist() == [3.0, 6.0]  # per image
