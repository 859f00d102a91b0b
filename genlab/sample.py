"""genlab sample: sample grids, latent interpolations and, for VAEs, reconstructions and a latent map."""

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from genlab import plots, schema
from genlab.build import check_sampling, compile_for_sampling, load_model, test_split
from genlab.device import autocast, resolve_device, resolve_precision
from genlab.images import save_grid, write_pngs
from genlab.errors import GenlabError
from genlab.models.base import balanced_labels, grid_labels

log = logging.getLogger(__name__)

GRID_MAX = 256  # grid.png shows at most this many of the samples


def slerp(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation, the path that keeps Gaussian latents at a typical norm. Broadcasts."""
    cos = (z0 * z1).sum(-1, keepdim=True) / (z0.norm(dim=-1, keepdim=True) * z1.norm(dim=-1, keepdim=True))
    omega = torch.acos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
    return (torch.sin((1 - t) * omega) * z0 + torch.sin(t * omega) * z1) / torch.sin(omega)


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
         batch_size: int = 250, command: str = "sample", **settings) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images [n, C, H, W] in [0, 1] on the CPU, their labels or None), as `genlab sample` draws them: ``labels``
    cycled to ``n`` (a conditional model without labels: a row per class, or with ``n``: every class equally
    often), ``batch_size`` images at a time, ``settings`` the model's sampling settings, the same ``seed`` the
    same images."""
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


def traversal(model, mu: torch.Tensor, logvar: torch.Tensor, image: torch.Tensor, path: Path, device, name: str,
              rows: int = 12, cols: int = 11, span: float = 3.0) -> None:
    """traversal.png: the code of one test ``image`` with one latent dimension a row moved from -span to +span
    prior standard deviations, the rest held. Rows: the dimensions that carry the most information (the
    highest mean KL over the encoded test images ``mu``, ``logvar``), most first; a dimension the model does not
    use (KL near 0) changes nothing."""
    kl = 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).mean(0)
    dims = kl.argsort(descending=True)[:rows]
    code = model.encode(image[None].to(device).float().div(255))[0][0].cpu()
    values = torch.linspace(-span, span, cols)
    z = code.repeat(len(dims), cols, 1)
    for r, d in enumerate(dims):
        z[r, :, d] = code[d] + values
    images = model.generate(z.flatten(0, 1).to(device)).float().cpu().view(len(dims), cols, *image.shape)
    plots.traversal(images, [f"z{d} (KL {kl[d]:.2f})" for d in dims.tolist()], values.tolist(), path,
                    f"latent traversal around a {name}: a dimension a row, by information carried")


@torch.inference_mode()
def run(cfg: DictConfig, run_dir: Path, overrides=()) -> None:
    if cfg.format not in ("pt", "png"):
        raise GenlabError(f"format={cfg.format} is not one of pt, png.")
    device = resolve_device(cfg.device)
    model, train_cfg, state = load_model(cfg.ckpt, device, ema=cfg.ema)
    settings = schema.sampling_overrides(cfg, "sample")
    check_sampling(model, settings, cfg.labels, command="sample")  # before draw: a key may be named like its arguments
    log.info("%s from %s (step %d, %s weights)%s", type(model).__name__, cfg.ckpt, state["step"], state["weights"],
             "".join(f", {k}={v}" for k, v in settings.items()))
    x, labels = draw(model, cfg.n, cfg.labels, cfg.seed, cfg.precision, cfg.compile, cfg.batch_size, **settings)
    nrow = sample_labels(model, min(len(x), GRID_MAX) if cfg.n else None, cfg.labels)[2]
    save_grid(x[:GRID_MAX], run_dir / "grid.png", nrow)
    if cfg.format == "png":
        write_pngs(x, run_dir / "samples", labels)
        written = ["grid.png", f"samples/ ({len(x)} PNG files)", "samples.npz"]
    else:
        torch.save(x, run_dir / "samples.pt")
        written = ["grid.png", "samples.pt"]
        if labels is not None:
            torch.save(labels, run_dir / "labels.pt")
            written.append("labels.pt")
    precision = autocast(device, resolve_precision(cfg.precision, device, fp16=False))
    g = torch.Generator().manual_seed(cfg.seed + 1)

    rows, steps = cfg.interp_rows, cfg.interp_steps
    z0, z1 = model.latent(rows, g), model.latent(rows, g)
    t = torch.linspace(0, 1, steps).view(1, steps, 1)
    z = slerp(z0.flatten(1)[:, None], z1.flatten(1)[:, None], t).reshape(rows * steps, *z0.shape[1:])
    row_labels = (torch.arange(rows) % model.num_classes).repeat_interleave(steps).to(device) if model.num_classes else None
    with precision:
        walks = model.generate(z.to(device), row_labels, **settings).float().cpu()
    save_grid(walks, run_dir / "interpolation.png", steps)
    written.append("interpolation.png")

    if hasattr(model, "encode"):  # models with an encoder: reconstructions and the latent map
        test = test_split(train_cfg, cfg.dataset_root)
        pick = torch.randperm(len(test), generator=g)[:32]
        images = test.images[pick].float().div(255)
        recon = model.reconstruct(images.to(device)).float().cpu()
        pairs = torch.stack([images.view(4, 8, *images.shape[1:]), recon.view(4, 8, *images.shape[1:])], dim=1)
        save_grid(pairs.flatten(0, 2), run_dir / "reconstructions.png", 8)
        pick = torch.randperm(len(test), generator=g)[: cfg.n_latent]
        codes = [model.encode(b.to(device).float().div(255)) for b in test.images[pick].split(500)]
        mu, logvar = (torch.cat([c[i].cpu() for c in codes]) for i in (0, 1))
        plots.latent_map(mu.numpy(), test.labels[pick].numpy(), run_dir / "latent.png", cfg.method,
                         title=f"{test.name} test set: latent means ({cfg.method})")
        traversal(model, mu, logvar, test.images[pick[0]], run_dir / "traversal.png", device, f"{test.name} test image")
        written += ["reconstructions.png", "latent.png", "traversal.png"]
    log.info("wrote %s", ", ".join(written))
