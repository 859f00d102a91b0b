"""Gradient accumulation's cost: a step's batch of 64 in 1, 2 or 4 micro-batches (trainer.accumulate)."""

import statistics

from bench.common import genlab_steps, model_to_time, peak_memory_mb, reset_peak_memory
from genlab.device import resolve_device, resolve_precision


def bench_accumulate(args) -> list[dict]:
    """img/s and peak memory of each model's step of 64 images, whole and in 2 and 4 micro-batches (the same
    updates), alternating the settings; medians of ``reps``. The memory is the process's peak (VmHWM on the CPU,
    which counts the model and data too; allocated memory on a GPU)."""
    device = resolve_device(args.device)
    precision = resolve_precision("auto", device)
    batch, reps, splits = 64, 3 if args.quick else 5, (1, 2, 4)
    rows = []
    print(f"\naccumulate: a step of {batch} images in 1, 2 or 4 micro-batches, {precision} on {device}; medians of {reps}")
    for name in args.models.split(","):
        model, opts, data, steps = model_to_time(name, args, device, batch)
        rates, memory = {n: [] for n in splits}, {}
        for n in splits:  # warm-up, and each setting's peak memory from a reset
            reset_peak_memory(device)
            genlab_steps(model, opts, data, 2, batch, device, precision, accumulate=n)
            memory[n] = peak_memory_mb(device)
        for _ in range(reps):
            for n in splits:
                rates[n].append(genlab_steps(model, opts, data, steps, batch, device, precision, accumulate=n))
        base = statistics.median(rates[1])
        for n in splits:
            rate = statistics.median(rates[n])
            rows.append({"model": name, "batch_size": batch, "accumulate": n, "precision": precision,
                         "img_per_s": round(rate, 1), "cost": round(1 - rate / base, 3),
                         "peak_mb": round(memory[n]) if memory[n] is not None else None})
            print(f"{name:8s} x{n}: {rate:9.1f} img/s ({100 * (1 - rate / base):+.1f} % slower), peak "
                  f"{memory[n] or float('nan'):.0f} MB", flush=True)
    return rows
