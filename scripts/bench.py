"""Training throughput: genlab's loop against the plain PyTorch loop, same network, batch and device.

The reference loop is written the way the usual tutorials write it: a torchvision dataset with
per-sample ToTensor/Normalize, a DataLoader with 2 workers, fp32, eager, separate real and fake
discriminator passes. genlab's loop is genlab.trainer.Trainer with its defaults (device tensors,
precision=auto). Both run in this one process, alternating A B A B after a warm-up; the table
reports medians.

    python scripts/bench.py                 # MNIST-shaped rows, batch 64 and 256
    python scripts/bench.py --quick         # fewer steps and rows: under 2 minutes on 2 CPU cores
    python scripts/bench.py --json out.json --data-root ../shared/data
"""

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from genlab import schema
from genlab.build import build_dataset, build_model, build_optimizers
from genlab.cli import CONFIG_DIR
from genlab.trainer import Trainer, resolve_device, resolve_precision


def compose_cfg(model: str, data_root: str | None):
    dataset = ["dataset=mnist", f"dataset.root={data_root}", "dataset.download=false"] if data_root else \
        ["dataset=synthetic", "dataset.n=8192"]
    schema.register()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=[f"model={model}", *dataset])


def reference_dataset(data_root: str | None, n: int):
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    if data_root:
        return datasets.MNIST(data_root, train=True, download=False, transform=tf)
    return datasets.FakeData(size=n, image_size=(1, 28, 28), num_classes=10, transform=tf)


def reference_steps(model, opts, loader, steps: int, device) -> float:
    """The tutorial loop; returns images per second over ``steps`` steps."""
    is_gan = hasattr(model, "g")
    done, t0 = 0, None
    while done < steps:
        for x, _ in loader:
            if done == 1:
                t0 = time.perf_counter()  # the first step (worker start-up) is not timed
            x = x.to(device)
            if is_gan:  # x in [-1, 1] from Normalize
                z = torch.randn(x.shape[0], model.z_dim, device=device)
                fake = model.g(z)
                real_out, fake_out = model.d(x), model.d(fake.detach())
                loss_d = F.binary_cross_entropy_with_logits(real_out, torch.ones_like(real_out)) + \
                    F.binary_cross_entropy_with_logits(fake_out, torch.zeros_like(fake_out))
                opts["d"].zero_grad()
                loss_d.backward()
                opts["d"].step()
                out = model.d(fake)
                loss_g = F.binary_cross_entropy_with_logits(out, torch.ones_like(out))
                opts["g"].zero_grad()
                loss_g.backward()
                opts["g"].step()
                loss_g.item()
            else:
                x = x * 0.5 + 0.5  # back to [0, 1] for the Bernoulli likelihood
                mu, logvar = model.encoder(x)
                z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
                recon = F.binary_cross_entropy_with_logits(model.decoder(z), x, reduction="sum") / x.shape[0]
                kl = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum() / x.shape[0]
                loss = recon + kl
                opts["vae"].zero_grad()
                loss.backward()
                opts["vae"].step()
                loss.item()
            done += 1
            if done == steps + 1:
                break
        if done >= steps + 1:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * loader.batch_size / (time.perf_counter() - t0)


def genlab_steps(model, opts, images, steps: int, batch: int, device, precision) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model, opts, images, tmp, device=device, precision=precision, max_steps=steps + 1,
                          batch_size=batch, log_every=1, n_samples=4, progress=False)
        trainer.fit()
        rows = trainer.rows[1:]  # the first step is warm-up
    return sum(r["img_per_s"] for r in rows) / len(rows) if rows else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", type=Path)
    p.add_argument("--device", default="auto")
    p.add_argument("--data-root", default=None, help="MNIST in torchvision's layout (else synthetic data)")
    p.add_argument("--models", default="gan,dcgan,vae")
    p.add_argument("--batch-sizes", default=None)
    args = p.parse_args()
    device = resolve_device(args.device)
    precision = resolve_precision("auto", device)
    batches = [int(b) for b in (args.batch_sizes or ("64" if args.quick else "64,256")).split(",")]
    reps = 2 if args.quick else 3
    rows = []
    for name in args.models.split(","):
        cfg = compose_cfg(name, args.data_root)
        images = build_dataset(cfg.dataset).images
        for batch in batches:
            steps = max(4, (1500 if name == "dcgan" else 6000) // batch) if args.quick else max(8, 12000 // batch)
            if name == "gan":
                steps *= 4
            torch.manual_seed(0)
            m_gen = build_model(cfg).to(device)
            m_ref = copy.deepcopy(m_gen)
            o_gen, o_ref = build_optimizers(cfg.optimizer, m_gen), build_optimizers(cfg.optimizer, m_ref)
            loader = DataLoader(reference_dataset(args.data_root, len(images)), batch_size=batch, shuffle=True,
                                num_workers=2, drop_last=True, persistent_workers=True)
            genlab_steps(m_gen, o_gen, images, 2, batch, device, precision)  # warm-up
            reference_steps(m_ref, o_ref, loader, 2, device)
            results = {"genlab": [], "reference": []}
            for _ in range(reps):  # A B A B
                results["genlab"].append(genlab_steps(m_gen, o_gen, images, steps, batch, device, precision))
                results["reference"].append(reference_steps(m_ref, o_ref, loader, steps, device))
            for impl, values in results.items():
                row = {"model": name, "dataset": "mnist" if args.data_root else "synthetic-28x28", "impl": impl,
                       "device": str(device), "precision": precision if impl == "genlab" else "fp32",
                       "batch_size": batch, "img_per_s": round(statistics.median(values), 1)}
                rows.append(row)
            g, r = rows[-2]["img_per_s"], rows[-1]["img_per_s"]
            print(f"{name:6s} batch {batch:4d}: genlab {g:9.1f} img/s ({precision})  reference {r:9.1f} img/s (fp32)"
                  f"  speed-up {g / r:5.2f}x", flush=True)
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(), "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
