"""The DCGAN of Radford et al. 2015, the architecture most reference implementations use: 4x4 transposed
convolutions doubling from 4x4 to the image side (64 for faces; any power of two from 16), batch norm and ReLU
in the generator, strided 4x4 convolutions with batch norm and LeakyReLU in the discriminator, weights drawn
from N(0, 0.02)."""

import math

from torch import Tensor, nn

from genlab.errors import GenlabError


def _levels(net: str, channels: int, image_size: int) -> int:
    """How many times the side doubles from 4: image_size = 4 * 2**levels."""
    if channels < 1:
        raise GenlabError(f"{net} needs at least one image channel; got channels={channels}.")
    levels = round(math.log2(max(image_size, 1) / 4))
    if image_size < 16 or 4 * 2**levels != image_size:
        raise GenlabError(f"{net} doubles the side from 4 to the image's, so image_size must be a power of two from "
                          f"16 (64 for the original); got {image_size}. Set dataset.image_size=64, or use model=dcgan "
                          "for 28x28 images.")
    return levels


def _init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class DCGAN64Generator(nn.Module):
    """z -> ConvT 4x4 to (w * 2**(L-1)) x 4 x 4, then L-1 ConvT 4x4 stride 2 halving the channels (BN, ReLU), then
    ConvT 4x4 stride 2 to C with Tanh; L = log2(image_size / 4)."""

    def __init__(self, channels: int = 3, image_size: int = 64, z_dim: int = 100, width: int = 64):
        super().__init__()
        levels = _levels("DCGAN64Generator", channels, image_size)
        self.z_dim = z_dim
        c = width * 2 ** (levels - 1)
        layers = [nn.ConvTranspose2d(z_dim, c, 4, 1, 0, bias=False), nn.BatchNorm2d(c), nn.ReLU(True)]
        for _ in range(levels - 1):
            layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU(True)]
            c //= 2
        layers += [nn.ConvTranspose2d(c, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        _init(self)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z[:, :, None, None])  # [B, C, s, s]


class DCGAN64Discriminator(nn.Module):
    """Conv 4x4 stride 2 to w (LeakyReLU 0.2), then L-1 convs doubling the channels (BN, LeakyReLU), then Conv 4x4
    on the 4x4 map to one logit."""

    def __init__(self, channels: int = 3, image_size: int = 64, width: int = 64):
        super().__init__()
        levels = _levels("DCGAN64Discriminator", channels, image_size)
        layers, c = [nn.Conv2d(channels, width, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)], width
        for _ in range(levels - 1):
            layers += [nn.Conv2d(c, 2 * c, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * c), nn.LeakyReLU(0.2, True)]
            c *= 2
        layers += [nn.Conv2d(c, 1, 4, 1, 0, bias=False), nn.Flatten()]
        self.net = nn.Sequential(*layers)
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(1)  # [B] logits
