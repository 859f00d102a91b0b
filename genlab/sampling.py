"""Drawing samples from a model, as `genlab sample`, `genlab evaluate task=quality`, the in-training FID and
genlab.api do: sampling settings checked against the model, labels for a conditional model, compiling where it
pays, a batch at a time under the run's precision; and what sample and evaluate open with."""

import logging

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from genlab import schema
from genlab.config import check_type, type_hints
from genlab.device import autocast, compile_networks, resolve_precision
from genlab.errors import GenlabError
from genlab.models import GenerativeModel
from genlab.models.base import balanced_labels, grid_labels
from genlab.parts import load_model

log = logging.getLogger(__name__)


def from_checkpoint(ckpt, cfg: DictConfig, verb: str, device):
    """What `genlab sample` and `genlab evaluate` open with: the model of checkpoint ``ckpt`` (the moving average
    of its weights unless ``ema=false``), its run's config, the checkpoint's state, and the command's sampling
    settings (any KEY=VALUE that is not the command's own, and ``sampler=``): (model, run config, state, settings)."""
    model, train_cfg, state = load_model(ckpt, device, ema=cfg.ema)
    return model, train_cfg, state, schema.sampling_overrides(cfg, verb)


def check_sampling(model: GenerativeModel, settings: dict, labels=None, where: str = "", command: str = "") -> None:
    """Sampling settings must be ones the model's ``generate`` declares, of its types; labels need a
    class-conditional model and must be its classes."""
    known = model.sampling_settings()
    hints = type_hints(type(model).generate)
    name = type(model).__name__
    for key, value in settings.items():
        if key not in known:
            theirs = f"its sampling settings are: {', '.join(known)}" if known else "it has no sampling settings"
            also = f"a setting of genlab {command} nor " if command else ""
            raise GenlabError(f"{where}{key} is not {also}a sampling setting of {name} ({theirs}).")
        check_type(value, hints.get(key), f"{where}{key}")
    if labels is not None:
        if not model.num_classes:
            raise GenlabError(f"labels= needs a class-conditional model; {name} is unconditional.")
        bad = [int(c) for c in labels if not 0 <= int(c) < model.num_classes]
        if bad:
            raise GenlabError(f"labels {bad} are not classes of this model: it has classes 0..{model.num_classes - 1}.")


def compile_for_sampling(model: GenerativeModel, n: int, settings: dict, choice) -> bool:
    """``compile=auto|true|false`` of sample and evaluate. auto compiles where it pays: an iterative sampler
    (a ``steps`` setting) making ``n`` samples at 100,000 network evaluations or more."""
    choice = str(choice).lower()
    if choice not in ("auto", "true", "false"):
        raise GenlabError(f"compile={choice} is not one of auto, true, false.")
    if choice == "auto":
        steps = settings.get("steps", model.sampling_settings().get("steps"))
        choice = "true" if isinstance(steps, int) and n * steps >= 100_000 else "false"
    if choice == "true":
        compile_networks(model)
        log.info("compiling the network for sampling (compile=false to skip)")
    return choice == "true"


def sample_labels(model, n: int | None, labels) -> tuple[torch.Tensor | None, int, int]:
    """(labels or None, how many samples, images per grid row) for ``genlab sample n=... labels=...``: given
    labels are cycled to ``n`` (default: one sample each); a conditional model without them draws a row per
    class; an unconditional one ``n`` (default 64) in a square."""
    if n is not None and n < 1:
        raise GenlabError(f"n must be at least 1; got {n}.")
    if labels is not None:
        if not len(labels):
            raise GenlabError("labels=[] names no class: give at least one, e.g. labels=[3], or leave labels out.")
        labels = torch.tensor(list(labels), dtype=torch.long)
        n = n or len(labels)
        return labels.repeat(-(-n // len(labels)))[:n], n, grid_labels(n, 0)[1]
    if model.num_classes and n is None:
        labels, nrow = grid_labels(64, model.num_classes)
        return labels, len(labels), nrow
    n = n or 64
    return balanced_labels(n, model.num_classes), n, grid_labels(n, 0)[1]


@torch.inference_mode()
def draw(model, n: int | None = None, labels=None, seed: int = 0, precision: str = "auto", compile="auto",
         batch_size: int = 250, command: str = "sample", settings: dict | None = None
         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images [n, C, H, W] in [0, 1] on the CPU, their labels or None), as `genlab sample` draws them: ``labels``
    cycled to ``n`` (a conditional model without labels: a row per class, or with ``n``: every class equally
    often), ``batch_size`` images at a time, ``settings`` the model's sampling settings (checked here, for
    ``command``'s messages), the same ``seed`` the same images."""
    settings = settings or {}
    if batch_size < 1:
        raise GenlabError(f"batch_size must be at least 1; got {batch_size}.")
    check_sampling(model, settings, labels, command=command)
    labels, n, _ = sample_labels(model, n, labels)
    compile_for_sampling(model, n, settings, compile)
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the noise a stochastic sampler draws as it goes
    batches = torch.arange(n).split(batch_size)
    with autocast(device, resolve_precision(precision, device, fp16=False)):
        x = torch.cat([model.sample(len(i), None if labels is None else labels[i], g, **settings).float().clamp(0, 1).cpu()
                       for i in tqdm(batches, desc="sampling", unit="batch", disable=None if len(batches) > 1 else True)])
    return x, labels


def slerp(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation, the path that keeps Gaussian latents at a typical norm. Broadcasts."""
    cos = (z0 * z1).sum(-1, keepdim=True) / (z0.norm(dim=-1, keepdim=True) * z1.norm(dim=-1, keepdim=True))
    omega = torch.acos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
    return (torch.sin((1 - t) * omega) * z0 + torch.sin(t * omega) * z1) / torch.sin(omega)
