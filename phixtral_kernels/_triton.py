"""What every kernel file shares: the interpreter switch, dtype names and the check that Triton can run here."""

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # macOS / Windows wheels of torch come without Triton: the torch backend still works.
    triton = None
    tl = None

# The oldest triton the kernels are tested with (CI runs 3.6.0, the pin of torch 2.11, and the newest release).
MIN_TRITON = (3, 3)

# The oldest GPUs the kernels run on. Below sm_80 Triton has no tensor-core path: tl.dot falls back to FMA and the GEMM
# tiles spill (7.3 KB of stack per thread at 128x128 on sm_75, see `python -m phixtral_kernels.aot`), and bf16 needs
# sm_80 as well. There (T4, V100) the torch backend, cuBLAS with tensor cores, is the faster path.
MIN_CAPABILITY = (8, 0)

# @triton.jit reads TRITON_INTERPRET when a kernel is decorated, so this flag must be read at import time too.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Checks of preconditions that cost a host read (a sync on a GPU), off unless PHIXTRAL_DEBUG is set to anything but 0.
DEBUG_ENV = "PHIXTRAL_DEBUG"


def debug_checks() -> bool:
    """Whether PHIXTRAL_DEBUG asks for the launchers' debug checks (read at each call; off by default)."""
    return os.environ.get(DEBUG_ENV, "0") not in ("", "0")


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on `device` in this process, or None when they can."""
    if triton is None:
        return "the triton package is not installed (it ships with CUDA builds of torch on Linux)"
    if _version_tuple(triton.__version__) < MIN_TRITON:
        oldest = ".".join(map(str, MIN_TRITON))
        return f"triton {triton.__version__} is older than {oldest}, the oldest these kernels are tested with"
    if device.type == "cuda":
        return _cuda_reason(device.index if device.index is not None else torch.cuda.current_device())
    if device.type == "cpu":
        if INTERPRET:
            return None
        return (
            "tensors are on the CPU and the Triton interpreter is off "
            "(set TRITON_INTERPRET=1 before importing phixtral_kernels, or use backend='torch')"
        )
    return f"Triton kernels run on CUDA tensors, got device {device}"


@functools.lru_cache(maxsize=None)  # asked on every launch: the answer is fixed per GPU in a process
def _cuda_reason(index: int) -> str | None:
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) >= MIN_CAPABILITY:
        return None
    return (
        f"cuda:{index} ({torch.cuda.get_device_name(index)}) is sm_{major}{minor}; the Triton kernels need sm_80 or "
        f"newer (no tensor-core path in Triton below it, and no bf16): use backend='torch', which backend='auto' picks "
        f"there"
    )


def _version_tuple(version: str) -> tuple:
    return tuple(int(part) for part in version.split("+")[0].split(".")[:2])


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
