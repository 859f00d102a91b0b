"""A GAN of the user's own that subclasses genlab's: it builds its own networks and passes everything else
(the loss genlab builds from loss=..., n_critic, num_classes) on to genlab's GAN through ``**kwargs``."""

from torch import nn

from genlab.models import GAN


class TinyGAN(GAN):
    """Two small MLPs: G z -> hidden -> image (Tanh), D image -> hidden -> one logit."""

    def __init__(self, channels: int = 1, image_size: int = 28, z_dim: int = 32, hidden: int = 128, **kwargs):
        shape = (channels, image_size, image_size)
        pixels = channels * image_size * image_size
        generator = nn.Sequential(nn.Linear(z_dim, hidden), nn.ReLU(), nn.Linear(hidden, pixels), nn.Tanh(),
                                  nn.Unflatten(1, shape))
        generator.z_dim = z_dim  # what GAN reads to draw latents
        discriminator = nn.Sequential(nn.Flatten(), nn.Linear(pixels, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1),
                                      nn.Flatten(0))  # logits [B]
        super().__init__(generator, discriminator, **kwargs)
