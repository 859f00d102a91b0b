"""trainer.on_nan=skip against on_nan=stop: the same model, batch and data."""

import statistics

from bench.common import genlab_steps, model_to_time
from genlab.device import resolve_device, resolve_precision


def bench_on_nan(args) -> list[dict]:
    """genlab's loop with trainer.on_nan=skip (each loss read on the host, and each gradient where no scaler
    checks it; copies of what an update changes where a later update of the same step can still drop it)
    against on_nan=stop, the default: the same model, batch and data, alternating stop skip stop skip."""
    device = resolve_device(args.device)
    precision = resolve_precision("auto", device)
    batch, reps = 64, 3 if args.quick else 5
    rows = []
    print(f"\non_nan: skip against stop, batch {batch}, {precision} on {device}; medians of {reps}")
    for name in args.models.split(","):
        model, opts, data, steps = model_to_time(name, args, device, batch)
        results = {"stop": [], "skip": []}
        for on_nan in results:
            genlab_steps(model, opts, data, 2, batch, device, precision, on_nan)  # warm-up
        for _ in range(reps):
            for on_nan, values in results.items():
                values.append(genlab_steps(model, opts, data, steps, batch, device, precision, on_nan))
        stop, skip = (statistics.median(v) for v in results.values())
        rows.append({"model": name, "batch_size": batch, "precision": precision, "stop_img_per_s": round(stop, 1),
                     "skip_img_per_s": round(skip, 1), "skip_cost": round(1 - skip / stop, 3)})
        print(f"{name:8s}: stop {stop:9.1f} img/s, skip {skip:9.1f} img/s ({100 * (1 - skip / stop):+.1f} % slower)",
              flush=True)
    return rows
