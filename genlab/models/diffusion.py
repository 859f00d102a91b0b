"""Diffusion (DDPM, sampled with DDIM or ancestrally) and flow matching on one UNet, unconditional or
class-conditional with classifier-free guidance.

Both learn to undo noise: the network sees a noisy image x_t and its time t and predicts what was added.
They differ in the path from image to noise. Sampling walks it back with a sampler (genlab.samplers), which asks
the model for its path's times and coefficients, its predictions of the image and the noise, and (flow) its
velocity. Images cross the network in [-1, 1].
"""

import functools
import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad

from genlab.errors import GenlabError
from genlab.models.base import GenerativeModel
from genlab.samplers import Sampler, make_sampler


class Denoiser(GenerativeModel):
    """What DDPM and flow matching share: the UNet, its optimizer, class conditioning with labels dropped at
    rate ``p_uncond`` in training (label ``num_classes`` means "no class"), classifier-free guidance in one
    batched forward (``guidance``: the weight sampling uses unless told otherwise), gradient clipping at
    ``clip``, sampling with any sampler that fits (``walk``), and what the ``denoise`` anomaly score needs."""

    default_score = "denoise"

    def __init__(self, unet: nn.Module, num_classes: int = 0, p_uncond: float = 0.1, clip: float | None = 1.0,
                 guidance: float = 1.0):
        super().__init__()
        if getattr(unet, "num_classes", num_classes) != num_classes:
            raise GenlabError(f"model.num_classes={num_classes} but the UNet has num_classes={unet.num_classes}; "
                              "set both (the model config passes ${..num_classes} to the UNet).")
        if not 0 <= p_uncond < 1:
            raise GenlabError(f"model.p_uncond must be in [0, 1); got {p_uncond}.")
        self.unet, self.num_classes, self.p_uncond, self.clip = unet, num_classes, p_uncond, clip
        self.guidance = guidance if num_classes else 1.0

    def optimizer_groups(self):
        return {"unet": self.unet.parameters()}

    def latent(self, n, generator=None):
        return torch.randn(n, *self.unet.image_shape, generator=generator)

    def train_labels(self, y: Tensor) -> Tensor | None:
        if not self.num_classes:
            return None
        drop = torch.rand(y.shape, device=y.device) < self.p_uncond
        return y.masked_fill(drop, self.num_classes)

    def predict(self, x: Tensor, t: Tensor, labels: Tensor | None, guidance: float, step: Tensor | None = None
                ) -> Tensor:
        """The network's output (fp32) at x [B, ...] and network times t [B] (and step sizes, for a network that
        takes them); with labels and guidance w != 1, uncond + w * (cond - uncond), both from one forward over
        the doubled batch."""
        extra = () if step is None else (step,)
        if labels is None or guidance == 1.0:
            return self.unet(x, t, labels, *extra).float()
        null = torch.full_like(labels, self.num_classes)
        doubled = (torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]), *(torch.cat([s, s]) for s in extra))
        cond, uncond = self.unet(*doubled).float().chunk(2)
        return uncond + guidance * (cond - uncond)

    def step_unet(self, ctx) -> None:
        """The UNet's update, once its gradients are in (from each micro-batch: ctx.chunks)."""
        if self.clip:
            ctx.clip("unet", self.clip)
        ctx.step("unet")

    def walk(self, z: Tensor, labels, sampler, steps: int, eta: float | None, guidance: float | None) -> Tensor:
        """Images in [0, 1] from noise ``z``: the sampler ``sampler`` names (genlab.samplers.make_sampler) walks
        this model's path in ``steps`` steps; ``eta`` goes to the sampler (DDIM's), the guidance weight is the
        model's own when None."""
        if steps < 1:
            raise GenlabError(f"steps must be at least 1; got {steps}.")
        if guidance is not None and guidance != 1.0 and not self.num_classes:
            raise GenlabError("guidance needs a class-conditional model (model.num_classes > 0).")
        chosen = make_sampler(sampler, **({} if eta is None else {"eta": eta}))
        chosen.check(self)
        x = chosen(self, z, steps, labels, self.guidance if guidance is None else guidance)
        return (x.clamp(-1, 1) + 1) / 2

    def denoise_errors(self, x: Tensor, times, seed: int = 0, per_pixel: bool = False) -> Tensor:
        """The mean squared error of the unconditional prediction for images ``x`` in [0, 1], noised to each
        fraction of the path in ``times`` with noise drawn from ``seed``: [len(times), B], or with ``per_pixel``
        each pixel's, averaged over the channels: [len(times), B, 1, H, W]. The ``denoise`` anomaly score
        (genlab.scores.Denoise) averages it over heavy noise levels."""
        g = torch.Generator().manual_seed(seed)
        x0 = x.float() * 2 - 1
        errors = []
        for frac in times:
            noise = torch.randn(x0.shape, generator=g).to(x0.device)
            xt, t, target = self.noised(x0, noise, x0.new_full(x0.shape[:1], float(frac), dtype=torch.float32))
            error = (self.unet(xt, t).float() - target).pow(2)
            errors.append(error.mean(1, keepdim=True) if per_pixel else error.flatten(1).mean(1))
        return torch.stack(errors)


class DDPM(Denoiser):
    """Denoising diffusion (Ho et al. 2020) over ``timesteps`` steps with a ``linear`` or ``cosine`` (Nichol &
    Dhariwal 2021) noise schedule; the network predicts the noise (``eps``) or the velocity (``v``, Salimans &
    Ho 2022). ``min_snr`` (gamma; Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
    Strategy"): each image's error weighted by min(SNR, gamma) / SNR for eps (/ (SNR + 1) for v), which caps the
    weight of the nearly clean steps; None: the plain mean. Sampled by default with DDIM (Song et al. 2021) over
    ``steps`` evenly spaced steps with ``eta`` (0: deterministic); ``sampler=ddpm`` is ancestral sampling (eta 1;
    with steps=1000, the original)."""

    def __init__(self, unet: nn.Module, schedule: str = "cosine", prediction: str = "v", timesteps: int = 1000,
                 num_classes: int = 0, p_uncond: float = 0.1, clip: float | None = 1.0, guidance: float = 1.0,
                 min_snr: float | None = None):
        super().__init__(unet, num_classes, p_uncond, clip, guidance)
        if prediction not in ("eps", "v"):
            raise GenlabError(f"model.prediction must be eps or v; got {prediction}.")
        if min_snr is not None and not min_snr > 0:
            raise GenlabError(f"model.min_snr is the weight's cap gamma, above 0 (5 in the paper), or null; got {min_snr}.")
        self.prediction, self.timesteps, self.min_snr = prediction, timesteps, min_snr
        self.register_buffer("alpha_bar", noise_schedule(schedule, timesteps), persistent=False)

    def noised(self, x0, noise, frac):
        """x_t, the network's time input and the training target at fractions ``frac`` of the schedule."""
        t = (frac * self.timesteps).long().clamp(0, self.timesteps - 1)
        ab = self.alpha_bar[t].view(-1, 1, 1, 1)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        target = noise if self.prediction == "eps" else ab.sqrt() * noise - (1 - ab).sqrt() * x0
        return xt, t.float(), target

    def training_step(self, batch, ctx):
        x0 = batch.x * 2 - 1
        noise = torch.randn_like(x0)
        xt, t, target = self.noised(x0, noise, torch.rand(len(x0), device=x0.device))
        out = {}
        for xt, t, target, labels in ctx.chunks(xt, t, target, self.train_labels(batch.y)):
            with ctx.autocast():
                pred = self.unet(xt, t, labels).float()
            if self.min_snr is None:
                loss = F.mse_loss(pred, target)
            else:
                loss = ((pred - target).pow(2).flatten(1).mean(1) * self.snr_weights(t.long())).mean()
            ctx.backward(loss, "unet")
            ctx.tally(out, loss=loss)
        self.step_unet(ctx)
        return out

    def snr_weights(self, t: Tensor) -> Tensor:
        """Min-SNR-gamma's weight of each image's error at steps ``t``: min(SNR, gamma) / SNR for an eps
        prediction, / (SNR + 1) for v (whose error is (SNR + 1) times eps's, in eps's units)."""
        ab = self.alpha_bar[t]
        snr = ab / (1 - ab)
        return snr.clamp(max=self.min_snr) / (snr if self.prediction == "eps" else snr + 1)

    def generate(self, z, labels=None, *, sampler: str | Sampler = "ddim", steps: int = 50, eta: float | None = None,
                 guidance: float | None = None):
        return self.walk(z, labels, sampler, steps, eta, guidance)

    def times(self, steps: int) -> list[int]:
        """The sampling path: ``steps`` of the T steps (trailing), then -1, the clean image."""
        return [*trailing_steps(self.timesteps, steps), -1]

    def coefficients(self, t: int):
        ab = self.alpha_bar[t] if t >= 0 else torch.ones((), device=self.alpha_bar.device)
        return ab.sqrt(), (1 - ab).sqrt()

    def denoise(self, x: Tensor, t: int, labels, guidance: float) -> tuple[Tensor, Tensor]:
        """The predicted image, clamped to [-1, 1], and the noise that goes with it at step ``t``."""
        ab = self.alpha_bar[t]
        out = self.predict(x, x.new_full(x.shape[:1], float(t), dtype=torch.float32), labels, guidance)
        if self.prediction == "eps":
            x0 = (x - (1 - ab).sqrt() * out) / ab.sqrt()
        else:
            x0 = ab.sqrt() * x - (1 - ab).sqrt() * out
        x0 = x0.clamp(-1, 1)
        return x0, (x - ab.sqrt() * x0) / (1 - ab).sqrt()


class FlowMatching(Denoiser):
    """Flow matching on the straight path x_t = (1 - t) x0 + t * noise (rectified flow, Liu et al. 2022;
    Lipman et al. 2022): the network predicts the velocity noise - x0 at times t = sigmoid(N(0, 1))
    (``logit_normal``, the default: it weights the middle of the path, Esser et al. 2024; it beat ``uniform``,
    t ~ U(0, 1), at equal training time on MNIST). Sampling integrates from
    noise (t=1) to an image (t=0) in ``steps`` steps, by default with Euler's method (``heun``: two network
    evaluations a step, but the last; ``ddim`` and ``ddpm`` fit the straight path too).

    ``shortcut`` > 0 trains a shortcut model (Frans et al. 2024, "One Step Diffusion via Shortcut Models") on
    a network that also takes a step size (``unet.step_input``): that share of each batch learns the jump of
    size 2d from two jumps of size d by the network itself (self-consistency; d from 1/``shortcut_steps`` to
    1/2), the rest plain flow matching. Its default sampler, ``shortcut``, then jumps in 1 to 4 steps.

    ``mean_flow`` > 0 trains a MeanFlow model (Geng et al. 2025, "Mean Flows for One-step Generative Modeling"),
    also on a network told the step size: that share of each batch learns the mean velocity u from r to t (times
    from sigmoid(N(-0.4, 1)), t > r) through the identity u = v - (t - r) du/dt, du/dt taken by forward-mode
    differentiation along the path; the rest plain flow matching (r = t). Each image's error is divided by
    itself (plus 1e-3), as the paper does (its adaptive weight, p = 1). It samples with ``shortcut`` too.

    ``reflow_from(teacher)`` trains on a teacher's pairs instead of the data (reflow)."""

    teacher = None  # (flow model, steps, sampler) of reflow, set by reflow_from

    def __init__(self, unet: nn.Module, time_sampling: str = "logit_normal", num_classes: int = 0, p_uncond: float = 0.1,
                 clip: float | None = 1.0, guidance: float = 1.0, shortcut: float = 0.0, shortcut_steps: int = 128,
                 mean_flow: float = 0.0):
        super().__init__(unet, num_classes, p_uncond, clip, guidance)
        if time_sampling not in ("uniform", "logit_normal"):
            raise GenlabError(f"model.time_sampling must be uniform or logit_normal; got {time_sampling}.")
        if not 0 <= shortcut < 1:
            raise GenlabError(f"model.shortcut is the share of each batch that learns shortcuts, in [0, 1); got {shortcut}.")
        if not 0 <= mean_flow < 1:
            raise GenlabError(f"model.mean_flow is the share of each batch that learns mean velocities, in [0, 1); "
                              f"got {mean_flow}.")
        if shortcut and mean_flow:
            raise GenlabError("model.shortcut and model.mean_flow are two ways to learn jumps: set one of them to 0.")
        for name, share in (("shortcut", shortcut), ("mean_flow", mean_flow)):
            if share and not getattr(unet, "step_input", False):
                raise GenlabError(f"model.{name} needs a network told the step size: set model.unet.step_input=true.")
        if shortcut_steps < 2 or shortcut_steps & (shortcut_steps - 1):
            raise GenlabError(f"model.shortcut_steps must be a power of two, at least 2; got {shortcut_steps}.")
        self.time_sampling, self.shortcut, self.shortcut_steps = time_sampling, shortcut, shortcut_steps
        self.mean_flow = mean_flow
        # the network is told times (and step sizes) in thousandths of the path, as DDPM's steps; MeanFlow's as they
        # are, in [0, 1]: it differentiates the network in t, and the fastest of the time features, a sine of
        # 1000 t, made its targets and losses explode (above 15 against flow matching's 0.3 in a first run)
        self.time_scale = 1.0 if mean_flow else 1000.0

    @property
    def learns_jumps(self) -> bool:
        """Whether it was trained to jump (shortcut or MeanFlow): its network is then told each step's size."""
        return bool(self.shortcut or self.mean_flow)

    def noised(self, x0, noise, t):
        tt = t.view(-1, 1, 1, 1)
        return (1 - tt) * x0 + tt * noise, t * self.time_scale, noise - x0

    def train_times(self, n: int, device) -> Tensor:
        if self.time_sampling == "uniform":
            return torch.rand(n, device=device)
        return torch.sigmoid(torch.randn(n, device=device))

    def reflow_from(self, teacher: "FlowMatching", steps: int = 8, sampler: str = "dpmpp_2m") -> None:
        """Reflow (Liu et al. 2022, "Flow Straight and Fast"): each training image is replaced by what ``teacher``
        (a trained flow model, frozen) makes of the batch's own noise in ``steps`` steps of ``sampler``, for the
        batch's labels where the models are conditional. Trained on these pairs, the paths straighten, so few
        steps suffice. The teacher is no part of this model's weights or checkpoints."""
        object.__setattr__(self, "teacher", (teacher.eval().requires_grad_(False), steps, sampler))

    @torch.no_grad()
    def teacher_images(self, noise: Tensor, y: Tensor) -> Tensor:
        teacher, steps, sampler = self.teacher
        images = teacher.generate(noise, y if teacher.num_classes else None, sampler=sampler, steps=steps)
        return images * 2 - 1

    def training_step(self, batch, ctx):
        x0, labels = batch.x * 2 - 1, self.train_labels(batch.y)
        noise = torch.randn_like(x0)
        if self.teacher is not None:
            with ctx.autocast():
                x0 = self.teacher_images(noise, batch.y)
        k = round(len(x0) * (self.shortcut or self.mean_flow))  # the first k images learn jumps
        xt, t_in, target = self.noised(x0[k:], noise[k:], self.train_times(len(x0) - k, x0.device))
        step = None
        if k:
            jumps = self.shortcut_targets if self.shortcut else self.mean_flow_targets
            with ctx.autocast():
                xs, ts, steps, targets = jumps(x0[:k], noise[:k], None if labels is None else labels[:k])
            xt, t_in, target = torch.cat([xs, xt]), torch.cat([ts, t_in]), torch.cat([targets, target])
            step = torch.cat([steps, torch.zeros(len(x0) - k, device=x0.device)])
        out = {}
        for xt, t_in, target, labels, step in ctx.chunks(xt, t_in, target, labels, step):
            with ctx.autocast():
                pred = self.unet(xt, t_in, labels, *(() if step is None else (step,))).float()
            errors = (pred - target).pow(2).flatten(1).mean(1)
            ctx.backward((errors / (errors.detach() + 1e-3)).mean() if self.mean_flow else errors.mean(), "unet")
            ctx.tally(out, loss=errors.mean())
        self.step_unet(ctx)
        return out

    @torch.no_grad()
    def shortcut_targets(self, x0: Tensor, noise: Tensor, labels: Tensor | None):
        """Inputs and targets of the self-consistency share: a jump of size 2d (2/M to 1, M = ``shortcut_steps``,
        each power of two as likely) from t, a multiple of 2d, is the mean of the network's two jumps of size d
        from t and from where the first lands: (x_t, network time, network step size, target)."""
        n, levels = len(x0), int(math.log2(self.shortcut_steps))
        big = 2.0 ** torch.randint(1, levels + 1, (n,), device=x0.device) / self.shortcut_steps
        t = big * (torch.rand(n, device=x0.device) / big).floor().add(1).clamp(max=1 / big)
        xt, t_in, _ = self.noised(x0, noise, t)
        d = (big / 2).view(-1, 1, 1, 1)
        first = self.unet(xt, t_in, labels, self.step_input(big / 2)).float()
        t_next = t_in - d.flatten() * self.time_scale
        second = self.unet(xt - d * first, t_next, labels, self.step_input(big / 2)).float()
        return xt, t_in, big * self.time_scale, (first + second) / 2

    @torch.no_grad()
    def mean_flow_targets(self, x0: Tensor, noise: Tensor, labels: Tensor | None):
        """Inputs and targets of MeanFlow's share: at t > r, x_t on the straight path, the target of the mean
        velocity from r to t is v - (t - r) du/dt, where v = noise - x0 and the total derivative
        du/dt = v ∂u/∂x + ∂u/∂t + ∂u/∂(t - r) is the network's own along the path, taken by one forward-mode pass:
        (x_t, network time, network step size, target)."""
        a, b = torch.sigmoid(torch.randn(2, len(x0), device=x0.device) - 0.4)
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        xt, t_in, v = self.noised(x0, noise, t)
        size = (t - r) * self.time_scale

        per_t = torch.full_like(t_in, self.time_scale)  # the network's time and step inputs per unit of t
        # in float32: autocast does not cast a dual tensor's tangent, so a bf16 convolution would meet a float32
        # input; dual tensors, not torch.func.jvp: 20 % faster on a CPU, and the same values
        # (torch's forward-mode rules script their decompositions on first use, with a deprecation warning that is
        # torch's business, not the user's: silenced here only)
        with torch.autocast(x0.device.type, enabled=False), forward_ad.dual_level(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=FutureWarning)
            dual = [forward_ad.make_dual(p, d) for p, d in ((xt, v), (t_in, per_t), (size, per_t))]
            du_dt = forward_ad.unpack_dual(self.unet(dual[0], dual[1], labels, dual[2])).tangent.float()
        return xt, t_in, size, v - (t - r).view(-1, 1, 1, 1) * du_dt

    def step_input(self, size: Tensor) -> Tensor:
        """The network's step input for jumps of ``size`` (fractions of the path). A shortcut model's: 0, plain
        flow matching's instantaneous velocity, below the smallest shortcut trained (2 / shortcut_steps)."""
        if self.mean_flow:
            return size * self.time_scale
        return torch.where(size < 1.999 / self.shortcut_steps, torch.zeros_like(size), size) * self.time_scale

    def generate(self, z, labels=None, *, sampler: str | Sampler | None = None, steps: int = 50,
                 eta: float | None = None, guidance: float | None = None):
        """``sampler`` None: ``shortcut`` for a model trained with shortcuts or mean flows, else ``euler``."""
        return self.walk(z, labels, sampler or ("shortcut" if self.learns_jumps else "euler"), steps, eta, guidance)

    def times(self, steps: int) -> list[float]:
        return torch.linspace(1, 0, steps + 1).tolist()

    def coefficients(self, t: float):
        return 1 - t, t

    def velocity(self, x: Tensor, t: float, labels, guidance: float) -> Tensor:
        return self.predict(x, x.new_full(x.shape[:1], t * self.time_scale, dtype=torch.float32), labels, guidance)

    def jump(self, x: Tensor, t: float, t_next: float, labels, guidance: float) -> Tensor:
        """The mean velocity from t to t_next: a shortcut model's learnt jump (its velocity if it has none)."""
        full = x.new_full(x.shape[:1], t * self.time_scale, dtype=torch.float32)
        step = self.step_input(x.new_full(x.shape[:1], t - t_next, dtype=torch.float32)) if self.learns_jumps else None
        return self.predict(x, full, labels, guidance, step)

    def denoise(self, x: Tensor, t: float, labels, guidance: float) -> tuple[Tensor, Tensor]:
        v = self.velocity(x, t, labels, guidance)  # noise - image, so x_t - t v is the image and x_t + (1 - t) v the noise
        return x - t * v, x + (1 - t) * v


def noise_schedule(kind: str, timesteps: int) -> Tensor:
    """alpha_bar_t, the share of the image left at step t = 0 .. T-1 (float32)."""
    if kind == "linear":
        betas = torch.linspace(1e-4, 0.02, timesteps, dtype=torch.float64) * 1000 / timesteps
        return torch.cumprod(1 - betas, 0).float()
    if kind == "cosine":
        s = 0.008
        f = torch.cos((torch.arange(timesteps + 1, dtype=torch.float64) / timesteps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        return torch.cumprod(1 - betas, 0).float()
    raise GenlabError(f"model.schedule must be linear or cosine; got {kind}.")


@functools.lru_cache(maxsize=64)
def trailing_steps(timesteps: int, steps: int) -> tuple[int, ...]:
    """``steps`` of the T steps, evenly spaced and starting from the last (pure noise): Lin et al. 2024. Plain ints,
    kept once computed: a graph traced from a sampler (genlab export) takes them as constants."""
    if steps > timesteps:
        raise GenlabError(f"steps={steps} is more than the model's {timesteps} diffusion steps.")
    return tuple((torch.linspace(timesteps, timesteps / steps, steps).round().long() - 1).tolist())
