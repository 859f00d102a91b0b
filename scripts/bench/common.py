"""What the benchmarks share: the config of a model, the tutorial's dataset, genlab's loop timed, memory read."""

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torchvision import datasets, transforms

from genlab import schema
from genlab.config import CONFIG_DIR
from genlab.data import Loader
from genlab.nets.dropout import Dropout
from genlab.step import StepContext
from genlab.trainer import Trainer

ENTRY = Path(__file__).resolve().parent.parent / "bench.py"  # what the worker processes run
SHAPES = {"mnist": (1, 28), "cifar": (3, 32)}  # channels, image size
WORK = {"gan": 24000, "dcgan": 1500, "vae": 6000, "ddpm": 500}  # images a timed run of each model trains on


def compose_cfg(model: str, data_root: str | None, shape="mnist", overrides=()):
    """MNIST itself when ``data_root`` has it and the shape is MNIST's; otherwise synthetic images of the
    shape (a name in SHAPES, or (channels, size)); ``overrides`` of the model's settings after them."""
    channels, size = SHAPES.get(shape, shape)
    if data_root and shape == "mnist":
        dataset = ["dataset=mnist", f"dataset.root={data_root}", "dataset.download=false"]
    else:
        dataset = ["dataset=synthetic", "dataset.n=8192", f"dataset.channels={channels}", f"dataset.image_size={size}"]
    schema.register()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=[f"model={model}", *dataset, *overrides])


def reference_dataset(data_root: str | None, n: int, shape: str = "mnist"):
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    if data_root and shape == "mnist":
        return datasets.MNIST(data_root, train=True, download=False, transform=tf)
    channels, size = SHAPES[shape]
    return datasets.FakeData(size=n, image_size=(channels, size, size), num_classes=10, transform=tf)


def plain(model):
    """The reference's own modules: torch's nn.Dropout in place of genlab's cheaper-mask Dropout."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, Dropout):
                setattr(parent, name, torch.nn.Dropout(child.p))
    return model


def reset_peak_memory(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: "5" resets this process's peak resident set size (VmHWM)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_memory_mb(device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return None


def genlab_steps(model, opts, data, steps: int, batch: int, device, precision, on_nan: str = "stop",
                 callbacks=(), accumulate: int = 1) -> float:
    """genlab's loop; returns images per second over ``steps`` steps after one warm-up window. The
    loop writes a metrics row (one host sync) every quarter of the steps, not every step, so that on
    a GPU the host can queue work ahead, as it does in `genlab train`. ``accumulate``: each step's ``batch`` in that
    many micro-batches."""
    every = max(1, steps // 4)
    trainer = Trainer(model, Loader(data.images, data.labels, batch, device),
                      StepContext(opts, precision, device, on_nan=on_nan, accumulate=accumulate), steps + every,
                      log_every=every,
                      callbacks=list(callbacks))
    trainer.fit()
    rows = trainer.history
    timed = [(b["step"] - a["step"]) * batch for a, b in zip(rows, rows[1:])]  # images per window after the first
    seconds = sum(n / r["img_per_s"] for n, r in zip(timed, rows[1:]))
    return sum(timed) / seconds if seconds else float("nan")


def rss_anon_mb() -> float:
    """This process's own memory (RssAnon: not the pages of mapped files, which the kernel can drop)."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("RssAnon:")) / 1024


def model_to_time(name: str, args, device, batch: int):
    """A model of the tutorial's shape, its optimizers, its data and the steps a timed run of it takes."""
    from genlab.parts import build_dataset, build_model, build_optimizers

    cfg = compose_cfg(name, args.data_root)
    data = build_dataset(cfg.dataset)
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    return model, build_optimizers(cfg.optimizer, model), data, max(8, WORK.get(name, 1500) // batch)
