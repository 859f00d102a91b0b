"""Own memory and img/s against dataset size: synthetic datasets of some GB in genlab's cache, memory-mapped."""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import ENTRY, compose_cfg, genlab_steps, rss_anon_mb
from genlab import data as genlab_data
from genlab.callbacks import Callback
from genlab.parts import build_model, build_optimizers


class PeakMemory(Callback):
    def __init__(self):
        self.peak = rss_anon_mb()

    def on_step_end(self, trainer) -> None:
        if trainer.step % 16 == 0:
            self.peak = max(self.peak, rss_anon_mb())


BENCH_SHAPE = (3, 32, 32)  # CIFAR-shaped images: 3 KiB each


def bench_cache(n: int) -> "genlab_data.Cache":
    return genlab_data.Cache("bench", True, [], f"synthetic:{n}")


def bench_memory(args) -> list[dict]:
    """For each size: a synthetic dataset of that many GB (decoded) written into a fresh genlab cache a chunk at a
    time (as a folder decode writes it), then a new process that trains the MLP GAN on it for the same number of
    steps, memory-mapped and, up to --in-memory-up-to GB, read into memory; its own memory before loading, after
    loading and at its peak, and its img/s."""
    rows = []
    steps = 120 if args.quick else 400
    row_bytes = int(np.prod(BENCH_SHAPE))
    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        env = {**os.environ, "GENLAB_CACHE": tmp}
        for gb in [float(g) for g in args.memory.split(",")]:
            n = int(gb * 2**30) // row_bytes
            os.environ["GENLAB_CACHE"] = tmp
            cache = bench_cache(n)
            t0 = time.perf_counter()
            flat, _ = cache.resume(n * row_bytes)
            images = flat.reshape(n, *BENCH_SHAPE)
            g = torch.Generator().manual_seed(0)
            for lo in range(0, n, 65536):  # noise: cheap to make, and no two pages alike
                k = min(65536, n - lo)
                images[lo:lo + k] = torch.randint(0, 256, (k, *BENCH_SHAPE), dtype=torch.uint8, generator=g).numpy()
            cache.finish(images, np.ones(n, dtype=bool), torch.arange(n) % 10)
            del images, flat
            print(f"{gb:g} GB: {n:,} images of {'x'.join(map(str, BENCH_SHAPE))} written in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
            for in_memory in ("false", "true") if gb <= args.in_memory_up_to else ("false",):
                out = Path(tmp) / "row.json"
                subprocess.run([sys.executable, str(ENTRY), "--memory-worker", str(n), in_memory, str(steps),
                                "--json", str(out)], check=True, env=env)
                row = {"gb": gb, **json.loads(out.read_text())}
                rows.append(row)
                print(f"{gb:g} GB {'in memory' if in_memory == 'true' else 'mapped':9s}: RssAnon {row['rss_start_mb']:.0f}"
                      f" MB at start, {row['rss_loaded_mb']:.0f} MB loaded, {row['rss_peak_mb']:.0f} MB at peak; "
                      f"{row['img_per_s']:.0f} img/s", flush=True)
            for f in (cache.images, cache.meta):
                f.unlink()
    return rows


def memory_worker(n: str, in_memory: str, steps: str, out: Path) -> None:
    """One row of bench_memory, in a process of its own (its memory is the measurement)."""
    start = rss_anon_mb()
    images, labels = bench_cache(int(n)).read(in_memory == "true")
    loaded = rss_anon_mb()
    cfg = compose_cfg("gan", None, BENCH_SHAPE[:1] + BENCH_SHAPE[2:])
    torch.manual_seed(0)
    model = build_model(cfg)
    peak = PeakMemory()
    rate = genlab_steps(model, build_optimizers(cfg.optimizer, model), genlab_data.ImageData(images, labels, "bench"),
                        int(steps), 256, torch.device("cpu"), "fp32", callbacks=[peak])
    out.write_text(json.dumps({"images": int(n), "in_memory": in_memory == "true", "rss_start_mb": round(start),
                               "rss_loaded_mb": round(loaded), "rss_peak_mb": round(max(peak.peak, loaded)),
                               "img_per_s": round(rate, 1)}))
