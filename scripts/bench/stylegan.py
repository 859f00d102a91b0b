"""StyleGAN's training step against the DCGAN's, in fp32 and bf16, and the modulated convolutions' share of it."""

import statistics
import time

import torch

from bench.common import compose_cfg, genlab_steps
from genlab.device import autocast, resolve_device, synchronize
from genlab.nets.stylegan import ModulatedConv
from genlab.parts import build_dataset, build_model, build_optimizers

MODELS = [("dcgan", []), ("stylegan", []), ("stylegan", ["augment=diffaugment"])]


def bench_stylegan(args) -> list[dict]:
    """Images per second of genlab's loop for the DCGAN and StyleGAN (its config's sizes, with and without
    DiffAugment) on CIFAR-shaped data at batch 64, in fp32 and under bf16 autocast; then, in fp32, the time of
    StyleGAN's modulated convolutions alone (forward and backward at the shapes one training step gives them) over
    the step's."""
    device = resolve_device(args.device)
    batch, steps, reps = 64, (8 if args.quick else 24), (2 if args.quick else 3)
    rows = []
    print(f"\nStyleGAN against the DCGAN, CIFAR-shaped, batch {batch}, on {device.type}; medians of {reps}")
    for name, overrides in MODELS:
        cfg = compose_cfg(name, None, "cifar", overrides)
        data = build_dataset(cfg.dataset)
        for precision in ("fp32", "bf16"):
            torch.manual_seed(0)
            model = build_model(cfg).to(device)
            opts = build_optimizers(cfg.optimizer, model)
            genlab_steps(model, opts, data, 2, batch, device, precision)  # warm-up
            rate = statistics.median(genlab_steps(model, opts, data, steps, batch, device, precision)
                                     for _ in range(reps))
            rows.append({"model": name + "".join(f" {o}" for o in overrides), "precision": precision,
                         "batch_size": batch, "img_per_s": round(rate, 1),
                         "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)})
            print(f"{rows[-1]['model']:30s} {precision}: {rate:8.1f} img/s ({rows[-1]['parameters_m']}M parameters)",
                  flush=True)
    for fused in (False, True):
        share = modulated_share(device, batch, rows[2]["img_per_s"], fused)
        rows.append({"model": "stylegan", "precision": "fp32", "fused": fused, "modulated_conv_share": round(share, 3)})
        print(f"the modulated convolutions' share of StyleGAN's fp32 step, {'grouped' if fused else 'input scaled'}: "
              f"{100 * share:.0f} %", flush=True)
    return rows


def modulated_share(device, batch: int, img_per_s: float, fused: bool) -> float:
    """The modulated convolutions' forward and backward (grouped, or with the input scaled: ``fused``), timed alone
    at the input shapes of one generator pass, over the time of a training step at ``img_per_s`` (training runs
    one generator pass and one backward a step, input scaled)."""
    torch.manual_seed(0)
    model = build_model(compose_cfg("stylegan", None, "cifar")).to(device)
    shapes = []
    hooks = [m.register_forward_pre_hook(lambda m, inputs: shapes.append((m, inputs[0].shape, inputs[1].shape)))
             for m in model.g.modules() if isinstance(m, ModulatedConv)]
    model.g(torch.randn(batch, model.z_dim, device=device))
    for h in hooks:
        h.remove()
    total = 0.0
    for module, x_shape, w_shape in shapes:
        module.fused = fused
        x = torch.randn(x_shape, device=device, requires_grad=True)
        w = torch.randn(w_shape, device=device)
        times = []
        for _ in range(4):
            synchronize(device)
            t0 = time.perf_counter()
            with autocast(device, "fp32"):
                module(x, w).sum().backward()
            synchronize(device)
            times.append(time.perf_counter() - t0)
        total += statistics.median(times[1:])
    return total / (batch / img_per_s)
