"""Sampling throughput of the diffusion models: genlab's against the same sampler as a tutorial runs it."""

import time

import torch

from bench.common import compose_cfg
from genlab.device import autocast, compile_networks, resolve_device, resolve_precision, synchronize
from genlab.parts import build_model


def bench_sampling(args, device, precision, models) -> list[dict]:
    """Sampling throughput of the diffusion models at 50 steps: genlab's (inference mode, ``precision``)
    against the same sampler in fp32 under no_grad, as a tutorial runs it. Images per second; each image
    is 50 network evaluations."""
    rows = []
    n, steps = (64, 50) if args.quick else (256, 50)
    print(f"\nsampling: {n} images, {steps} steps, genlab ({precision}) against fp32")
    for name in ("ddpm", "flow"):
        if "ddpm" not in models:
            continue
        torch.manual_seed(0)
        model = build_model(compose_cfg(name, None)).to(device).eval()
        z = model.latent(n).to(device)

        def genlab_sample():
            with torch.inference_mode(), autocast(device, precision):
                model.generate(z, steps=steps)

        def reference_sample():
            with torch.no_grad():
                model.generate(z, steps=steps)

        def compiled_sample():  # what compile=auto does for 10,000 samples at 50 steps
            if not hasattr(model, "_compiled"):
                compile_networks(model)
                model._compiled = True
            genlab_sample()

        impls = [("genlab", genlab_sample), ("reference", reference_sample)]
        if not args.quick and device.type == "cpu":
            impls.append(("genlab-compiled", compiled_sample))
        for impl, fn in impls:
            t0 = time.perf_counter()
            fn()  # warm-up (and compilation)
            warm = time.perf_counter() - t0
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            rows.append({"model": name, "impl": impl, "precision": "fp32" if impl == "reference" else precision,
                         "steps": steps, "n": n, "img_per_s": round(n / (time.perf_counter() - t0), 2),
                         "first_call_s": round(warm, 1)})
        g, r = rows[-len(impls)], rows[-len(impls) + 1]
        best = max(rows[-len(impls):], key=lambda row: row["img_per_s"])
        print(f"{name:6s} {steps} steps: " + ", ".join(f"{row['impl']} {row['img_per_s']:.1f} img/s"
                                                       for row in rows[-len(impls):])
              + f" (genlab {g['img_per_s'] / r['img_per_s']:.2f}x the reference); 10,000 samples in "
              f"{10000 / best['img_per_s'] / 60:.1f} min ({best['impl']})", flush=True)
    return rows


FEW_STEPS = [  # (label, model, its overrides, sampler)
    ("ddpm", "ddpm", (), "ddim"),
    ("ddpm", "ddpm", (), "dpmpp_2m"),
    ("flow", "flow", (), "euler"),
    ("flow shortcut", "flow", ("model.shortcut=0.25", "model.unet.step_input=true"), "shortcut"),
    ("flow_mnist_cpu", "flow", ("model.unet.width=16", "model.unet.mults=[1,2,2]"), "euler"),  # its UNet
]


def bench_sampling_steps(args) -> list[dict]:
    """Images per second of each diffusion and flow sampler at 1, 4 and 20 steps (the presets' UNet, MNIST's
    shape, untrained weights: the cost is the same), under sampling's precision=auto, one timed call after a
    warm-up, ``n`` images a call; and how long 10,000 samples would take."""
    device = resolve_device(args.device)
    precision = resolve_precision("auto", device, fp16=False)
    n = 64 if args.quick else 250
    rows = []
    print(f"\nsampling {n} images a call, {precision} on {device.type}")
    for label, name, overrides, sampler in FEW_STEPS:
        torch.manual_seed(0)
        model = build_model(compose_cfg(name, None, overrides=overrides)).to(device).eval()
        z = model.latent(n).to(device)
        for steps in (1, 4, 20):
            def run():
                with torch.inference_mode(), autocast(device, precision):
                    model.generate(z, sampler=sampler, steps=steps)
            run()
            synchronize(device)
            t0 = time.perf_counter()
            run()
            synchronize(device)
            rate = n / (time.perf_counter() - t0)
            rows.append({"model": label, "sampler": sampler, "steps": steps, "n": n, "precision": precision,
                         "img_per_s": round(rate, 1), "s_per_10k": round(10000 / rate, 1)})
            print(f"{label:14s} {sampler:9s} {steps:3d} steps: {rate:8.1f} img/s, 10,000 in {10000 / rate:7.1f} s",
                  flush=True)
    return rows
