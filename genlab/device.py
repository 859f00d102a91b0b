"""Which device and which precision a command runs in, and compiling for it."""

import contextlib
from pathlib import Path

import torch

from genlab.errors import GenlabError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then the CPU; a named device must be present."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise GenlabError(f"device={name} is not a device name: use auto, cpu, cuda, cuda:N or mps.") from e
    if device.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            raise GenlabError(f"device={name}, but this machine has no CUDA GPU that PyTorch can use; use device=auto or cpu.")
        if device.index is not None and device.index >= n:
            raise GenlabError(f"device={name}, but this machine has {n} CUDA GPU(s) (cuda:0..cuda:{n - 1}).")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise GenlabError("device=mps, but MPS is not available here; use device=auto or cpu.")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise GenlabError(f"device={name} is not supported: use auto, cpu, cuda, cuda:N or mps.")
    return device


def cpu_has_fast_bf16() -> bool:
    """True where the CPU has native bf16 arithmetic (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cuda_has_native_bf16(device: torch.device) -> bool:
    """True on GPUs with bf16 tensor cores (compute capability 8.0+: A100, H100, RTX 30xx and later).
    ``torch.cuda.is_bf16_supported()`` also counts the emulated bf16 of a T4 or V100, which is slow."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index) >= (8, 0)


def resolve_precision(precision: str, device: torch.device, fp16: bool = True) -> str:
    """``auto``: bf16 where ``device`` computes it natively, fp16 (with a gradient scaler: training) on older GPUs
    when ``fp16``, else fp32. Sampling and evaluation pass ``fp16=False``: fp32 where bf16 is not native."""
    if precision not in ("auto", *DTYPES):
        raise GenlabError(f"trainer.precision={precision} is not one of auto, fp32, bf16, fp16.")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if cuda_has_native_bf16(device) else ("fp16" if fp16 else "fp32")
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return "fp32"


def autocast(device: torch.device, precision: str):
    """The mixed-precision context of ``precision`` (fp32: none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on a GPU (a no-op on the CPU, which runs each op as it is called)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def compile_networks(model: torch.nn.Module) -> None:
    """torch.compile each network of a model in place: the state dict keys stay as they are, so checkpoints move
    freely between compiled and eager runs."""
    if not torch._dynamo.is_dynamo_supported():
        raise GenlabError("trainer.compile=true, but torch.compile is not supported with this Python/PyTorch; "
                          "use trainer.compile=false.")
    for net in model.children():
        net.compile()
