"""The writers' share of default `genlab train` runs: metrics.csv, the loss curves, the grids, the checkpoints."""

import tempfile
import time
from pathlib import Path

import torch

from genlab import api, callbacks
from genlab.build import build_trainer
from genlab.callbacks import Callback
from genlab.device import resolve_device


class WriterClock(Callback):
    """Wraps a writer callback's hooks with a clock: ``spent`` seconds in them."""

    def __init__(self, writer):
        self.writer, self.spent = writer, 0.0
        for hook in ("on_fit_start", "on_step_end", "on_log", "on_epoch_end", "on_interrupt", "on_fit_end"):
            setattr(self, hook, self._timed(getattr(writer, hook)))

    def _timed(self, fn):
        def timed(*args):
            t = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.spent += time.perf_counter() - t
        return timed


def bench_writers(args) -> list[dict]:
    """The writers' share of a default run (`genlab train model=NAME dataset=DATA`, progress bar off): the seconds
    spent writing metrics.csv, loss_curves.png, the sample grids and the checkpoints over the run's seconds."""
    device = resolve_device(args.device)
    epochs = {k: int(v) for k, v in (item.split("=") for item in args.epochs.split(","))}
    names = args.models.split(",")
    kinds = (callbacks.MetricsCSV, callbacks.LossCurves, callbacks.SampleGrids, callbacks.Checkpoints)
    rows = []
    print(f"\nwriters: their share of `genlab train` runs on {device} ({', '.join(f'{k} {v} epochs' for k, v in epochs.items())})")
    for dataset, n_epochs in epochs.items():
        where = [f"dataset.root={args.data_root}"] if dataset != "digits" and args.data_root else []
        for name in names:
            size = ["dataset.image_size=64"] if name == "dcgan64" else []  # its smallest side is 16; 64 its own
            cfg = api.compose("train", [f"model={name}", f"dataset={dataset}", *where, *size, f"trainer.epochs={n_epochs}",
                                        "trainer.progress=false"])
            with tempfile.TemporaryDirectory() as tmp:
                torch.manual_seed(cfg.seed)
                trainer = build_trainer(cfg, Path(tmp), device)
                clocks = {}
                for i, c in enumerate(trainer.callbacks):
                    if isinstance(c, kinds):
                        trainer.callbacks[i] = clocks[type(c).__name__] = WriterClock(c)
                t0 = time.perf_counter()
                trainer.fit()
                total = time.perf_counter() - t0
                grids = len(list(Path(tmp, "samples").glob("*.png")))
            spent = {k: c.spent for k, c in clocks.items()}
            row = {"model": name, "dataset": dataset, "epochs": n_epochs, "steps": trainer.step, "run_s": round(total, 1),
                   **{f"{k}_s": round(v, 2) for k, v in spent.items()}, "grids": grids,
                   "share": round(sum(spent.values()) / total, 4)}
            rows.append(row)
            print(f"{name:8s} {dataset:7s} {n_epochs:3d} epochs, {total:7.1f} s: writers {100 * row['share']:4.1f} % ("
                  + ", ".join(f"{k} {100 * v / total:.1f} %" for k, v in spent.items()) + f"; {row['grids']} grids)",
                  flush=True)
    return rows
