"""What a run ran on, kept beside it as ``env.json``: the first thing to compare when a number does not reproduce.

``describe`` gathers genlab's version (and, run from a git checkout, its commit and whether the tree had changes),
Python's, torch's, CUDA's and cuDNN's versions, the devices, the CPU model and count, the number of processes and
the precision. ``record`` writes it into a run directory (rank 0 alone); a run resumed elsewhere keeps the
environments it ran on before under ``earlier``. ``read`` gives it back (genlab report, a model card).
"""

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from genlab import __version__

FILE = "env.json"
SOURCE = Path(__file__).resolve().parent.parent  # the checkout genlab runs from, when it is one


def describe(device: str | torch.device = "cpu", precision: str = "fp32", processes: int = 1) -> dict:
    device = torch.device(device)
    cuda = torch.cuda.is_available()
    return {
        "genlab": __version__, **git_state(SOURCE),
        "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
        "device": str(device),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda and device.type == "cuda" else [],  # a CPU command starts no CUDA context for it
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "platform": platform.platform(), "processes": processes, "precision": precision,
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def git_state(where: Path) -> dict:
    """The commit of the checkout at ``where`` and whether its tracked files differ from it: {} when genlab is an
    installed package (or git is missing)."""
    if not (where / ".git").exists():
        return {}
    try:
        def git(*args):
            return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def record(run_dir: Path, device, precision: str, processes: int = 1) -> dict:
    """``run_dir/env.json`` for this process's environment; the file's earlier environments (a resumed run's) are kept
    under ``earlier`` when they differ from this one."""
    now = describe(device, precision, processes)
    path = Path(run_dir) / FILE
    before = read(path.parent)
    earlier = before.pop("earlier", []) if before else []
    if before and {k: v for k, v in before.items() if k != "started"} != {k: v for k, v in now.items() if k != "started"}:
        earlier.append(before)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{FILE}.tmp{os.getpid()}")
    tmp.write_text(json.dumps({**now, "earlier": earlier} if earlier else now, indent=1))
    tmp.replace(path)
    return now


def read(run_dir: Path) -> dict | None:
    """A run directory's env.json, or None when it has none (a run from before genlab wrote one) or it is unreadable."""
    try:
        return json.loads((Path(run_dir) / FILE).read_text())
    except (OSError, ValueError):
        return None


def summary(env: dict) -> str:
    """One line for a page or a model card: genlab 0.9 (abc1234, changed), torch 2.14.1, CUDA 13.0, ..."""
    commit = f" ({env['commit'][:7]}{', uncommitted changes' if env.get('dirty') else ''})" if env.get("commit") else ""
    where = ", ".join(env.get("gpus") or []) or f"{env.get('cpu')} ({env.get('cpu_count')} cores)"
    parts = [f"genlab {env.get('genlab')}{commit}", f"Python {env.get('python')}", f"torch {env.get('torch')}",
             *([f"CUDA {env['cuda']}"] if env.get("cuda") else []), f"on {where}",
             f"device {env.get('device')}", f"{env.get('processes')} process(es)", f"precision {env.get('precision')}"]
    return ", ".join(parts)
