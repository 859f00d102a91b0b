"""Training throughput: genlab's loop against the plain PyTorch loop, same network, batch and device.

The reference loop is written the way the usual tutorials write it: a torchvision dataset with
per-sample ToTensor/Normalize, a DataLoader with 2 workers, fp32, eager, separate real and fake
discriminator passes, torch's nn.Dropout and torch's default (foreach) Adam. genlab's loop is genlab.trainer.Trainer with its defaults (device tensors,
precision=auto). Both run in this one process, alternating A B A B after a warm-up; the table
reports medians, and the peak memory of each loop (this process; DataLoader workers not counted).

Then: the DCGAN step's share of the device's arithmetic limit (FLOPs from torch.utils.flop_counter
over a measured matmul rate in the same precision), `genlab evaluate` scoring throughput, and
(without --quick) how genlab's time per epoch grows with batch size and image size.

    python scripts/bench.py                 # MNIST- and CIFAR-shaped rows, batch 64 and 256
    python scripts/bench.py --quick         # fewer steps and rows: under 2 minutes on 2 CPU cores
    python scripts/bench.py --json out.json --data-root ../shared/data
    python scripts/bench.py --data-parallel  # 2 processes x 1 thread against 1 process x 2 threads (torchrun)
    python scripts/bench.py --on-nan         # trainer.on_nan=skip against stop, same model and batch
    python scripts/bench.py --writers --data-root ../shared/data  # the writers' share of default runs
    python scripts/bench.py --memory 1,4,8   # own memory and img/s against dataset size (GB, memory-mapped)
    python scripts/bench.py --decode 4000    # a folder of that many JPEGs decoded by 1 process, then by all CPUs
"""

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode
from torchvision import datasets, transforms

import genlab.data as genlab_data
from genlab import dist, schema
from genlab.build import build_dataset, build_model, build_optimizers, compile_networks
from genlab.callbacks import Callback
from genlab.cli import CONFIG_DIR
from genlab.data import Loader
from genlab.device import DTYPES, autocast, resolve_device, resolve_precision, synchronize
from genlab.anomaly import scores_of
from genlab.nets.dropout import Dropout
from genlab.trainer import StepContext, Trainer

SHAPES = {"mnist": (1, 28), "cifar": (3, 32)}  # channels, image size


def compose_cfg(model: str, data_root: str | None, shape="mnist"):
    """MNIST itself when ``data_root`` has it and the shape is MNIST's; otherwise synthetic images of the
    shape (a name in SHAPES, or (channels, size))."""
    channels, size = SHAPES.get(shape, shape)
    if data_root and shape == "mnist":
        dataset = ["dataset=mnist", f"dataset.root={data_root}", "dataset.download=false"]
    else:
        dataset = ["dataset=synthetic", "dataset.n=8192", f"dataset.channels={channels}", f"dataset.image_size={size}"]
    schema.register()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=[f"model={model}", *dataset])


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


def matmul_rate(device, precision: str) -> float:
    """The best measured FLOP/s of square matmuls in ``precision``: the arithmetic limit used for the share."""
    dtype = DTYPES[precision]
    best = 0.0
    for n in (1024, 2048, 4096 if device.type == "cuda" else 1536):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        reps = max(3, int((2e13 if device.type == "cuda" else 1.5e11) / (2 * n**3)))
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        synchronize(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def step_flops(model, opts, data, batch: int, device, precision) -> float:
    """FLOPs of one genlab training step, per image (torch.utils.flop_counter: matmuls and convolutions)."""
    ctx = StepContext(opts, precision, device)
    first = next(Loader(data.images, data.labels, batch, device).epoch(0))
    with FlopCounterMode(display=False) as counter:
        model.training_step(first, ctx)
    ctx.end()
    return counter.get_total_flops() / batch


def reference_steps(model, opts, loader, steps: int, device, precision: str = "fp32") -> float:
    """The tutorial loop, in fp32 or under bf16 autocast; returns images per second over ``steps`` steps."""
    done, t0 = 0, None
    while done < steps:
        for x, _ in loader:
            if done == 1:
                t0 = time.perf_counter()  # the first step (worker start-up) is not timed
            x = x.to(device)
            with autocast(device, precision):
                reference_step(model, opts, x)
            done += 1
            if done == steps + 1:
                break
        if done >= steps + 1:
            break
    synchronize(device)
    return steps * loader.batch_size / (time.perf_counter() - t0)


def reference_step(model, opts, x) -> None:
    """One step as a tutorial writes it; ``x`` in [-1, 1] from Normalize."""
    if hasattr(model, "g"):
        z = torch.randn(x.shape[0], model.z_dim, device=x.device)
        fake = model.g(z)
        real_out, fake_out = model.d(x).float(), model.d(fake.detach()).float()
        loss_d = F.binary_cross_entropy_with_logits(real_out, torch.ones_like(real_out)) + \
            F.binary_cross_entropy_with_logits(fake_out, torch.zeros_like(fake_out))
        opts["d"].zero_grad()
        loss_d.backward()
        opts["d"].step()
        out = model.d(fake).float()
        loss = F.binary_cross_entropy_with_logits(out, torch.ones_like(out))
        opts["g"].zero_grad()
        loss.backward()
        opts["g"].step()
    elif hasattr(model, "unet"):  # the diffusion model's own noising; network, loss and step written out
        xt, t, target = model.noised(x, torch.randn_like(x), torch.rand(x.shape[0], device=x.device))
        loss = F.mse_loss(model.unet(xt, t).float(), target)
        opts["unet"].zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.unet.parameters(), 1.0)
        opts["unet"].step()
    else:
        x = x * 0.5 + 0.5  # back to [0, 1] for the Bernoulli likelihood
        mu, logvar = (t.float() for t in model.encoder(x))
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        recon = F.binary_cross_entropy_with_logits(model.decoder(z).float(), x, reduction="sum") / x.shape[0]
        kl = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum() / x.shape[0]
        loss = recon + kl
        opts["vae"].zero_grad()
        loss.backward()
        opts["vae"].step()
    loss.item()


def genlab_steps(model, opts, data, steps: int, batch: int, device, precision, on_nan: str = "stop",
                 callbacks=()) -> float:
    """genlab's loop; returns images per second over ``steps`` steps after one warm-up window. The
    loop writes a metrics row (one host sync) every quarter of the steps, not every step, so that on
    a GPU the host can queue work ahead, as it does in `genlab train`."""
    every = max(1, steps // 4)
    trainer = Trainer(model, Loader(data.images, data.labels, batch, device),
                      StepContext(opts, precision, device, on_nan=on_nan), steps + every, log_every=every,
                      callbacks=list(callbacks))
    trainer.fit()
    rows = trainer.history
    timed = [(b["step"] - a["step"]) * batch for a, b in zip(rows, rows[1:])]  # images per window after the first
    seconds = sum(n / r["img_per_s"] for n, r in zip(timed, rows[1:]))
    return sum(timed) / seconds if seconds else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", type=Path)
    p.add_argument("--device", default="auto")
    p.add_argument("--data-root", default=None, help="MNIST in torchvision's layout (else synthetic data)")
    p.add_argument("--models", default=None, help="default: gan,dcgan,vae,ddpm (--writers: every model genlab ships)")
    p.add_argument("--shapes", default=None, help="mnist,cifar (MNIST-shaped 1x28x28, CIFAR-shaped 3x32x32)")
    p.add_argument("--batch-sizes", default=None)
    p.add_argument("--no-scaling", action="store_true", help="leave out the DCGAN batch/image-size table")
    p.add_argument("--data-parallel", action="store_true", help="only the torchrun table: processes x threads")
    p.add_argument("--on-nan", action="store_true", help="only the on_nan=skip against on_nan=stop table")
    p.add_argument("--writers", action="store_true", help="only the writers' share of default runs")
    p.add_argument("--epochs", default="digits=50,mnist=1", help="--writers: epochs per dataset (digits=50 is the default run)")
    p.add_argument("--memory", default=None, metavar="GB,...", help="only the table of own memory (RssAnon) and img/s "
                   "against dataset size: synthetic CIFAR-shaped datasets of these sizes, memory-mapped")
    p.add_argument("--in-memory-up-to", type=float, default=1.0, help="--memory: also train in memory up to this size")
    p.add_argument("--decode", type=int, default=None, metavar="N", help="only the folder decoding table: N JPEGs")
    p.add_argument("--scratch", default=None, help="--memory/--decode: where to write the data (default: the temp dir)")
    p.add_argument("--memory-worker", nargs=3, metavar=("N", "IN_MEMORY", "STEPS"), help=argparse.SUPPRESS)
    p.add_argument("--dp-worker", nargs=3, metavar=("MODEL", "BATCH", "STEPS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    args.models = args.models or ("gan,cgan,vae,vae_gan,dcgan,dcgan64,ddpm,flow" if args.writers else "gan,dcgan,vae,ddpm")
    if args.dp_worker:
        return data_parallel_worker(*args.dp_worker, args.json)
    if args.memory_worker:
        return memory_worker(*args.memory_worker, args.json)
    for flag, bench in (("data_parallel", bench_data_parallel), ("on_nan", bench_on_nan), ("writers", bench_writers),
                        ("memory", bench_memory), ("decode", bench_decode)):
        if getattr(args, flag):
            rows = bench(args)
            if args.json:
                args.json.write_text(json.dumps({flag: rows}, indent=2) + "\n")
            return
    device = resolve_device(args.device)
    precision = resolve_precision("auto", device)
    batches = [int(b) for b in (args.batch_sizes or ("64" if args.quick else "64,256")).split(",")]
    shapes = (args.shapes or ("mnist" if args.quick else "mnist,cifar")).split(",")
    models = args.models.split(",")
    reps = 2 if args.quick else 3
    impls = {"genlab": precision, "reference": "fp32", f"reference-{precision}": precision}
    if precision == "fp32":
        del impls["reference-fp32"]
    rows, flops = [], []
    print(f"training: genlab ({precision}) against the reference loop in fp32 and {precision} on {device}; "
          f"medians of {reps}")
    for shape in shapes:
        for name in models:
            cfg = compose_cfg(name, args.data_root, shape)
            data = build_dataset(cfg.dataset)
            images = data.images
            dataset = "mnist" if args.data_root and shape == "mnist" else f"synthetic-{'x'.join(map(str, images.shape[1:]))}"
            for batch in batches:
                work = {"gan": 24000, "dcgan": 1500, "vae": 6000, "ddpm": 500}[name]  # images a timed run trains on
                steps = max(4, work // batch) if args.quick else max(8, 8 * work // batch)
                torch.manual_seed(0)
                m_gen = build_model(cfg).to(device)
                m_ref = plain(copy.deepcopy(m_gen))
                o_gen = build_optimizers(cfg.optimizer, m_gen)
                ref_opt = OmegaConf.merge(cfg.optimizer, {"fused": None} if "fused" in cfg.optimizer else {})
                o_ref = build_optimizers(ref_opt, m_ref)  # torch's default implementation
                loader = DataLoader(reference_dataset(args.data_root, len(images), shape), batch_size=batch,
                                    shuffle=True, num_workers=2, drop_last=True, persistent_workers=True)

                def run(impl, n_steps):
                    if impl == "genlab":
                        return genlab_steps(m_gen, o_gen, data, n_steps, batch, device, precision)
                    return reference_steps(m_ref, o_ref, loader, n_steps, device, impls[impl])

                for impl in impls:
                    run(impl, 2)  # warm-up
                results = {impl: [] for impl in impls}
                peaks = {impl: 0.0 for impl in impls}
                for _ in range(reps):  # A B C A B C
                    for impl in impls:
                        reset_peak_memory(device)
                        results[impl].append(run(impl, steps))
                        peaks[impl] = max(peaks[impl], peak_memory_mb(device) or 0.0)
                for impl, values in results.items():
                    rows.append({"model": name, "dataset": dataset, "impl": impl, "device": str(device),
                                 "precision": impls[impl], "batch_size": batch,
                                 "img_per_s": round(statistics.median(values), 1), "peak_mem_mb": round(peaks[impl])})
                mine = rows[-len(impls):]
                g = mine[0]
                print(f"{name:6s} {dataset:18s} batch {batch:4d}: genlab {g['img_per_s']:9.1f} img/s, " + ", ".join(
                    f"{r['impl']} {r['img_per_s']:.1f} ({g['img_per_s'] / r['img_per_s']:.2f}x)" for r in mine[1:])
                    + f"; peak memory {' / '.join(str(r['peak_mem_mb']) for r in mine)} MiB", flush=True)
                if name in ("dcgan", "ddpm"):
                    flops.append({"model": name, "dataset": dataset, "batch_size": batch, "precision": precision,
                                  "gflop_per_img": step_flops(m_gen, o_gen, data, batch, device, precision) / 1e9,
                                  "img_per_s": g["img_per_s"]})
    if flops:
        rate = matmul_rate(device, precision)
        print(f"\narithmetic: best measured {precision} matmul rate {rate / 1e9:.0f} GFLOP/s")
        for f in flops:
            f["matmul_gflop_per_s"] = round(rate / 1e9, 1)
            f["share"] = round(f["img_per_s"] * f["gflop_per_img"] * 1e9 / rate, 3)
            print(f"{f['model']:6s} {f['dataset']:18s} batch {f['batch_size']:4d}: {f['gflop_per_img']:.3f} GFLOP/img x "
                  f"{f['img_per_s']:.0f} img/s = {f['img_per_s'] * f['gflop_per_img']:.0f} GFLOP/s, "
                  f"{100 * f['share']:.0f}% of the matmul rate")
    evaluation = bench_evaluate(args, device, models, reps)
    sampling = bench_sampling(args, device, precision, models)
    scaling = [] if args.quick or args.no_scaling else bench_scaling(args, device, precision)
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(), "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows, "flops": flops, "evaluate": evaluation,
                                         "sampling": sampling, "scaling": scaling}, indent=2) + "\n")


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
                subprocess.run([*launch, __file__, "--dp-worker", name, str(batch), str(steps), "--json", str(out)],
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


def rss_anon_mb() -> float:
    """This process's own memory (RssAnon: not the pages of mapped files, which the kernel can drop)."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("RssAnon:")) / 1024


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
                subprocess.run([sys.executable, __file__, "--memory-worker", str(n), in_memory, str(steps),
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
        cfg = compose_cfg(name, args.data_root)
        data = build_dataset(cfg.dataset)
        steps = max(8, {"gan": 24000, "dcgan": 1500, "vae": 6000, "ddpm": 500}.get(name, 1500) // batch)
        torch.manual_seed(0)
        model = build_model(cfg).to(device)
        opts = build_optimizers(cfg.optimizer, model)
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
    from genlab import api, callbacks
    from genlab.build import build_trainer

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
        scores_of(model, test[:1000], score, 1000, device)  # warm-up
        times = []
        for _ in range(reps):
            synchronize(device)
            t0 = time.perf_counter()
            scores_of(model, test, score, 1000, device)
            synchronize(device)
            times.append(time.perf_counter() - t0)
        rows.append({"model": name, "score": score, "images": len(test), "device": str(device),
                     "img_per_s": round(len(test) / statistics.median(times), 1)})
        print(f"{name:6s} score={score:9s}: {rows[-1]['img_per_s']:10.1f} img/s over {len(test)} images")
    return rows


def bench_sampling(args, device, precision, models) -> list[dict]:
    """Sampling throughput of the diffusion models at 50 steps: genlab's (inference mode, ``precision``)
    against the same sampler in fp32 under no_grad, as a tutorial runs it. Images per second; each image
    is 50 network evaluations."""
    rows = []
    n, steps = (64, 50) if args.quick else (256, 50)
    print(f"\nsampling: {n} images, {steps} steps, genlab ({precision}) against fp32")
    for name in ("ddpm", "flow"):
        if "ddpm" not in models:
            continue
        torch.manual_seed(0)
        model = build_model(compose_cfg(name, None)).to(device).eval()
        z = model.latent(n).to(device)

        def genlab_sample():
            with torch.inference_mode(), autocast(device, precision):
                model.generate(z, steps=steps)

        def reference_sample():
            with torch.no_grad():
                model.generate(z, steps=steps)

        def compiled_sample():  # what compile=auto does for 10,000 samples at 50 steps
            if not hasattr(model, "_compiled"):
                compile_networks(model)
                model._compiled = True
            genlab_sample()

        impls = [("genlab", genlab_sample), ("reference", reference_sample)]
        if not args.quick and device.type == "cpu":
            impls.append(("genlab-compiled", compiled_sample))
        for impl, fn in impls:
            t0 = time.perf_counter()
            fn()  # warm-up (and compilation)
            warm = time.perf_counter() - t0
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            rows.append({"model": name, "impl": impl, "precision": "fp32" if impl == "reference" else precision,
                         "steps": steps, "n": n, "img_per_s": round(n / (time.perf_counter() - t0), 2),
                         "first_call_s": round(warm, 1)})
        g, r = rows[-len(impls)], rows[-len(impls) + 1]
        best = max(rows[-len(impls):], key=lambda row: row["img_per_s"])
        print(f"{name:6s} {steps} steps: " + ", ".join(f"{row['impl']} {row['img_per_s']:.1f} img/s"
                                                       for row in rows[-len(impls):])
              + f" (genlab {g['img_per_s'] / r['img_per_s']:.2f}x the reference); 10,000 samples in "
              f"{10000 / best['img_per_s'] / 60:.1f} min ({best['impl']})", flush=True)
    return rows


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


if __name__ == "__main__":
    main()
