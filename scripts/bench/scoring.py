"""`genlab evaluate`'s anomaly scoring throughput over a test split."""

import statistics
import time

import torch

from bench.common import compose_cfg
from genlab.device import synchronize
from genlab.parts import build_dataset, build_model
from genlab.scores import score_for
from genlab.scoring import scores_of


def bench_evaluate(args, device, models, reps) -> list[dict]:
    """`genlab evaluate` scoring throughput: its own scoring function over the test split, batch 1000."""
    rows = []
    print("\nevaluate: anomaly scores of the test split (fp32, batch 1000)")
    for name, score in (("vae", "elbo"), ("vae", "mse_blur"), ("gan", "critic"), ("dcgan", "critic"), ("ddpm", "denoise")):
        if name not in models:
            continue
        cfg = compose_cfg(name, args.data_root)
        # the denoise score runs the UNet five times an image: 2,000 images keep its row to a minute
        test = build_dataset(cfg.dataset, train=False).images[: 2000 if args.quick or name == "ddpm" else 10000]
        torch.manual_seed(0)
        model = build_model(cfg).to(device).eval()
        score = score_for(model, score)
        scores_of(model, test[:1000], score, 1000, device)  # warm-up
        times = []
        for _ in range(reps):
            synchronize(device)
            t0 = time.perf_counter()
            scores_of(model, test, score, 1000, device)
            synchronize(device)
            times.append(time.perf_counter() - t0)
        rows.append({"model": name, "score": score.name, "images": len(test), "device": str(device),
                     "img_per_s": round(len(test) / statistics.median(times), 1)})
        print(f"{name:6s} score={score.name:9s}: {rows[-1]['img_per_s']:10.1f} img/s over {len(test)} images")
    return rows
