"""genlab's training loop against the plain PyTorch loop a tutorial writes: same network, batch and device, in
fp32 and in genlab's precision; and the DCGAN and UNet steps' share of the device's matmul rate."""

import copy
import statistics
import time

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from bench.common import WORK, compose_cfg, genlab_steps, peak_memory_mb, plain, reference_dataset, reset_peak_memory
from genlab.data import Loader
from genlab.device import DTYPES, autocast, synchronize
from genlab.parts import build_dataset, build_model, build_optimizers
from genlab.step import StepContext


def matmul_rate(device, precision: str) -> float:
    """The best measured FLOP/s of square matmuls in ``precision``: the arithmetic limit used for the share."""
    dtype = DTYPES[precision]
    best = 0.0
    for n in (1024, 2048, 4096 if device.type == "cuda" else 1536):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        reps = max(3, int((2e13 if device.type == "cuda" else 1.5e11) / (2 * n**3)))
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        synchronize(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def step_flops(model, opts, data, batch: int, device, precision) -> float:
    """FLOPs of one genlab training step, per image (torch.utils.flop_counter: matmuls and convolutions)."""
    ctx = StepContext(opts, precision, device)
    first = next(Loader(data.images, data.labels, batch, device).epoch(0))
    with FlopCounterMode(display=False) as counter:
        model.training_step(first, ctx)
    ctx.end()
    return counter.get_total_flops() / batch


def reference_steps(model, opts, loader, steps: int, device, precision: str = "fp32") -> float:
    """The tutorial loop, in fp32 or under bf16 autocast; returns images per second over ``steps`` steps."""
    done, t0 = 0, None
    while done < steps:
        for x, _ in loader:
            if done == 1:
                t0 = time.perf_counter()  # the first step (worker start-up) is not timed
            x = x.to(device)
            with autocast(device, precision):
                reference_step(model, opts, x)
            done += 1
            if done == steps + 1:
                break
        if done >= steps + 1:
            break
    synchronize(device)
    return steps * loader.batch_size / (time.perf_counter() - t0)


def reference_step(model, opts, x) -> None:
    """One step as a tutorial writes it; ``x`` in [-1, 1] from Normalize."""
    if hasattr(model, "g"):
        z = torch.randn(x.shape[0], model.z_dim, device=x.device)
        fake = model.g(z)
        real_out, fake_out = model.d(x).float(), model.d(fake.detach()).float()
        loss_d = F.binary_cross_entropy_with_logits(real_out, torch.ones_like(real_out)) + \
            F.binary_cross_entropy_with_logits(fake_out, torch.zeros_like(fake_out))
        opts["d"].zero_grad()
        loss_d.backward()
        opts["d"].step()
        out = model.d(fake).float()
        loss = F.binary_cross_entropy_with_logits(out, torch.ones_like(out))
        opts["g"].zero_grad()
        loss.backward()
        opts["g"].step()
    elif hasattr(model, "unet"):  # the diffusion model's own noising; network, loss and step written out
        xt, t, target = model.noised(x, torch.randn_like(x), torch.rand(x.shape[0], device=x.device))
        loss = F.mse_loss(model.unet(xt, t).float(), target)
        opts["unet"].zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.unet.parameters(), 1.0)
        opts["unet"].step()
    else:
        x = x * 0.5 + 0.5  # back to [0, 1] for the Bernoulli likelihood
        mu, logvar = (t.float() for t in model.encoder(x))
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        recon = F.binary_cross_entropy_with_logits(model.decoder(z).float(), x, reduction="sum") / x.shape[0]
        kl = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum() / x.shape[0]
        loss = recon + kl
        opts["vae"].zero_grad()
        loss.backward()
        opts["vae"].step()
    loss.item()


def bench_training(args, device, precision) -> tuple[list[dict], list[dict]]:
    """The training table (genlab against the reference in fp32 and in ``precision``, medians of alternating runs)
    and, for the DCGAN and the UNet, their FLOPs per image."""
    batches = [int(b) for b in (args.batch_sizes or ("64" if args.quick else "64,256")).split(",")]
    shapes = (args.shapes or ("mnist" if args.quick else "mnist,cifar")).split(",")
    reps = 2 if args.quick else 3
    impls = {"genlab": precision, "reference": "fp32", f"reference-{precision}": precision}
    if precision == "fp32":
        del impls["reference-fp32"]
    rows, flops = [], []
    print(f"training: genlab ({precision}) against the reference loop in fp32 and {precision} on {device}; "
          f"medians of {reps}")
    for shape in shapes:
        for name in args.models.split(","):
            cfg = compose_cfg(name, args.data_root, shape)
            data = build_dataset(cfg.dataset)
            dataset = "mnist" if args.data_root and shape == "mnist" else \
                f"synthetic-{'x'.join(map(str, data.images.shape[1:]))}"
            for batch in batches:
                steps = max(4, WORK[name] // batch) if args.quick else max(8, 8 * WORK[name] // batch)
                mine, models = compare(args, cfg, data, shape, batch, steps, reps, impls, device, precision)
                rows += [{"model": name, "dataset": dataset, **r} for r in mine]
                g = mine[0]
                print(f"{name:6s} {dataset:18s} batch {batch:4d}: genlab {g['img_per_s']:9.1f} img/s, " + ", ".join(
                    f"{r['impl']} {r['img_per_s']:.1f} ({g['img_per_s'] / r['img_per_s']:.2f}x)" for r in mine[1:])
                    + f"; peak memory {' / '.join(str(r['peak_mem_mb']) for r in mine)} MiB", flush=True)
                if name in ("dcgan", "ddpm"):
                    flops.append({"model": name, "dataset": dataset, "batch_size": batch, "precision": precision,
                                  "gflop_per_img": step_flops(*models, data, batch, device, precision) / 1e9,
                                  "img_per_s": g["img_per_s"]})
    return rows, flops


def compare(args, cfg, data, shape, batch: int, steps: int, reps: int, impls: dict, device, precision):
    """One row of the table for each implementation (img/s, peak memory), and genlab's (model, optimizers)."""
    torch.manual_seed(0)
    m_gen = build_model(cfg).to(device)
    m_ref = plain(copy.deepcopy(m_gen))
    o_gen = build_optimizers(cfg.optimizer, m_gen)
    ref_opt = OmegaConf.merge(cfg.optimizer, {"fused": None} if "fused" in cfg.optimizer else {})
    o_ref = build_optimizers(ref_opt, m_ref)  # torch's default implementation
    loader = DataLoader(reference_dataset(args.data_root, len(data.images), shape), batch_size=batch,
                        shuffle=True, num_workers=2, drop_last=True, persistent_workers=True)

    def run(impl, n_steps):
        if impl == "genlab":
            return genlab_steps(m_gen, o_gen, data, n_steps, batch, device, precision)
        return reference_steps(m_ref, o_ref, loader, n_steps, device, impls[impl])

    for impl in impls:
        run(impl, 2)  # warm-up
    results, peaks = {impl: [] for impl in impls}, {impl: 0.0 for impl in impls}
    for _ in range(reps):  # A B C A B C
        for impl in impls:
            reset_peak_memory(device)
            results[impl].append(run(impl, steps))
            peaks[impl] = max(peaks[impl], peak_memory_mb(device) or 0.0)
    rows = [{"impl": impl, "device": str(device), "precision": impls[impl], "batch_size": batch,
             "img_per_s": round(statistics.median(values), 1), "peak_mem_mb": round(peaks[impl])}
            for impl, values in results.items()]
    return rows, (m_gen, o_gen)


def arithmetic(flops: list[dict], device, precision) -> None:
    """Each FLOPs row's share of the best measured matmul rate in ``precision``, printed and added to the row."""
    rate = matmul_rate(device, precision)
    print(f"\narithmetic: best measured {precision} matmul rate {rate / 1e9:.0f} GFLOP/s")
    for f in flops:
        f["matmul_gflop_per_s"] = round(rate / 1e9, 1)
        f["share"] = round(f["img_per_s"] * f["gflop_per_img"] * 1e9 / rate, 3)
        print(f"{f['model']:6s} {f['dataset']:18s} batch {f['batch_size']:4d}: {f['gflop_per_img']:.3f} GFLOP/img x "
              f"{f['img_per_s']:.0f} img/s = {f['img_per_s'] * f['gflop_per_img']:.0f} GFLOP/s, "
              f"{100 * f['share']:.0f}% of the matmul rate")
