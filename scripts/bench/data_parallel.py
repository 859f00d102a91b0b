"""genlab's loop on the CPU as one process with 2 threads against 2 processes (torchrun, gloo) with 1 thread each."""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import ENTRY, compose_cfg
from genlab import dist
from genlab.callbacks import Callback
from genlab.data import Loader
from genlab.device import resolve_precision
from genlab.parts import build_dataset, build_model, build_optimizers
from genlab.step import StepContext
from genlab.trainer import Trainer


def bench_data_parallel(args) -> list[dict]:
    """genlab's loop on the CPU as one process with 2 threads and as 2 processes (torchrun, gloo) with 1 thread
    each, at the same global batch: img/s, and the share of the step the gradient all-reduce takes."""
    models = {"dcgan": (64, 8 if args.quick else 80), "ddpm": (64, 4 if args.quick else 24)}  # global batch, timed steps
    rows = []
    print("\ndata-parallel on the CPU: one process x 2 threads against 2 processes x 1 thread (torchrun, gloo)")
    for name in (m for m in args.models.split(",") if m in models):
        batch, steps = models[name]
        for world, threads in ((1, 2), (2, 1)):
            launch = [sys.executable] if world == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                           f"--nproc_per_node={world}"]
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "row.json"
                subprocess.run([*launch, str(ENTRY), "--dp-worker", name, str(batch), str(steps), "--json", str(out)],
                               check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
                row = json.loads(out.read_text())
            rows.append(row)
            print(f"  {name:6s} {world} x {threads} thread(s), batch {batch}: {row['img_per_s']:8.0f} img/s; "
                  f"all-reduce {100 * row['allreduce_share']:.1f} % of the step ({row['grad_mb']:.1f} MB of gradients a step)")
    return rows


class AllReduceClock(Callback):
    """Counts the seconds spent averaging gradients over the ranks; ``marks``: (wall_time, seconds) per row."""

    def __init__(self):
        self.spent, self.marks = 0.0, []
        average = dist.average_gradients

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return average(*args, **kwargs)
            finally:
                self.spent += time.perf_counter() - t

        dist.average_gradients = timed

    def on_log(self, trainer, row):
        self.marks.append((row["wall_time"], self.spent))


def data_parallel_worker(name: str, batch: str, steps: str, out: Path) -> None:
    """One rank of bench_data_parallel: genlab's loop with the time spent in the gradient all-reduce counted."""
    batch, steps = int(batch), int(steps)
    device = dist.setup("cpu")
    cfg = compose_cfg(name, None)
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    dist.broadcast_tensors(model.state_dict().values())
    opts = build_optimizers(cfg.optimizer, model)
    data = build_dataset(cfg.dataset)
    clock = AllReduceClock()
    every = max(1, steps // 4)
    loader = Loader(data.images, data.labels, batch, device, rank=dist.rank(), world=dist.world())
    precision = resolve_precision("auto", device)
    trainer = Trainer(model, loader, StepContext(opts, precision, device), steps + every, log_every=every,
                      callbacks=[clock])
    trainer.fit()
    rows = trainer.history
    timed_images = [(b["step"] - a["step"]) * batch for a, b in zip(rows, rows[1:])]
    seconds = sum(n / r["img_per_s"] for n, r in zip(timed_images, rows[1:]))
    (t0, s0), (t1, s1) = clock.marks[0], clock.marks[-1]
    grads = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    if dist.is_main() and out:
        out.write_text(json.dumps({"model": name, "processes": dist.world(), "threads": torch.get_num_threads(),
                                   "batch": batch, "precision": precision, "img_per_s": round(sum(timed_images) / seconds, 1),
                                   "allreduce_share": round((s1 - s0) / (t1 - t0), 4) if dist.world() > 1 else 0.0,
                                   "grad_mb": round(grads, 2)}))
