"""`genlab predict`'s images per second: a trained run scoring a folder of images, with and without its anomaly maps
written, each timed from the command's start (model loading, calibration and threshold included) to its end."""

import logging
import tempfile
import time
from pathlib import Path

from genlab import api


def bench_predict(args) -> list[dict]:
    """``--predict RUN --images DIR``: genlab predict of run RUN on the folder DIR, with maps (the default) and
    without; the threshold is the run's stored one, else quantile:0.99 of its validation images."""
    run, images = Path(args.predict), Path(args.images)
    n = sum(1 for p in images.rglob("*") if p.is_file() and p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    logging.getLogger("genlab").setLevel(logging.WARNING)
    rows = []
    print(f"\ngenlab predict on {n} images of {images}, run {run}, device {args.device}")
    for maps in (True, False):
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            api.predict(run, images, [f"maps={str(maps).lower()}", f"device={args.device}"], run_dir=Path(out))
            seconds = time.perf_counter() - start
        rows.append({"maps": maps, "images": n, "seconds": round(seconds, 2), "img_per_s": round(n / seconds, 1)})
        print(f"maps={str(maps).lower():5s}: {seconds:6.1f} s, {n / seconds:7.1f} img/s", flush=True)
    return rows
