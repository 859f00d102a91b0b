"""The process layout of a training run: which rank this process is, of how many, on which device.

torchrun starts one process per device and says where each stands in the environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); under SLURM, submitit's
TorchDistributedEnvironment turns SLURM's variables (a job started by ``srun`` or by genlab's submitit
launcher) into the same ones. ``setup`` reads them once and joins the process group: gloo on CPUs,
NCCL on GPUs. Everything else in genlab asks this module (``world()``, ``rank()``, ``is_main()``) and
never reads the environment itself. One process (the usual case) needs no process group at all, and
every helper here is then a no-op.
"""

import atexit
import contextlib
import datetime
import logging
import math
import os
import re
import time

import torch
import torch.distributed as dist

from genlab.device import resolve_device
from genlab.errors import GenlabError, first_line

log = logging.getLogger(__name__)


class PeerGone(GenlabError):
    """Another process of the run stopped (its own error says why): this one cannot go on alone."""


@contextlib.contextmanager
def _with_peers():
    try:
        yield
    except (RuntimeError, dist.DistError) as e:
        first = re.sub(r"^\[[^\]]*\]\s*", "", first_line(e)).split(". ")[0]  # gloo: "[file:line] What."
        raise PeerGone(f"another process of this run stopped, so this one stops too ({first})") from e


def launched() -> tuple[int, int] | None:
    """(rank, world size) when this process was started as one of several (torchrun, srun), else None.
    Reads the environment only: safe before anything is set up, e.g. to keep a non-main rank from writing."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:  # torchrun, or an already exported SLURM job
        world = int(os.environ["WORLD_SIZE"])
        return (int(os.environ["RANK"]), world) if world > 1 else None
    # srun's tasks of this job step (not SLURM_NTASKS: a batch script's own process is one of one)
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SUBMITIT_LOCAL_NTASKS")
    if tasks and int(tasks) > 1:
        procid = os.environ.get("SLURM_PROCID") or os.environ.get("SUBMITIT_LOCAL_GLOBALID", "0")
        return int(procid), int(tasks)
    return None


def setup(device: str = "auto") -> torch.device:
    """Join the process group when this process is one of several, and return its device: with CUDA,
    ``cuda:LOCAL_RANK`` (one process per GPU); else the CPU. One process: ``device`` as resolved. A collective
    that waits longer than GENLAB_DIST_TIMEOUT seconds (default 1800) fails; the waits for work that rank 0
    does alone go through the store instead (``settle``), with no limit."""
    if launched() is None:
        return resolve_device(device)
    if not dist.is_initialized():
        _export_slurm()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device not in ("auto", "cpu", "cuda"):
            raise GenlabError(f"device={device}: under several processes each one takes its own device "
                              "(cuda:LOCAL_RANK, or the CPU); use device=auto, cuda or cpu.")
        use_cuda = device != "cpu" and torch.cuda.is_available()
        if device == "cuda" and not use_cuda:
            raise GenlabError("device=cuda, but this machine has no CUDA GPU that PyTorch can use; use device=auto or cpu.")
        if use_cuda:
            if local >= torch.cuda.device_count():
                raise GenlabError(f"process {os.environ.get('RANK')} is local rank {local}, but this machine has "
                                  f"{torch.cuda.device_count()} CUDA GPU(s): start one process per GPU "
                                  "(torchrun --nproc_per_node=N with N at most the GPUs).")
            torch.cuda.set_device(local)
        try:
            dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://",
                                    timeout=datetime.timedelta(seconds=collective_timeout()),
                                    device_id=torch.device("cuda", local) if use_cuda else None)
        except (RuntimeError, ValueError) as e:
            raise GenlabError(f"could not join the other processes of this run: {first_line(e)}") from e
        atexit.register(teardown)
    return torch.device("cuda", torch.cuda.current_device()) if backend() == "nccl" else torch.device("cpu")


def collective_timeout() -> float:
    """Seconds a collective may wait for the other processes: GENLAB_DIST_TIMEOUT, 1800 by default."""
    value = os.environ.get("GENLAB_DIST_TIMEOUT", "1800")
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not seconds > 0 or math.isinf(seconds):
        raise GenlabError(f"GENLAB_DIST_TIMEOUT={value}: the seconds a collective may wait, a number above 0.")
    return seconds


def _export_slurm() -> None:
    """A SLURM or submitit job with several tasks: MASTER_ADDR, RANK, WORLD_SIZE, ... from submitit."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return
    try:
        import submitit.helpers
    except ImportError as e:
        raise GenlabError("this job has several SLURM tasks, and genlab reads their layout with submitit: "
                          "pip install 'genlab[scale]' (or start the tasks with torchrun).") from e
    os.environ.setdefault("SUBMITIT_EXECUTOR", "slurm" if "SLURM_PROCID" in os.environ else "local")
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def finish() -> None:
    """Wait for every rank at the end of a run (rank 0 may still be writing), so none leaves the group early. Then
    rank 0, which may host the group's store, waits until every rank is out of that wait: a peer that leaves
    while another still waits on the store aborts that one. Through the store, so with no time limit."""
    if world() > 1 and dist.is_initialized():
        key = _next_key("finished")  # every rank calls this as often as the others
        with _with_peers():
            store = dist.distributed_c10d._get_default_store()
            store.add(key, 1)
            _wait(lambda: store.add(key, 0) >= world())
            done, deadline = store.add(key + "/out", 1), time.monotonic() + 60
            while is_main() and done < world() and time.monotonic() < deadline:
                time.sleep(0.01)
                done = store.add(key + "/out", 0)


def settle(error: BaseException | None, what: str) -> None:
    """Every rank says whether ``what`` failed on it, and waits for every other's word: through the process
    group's store, with no time limit, so that rank 0 may take as long as it needs for work it does alone
    (training the yardstick classifier, writing a checkpoint) while the others wait for it without a
    collective's timeout. Then, if any rank failed, every rank stops: the failed one with its own error, the
    others with the first failed rank's message. One process: ``error`` is raised, if any."""
    if world() == 1 or not dist.is_initialized():
        if error is not None:
            raise error
        return
    key = _next_key("settle")
    with _with_peers():
        store = dist.distributed_c10d._get_default_store()
        store.set(f"{key}/{rank()}", "" if error is None else f"{type(error).__name__}: {first_line(error)}")
        keys = [f"{key}/{r}" for r in range(world())]
        _wait(lambda: store.check(keys))
        words = [store.get(k).decode() for k in keys]
    if error is not None:
        raise error
    failed = next(((r, w) for r, w in enumerate(words) if w), None)
    if failed is not None:
        raise PeerGone(f"process {failed[0]} of this run stopped ({what}), so this one stops too: {failed[1]}")


def _wait(ready) -> None:
    """Poll ``ready()`` until it holds: every millisecond at first, every 50 ms after a while."""
    pause = 0.001
    while not ready():
        time.sleep(pause)
        pause = min(0.05, pause * 1.5)


def _next_key(kind: str) -> str:
    """A store key of its own for each agreement of this kind (every rank makes the same ones, in the same order)."""
    _agreements[kind] = _agreements.get(kind, 0) + 1
    return f"genlab/{kind}/{_agreements[kind]}"


_agreements: dict[str, int] = {}


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_world() -> int:
    """The run's processes on this machine (LOCAL_WORLD_SIZE, set by torchrun and submitit); 1 when alone."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def backend() -> str | None:
    return dist.get_backend() if dist.is_initialized() else None


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place over every rank (``sum`` or ``max``); returns ``tensor``. One process: as it is."""
    if world() > 1:
        with _with_peers():
            dist.all_reduce(tensor, dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def broadcast(obj):
    """Rank 0's ``obj`` (any picklable value) on every rank."""
    if world() == 1:
        return obj
    box = [obj]
    with _with_peers():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_tensors(tensors) -> None:
    """Rank 0's values of ``tensors`` (parameters, buffers) on every rank, in place."""
    if world() == 1:
        return
    with torch.no_grad(), _with_peers():
        for t in tensors:
            dist.broadcast(t.data, src=0)


def average_gradients(params, extra: torch.Tensor | None = None) -> torch.Tensor | None:
    """Every rank's gradients of ``params`` replaced by their mean over the ranks, in one flat all-reduce;
    ``extra`` (a small tensor) rides along and comes back summed over the ranks.

    The ranks need not agree on which parameters have gradients (a branch taken only for some classes, on the
    ranks whose slice of the batch holds them): a rank adds zeros for those it lacks and a 0/1 mark for each
    parameter, so that the flat tensors line up. A parameter that any rank has a gradient for gets the mean
    over all ranks (a lacking rank counting as zero, as in the one-process gradient of the whole batch); one
    that no rank has a gradient for stays without. Only a rank that lacks some reads the marks on the host."""
    params = list(params)
    like = next((p.grad for p in params if p.grad is not None), None)
    if like is None and extra is None and world() == 1:
        return None
    dtype = like.dtype if like is not None else torch.float32
    device = like.device if like is not None else params[0].device if params else extra.device
    lacking = [p.grad is None for p in params]
    parts = [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel(), dtype=dtype) for p in params]
    parts.append(torch.tensor([0.0 if lack else 1.0 for lack in lacking], dtype=dtype, device=device))
    if extra is not None:
        parts.append(extra.reshape(-1).to(device=device, dtype=dtype))
    flat = all_reduce(torch.cat(parts))
    total = sum(p.numel() for p in params)
    marks = flat[total:total + len(params)].tolist() if any(lacking) else [1.0] * len(params)
    offset = 0
    for p, mark in zip(params, marks):
        n = p.numel()
        if mark > 0:
            mean = flat[offset:offset + n].view_as(p).div_(world())
            if p.grad is None:
                p.grad = mean.clone()
            else:
                p.grad.copy_(mean)
        offset += n
    return flat[total + len(params):] if extra is not None else None
