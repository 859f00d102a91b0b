"""DRAEM (Zavrtanik et al., ICCV 2021, "DRAEM - A discriminatively trained reconstruction embedding for surface
anomaly detection"): trained on good images only, each shown with a synthetic anomaly pasted in a Perlin-noise
mask; one network learns to remove it (the reconstruction), a second to find it from the image beside that
reconstruction (the segmentation). The segmentation is the anomaly map; its pooled maximum the image's score.

DRAEM's anomaly textures come from the DTD texture dataset, which genlab does not have. Here each anomalous
image gets, with equal chance, either another image of its batch (flipped, turned by a multiple of 90 degrees,
with gamma, contrast and brightness jitter, inverted with chance 0.3), or a smooth two-colour Perlin texture at
a finer scale than the masks.
"""

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genlab.errors import GenlabError
from genlab.losses import gaussian_blur
from genlab.models.base import GenerativeModel


def fade(t: Tensor) -> Tensor:
    """Perlin's smoothstep 6t^5 - 15t^4 + 10t^3."""
    return t**3 * (t * (6 * t - 15) + 10)


def perlin_noise(n: int, height: int, width: int, max_log2: int = 5, device=None) -> Tensor:
    """``n`` draws of 2D Perlin noise [n, H, W], in [-1, 1]: random unit gradients on a lattice of 2^ky by 2^kx
    cells over the image, ky and kx drawn from 0..``max_log2`` for each draw on its own (DRAEM: 0..5), blended
    with Perlin's fade. Drawn from torch's generator of ``device``."""
    k = torch.randint(0, max_log2 + 1, (n, 2), device=device)
    res = (2**k).float()  # cells along y and x, [n, 2]
    top = 2**max_log2 + 1  # lattice points along a side at the finest scale
    angle = torch.rand(n, top, top, device=device) * (2 * math.pi)
    grads = torch.stack([angle.sin(), angle.cos()], -1)  # [n, top, top, (y, x)]
    uy = torch.arange(height, device=device)[None] * res[:, :1] / height  # lattice coordinates [n, H]
    ux = torch.arange(width, device=device)[None] * res[:, 1:] / width  # [n, W]
    iy, ix = uy.long(), ux.long()
    fy, fx = uy - iy, ux - ix
    b = torch.arange(n, device=device)[:, None, None]

    def corner(dy: int, dx: int) -> Tensor:  # the gradient of corner (dy, dx) dotted with the offset from it
        g = grads[b, (iy + dy)[:, :, None], (ix + dx)[:, None, :]]  # [n, H, W, 2]
        return g[..., 0] * (fy - dy)[:, :, None] + g[..., 1] * (fx - dx)[:, None, :]

    wy, wx = fade(fy)[:, :, None], fade(fx)[:, None, :]
    top_row = torch.lerp(corner(0, 0), corner(0, 1), wx)
    bottom_row = torch.lerp(corner(1, 0), corner(1, 1), wx)
    return math.sqrt(2) * torch.lerp(top_row, bottom_row, wy)


def perlin_masks(n: int, height: int, width: int, max_log2: int = 5, threshold: float = 0.5, device=None) -> Tensor:
    """DRAEM's anomaly masks: Perlin noise above ``threshold``, [n, 1, H, W] of 0.0 and 1.0."""
    return (perlin_noise(n, height, width, max_log2, device) > threshold).float()[:, None]


def crack_masks(n: int, height: int, width: int, device=None) -> Tensor:
    """Thin, winding lines, as cracks and frays are: [n, 1, H, W] of 0.0 and 1.0. Each a walk of steps of one pixel
    from a random point of the middle half, turning by a little at each step, as long as a third to the whole of the
    image's side, one or two pixels wide."""
    side = min(height, width)
    steps = 2 * side
    start = (torch.rand(n, 1, 2, device=device) * 0.5 + 0.25) * torch.tensor([height, width], device=device)
    turn = torch.randn(n, steps, device=device).mul(0.25).cumsum(1) + torch.rand(n, 1, device=device) * (2 * math.pi)
    path = start + torch.stack([turn.sin(), turn.cos()], -1).cumsum(1)  # [n, steps, 2]
    length = (torch.rand(n, 1, device=device) * (2 / 3) + 1 / 3) * side
    inside = (torch.arange(steps, device=device)[None] < length) & (path[..., 0] >= 0) & (path[..., 0] < height) \
        & (path[..., 1] >= 0) & (path[..., 1] < width)
    flat = path[..., 0].long().clamp(0, height - 1) * width + path[..., 1].long().clamp(0, width - 1)
    m = torch.zeros(n, height * width, device=device).scatter_add_(1, flat, inside.float()).clamp(max=1)
    m = m.view(n, 1, height, width)
    wide = torch.rand(n, 1, 1, 1, device=device) < 0.5  # two pixels wide: grown by one pixel up and to the left
    return torch.where(wide, F.max_pool2d(F.pad(m, (0, 1, 0, 1)), 2, 1), m)


def hole_masks(n: int, height: int, width: int, device=None) -> Tensor:
    """Small round holes, as blowholes are: one to three discs of radius 1.5 to side/12 pixels, [n, 1, H, W]."""
    k = 3
    centre = torch.rand(n, k, 2, device=device) * torch.tensor([height, width], device=device)
    radius = 1.5 + torch.rand(n, k, device=device) * max(0.0, min(height, width) / 12 - 1.5)
    used = torch.arange(k, device=device)[None] < torch.randint(1, k + 1, (n, 1), device=device)
    yy = torch.arange(height, device=device).view(1, 1, -1, 1) + 0.5
    xx = torch.arange(width, device=device).view(1, 1, 1, -1) + 0.5
    d2 = (yy - centre[..., 0, None, None]) ** 2 + (xx - centre[..., 1, None, None]) ** 2  # [n, k, H, W]
    return ((d2 < radius[..., None, None] ** 2) & used[..., None, None]).any(1, keepdim=True).float()


def band_masks(n: int, height: int, width: int, device=None) -> Tensor:
    """Bands along an edge, as an unevenly ground or coated surface is: [n, 1, H, W] of 0.0 and 1.0. Each covers
    the image from one edge (drawn from the four; top or bottom for an image that is not square) to a wavy line
    a tenth to half of the image away, waving by up to a twentieth of the side."""
    depth = (torch.rand(n, 1, 1, device=device) * 0.4 + 0.1) * height
    wave = perlin_noise(n, 1, width, 2, device) * (0.05 * height)  # [n, 1, W]
    rows = torch.arange(height, device=device).view(1, -1, 1) + 0.5
    m = (rows < depth + wave).float()[:, None]  # from the top edge
    if height != width:
        return torch.where(torch.rand(n, 1, 1, 1, device=device) < 0.5, m, m.flip(-2))
    return quarter_turns(m, torch.randint(0, 4, (n,), device=device))


def quarter_turns(x: Tensor, turns: Tensor) -> Tensor:
    """Each square image of ``x`` [B, C, H, H] turned by its own multiple of 90 degrees, ``turns`` [B] in 0..3."""
    return torch.stack([x.rot90(k, (-2, -1)) for k in range(4)])[turns, torch.arange(len(x), device=x.device)]


def textures(x: Tensor, max_log2: int) -> Tensor:
    """An anomaly texture [B, C, H, W] in [0, 1] for each image of ``x``: another image of the batch, jittered,
    or a smooth two-colour Perlin texture (cells up to 2^``max_log2`` a side), each with chance 1/2."""
    b, c, h, w = x.shape
    dev = x.device
    t = x[torch.randperm(b, device=dev)].float()
    t = torch.where(torch.rand(b, 1, 1, 1, device=dev) < 0.5, t.flip(-1), t)
    if h == w:  # a quarter turn keeps the shape of a square image only
        t = quarter_turns(t, torch.randint(0, 4, (b,), device=dev))
    gamma = torch.empty(b, 1, 1, 1, device=dev).uniform_(math.log(0.5), math.log(2.0)).exp()
    contrast = torch.empty(b, 1, 1, 1, device=dev).uniform_(0.5, 1.5)
    brightness = torch.empty(b, 1, 1, 1, device=dev).uniform_(-0.2, 0.2)
    t = t.clamp(0, 1) ** gamma
    mean = t.mean((1, 2, 3), keepdim=True)
    t = ((t - mean) * contrast + mean + brightness).clamp(0, 1)
    t = torch.where(torch.rand(b, 1, 1, 1, device=dev) < 0.3, 1 - t, t)
    pattern = perlin_noise(b, h, w, max_log2, dev)[:, None] * 0.5 + 0.5  # [B, 1, H, W], about [0, 1]
    lo, hi = torch.rand(b, c, 1, 1, device=dev), torch.rand(b, c, 1, 1, device=dev)
    noise = (lo + (hi - lo) * pattern).clamp(0, 1)
    return torch.where(torch.rand(b, 1, 1, 1, device=dev) < 0.5, t, noise)


# the anomalies' shapes: each set's shares of each kind of mask, Perlin's blobs first
MASKS = {"perlin": {"perlin": 1.0},
         "defects": {"perlin": 0.5, "crack": 0.25, "hole": 0.25},
         "surface": {"perlin": 0.4, "crack": 0.2, "hole": 0.2, "band": 0.2}}
MASK_KINDS = {"crack": crack_masks, "hole": hole_masks, "band": band_masks}


def synthetic_anomalies(x: Tensor, p_anomaly: float = 0.5, max_log2: int = 5,
                        texture_log2: int | None = None, masks: str = "perlin") -> tuple[Tensor, Tensor]:
    """DRAEM's training images: (x with an anomaly pasted in a mask, the mask [B, 1, H, W] of 0 and 1).
    With chance ``p_anomaly`` an image gets one: inside the mask, the texture (genlab.models.draem.textures) at
    opacity 1 - beta over the image, beta ~ U(0, 0.8) as in DRAEM; outside it, and in an image without one, x is
    untouched. The masks' shapes are drawn with ``MASKS[masks]``'s shares: ``perlin`` DRAEM's Perlin blobs alone;
    ``defects`` half blobs, a quarter thin winding lines (cracks), a quarter small discs (holes); ``surface``
    those and bands along an edge (uneven finish). All drawn on x's device from torch's generator, vectorised
    over the batch."""
    b, _, h, w = x.shape
    m = perlin_masks(b, h, w, max_log2, device=x.device)  # every set's first kind
    kinds = list(MASKS[masks].items())
    if len(kinds) > 1:
        kind = torch.rand(b, 1, 1, 1, device=x.device)
        # each later kind takes the images whose draw lies past the shares before it
        for (name, _), before in zip(kinds[1:], itertools.accumulate(share for _, share in kinds)):
            m = torch.where(kind < before, m, MASK_KINDS[name](b, h, w, x.device))
    m = m * (torch.rand(b, 1, 1, 1, device=x.device) < p_anomaly)
    beta = torch.rand(b, 1, 1, 1, device=x.device) * 0.8
    t = textures(x, max_log2 + 1 if texture_log2 is None else texture_log2)
    return torch.where(m > 0, (1 - beta) * t + beta * x, x), m


def ssim(a: Tensor, b: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """The structural similarity of images ``a`` and ``b`` in [0, 1] [B, C, H, W], per image [B]: local means,
    variances and covariance under a ``window``-wide Gaussian (zero-padded), averaged over pixels and channels.
    1 for identical images."""
    c1, c2 = 0.01**2, 0.03**2

    def blur(t: Tensor) -> Tensor:
        return gaussian_blur(t, sigma, window // 2)

    a, b = a.float(), b.float()
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


def focal_loss(logits: Tensor, target: Tensor, gamma: float = 2.0) -> Tensor:
    """The focal loss (Lin et al. 2017) of class logits [B, K, H, W] against classes [B, H, W], averaged over
    pixels: cross-entropy weighted by (1 - p_true)^gamma, so that pixels already right count little."""
    logp = F.log_softmax(logits.float(), 1).gather(1, target[:, None].long())[:, 0]
    return (-((1 - logp.exp()) ** gamma) * logp).mean()


def pooled_max(amap: Tensor, pool: int) -> Tensor:
    """DRAEM's image score: the largest mean of anomaly map ``amap`` [B, 1, H, W] over a ``pool``-wide square, [B]."""
    return F.avg_pool2d(amap, pool, stride=1, padding=pool // 2).amax((1, 2, 3))


def pool_size(image_size: int) -> int:
    """DRAEM's 21-pixel window at 256, scaled with the side and odd: 11 at 128, 5 at 64, 3 at 32."""
    return max(1, 2 * round((image_size / 12 - 1) / 2) + 1)


class DRAEM(GenerativeModel):
    """DRAEM: ``reconstructive`` (x -> reconstruction logits, no skips: genlab.nets.DRAEMReconstructive) learns to
    turn a synthetic anomaly back into the good image (squared error plus SSIM loss), ``discriminative`` ([x,
    reconstruction] -> 2-class logits per pixel, a UNet) to find the anomaly's mask (focal loss, ``gamma``). One
    Adam over both, as in DRAEM.

    ``p_anomaly``: the share of training images given an anomaly (DRAEM's 0.5). ``max_scale``: the Perlin masks'
    coarsest-to-finest lattice, 2^0 .. 2^max_scale cells a side (DRAEM's 5 at 256 pixels), capped so that a cell
    is at least 8 pixels. ``pool``: the image score's window (None: DRAEM's 21 at 256, scaled with the side).
    ``smooth``: the standard deviation, in pixels, of a Gaussian blur of the anomaly map (0: none, as DRAEM).
    ``masks``: the anomalies' shapes, ``perlin`` (DRAEM's blobs), ``defects`` (blobs, cracks and holes: the
    shapes surface defects take) or ``surface`` (those and bands along an edge: uneven finish).

    Scores: its own ``segmentation`` (default), and genlab's reconstruction scores (mse, mse_blur) on
    ``reconstruct``. It draws no images: ``genlab sample`` refuses it.
    """

    scores = ("segmentation",)
    default_score = "segmentation"
    generates = False  # an anomaly detector: no sample grids, and genlab sample refuses it

    def __init__(self, reconstructive: nn.Module, discriminative: nn.Module, p_anomaly: float = 0.5,
                 max_scale: int = 5, pool: int | None = None, smooth: float = 0.0, gamma: float = 2.0,
                 masks: str = "perlin"):
        super().__init__()
        shapes = getattr(reconstructive, "image_shape", None), getattr(discriminative, "image_shape", None)
        if shapes[0] is None or shapes[0] != shapes[1]:
            raise GenlabError(f"model.reconstructive takes {shapes[0]} images and model.discriminative {shapes[1]} "
                              "(their image_shape): give both the same channels and image_size.")
        if not 0 <= p_anomaly <= 1:
            raise GenlabError(f"model.p_anomaly is a probability; got {p_anomaly}.")
        if pool is not None and (pool < 1 or pool % 2 == 0):
            raise GenlabError(f"model.pool must be an odd number of pixels; got {pool}.")
        if smooth < 0:
            raise GenlabError(f"model.smooth is a standard deviation in pixels, 0 or more; got {smooth}.")
        if masks not in MASKS:
            raise GenlabError(f"model.masks={masks} is not one of {', '.join(MASKS)}.")
        self.masks = masks
        self.reconstructive, self.discriminative = reconstructive, discriminative
        self.image_shape = shapes[0]
        side = min(self.image_shape[1:])
        self.max_log2 = max(0, min(max_scale, int(math.log2(side)) - 3))  # cells of 8 pixels or more
        self.p_anomaly, self.gamma, self.smooth = p_anomaly, gamma, smooth
        self.pool = pool or pool_size(side)

    def optimizer_groups(self):
        return {"draem": self.parameters()}

    def training_step(self, batch, ctx) -> dict[str, Tensor]:
        x = batch.x.float()
        x_aug, m = synthetic_anomalies(x, self.p_anomaly, self.max_log2, masks=self.masks)  # for the whole batch
        out = {}
        for x, x_aug, m in ctx.chunks(x, x_aug, m):
            with ctx.autocast():
                rec = torch.sigmoid(self.reconstructive(x_aug).float())
                logits = self.discriminative(torch.cat([x_aug, rec], 1))
            recon = F.mse_loss(rec, x)
            ssim_loss = 1 - ssim(rec, x).mean()
            focal = focal_loss(logits, m[:, 0], self.gamma)
            loss = recon + ssim_loss + focal
            ctx.backward(loss, "draem")
            ctx.tally(out, loss=loss, recon=recon, ssim=ssim_loss, focal=focal)
        ctx.step("draem")
        return out

    def reconstruct(self, x: Tensor) -> Tensor:
        """The reconstructive network's image of ``x``, in [0, 1]."""
        return torch.sigmoid(self.reconstructive(x).float())

    def anomaly_map(self, x: Tensor, score: str | None = None) -> Tensor:
        """How anomalous each pixel of ``x`` looks, [B, 1, H, W]: the discriminative network's probability of
        "anomalous" in [0, 1] (``segmentation``), or genlab's score ``score``'s per-pixel form."""
        if score not in (None, "segmentation"):
            return self._score(score).map(self, x)
        x = x.float()
        logits = self.discriminative(torch.cat([x, self.reconstruct(x)], 1))
        amap = F.softmax(logits.float(), 1)[:, 1:]
        if self.smooth:  # border pixels repeated: a blur that keeps the border's level
            amap = gaussian_blur(amap, self.smooth, math.ceil(3 * self.smooth), edge="replicate")
        return amap

    def anomaly_score(self, x: Tensor, score: str | None = None) -> Tensor:
        """Per image [B]: the anomaly map's largest mean over a ``pool``-wide window (``segmentation``), or
        genlab's score ``score``."""
        if score not in (None, "segmentation"):
            return super().anomaly_score(x, score)
        return pooled_max(self.anomaly_map(x), self.pool)

    def score_and_map(self, x: Tensor, score: str | None = None) -> tuple[Tensor, Tensor]:
        """``anomaly_score`` and ``anomaly_map`` of ``x`` from one pass of the networks."""
        if score not in (None, "segmentation"):
            return self._score(score).score_and_map(self, x)
        amap = self.anomaly_map(x)
        return pooled_max(amap, self.pool), amap

    def latent(self, n, generator=None):
        raise GenlabError(f"{type(self).__name__} draws no images: it is an anomaly detector. Score images with "
                          "genlab evaluate ckpt=RUN instead of genlab sample.")
