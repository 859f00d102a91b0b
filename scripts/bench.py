"""Training throughput: genlab's loop against the plain PyTorch loop, same network, batch and device.

The reference loop is written the way the usual tutorials write it: a torchvision dataset with
per-sample ToTensor/Normalize, a DataLoader with 2 workers, fp32, eager, separate real and fake
discriminator passes, torch's nn.Dropout and torch's default (foreach) Adam. genlab's loop is genlab.trainer.Trainer with its defaults (device tensors,
precision=auto). Both run in this one process, alternating A B A B after a warm-up; the table
reports medians, and the peak memory of each loop (this process; DataLoader workers not counted).

Then: the DCGAN step's share of the device's arithmetic limit (FLOPs from torch.utils.flop_counter
over a measured matmul rate in the same precision), `genlab evaluate` scoring throughput, and
(without --quick) how genlab's time per epoch grows with batch size and image size. Each table is a module of
scripts/bench/; this file reads the command line and runs them.

    python scripts/bench.py                 # MNIST- and CIFAR-shaped rows, batch 64 and 256
    python scripts/bench.py --quick         # fewer steps and rows: under 2 minutes on 2 CPU cores
    python scripts/bench.py --json out.json --data-root ../shared/data
    python scripts/bench.py --data-parallel  # 2 processes x 1 thread against 1 process x 2 threads (torchrun)
    python scripts/bench.py --on-nan         # trainer.on_nan=skip against stop, same model and batch
    python scripts/bench.py --accumulate     # a step of 64 images whole and in 2 or 4 micro-batches (trainer.accumulate)
    python scripts/bench.py --sampling-steps  # img/s of each diffusion and flow sampler at 1, 4 and 20 steps
    python scripts/bench.py --writers --data-root ../shared/data  # the writers' share of default runs
    python scripts/bench.py --stylegan       # StyleGAN's training step against the DCGAN's, fp32 and bf16
    python scripts/bench.py --memory 1,4,8   # own memory and img/s against dataset size (GB, memory-mapped)
    python scripts/bench.py --decode 4000    # a folder of that many JPEGs decoded by 1 process, then by all CPUs
    python scripts/bench.py --predict RUN --images DIR  # genlab predict's img/s on a folder, with maps and without
"""

import argparse
import json
import platform
from pathlib import Path

import torch

from bench.accumulate import bench_accumulate
from bench.data_parallel import bench_data_parallel, data_parallel_worker
from bench.decode import bench_decode
from bench.memory import bench_memory, memory_worker
from bench.on_nan import bench_on_nan
from bench.predict import bench_predict
from bench.sampling import bench_sampling, bench_sampling_steps
from bench.scaling import bench_scaling
from bench.scoring import bench_evaluate
from bench.stylegan import bench_stylegan
from bench.training import arithmetic, bench_training
from bench.writers import bench_writers
from genlab.device import resolve_device, resolve_precision

ONLY = {"data_parallel": bench_data_parallel, "on_nan": bench_on_nan, "writers": bench_writers,  # a flag that runs
        "memory": bench_memory, "decode": bench_decode, "sampling_steps": bench_sampling_steps,  # one table alone
        "stylegan": bench_stylegan, "predict": bench_predict, "accumulate": bench_accumulate}


def arguments(argv=None) -> argparse.Namespace:
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
    p.add_argument("--accumulate", action="store_true", help="only the table of a step in 1, 2 or 4 micro-batches")
    p.add_argument("--sampling-steps", action="store_true", help="only the table of sampling img/s at 1, 4 and 20 steps")
    p.add_argument("--stylegan", action="store_true", help="only StyleGAN's step against the DCGAN's, fp32 and bf16")
    p.add_argument("--predict", default=None, metavar="RUN", help="only genlab predict's img/s: a trained run...")
    p.add_argument("--images", default=None, metavar="DIR", help="...scoring this folder of images")
    p.add_argument("--writers", action="store_true", help="only the writers' share of default runs")
    p.add_argument("--epochs", default="digits=50,mnist=1", help="--writers: epochs per dataset (digits=50 is the default run)")
    p.add_argument("--memory", default=None, metavar="GB,...", help="only the table of own memory (RssAnon) and img/s "
                   "against dataset size: synthetic CIFAR-shaped datasets of these sizes, memory-mapped")
    p.add_argument("--in-memory-up-to", type=float, default=1.0, help="--memory: also train in memory up to this size")
    p.add_argument("--decode", type=int, default=None, metavar="N", help="only the folder decoding table: N JPEGs")
    p.add_argument("--scratch", default=None, help="--memory/--decode: where to write the data (default: the temp dir)")
    p.add_argument("--memory-worker", nargs=3, metavar=("N", "IN_MEMORY", "STEPS"), help=argparse.SUPPRESS)
    p.add_argument("--dp-worker", nargs=3, metavar=("MODEL", "BATCH", "STEPS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.models = args.models or ("gan,cgan,vae,vae_gan,dcgan,dcgan64,ddpm,flow" if args.writers else "gan,dcgan,vae,ddpm")
    return args


def main(argv=None) -> None:
    args = arguments(argv)
    if args.dp_worker:
        return data_parallel_worker(*args.dp_worker, args.json)
    if args.memory_worker:
        return memory_worker(*args.memory_worker, args.json)
    for flag, bench in ONLY.items():
        if getattr(args, flag):
            rows = bench(args)
            if args.json:
                args.json.write_text(json.dumps({flag: rows}, indent=2) + "\n")
            return
    device = resolve_device(args.device)
    precision = resolve_precision("auto", device)
    models = args.models.split(",")
    rows, flops = bench_training(args, device, precision)
    if flops:
        arithmetic(flops, device, precision)
    evaluation = bench_evaluate(args, device, models, 2 if args.quick else 3)
    sampling = bench_sampling(args, device, precision, models)
    scaling = [] if args.quick or args.no_scaling else bench_scaling(args, device, precision)
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(), "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows, "flops": flops, "evaluate": evaluation,
                                         "sampling": sampling, "scaling": scaling}, indent=2) + "\n")


if __name__ == "__main__":
    main()
