"""DRAEM's two networks (Zavrtanik et al., ICCV 2021): an encoder-decoder without skip connections, which
reconstructs an image and cannot copy an anomaly through, and a UNet with them, which segments the anomalies
of an image shown beside its reconstruction. Both: two 3x3 conv-BatchNorm-ReLU layers per resolution, max
pooling down, bilinear upsampling and a conv up; channels ``width`` times 1, 2, 4, 8, 8, ... per resolution."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genlab.errors import GenlabError


def halvings(image_size: int, smallest: int, most: int) -> int:
    """How often a side of ``image_size`` halves: while it is even and above ``smallest``, at most ``most`` times
    (128 -> 8 and 256 -> 16 for the autoencoder: DRAEM's four; 28 -> 14 -> 7)."""
    n = 0
    while image_size % 2 == 0 and image_size > smallest and n < most:
        image_size //= 2
        n += 1
    return n


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class EncoderDecoder(nn.Module):
    """[B, c_in, s, s] -> [B, c_out, s, s] through ``levels`` halvings; with ``skips`` a UNet (each level's
    features joined to the decoder's at that level), without them every pixel passes the bottleneck."""

    def __init__(self, c_in: int, c_out: int, width: int, levels: int, skips: bool):
        super().__init__()
        if width < 1:
            raise GenlabError(f"a DRAEM network's width must be at least 1; got {width}.")
        self.skips = skips
        chans = [width * min(2**i, 8) for i in range(levels + 1)]
        self.down = nn.ModuleList(conv_block(a, b) for a, b in zip([c_in, *chans], chans))
        self.upconv = nn.ModuleList(nn.Sequential(nn.Conv2d(chans[i + 1], chans[i], 3, padding=1),
                                                  nn.BatchNorm2d(chans[i]), nn.ReLU(inplace=True))
                                    for i in range(levels))
        self.up = nn.ModuleList(conv_block(chans[i] * (2 if skips else 1), chans[i]) for i in range(levels))
        self.head = nn.Conv2d(chans[0], c_out, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        hs = []
        for i, block in enumerate(self.down):
            x = block(F.max_pool2d(x, 2) if i else x)
            hs.append(x)
        hs.pop()
        for i in reversed(range(len(self.up))):
            x = self.upconv[i](F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False))
            skip = hs.pop()
            x = self.up[i](torch.cat([x, skip], 1) if self.skips else x)
        return self.head(x)


class DRAEMReconstructive(EncoderDecoder):
    """x [B, C, s, s] in [0, 1] -> reconstruction logits [B, C, s, s] (their sigmoid: the image). No skip
    connections: DRAEM's reconstructive network. Halves the side up to four times, down to 8 or above."""

    def __init__(self, channels: int = 1, image_size: int = 128, width: int = 32):
        if channels < 1:
            raise GenlabError(f"DRAEMReconstructive needs at least one image channel; got channels={channels}.")
        super().__init__(channels, channels, width, halvings(image_size, 8, 4), skips=False)
        self.image_shape = (channels, image_size, image_size)


class DRAEMDiscriminative(EncoderDecoder):
    """[image, its reconstruction] [B, 2C, s, s] -> anomaly logits [B, 2, s, s] (class 1: anomalous). A UNet:
    DRAEM's discriminative network. Halves the side up to five times, down to 4 or above."""

    def __init__(self, channels: int = 1, image_size: int = 128, width: int = 16):
        if channels < 1:
            raise GenlabError(f"DRAEMDiscriminative needs at least one image channel; got channels={channels}.")
        super().__init__(2 * channels, 2, width, halvings(image_size, 4, 5), skips=True)
        self.image_shape = (channels, image_size, image_size)
