"""A loss from a user's own module, plugged in by a loss config's _target_."""

from genlab.losses import GANLoss


class Softplus(GANLoss):
    """The non-saturating BCE pair written out by hand."""

    def d(self, real, fake):
        return (-real).exp().log1p().mean() + fake.exp().log1p().mean()

    def g(self, fake, real=None):
        return (-fake).exp().log1p().mean()
