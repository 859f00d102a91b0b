"""A StyleGAN2-style generator and discriminator for small images (Karras et al. 2020, "Analyzing and Improving the
Image Quality of StyleGAN"), sized for 28 to 64 pixels.

The generator maps z through an MLP to a style w, and draws the image from a learnt constant: at each resolution two
3x3 convolutions whose weights each style scales per input channel (modulation) and renormalises per output channel
(demodulation), run as one grouped convolution over the batch, with per-pixel noise; each resolution adds its RGB
output to the upsampled sum of the ones before (skip outputs). The discriminator is residual, with the minibatch
standard deviation as a feature before its last layers. Every weight is stored at unit variance and scaled by its
fan-in when used (equalized learning rate).

Left out against the paper: the low-pass (FIR) filters of the up- and downsampling (bilinear and average pooling
here). Path-length regularisation is the model's (genlab.models.StyleGAN, ``path_length``).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genlab.errors import GenlabError

GAIN = math.sqrt(2)  # leaky ReLU's gain, so that activations keep their scale


def levels_for(image_size: int) -> tuple[int, int]:
    """The smallest side (4 to 7) and the number of doublings from it to ``image_size``: 28 -> (7, 2), 32 -> (4, 3),
    64 -> (4, 4)."""
    start, doublings = image_size, 0
    while start > 7 and start % 2 == 0:
        start, doublings = start // 2, doublings + 1
    if not 4 <= start <= 7 or doublings < 1:
        raise GenlabError(f"StyleGAN draws images whose side halves to 4 to 7 pixels (28, 32, 64, 128, ...); got "
                          f"dataset.image_size={image_size}.")
    return start, doublings


def widths(doublings: int, width: int, max_width: int) -> list[int]:
    """Channels at each resolution from the smallest up: ``width`` at the full resolution, doubling towards the
    smallest, at most ``max_width``."""
    return [min(max_width, width * 2 ** (doublings - i)) for i in range(doublings + 1)]


class EqualLinear(nn.Module):
    """A linear layer with the equalized learning rate; ``lr_mul`` slows it (the mapping network's 0.01)."""

    def __init__(self, c_in: int, c_out: int, bias: float = 0.0, lr_mul: float = 1.0, activate: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(c_out, c_in).normal_() / lr_mul)
        self.bias = nn.Parameter(torch.full((c_out,), bias / lr_mul))
        self.scale, self.lr_mul, self.activate = lr_mul / math.sqrt(c_in), lr_mul, activate

    def forward(self, x: Tensor) -> Tensor:
        x = F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)
        return F.leaky_relu(x, 0.2) * GAIN if self.activate else x


class EqualConv(nn.Module):
    """A convolution with the equalized learning rate, optionally followed by 2x average pooling."""

    def __init__(self, c_in: int, c_out: int, kernel: int, bias: bool = True, down: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(c_out, c_in, kernel, kernel).normal_())
        self.bias = nn.Parameter(torch.zeros(c_out)) if bias else None
        self.scale, self.down = 1 / math.sqrt(c_in * kernel * kernel), down

    def forward(self, x: Tensor) -> Tensor:
        x = F.conv2d(x, self.weight * self.scale, self.bias, padding=self.weight.shape[-1] // 2)
        return F.avg_pool2d(x, 2) if self.down else x


class ModulatedConv(nn.Module):
    """A convolution whose weights a style w scales per input channel and, with ``demodulate``, renormalises per
    output channel to unit norm, so that inputs of unit variance give outputs of unit variance. ``up``: bilinear 2x
    upsampling first.

    Two ways to compute it, equal up to rounding (``fused``; None: as StyleGAN2-ADA chooses, fused outside
    training): fused, one grouped convolution with each image's own modulated weights; or not, the input scaled by
    the style, one plain convolution for the batch, and the output scaled by the demodulation coefficients, whose
    backward pass is the cheaper one."""

    def __init__(self, c_in: int, c_out: int, kernel: int, w_dim: int, demodulate: bool = True, up: bool = False,
                 fused: bool | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(c_out, c_in, kernel, kernel).normal_())
        self.affine = EqualLinear(w_dim, c_in, bias=1.0)  # styles start at 1: the plain convolution
        self.scale, self.demodulate, self.up, self.fused = 1 / math.sqrt(c_in * kernel * kernel), demodulate, up, fused

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        style = self.affine(w)  # [B, in]
        if self.up:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        fused = (not self.training) if self.fused is None else self.fused
        return self.grouped(x, style) if fused else self.scaled(x, style)

    def grouped(self, x: Tensor, style: Tensor) -> Tensor:
        b, c, h, wd = x.shape
        weight = self.weight[None] * self.scale * style[:, None, :, None, None]  # [B, out, in, k, k]
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.pow(2).sum((2, 3, 4), keepdim=True) + 1e-8)
        out = F.conv2d(x.reshape(1, b * c, h, wd), weight.reshape(-1, c, *weight.shape[3:]).to(x.dtype),
                       padding=self.weight.shape[-1] // 2, groups=b)
        return out.view(b, -1, h, wd)

    def scaled(self, x: Tensor, style: Tensor) -> Tensor:
        weight = self.weight * self.scale
        out = F.conv2d(x * style[:, :, None, None].to(x.dtype), weight.to(x.dtype), padding=self.weight.shape[-1] // 2)
        if not self.demodulate:
            return out
        energy = style.float().pow(2) @ weight.pow(2).sum((2, 3)).t()  # [B, out]: each output's weights' squared norm
        return out * torch.rsqrt(energy + 1e-8)[:, :, None, None].to(out.dtype)


class StyleLayer(nn.Module):
    """A modulated 3x3 convolution, per-pixel noise at a learnt strength, a bias and a leaky ReLU. The noise is
    fresh in training and fixed in eval mode, so that a latent always gives the same image."""

    def __init__(self, c_in: int, c_out: int, w_dim: int, size: int, up: bool = False):
        super().__init__()
        self.conv = ModulatedConv(c_in, c_out, 3, w_dim, up=up)
        self.strength = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.register_buffer("fixed_noise", torch.randn(1, 1, size, size, generator=torch.Generator().manual_seed(2 * size + up)))

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        x = self.conv(x, w)
        noise = torch.randn_like(x[:, :1]) if self.training else self.fixed_noise.to(x.dtype)
        return F.leaky_relu(x + self.strength * noise + self.bias.view(1, -1, 1, 1), 0.2) * GAIN


class ToRGB(nn.Module):
    """A modulated 1x1 convolution to the image's channels, not demodulated, with a bias."""

    def __init__(self, c_in: int, channels: int, w_dim: int):
        super().__init__()
        self.conv = ModulatedConv(c_in, channels, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        return self.conv(x, w) + self.bias.view(1, -1, 1, 1)


class Mapping(nn.Module):
    """z (and a class embedding), normalised, through ``layers`` leaky-ReLU layers at a hundredth of the learning
    rate: the style w."""

    def __init__(self, z_dim: int, w_dim: int, layers: int, num_classes: int):
        super().__init__()
        self.embed = nn.Embedding(num_classes, w_dim) if num_classes else None
        dims = [z_dim + (w_dim if num_classes else 0)] + [w_dim] * layers
        self.net = nn.Sequential(*[EqualLinear(a, b, lr_mul=0.01, activate=True) for a, b in zip(dims, dims[1:])])

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        z = z * torch.rsqrt(z.pow(2).mean(1, keepdim=True) + 1e-8)
        if self.embed is not None:
            c = self.embed(labels)
            z = torch.cat([z, c * torch.rsqrt(c.pow(2).mean(1, keepdim=True) + 1e-8)], 1)
        return self.net(z)


class StyleGANGenerator(nn.Module):
    """z [B, z_dim] (and labels [B]) -> images in [-1, 1]. ``width`` channels at the full resolution, doubling
    towards the smallest up to ``max_width``. In training, a share ``mixing`` of the images take their styles from
    two latents, switching at a random layer (style mixing regularisation). ``synthesis(ws)`` draws from styles
    [B, num_ws, w_dim] directly: truncation, style mixing and interpolation in W use it."""

    def __init__(self, channels: int = 3, image_size: int = 32, z_dim: int = 256, w_dim: int = 256,
                 mapping_layers: int = 4, width: int = 64, max_width: int = 256, num_classes: int = 0,
                 mixing: float = 0.9):
        super().__init__()
        start, doublings = levels_for(image_size)
        chans = widths(doublings, width, max_width)
        self.z_dim, self.num_classes, self.mixing = z_dim, num_classes, mixing
        self.mapping = Mapping(z_dim, w_dim, mapping_layers, num_classes)
        self.const = nn.Parameter(torch.empty(1, chans[0], start, start).normal_())
        self.layers, self.to_rgb = nn.ModuleList([StyleLayer(chans[0], chans[0], w_dim, start)]), nn.ModuleList()
        self.to_rgb.append(ToRGB(chans[0], channels, w_dim))
        for i in range(1, doublings + 1):
            size = start * 2 ** i
            self.layers.append(StyleLayer(chans[i - 1], chans[i], w_dim, size, up=True))
            self.layers.append(StyleLayer(chans[i], chans[i], w_dim, size))
            self.to_rgb.append(ToRGB(chans[i], channels, w_dim))
        self.num_ws = len(self.layers)

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        ws = self.mapping(z, labels)[:, None].expand(-1, self.num_ws, -1)
        if self.training and self.mixing > 0:
            other = self.mapping(torch.randn_like(z), labels)[:, None]
            cut = 1 + (torch.rand(len(z), 1, device=z.device) * (self.num_ws - 1)).long()  # the first layer of `other`
            mixed = torch.rand(len(z), 1, device=z.device) < self.mixing
            switch = (torch.arange(self.num_ws, device=z.device)[None] >= cut) & mixed  # [B, num_ws]
            ws = torch.where(switch[..., None], other, ws)
        return self.synthesis(ws)

    def synthesis(self, ws: Tensor) -> Tensor:
        x = self.layers[0](self.const.expand(ws.shape[0], -1, -1, -1).to(ws.dtype), ws[:, 0])
        rgb = self.to_rgb[0](x, ws[:, 0])
        for i in range(1, len(self.to_rgb)):
            x = self.layers[2 * i - 1](x, ws[:, 2 * i - 1])
            x = self.layers[2 * i](x, ws[:, 2 * i])
            rgb = F.interpolate(rgb, scale_factor=2.0, mode="bilinear", align_corners=False) + self.to_rgb[i](x, ws[:, 2 * i])
        return torch.tanh(rgb)


class DiscriminatorBlock(nn.Module):
    """Two 3x3 convolutions, the second halving the side, beside a 1x1 skip that halves it too; their sum over
    sqrt(2)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1, self.conv2 = EqualConv(c_in, c_in, 3), EqualConv(c_in, c_out, 3, down=True)
        self.skip = EqualConv(c_in, c_out, 1, bias=False, down=True)

    def forward(self, x: Tensor) -> Tensor:
        h = F.leaky_relu(self.conv1(x), 0.2) * GAIN
        h = F.leaky_relu(self.conv2(h), 0.2) * GAIN
        return (h + self.skip(x)) / math.sqrt(2)


def minibatch_std(x: Tensor, group: int) -> Tensor:
    """One more feature map: the standard deviation of the features across each group of ``group`` consecutive
    images (or fewer, dividing the batch), averaged over channels and pixels: how varied the batch is. Consecutive,
    so that data-parallel ranks whose slices are whole groups compute what one process does."""
    b, c, h, w = x.shape
    g = math.gcd(b, group)
    std = (x.float().view(-1, g, c, h, w).var(1, unbiased=False) + 1e-8).sqrt().mean((1, 2, 3))  # [B / g]
    return torch.cat([x, std.to(x.dtype).repeat_interleave(g).view(-1, 1, 1, 1).expand(b, 1, h, w)], 1)


class StyleGANDiscriminator(nn.Module):
    """Images in [-1, 1] (and labels) -> logits [B]. Residual blocks from ``width`` channels at the full resolution,
    doubling as the side halves, up to ``max_width``; at the smallest side the minibatch standard deviation, a 3x3
    convolution and two linear layers. Class-conditional by projection (Miyato & Koyama 2018). Each image's logit
    depends on its group of ``mbstd_group`` images (``per_sample`` is False: the GAN shows it real and fake
    images in separate passes)."""

    per_sample = False

    def __init__(self, channels: int = 3, image_size: int = 32, width: int = 64, max_width: int = 256,
                 num_classes: int = 0, mbstd_group: int = 4):
        super().__init__()
        start, doublings = levels_for(image_size)
        chans = widths(doublings, width, max_width)[::-1]  # full resolution first
        self.num_classes, self.group = num_classes, mbstd_group
        self.from_rgb = EqualConv(channels, chans[0], 1)
        self.blocks = nn.Sequential(*[DiscriminatorBlock(a, b) for a, b in zip(chans, chans[1:])])
        c = chans[-1]
        self.conv = EqualConv(c + 1, c, 3)
        self.fc = EqualLinear(c * start * start, c, activate=True)
        self.out = EqualLinear(c, 1)
        self.embed = nn.Embedding(num_classes, c) if num_classes else None

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        h = self.blocks(F.leaky_relu(self.from_rgb(x), 0.2) * GAIN)
        h = F.leaky_relu(self.conv(minibatch_std(h, self.group)), 0.2) * GAIN
        h = self.fc(h.flatten(1))
        out = self.out(h).squeeze(1)
        if self.embed is not None:
            out = out + (self.embed(labels) * h).sum(1) / math.sqrt(h.shape[1])
        return out
