"""The MLP GAN of seed report 1 (G: 100 -> 128 -> 256 -> 784; D: 784 -> 256 -> 128 -> 1)."""

import math

from torch import Tensor, nn

from genlab.nets.dropout import Dropout
from genlab.nets.shapes import check_divisible


class MLPGenerator(nn.Module):
    """z -> hidden layers (ReLU) -> C*H*W pixels (Tanh, in [-1, 1])."""

    def __init__(self, channels: int = 1, image_size: int = 28, z_dim: int = 100, hidden=(128, 256)):
        super().__init__()
        check_divisible("MLPGenerator", channels, image_size, 1)
        self.z_dim = z_dim
        self.image_shape = (channels, image_size, image_size)
        layers, width = [], z_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        layers += [nn.Linear(width, math.prod(self.image_shape)), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z).view(-1, *self.image_shape)  # [B, C, H, W]


class MLPDiscriminator(nn.Module):
    """C*H*W pixels -> hidden layers (LeakyReLU 0.2, then Dropout) -> one logit."""

    def __init__(self, channels: int = 1, image_size: int = 28, hidden=(256, 128), dropout: float = 0.0):
        super().__init__()
        check_divisible("MLPDiscriminator", channels, image_size, 1)
        layers, width = [nn.Flatten()], channels * image_size * image_size
        for h in hidden:
            layers += [nn.Linear(width, h), nn.LeakyReLU(0.2, inplace=True)]
            layers += [Dropout(dropout)] if dropout else []
            width = h
        layers += [nn.Linear(width, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(1)  # [B] logits
