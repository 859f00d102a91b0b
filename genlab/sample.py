"""genlab sample: sample grids, latent interpolations and, for VAEs, reconstructions and a latent map."""

import logging
import math
from pathlib import Path

import torch
from omegaconf import DictConfig
from torchvision.utils import save_image

from genlab import plots
from genlab.build import load_model, test_split
from genlab.trainer import resolve_device

log = logging.getLogger(__name__)


def slerp(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation, the path that keeps Gaussian latents at a typical norm. Broadcasts."""
    cos = (z0 * z1).sum(-1, keepdim=True) / (z0.norm(dim=-1, keepdim=True) * z1.norm(dim=-1, keepdim=True))
    omega = torch.acos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
    return (torch.sin((1 - t) * omega) * z0 + torch.sin(t * omega) * z1) / torch.sin(omega)


@torch.inference_mode()
def run(cfg: DictConfig, run_dir: Path, overrides=()) -> None:
    device = resolve_device(cfg.device)
    model, train_cfg, state = load_model(cfg.ckpt, device)
    log.info("%s from %s (step %d)", type(model).__name__, cfg.ckpt, state["step"])
    g = torch.Generator().manual_seed(cfg.seed)

    x = model.generate(model.latent(cfg.n, g).to(device)).float().cpu()  # [n, C, H, W] in [0, 1]
    save_image(x, run_dir / "grid.png", nrow=math.ceil(math.sqrt(cfg.n)), padding=2, pad_value=1.0)
    torch.save(x, run_dir / "samples.pt")

    rows, steps = cfg.interp_rows, cfg.interp_steps
    z0, z1 = model.latent(rows, g), model.latent(rows, g)
    t = torch.linspace(0, 1, steps).view(1, steps, 1)
    z = slerp(z0[:, None], z1[:, None], t).reshape(rows * steps, -1)
    save_image(model.generate(z.to(device)).float().cpu(), run_dir / "interpolation.png", nrow=steps, pad_value=1.0)
    written = ["grid.png", "interpolation.png", "samples.pt"]

    if hasattr(model, "encode"):  # models with an encoder: reconstructions and the latent map
        test = test_split(train_cfg, cfg.dataset_root)
        pick = torch.randperm(len(test), generator=g)[:32]
        images = test.images[pick].float().div(255)
        recon = model.reconstruct(images.to(device)).float().cpu()
        pairs = torch.stack([images.view(4, 8, *images.shape[1:]), recon.view(4, 8, *images.shape[1:])], dim=1)
        save_image(pairs.flatten(0, 2), run_dir / "reconstructions.png", nrow=8, pad_value=1.0)
        pick = torch.randperm(len(test), generator=g)[: cfg.n_latent]
        mu = torch.cat([model.encode(b.to(device).float().div(255))[0].cpu() for b in test.images[pick].split(500)])
        plots.latent_map(mu.numpy(), test.labels[pick].numpy(), run_dir / "latent.png", cfg.method,
                         title=f"{test.name} test set: latent means ({cfg.method})")
        written += ["reconstructions.png", "latent.png"]
    log.info("wrote %s", ", ".join(written))
