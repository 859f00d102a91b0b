"""The DCGAN of the WiDS report, sized from the image: s/4 -> s/2 -> s with 5x5 kernels; class-conditional
with ``num_classes`` > 0 (the label one-hot beside z in the generator, a projection head in the discriminator)."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genlab.nets.dropout import Dropout
from genlab.nets.shapes import check_divisible


class DCGANGenerator(nn.Module):
    """z -> Linear to (4w x s/4 x s/4) + BN + LeakyReLU -> ConvT 5x5 to 2w, w, then C with Tanh. Conditional: the
    label, one-hot, joins z at the input (a learned embedding of the class, added by the first layer)."""

    def __init__(self, channels: int = 1, image_size: int = 28, z_dim: int = 100, width: int = 64,
                 num_classes: int = 0):
        super().__init__()
        check_divisible("DCGANGenerator", channels, image_size, 4)
        self.z_dim, self.num_classes = z_dim, num_classes
        self.start = (4 * width, image_size // 4, image_size // 4)
        n = self.start[0] * self.start[1] * self.start[2]
        self.project = nn.Sequential(nn.Linear(z_dim + num_classes, n, bias=False), nn.BatchNorm1d(n), nn.LeakyReLU(0.2))
        self.net = nn.Sequential(
            nn.ConvTranspose2d(4 * width, 2 * width, 5, stride=1, padding=2, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(2 * width, width, 5, stride=2, padding=2, output_padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(width, channels, 5, stride=2, padding=2, output_padding=1),
            nn.Tanh(),
        )

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        if self.num_classes:
            z = torch.cat([z, F.one_hot(labels, self.num_classes).to(z.dtype)], 1)
        return self.net(self.project(z).view(-1, *self.start))  # [B, C, s, s]


class DCGANDiscriminator(nn.Module):
    """Conv 5x5 stride 2 to w, 2w (LeakyReLU, Dropout) -> Linear to one logit. Conditional: plus the projection
    of the features on a learned vector of the label's class (Miyato & Koyama 2018)."""

    def __init__(self, channels: int = 1, image_size: int = 28, width: int = 64, dropout: float = 0.3,
                 num_classes: int = 0):
        super().__init__()
        check_divisible("DCGANDiscriminator", channels, image_size, 4)
        self.num_classes = num_classes
        features = 2 * width * (image_size // 4) ** 2
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 5, stride=2, padding=2),
            nn.LeakyReLU(0.2),
            Dropout(dropout),
            nn.Conv2d(width, 2 * width, 5, stride=2, padding=2),
            nn.LeakyReLU(0.2),
            Dropout(dropout),
            nn.Flatten(),
            nn.Linear(features, 1),
        )
        self.embed = nn.Embedding(num_classes, features) if num_classes else None
        if self.embed is not None:
            nn.init.normal_(self.embed.weight, std=features ** -0.5)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.score(self.features(x), labels)  # [B] logits

    def features(self, x: Tensor) -> Tensor:
        """The last convolution's activations, flattened: [B, 2w * (s/4)^2] (the VAE-GAN's measure of likeness)."""
        return self.net[:-1](x)

    def score(self, h: Tensor, labels: Tensor | None = None) -> Tensor:
        """The logits [B] from ``features``."""
        logits = self.net[-1](h).squeeze(1)
        if self.embed is None:
            return logits
        return logits + (self.embed(labels).to(h.dtype) * h).sum(1)
