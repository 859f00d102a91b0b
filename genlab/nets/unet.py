"""The UNet a diffusion or flow model denoises with: residual blocks with a time (and class) embedding,
GroupNorm and SiLU, self-attention only at the lowest resolution(s)."""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genlab.errors import GenlabError
from genlab.nets.shapes import check_divisible


def default_mults(image_size: int) -> tuple[int, ...]:
    """Halve while the side is even and above 8, at most three times: 28 -> 14 -> 7, 32 -> 16 -> 8,
    64 -> 32 -> 16 -> 8; one channel multiplier per resolution."""
    levels, size = 1, image_size
    while size % 2 == 0 and size > 8 and levels < 4:
        size //= 2
        levels += 1
    return (1, 2, 2, 2)[:levels]


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal features of times ``t`` [B] (floats, any scale): [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


def groups(channels: int) -> int:
    """GroupNorm groups of at least 4 channels, at most 32 groups (a group of one channel would be instance
    norm, which erases any per-channel signal such as the time embedding)."""
    return math.gcd(channels, max(1, min(32, channels // 4)))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice; between them the embedding scales and shifts the normalised features
    (Nichol & Dhariwal 2021)."""

    def __init__(self, c_in: int, c_out: int, emb: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups(c_in), c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb, 2 * c_out)
        self.norm2, self.conv2 = nn.GroupNorm(groups(c_out), c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(e))[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(self.drop(F.silu(self.norm2(h) * (1 + scale) + shift)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, with a residual connection."""

    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        a = F.scaled_dot_product_attention(q, k, v)  # [B, heads, HW, c/heads]
        return x + self.out(a.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """x_t [B, C, s, s], t [B] (any scale: diffusion steps or flow times), labels [B] -> a tensor like x_t.

    ``width`` channels at full resolution, times ``mults[i]`` at the i-th (each halving the side; default:
    sized from ``image_size``), ``blocks`` residual blocks per resolution on the way down (one more on the
    way up), attention at the lowest ``attention_levels`` resolutions. With ``num_classes`` > 0 a class
    embedding is added to the time embedding; label ``num_classes`` means "no class" (for
    classifier-free guidance). With ``step_input``, so is an embedding of a step size ``step`` [B] (in the
    time's units; 0 when not given): what a shortcut model's network is told of the jump it makes."""

    def __init__(self, channels: int = 1, image_size: int = 28, width: int = 32, mults: list[int] | None = None,
                 blocks: int = 1, attention_levels: int = 1, heads: int = 4, num_classes: int = 0, dropout: float = 0.0,
                 step_input: bool = False):
        super().__init__()
        mults = tuple(mults) if mults else default_mults(image_size)
        check_divisible("UNet", channels, image_size, 2 ** (len(mults) - 1))
        if width % heads or width < 8:
            raise GenlabError(f"model.unet.width must be at least 8 and a multiple of heads ({heads}); got {width}.")
        self.num_classes, self.image_shape = num_classes, (channels, image_size, image_size)
        emb = 4 * width
        self.time = nn.Sequential(nn.Linear(width, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.classes = nn.Embedding(num_classes + 1, emb) if num_classes else None
        self.steps = nn.Sequential(nn.Linear(width, emb), nn.SiLU(), nn.Linear(emb, emb)) if step_input else None
        self.step_input = step_input
        self.width = width
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        chans = [width * m for m in mults]
        attend = [i >= len(mults) - attention_levels for i in range(len(mults))]
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        skips, c = [width], width
        for i, c_out in enumerate(chans):
            level = nn.ModuleList()
            for _ in range(blocks):
                level.append(Level(c, c_out, emb, attend[i], heads, dropout))
                c = c_out
                skips.append(c)
            self.down.append(level)
            if i < len(chans) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid = nn.ModuleList([Level(c, c, emb, True, heads, dropout), Level(c, c, emb, False, heads, dropout)])
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, c_out in reversed(list(enumerate(chans))):
            level = nn.ModuleList()
            for _ in range(blocks + 1):
                level.append(Level(c + skips.pop(), c_out, emb, attend[i], heads, dropout))
                c = c_out
            self.up.append(level)
            if i > 0:  # to the next level's channels before the larger side makes the convolution dear
                self.upsample.append(nn.Conv2d(c, chans[i - 1], 3, padding=1))
                c = chans[i - 1]
        self.head = nn.Sequential(nn.GroupNorm(groups(c), c), nn.SiLU(), nn.Conv2d(c, channels, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None, step: Tensor | None = None) -> Tensor:
        e = self.time(timestep_embedding(t, self.width).to(x.dtype))
        if self.steps is not None:
            e = e + self.steps(timestep_embedding(torch.zeros_like(t) if step is None else step, self.width).to(x.dtype))
        if self.classes is not None:
            if labels is None:
                labels = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            e = e + self.classes(labels)
        h = self.stem(x)
        hs = [h]
        for i, level in enumerate(self.down):
            for block in level:
                h = block(h, e)
                hs.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
                hs.append(h)
        for block in self.mid:
            h = block(h, e)
        for i, level in enumerate(self.up):
            for block in level:
                h = block(torch.cat([h, hs.pop()], dim=1), e)
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.head(h)


class Level(nn.Module):
    """A residual block, followed by attention where the resolution is low enough."""

    def __init__(self, c_in: int, c_out: int, emb: int, attention: bool, heads: int, dropout: float):
        super().__init__()
        self.block = ResBlock(c_in, c_out, emb, dropout)
        self.attention = Attention(c_out, heads) if attention else None

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        x = self.block(x, e)
        return self.attention(x) if self.attention is not None else x
