"""Compile every kernel ahead of time for sm_80 and sm_90, with the exact launches fused_moe makes at phixtral shapes.

No GPU needed: `fused_moe` runs on meta tensors with the kernels swapped for recorders, so the report covers the very
arguments, constexprs and configs the launchers pick. `--backward` reports the launches of fused_moe's backward instead
(the backward GEMMs over transposed weight views, the row pass, the combine, the weight gradients). Each recorded launch is then compiled with `triton.compile` for
each target, and the report gives shared memory, registers, spill stores and whether tensor-core instructions
(mma.sync on sm_80, wgmma on sm_90) made it into the PTX.

    python -m phixtral_kernels.aot [--tokens 1 64 4096] [--dtypes float16 bfloat16] [--backward] [--json]

Run it with TRITON_INTERPRET unset: the interpreter replaces the kernels with Python functions that cannot be compiled.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from unittest import mock

import torch

from . import grouped_gemm, moe, moe_backward, routing, unpermute
from ._triton import INTERPRET, triton

PHIXTRAL_SHAPE = dict(D=2560, F=10240, E=4, top_k=2)
_KERNEL_MODULES = {
    "_topk_softmax_kernel": routing,
    "_align_kernel": routing,
    "_grouped_gemm_kernel": grouped_gemm,
    "_combine_kernel": unpermute,
    "_act_backward_kernel": moe_backward,
    "_weight_grad_kernel": moe_backward,
}
_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32", torch.int64: "i64"}


@dataclass
class Launch:
    kernel: object  # the JITFunction
    args: tuple
    kwargs: dict


@dataclass
class CompileRow:
    kernel: str
    variant: str
    arch: str
    dtype: str
    tokens: int
    num_warps: int
    num_stages: int
    shared_bytes: int
    registers: int
    spill_bytes: int
    tensor_core: bool
    needs_tensor_core: bool


class _Recorder:
    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(Launch(self.kernel, args, kwargs))


@contextmanager
def _recording():
    """Swap every kernel for a recorder and let the launchers accept meta tensors."""
    launches = []
    patches = [mock.patch.object(mod, name, _Recorder(getattr(mod, name), launches)) for name, mod in _KERNEL_MODULES.items()]
    patches += [mock.patch.object(mod, "triton_unavailable_reason", lambda device: None) for mod in (routing, grouped_gemm, unpermute, moe)]
    for p in patches:
        p.start()
    try:
        yield launches
    finally:
        for p in patches:
            p.stop()


def record_launches(T: int, dtype: torch.dtype, D: int, F: int, E: int, top_k: int) -> list:
    """The kernel launches of one fused_moe call on meta tensors of these shapes."""
    meta = dict(device="meta", dtype=dtype)
    x = torch.empty(T, D, **meta)
    weights = (torch.empty(E, D, **meta), torch.empty(E, F, D, **meta), torch.empty(E, F, **meta))
    weights += (torch.empty(E, D, F, **meta), torch.empty(E, D, **meta))
    with _recording() as launches:
        moe.fused_moe(x, *weights, top_k, backend="triton")
    return launches


def record_backward_launches(T: int, dtype: torch.dtype, D: int, F: int, E: int, top_k: int) -> list:
    """The kernel launches of one fused_moe backward with every gradient asked for, on meta tensors of these shapes."""
    meta = dict(device="meta", dtype=dtype)
    gemm1, gemm2 = grouped_gemm.moe_gemm_configs(T, top_k, E)
    S, block_m = T * top_k, gemm1.block_m
    index = dict(device="meta", dtype=torch.int32)
    routing_map = routing.RoutingMap(
        torch.empty(T, top_k, device="meta"), torch.empty(T, top_k, **index),
        torch.empty(S + E * (block_m - 1), **index), torch.empty(E + 1, **index), block_m,
    )  # fmt: skip
    x, dout = torch.empty(T, D, **meta), torch.empty(T, D, **meta)
    w1, b1, w2, b2 = torch.empty(E, F, D, **meta), torch.empty(E, F, **meta), torch.empty(E, D, F, **meta), torch.empty(E, D, **meta)
    h = torch.empty(routing_map.max_rows, F, **meta)
    with _recording() as launches:
        u = moe_backward.expert_grad_hidden(dout, w2, routing_map, gemm1)
        a = moe_backward.expert_preact(x, w1, b1, routing_map, gemm1)
        da, _ = moe_backward.act_backward(u, a, h, dout, b2, routing_map, compute_da=True, compute_dwts=True)
        moe_backward.expert_grad_input(da, w1, routing_map, gemm2)
        moe_backward.expert_weight_grads(x, dout, h, da, routing_map, (True, True, True, True))
    return launches


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


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, spill store bytes) from cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    regs = re.search(r"REG:(\d+)", text)
    spills = re.search(r"STORE:(\d+)", text)
    return int(regs.group(1)) if regs else -1, int(spills.group(1)) if spills else 0


def compile_launch(launch: Launch, capability: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = _signature(launch)
    options = {k: launch.kwargs[k] for k in ("num_warps", "num_stages") if k in launch.kwargs}
    src = ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)


def _variant(launch: Launch) -> str:
    kw = launch.kwargs
    if "GATHER_P" in kw:
        name = "w1/b1" if not kw["GATHER_P"] else "w2/b2"
        return f"{name} {kw['BLOCK_N']}x{kw['BLOCK_K']}x{kw['BLOCK_R']}"
    if "BLOCK_M" in kw and "GATHER_A" in kw:
        if kw["GATHER_A"]:
            name = "gemm1" if kw["ACTIVATION"] else "preact" if kw["HAS_BIAS"] else "grad_hidden"
        else:
            name = "gemm2" if kw["HAS_BIAS"] else "grad_input"
        return f"{name} {kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} split{kw['SPLIT_K']}"
    return ""


def compile_report(tokens=(1, 64, 4096), dtypes=(torch.float16, torch.bfloat16), capabilities=(80, 90), backward=False) -> list:
    if INTERPRET:
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    rows = []
    for dtype in dtypes:
        for T in tokens:
            record = record_backward_launches if backward else record_launches
            for launch in record(T, dtype, **PHIXTRAL_SHAPE):
                for cap in capabilities:
                    compiled = compile_launch(launch, cap)
                    ptx = compiled.asm["ptx"]
                    regs, spills = _resource_usage(compiled.asm["cubin"])
                    is_gemm = launch.kernel.__name__ in ("_grouped_gemm_kernel", "_weight_grad_kernel")
                    rows.append(
                        CompileRow(
                            kernel=launch.kernel.__name__.strip("_"),
                            variant=_variant(launch),
                            arch=f"sm_{cap}",
                            dtype=str(dtype).replace("torch.", ""),
                            tokens=T,
                            num_warps=compiled.metadata.num_warps,
                            num_stages=compiled.metadata.num_stages,
                            shared_bytes=compiled.metadata.shared,
                            registers=regs,
                            spill_bytes=spills,
                            tensor_core=bool(re.search(r"\bwgmma\.mma_async|\bmma\.sync", ptx)),
                            needs_tensor_core=is_gemm and dtype != torch.float32,  # fp32 runs as ieee FMA
                        )
                    )
    return rows


def format_table(rows) -> str:
    head = "| kernel | variant | arch | dtype | T | warps | stages | shared KB | regs | spills B | tensor cores |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        tc = ("wgmma" if r.arch == "sm_90" else "mma") if r.tensor_core else "-"
        lines.append(
            f"| {r.kernel} | {r.variant} | {r.arch} | {r.dtype} | {r.tokens} | {r.num_warps} | {r.num_stages} | "
            f"{r.shared_bytes / 1024:.1f} | {r.registers} | {r.spill_bytes} | {tc} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 4096])
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"], choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--backward", action="store_true", help="the launches of fused_moe's backward instead")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    rows = compile_report(args.tokens, [getattr(torch, d) for d in args.dtypes], backward=args.backward)
    bad = [r for r in rows if r.spill_bytes or (r.needs_tensor_core and not r.tensor_core)]
    if args.json:
        print(json.dumps({"rows": [asdict(r) for r in rows], "problems": len(bad)}))
    else:
        print(format_table(rows))
        print(f"\n{len(rows)} compiles, {len(bad)} with spills or without tensor-core instructions", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
