"""Compiling one recorded kernel launch ahead of time for a GPU target, and running many such compiles in a pool.

aot.py decides which launches a report covers and what it checks; this module knows how Triton would specialize a
launch (`compile_launch`: the JIT's signature, constexprs and divisibility hints, rebuilt from the recorded arguments),
what two launches share a binary (`launch_key`), and how a cubin's registers and stack are read (`resource_usage`).
benchmarks/tune_moe.py dedupes its candidate launches by the same key.
"""

import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

import torch

from ._triton import triton
from .launches import Launch

_TRITON_TYPES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.int32: "i32",
    torch.int64: "i64",
}


def _signature(launch: Launch):
    """(signature, constexprs, attrs) as the JIT would specialize them: ints of 1 folded, 16-divisible values hinted."""
    fn = launch.kernel
    signature, constexprs, attrs = {}, {}, {}
    names = [p.name for p in fn.params]
    values = dict(zip(names, launch.args))
    values.update({k: v for k, v in launch.kwargs.items() if k in names})
    for i, p in enumerate(fn.params):
        v = values[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[p.name] = "*" + _TRITON_TYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # allocations are 256-byte aligned
        elif isinstance(v, bool):
            signature[p.name] = "i1"
        elif isinstance(v, int):
            if v == 1:
                signature[p.name], constexprs[p.name] = "constexpr", 1
                continue
            signature[p.name] = "i32" if -(2**31) <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {p.name}={v!r}")
    return signature, constexprs, attrs


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) per thread, from cuobjdump.

    cuobjdump prints no spill count: the stack frame is where spilled registers go (these kernels keep no local arrays),
    0 B for every kernel on sm_80 / sm_90, 7312 B for the 128x128 FMA GEMM on sm_75.
    """
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    regs = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    if not regs or not stack:
        raise RuntimeError(f"cuobjdump printed no REG / STACK figures:\n{text}")
    return int(regs.group(1)), int(stack.group(1))


def compile_launch(launch: Launch, capability: int):
    """The compiled kernel (triton.compile's result: .asm["ptx"], .asm["cubin"], .metadata) of one recorded launch for
    sm_<capability>, specialized as the JIT would specialize that launch."""
    # Here, not at the top: triton is optional for the package (the torch backend runs without it), and only compiling
    # needs its compiler modules.
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = _signature(launch)
    src = ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=_options(launch))


def _options(launch: Launch) -> dict:
    return {k: launch.kwargs[k] for k in ("num_warps", "num_stages") if k in launch.kwargs}


def launch_key(launch: Launch) -> str:
    """What a compile depends on besides the target: equal for two launches that compile to the same binary."""
    signature, constexprs, attrs = _signature(launch)
    parts = (
        launch.kernel.__name__,
        signature,
        {k: repr(v) for k, v in constexprs.items()},
        sorted(attrs),
        _options(launch),
    )
    return repr(parts)


def default_jobs() -> int:
    """Processes for a pool: the CPUs this process may run on (each compile keeps one busy)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_tasks(fn, tasks: list, jobs: int, describe, verb: str) -> list:
    """fn(task) for every task, in `jobs` spawned processes when jobs > 1; results in task order.

    One progress line per task on stderr: a cold run is a minute or more of compiles. Spawned, not forked: the parent
    may hold CUDA or OpenMP state that a forked child must not inherit. GEMM tasks go first, being the slowest.
    """
    results = [None] * len(tasks)
    start = time.monotonic()

    def progress(i: int, done: int) -> None:
        print(
            f"aot: {verb} {done}/{len(tasks)}: {describe(tasks[i])} ({time.monotonic() - start:.1f} s)",
            file=sys.stderr,
            flush=True,
        )

    if jobs <= 1 or len(tasks) <= 1:
        for i, task in enumerate(tasks):
            results[i] = fn(task)
            progress(i, i + 1)
        return results
    order = sorted(range(len(tasks)), key=lambda i: "gemm" not in describe(tasks[i]))
    pool = ProcessPoolExecutor(min(jobs, len(tasks)), mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = {pool.submit(fn, tasks[i]): i for i in order}
        for done, future in enumerate(as_completed(futures), 1):
            i = futures[future]
            results[i] = future.result()
            progress(i, done)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results
