"""What every kernel file shares: the interpreter switch, dtype names and the check that Triton can run here."""

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

# @triton.jit reads TRITON_INTERPRET when a kernel is decorated, so this flag must be read at import time too.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on `device` in this process, or None when they can."""
    if triton is None:
        return "the triton package is not installed (it ships with CUDA builds of torch on Linux)"
    if _version_tuple(triton.__version__) < MIN_TRITON:
        return f"triton {triton.__version__} is older than {'.'.join(map(str, MIN_TRITON))}, the oldest these kernels are tested with"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if INTERPRET:
            return None
        return (
            "tensors are on the CPU and the Triton interpreter is off "
            "(set TRITON_INTERPRET=1 before importing phixtral_kernels, or use backend='torch')"
        )
    return f"Triton kernels run on CUDA tensors, got device {device}"


def _version_tuple(version: str) -> tuple:
    return tuple(int(part) for part in version.split("+")[0].split(".")[:2])


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
