"""How genlab's DCGAN time per epoch grows with batch size and image size."""

import statistics

import torch

from bench.common import compose_cfg, genlab_steps
from genlab.parts import build_dataset, build_model, build_optimizers


def bench_scaling(args, device, precision) -> list[dict]:
    """How genlab's DCGAN time per 60,000-image epoch grows with batch size and image size."""
    rows = []
    print("\nscaling: genlab DCGAN, seconds per 60,000-image epoch")
    for channels, size in ((1, 28), (3, 32), (3, 64)):
        cfg = compose_cfg("dcgan", None, (channels, size))
        data = build_dataset(cfg.dataset)
        for batch in (32, 64, 128, 256, 512):
            torch.manual_seed(0)
            model = build_model(cfg).to(device)
            opts = build_optimizers(cfg.optimizer, model)
            steps = max(6, (1500 if size < 64 else 500) // batch)
            genlab_steps(model, opts, data, 2, batch, device, precision)
            ips = statistics.median(genlab_steps(model, opts, data, steps, batch, device, precision) for _ in range(2))
            rows.append({"model": "dcgan", "shape": f"{channels}x{size}x{size}", "batch_size": batch,
                         "precision": precision, "img_per_s": round(ips, 1), "s_per_epoch": round(60000 / ips, 1)})
            print(f"{channels}x{size}x{size} batch {batch:4d}: {ips:8.1f} img/s, {60000 / ips:7.1f} s/epoch", flush=True)
    return rows
