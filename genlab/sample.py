"""genlab sample: sample grids, latent interpolations and, for VAEs, reconstructions and a latent map."""

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from genlab import environment, plots
from genlab.device import autocast, resolve_device, resolve_precision
from genlab.errors import GenlabError
from genlab.images import as_float, save_grid, write_pngs
from genlab.parts import test_split
from genlab.sampling import draw, from_checkpoint, sample_labels, slerp

log = logging.getLogger(__name__)

GRID_MAX = 256  # grid.png shows at most this many of the samples


def traversal(model, mu: torch.Tensor, logvar: torch.Tensor, image: torch.Tensor, path: Path, device, name: str,
              rows: int = 12, cols: int = 11, span: float = 3.0) -> None:
    """traversal.png: the code of one test ``image`` with one latent dimension a row moved from -span to +span
    prior standard deviations, the rest held. Rows: the dimensions that carry the most information (the
    highest mean KL over the encoded test images ``mu``, ``logvar``), most first; a dimension the model does not
    use (KL near 0) changes nothing."""
    kl = 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).mean(0)
    dims = kl.argsort(descending=True)[:rows]
    code = model.encode(as_float(image[None], device))[0][0].cpu()
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
    environment.record(run_dir, device, resolve_precision(cfg.precision, device, fp16=False))
    model, train_cfg, state, settings = from_checkpoint(cfg.ckpt, cfg, "sample", device)
    log.info("%s from %s (step %d, %s weights)%s", type(model).__name__, cfg.ckpt, state["step"], state["weights"],
             "".join(f", {k}={v}" for k, v in settings.items()))
    x, labels = draw(model, cfg.n, cfg.labels, cfg.seed, cfg.precision, cfg.compile, cfg.batch_size, settings=settings)
    nrow = sample_labels(model, min(len(x), GRID_MAX) if cfg.n else None, cfg.labels)[2]
    save_grid(x[:GRID_MAX], run_dir / "grid.png", nrow)
    written = ["grid.png", *write_samples(x, labels, run_dir, cfg.format)]
    precision = autocast(device, resolve_precision(cfg.precision, device, fp16=False))
    g = torch.Generator().manual_seed(cfg.seed + 1)
    with precision:
        interpolation(model, settings, cfg.interp_rows, cfg.interp_steps, g, device, run_dir / "interpolation.png")
    written.append("interpolation.png")
    if hasattr(model, "style_mix"):  # a StyleGAN: rows' coarse styles with columns' fine ones
        with precision:
            save_grid(model.style_mix(model.latent(6, g).to(device), model.latent(6, g).to(device), **settings).cpu(),
                      run_dir / "style_mixing.png", 7)
        written.append("style_mixing.png")
    if hasattr(model, "encode"):  # models with an encoder: reconstructions and the latent map
        test = test_split(train_cfg, cfg.dataset_root)
        encoder_pictures(model, test, cfg, g, device, run_dir)
        written += ["reconstructions.png", "latent.png", "traversal.png"]
    log.info("wrote %s", ", ".join(written))


def write_samples(x: torch.Tensor, labels, run_dir: Path, form: str) -> list[str]:
    """The samples themselves: samples.pt (and labels.pt), or a folder of PNGs and samples.npz."""
    if form == "png":
        write_pngs(x, run_dir / "samples", labels)
        return [f"samples/ ({len(x)} PNG files)", "samples.npz"]
    torch.save(x, run_dir / "samples.pt")
    if labels is None:
        return ["samples.pt"]
    torch.save(labels, run_dir / "labels.pt")
    return ["samples.pt", "labels.pt"]


def interpolation(model, settings: dict, rows: int, steps: int, g: torch.Generator, device, path: Path) -> None:
    """interpolation.png: ``rows`` latent walks (slerp, or the model's own ``interpolate``) between random endpoints,
    ``steps`` images each; a conditional model walks within one class a row."""
    z0, z1 = model.latent(rows, g), model.latent(rows, g)
    t = torch.linspace(0, 1, steps).view(1, steps, 1)
    if hasattr(model, "interpolate"):  # a model with its own latent path (a StyleGAN's straight lines in W)
        labels = (torch.arange(rows) % model.num_classes).to(device) if model.num_classes else None
        images = model.interpolate(z0.to(device), z1.to(device), t.flatten().to(device), labels, **settings)
        save_grid(images.float().cpu(), path, steps)
        return
    z = slerp(z0.flatten(1)[:, None], z1.flatten(1)[:, None], t).reshape(rows * steps, *z0.shape[1:])
    row_labels = (torch.arange(rows) % model.num_classes).repeat_interleave(steps).to(device) if model.num_classes else None
    save_grid(model.generate(z.to(device), row_labels, **settings).float().cpu(), path, steps)


def encoder_pictures(model, test, cfg: DictConfig, g: torch.Generator, device, run_dir: Path) -> None:
    """reconstructions.png (test images beside their reconstructions), latent.png (the latent means of
    ``n_latent`` test images, by ``method``) and traversal.png."""
    pick = torch.randperm(len(test), generator=g)[:32]
    images = as_float(test.images[pick])
    recon = model.reconstruct(images.to(device)).float().cpu()
    pairs = torch.stack([images.view(4, 8, *images.shape[1:]), recon.view(4, 8, *images.shape[1:])], dim=1)
    save_grid(pairs.flatten(0, 2), run_dir / "reconstructions.png", 8)
    pick = torch.randperm(len(test), generator=g)[: cfg.n_latent]
    codes = [model.encode(as_float(b, device)) for b in test.images[pick].split(500)]
    mu, logvar = (torch.cat([c[i].cpu() for c in codes]) for i in (0, 1))
    plots.latent_map(mu.numpy(), test.labels[pick].numpy(), run_dir / "latent.png", cfg.method,
                     title=f"{test.name} test set: latent means ({cfg.method})")
    traversal(model, mu, logvar, test.images[pick[0]], run_dir / "traversal.png", device, f"{test.name} test image")
