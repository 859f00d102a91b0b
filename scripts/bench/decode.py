"""Decoding a folder of JPEGs into genlab's cache: one process, then one a CPU."""

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from genlab import data as genlab_data


def bench_decode(args) -> list[dict]:
    """A folder of --decode JPEGs (320x240, smooth shapes and noise, as photos compress) decoded into a 64x64 cache
    by one process, then by one a CPU."""
    from PIL import Image, ImageDraw

    rows = []
    cpus = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        root = Path(tmp) / "images"
        root.mkdir()
        rng = np.random.default_rng(0)
        for i in range(args.decode):
            im = Image.fromarray(rng.integers(0, 40, (240, 320, 3), dtype=np.uint8) + np.uint8(100))
            draw = ImageDraw.Draw(im)
            for _ in range(4):
                x, y = rng.integers(0, 320), rng.integers(0, 240)
                draw.ellipse((x, y, x + 80, y + 60), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
            im.save(root / f"{i:06d}.jpg", quality=90)
        for workers in sorted({1, cpus}):
            os.environ["GENLAB_CACHE"] = str(Path(tmp) / f"cache{workers}")
            t0 = time.perf_counter()
            d = genlab_data.folder(str(root), image_size=64, test_fraction=0.0, workers=workers, in_memory=False)
            seconds = time.perf_counter() - t0
            rows.append({"images": len(d), "workers": workers, "seconds": round(seconds, 2),
                         "img_per_s": round(len(d) / seconds, 1)})
            print(f"{len(d)} JPEGs (320x240) to 64x64, {workers} process(es): {seconds:.1f} s, "
                  f"{len(d) / seconds:.0f} img/s", flush=True)
    return rows
