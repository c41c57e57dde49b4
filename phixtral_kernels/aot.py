"""Compile every kernel ahead of time for sm_80, sm_86, sm_89 and sm_90, with the launches fused_moe makes at phixtral
shapes.

No GPU needed: `fused_moe` runs on meta tensors with the kernels swapped for recorders (launches.py), so the report
covers the very arguments, constexprs and configs the launchers pick. Each distinct recorded launch is then compiled
with `triton.compile` for each target, in a pool of processes (Triton's compile holds the GIL, so threads do not
overlap), and the report gives shared memory against the target's opt-in limit per block (163 KB on sm_80, 99 KB on
sm_86 / sm_89, 227 KB on sm_90; a row over it is a problem) and, for the grouped GEMMs, the estimate their configs are
fitted by (shared_memory.gemm_shared_bytes), registers, stack bytes per thread (register spills: the kernels keep no
local arrays), whether tensor-core instructions (mma.sync on sm_80 - sm_89, wgmma on sm_90) made it into the PTX, and
how many wgmma.mma_async and cp.async.bulk.tensor (TMA copy) instructions the PTX holds. The launches are recorded once
per target with that target's configs (the heuristic picks 128x256 tiles on sm_90 for prefill; fp32 tiles take fewer
stages on sm_86 / sm_89); tuned tables play no part here (meta tensors have no GPU). sm_75 (T4) is reported for
information only, beside sm_80: Triton has no tensor-core path below sm_80 and `triton_unavailable_reason` gates it
off.

    python -m phixtral_kernels.aot [--tokens 1 64 128 4096] [--dtypes float16 bfloat16 float32] [--archs 80 86 89 90]
        [--backward | --quant SCHEME ... | --tma] [--jobs N] [--json]

`--tma` reports fused_moe's launches with every GEMM config's TMA flag set (weight tiles through tensor descriptors):
on sm_90 their PTX must hold cp.async.bulk.tensor, or the row counts as a problem; sm_80 has no TMA and loads them
as before.

`--backward` reports the launches of fused_moe's backward instead (the backward GEMMs over transposed weight views, the
row pass, the combine, the weight gradients).

`--quant SCHEME ...` reports the launches of fused_moe with quantized experts instead, plus a quantized dense Linear of
attention's Wqkv shape (`quantized_linear`). SCHEME is `w<bits>g<group>` or `w<bits>c` (per channel), then `z` for zero
points and `a` for act-order: w4g128, w4g128za, w8c. Act-order gives GEMM 1 and the dense Linear a g_idx (per-element
group lookups); GEMM 2's act-order is absorbed at load (`absorb_act_order`), so its launch has none.

`--path legacy` (or `decode`) reports the launches of that forward chain instead of the default one (see
moe_triton.DECODE_PATHS): at T <= 16 the default is the three-launch decode chain.

On a CUDA machine, `--warm` instead compiles the launches of these shapes for the GPU present into Triton's cache, the
same way a first launch would (`JITFunction.warmup` on empty CUDA tensors), so that later processes start warm. It
takes the default chain at every T and the legacy chain at decode T as well (benchmarks/bench_moe.py times both):

    python -m phixtral_kernels.aot --warm [--tokens ...] [--dtypes ...] [--jobs N]

Run it with TRITON_INTERPRET unset: the interpreter replaces the kernels with Python functions that cannot be compiled.
Progress goes to stderr, one line per compile. How one launch compiles (the JIT's specialization rebuilt, cuobjdump's
figures, the pool of processes) is aot_compile.py's; this module picks the launches, the targets and the checks.
"""

import argparse
import functools
import json
import re
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch

from . import moe_triton
from ._triton import INTERPRET
from .aot_compile import compile_launch, default_jobs, launch_key, resource_usage, run_tasks
from .launches import (  # noqa: F401 -- KERNEL_MODULES, empty_quantized, recording: their home before launches.py
    KERNEL_MODULES,
    PHIXTRAL_SHAPE,
    Launch,
    empty_quantized,
    parse_quant_scheme,
    record_backward_launches,
    record_launches,
    recording,
)
from .shared_memory import capability_shared_bytes, gemm_shared_bytes

# Checked targets: tensor cores in every fp16/bf16 GEMM, no spills, shared memory within the opt-in limit. sm_86 and
# sm_89 (RTX 30xx / 40xx, A10, L4, L40; sm_120's RTX 50xx has their 99 KB too) for the shared memory most local GPUs
# have: fp32 tiles sized for sm_80 / sm_90 overflow it unless fitted (gemm_configs.moe_gemm_configs).
CAPABILITIES = (80, 86, 89, 90)
# Reported for information, never counted as a problem: (capability, dtypes). The kernels refuse sm_75 (T4, no bf16,
# no tensor-core path in Triton below sm_80: its 128x128 GEMM tiles fall back to FMA and spill); its row shows why.
INFO_CAPABILITIES = ((75, (torch.float16,)),)


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
    info_only: bool = False  # a target reported for information (sm_75), not held to the checks
    wgmma: int = 0  # wgmma.mma_async instructions in the PTX (Hopper's warpgroup MMA)
    tma: int = 0  # cp.async.bulk.tensor instructions in the PTX (TMA tile copies)
    tma_requested: bool = False  # the launch asked for TMA weight loads (TMA_B)
    shared_limit: int = 0  # the target's opt-in shared memory per block
    shared_estimate: int | None = None  # grouped GEMMs: shared_memory.gemm_shared_bytes of the launch's config

    @property
    def problem(self) -> bool:
        no_tma = self.tma_requested and self.arch == "sm_90" and not self.tma  # sm_80 has no TMA: plain loads there
        over = self.shared_bytes > self.shared_limit
        return not self.info_only and bool(
            self.spill_bytes or (self.needs_tensor_core and not self.tensor_core) or no_tma or over
        )


def _variant(launch: Launch) -> str:
    kw = launch.kwargs
    if "GATHER_P" in kw:
        name = "w1/b1" if not kw["GATHER_P"] else "w2/b2"
        return f"{name} {kw['BLOCK_N']}x{kw['BLOCK_K']}x{kw['BLOCK_R']}"
    if "BLOCK_M" in kw and "GATHER_A" in kw:
        if kw["GATHER_A"] and kw["SCATTER_C"]:
            name = "linear"  # quantized_linear: a dense layer as one expert
        elif kw["GATHER_A"]:
            name = "gemm1" if kw["ACTIVATION"] else "preact" if kw["HAS_BIAS"] else "grad_hidden"
        else:
            name = "gemm2" if kw["HAS_BIAS"] else "grad_input"
        if kw.get("PAIR_SUM"):
            name += "+sum"  # GEMM 2 summing each token's two rows (no combine launch)
        tma = " tma" if kw.get("TMA_B") else ""
        quant = ""
        if kw.get("W_BITS"):
            group = f"g{kw['GROUP_SIZE']}" if kw["GROUP_SIZE"] else "c"
            quant = f" w{kw['W_BITS']}{group}{'z' if kw['HAS_ZEROS'] else ''}{'a' if kw['HAS_G_IDX'] else ''}"
        return f"{name} {kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} split{kw['SPLIT_K']}{quant}{tma}"
    return ""


# --- work in a pool of processes: a task names its launch (dtype, T, index into record_launches, shape), since kernels
# and tensors do not cross process boundaries; each process records the launches again (milliseconds, meta tensors).
@functools.lru_cache(maxsize=None)
def _launches(T: int, dtype_name: str, shape: tuple, capability: int | None = None) -> list:
    """shape: the layer's (name, size) items, plus ("backward", True) for the launches of the backward, ("quant",
    scheme) for those of quantized experts, ("path", name) for a forward chain or ("tma", True) for the forward's with
    TMA weight loads. capability: the target whose configs the launchers pick (None: no particular GPU)."""
    sizes = dict(shape)
    if sizes.pop("backward", False):
        return record_backward_launches(T, getattr(torch, dtype_name), **sizes, capability=capability)
    return record_launches(T, getattr(torch, dtype_name), **sizes, capability=capability)


def _shapes(shape: dict, backward: bool = False, quant=(), path: str = "auto", tma: bool = False) -> list[tuple]:
    """The shape items of each report: one per quant scheme, else one (forward, backward, or forward with TMA);
    ("path", name) for a forward chain other than the default."""
    base = tuple(shape.items()) + ((("path", path),) if path != "auto" and not backward else ())
    if quant:
        return [base + (("quant", scheme),) for scheme in quant]
    return [base + ((("backward", True),) if backward else (("tma", True),) if tma else ())]


def _describe(dtype_name: str, T: int, index: int, shape: tuple, capability: int | None = None) -> str:
    launch = _launches(T, dtype_name, shape, capability)[index]
    return " ".join(filter(None, (launch.kernel.__name__.strip("_"), _variant(launch), dtype_name, f"T={T}")))


def _compile_task(task) -> CompileRow:
    dtype_name, T, index, shape, capability, info_only = task
    launch = _launches(T, dtype_name, shape, capability)[index]
    compiled = compile_launch(launch, capability)
    regs, stack = resource_usage(compiled.asm["cubin"])
    is_gemm = launch.kernel.__name__ in ("_grouped_gemm_kernel", "_weight_grad_kernel")
    ptx = compiled.asm["ptx"]
    return CompileRow(
        kernel=launch.kernel.__name__.strip("_"),
        variant=_variant(launch),
        arch=f"sm_{capability}",
        dtype=dtype_name,
        tokens=T,
        num_warps=compiled.metadata.num_warps,
        num_stages=compiled.metadata.num_stages,
        shared_bytes=compiled.metadata.shared,
        registers=regs,
        spill_bytes=stack,
        tensor_core=bool(re.search(r"\bwgmma\.mma_async|\bmma\.sync", ptx)),
        wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)),
        tma=len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx)),
        tma_requested=bool(launch.kwargs.get("TMA_B")),
        needs_tensor_core=is_gemm and dtype_name != "float32" and capability >= 80,  # fp32 runs as ieee FMA
        info_only=info_only,
        shared_limit=capability_shared_bytes(capability),
        shared_estimate=_shared_estimate(launch, capability),
    )


def _shared_estimate(launch: Launch, capability: int) -> int | None:
    """gemm_shared_bytes of a grouped GEMM launch, from its arguments (a, scales, c) and constexprs; None for the
    other kernels."""
    if launch.kernel.__name__ != "_grouped_gemm_kernel":
        return None
    kw, (a, _, scales, *_), c = launch.kwargs, launch.args, launch.args[6]
    return gemm_shared_bytes(
        kw["BLOCK_M"],
        kw["BLOCK_N"],
        kw["BLOCK_K"],
        kw["num_stages"],
        kw["num_warps"],
        a.element_size(),
        divmod(capability, 10),
        w_bits=kw["W_BITS"],
        act_order=kw["HAS_G_IDX"],
        group_size=kw["GROUP_SIZE"],
        zeros=kw["HAS_ZEROS"],
        scale_bytes=scales.element_size(),
        tma=kw["TMA_B"],
        out_bytes=c.element_size(),
    )


# One token count per GEMM config moe_gemm_configs picks at phixtral's E=4, top_k=2 (rows per expert <= 16, <= 32,
# <= 64, more; on sm_90 the last is 128x256 tiles): every distinct launch fused_moe makes, each compiled once.
TOKENS = (1, 64, 128, 4096)


def _report_tasks(tokens, dtypes, capabilities, info_capabilities, shapes: list):
    """(every task, {(launch key, capability): index of the first task that compiles it})."""
    targets = [(cap, False, None) for cap in capabilities] + [(cap, True, only) for cap, only in info_capabilities]
    tasks, first = [], {}
    for shape in shapes:
        for dtype in dtypes:
            name = str(dtype).replace("torch.", "")
            for T in tokens:
                for cap, info_only, only in targets:
                    if only is not None and dtype not in only:
                        continue
                    for index, launch in enumerate(_launches(T, name, shape, cap)):
                        first.setdefault((launch_key(launch), cap), len(tasks))
                        tasks.append((name, T, index, shape, cap, info_only))
    return tasks, first


def _describe_compile(task) -> str:
    return f"{_describe(*task[:5])} sm_{task[4]}"


def compile_report(
    tokens=TOKENS,
    dtypes=(torch.float16, torch.bfloat16),
    capabilities=CAPABILITIES,
    info_capabilities=INFO_CAPABILITIES,
    jobs: int | None = None,
    shape: dict = PHIXTRAL_SHAPE,
    backward: bool = False,
    quant=(),
    path: str = "auto",
    tma: bool = False,
) -> list:
    """One CompileRow per (dtype, T, launch of fused_moe or, with `backward`, of its backward, or with `quant` schemes,
    of fused_moe on quantized experts and a quantized dense Linear, or with `tma` of fused_moe with TMA weight loads,
    target). Each distinct launch compiles once per target."""
    if INTERPRET:
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    for scheme in quant:
        parse_quant_scheme(scheme)
    tasks, first = _report_tasks(
        tokens, dtypes, capabilities, info_capabilities, _shapes(shape, backward, quant, path, tma)
    )
    unique = sorted(set(first.values()))
    results = run_tasks(
        _compile_task, [tasks[i] for i in unique], jobs or default_jobs(), _describe_compile, "compiled"
    )
    compiled = dict(zip(unique, results))
    rows = []
    for name, T, index, shape_items, cap, _ in tasks:
        row = compiled[first[(launch_key(_launches(T, name, shape_items, cap)[index]), cap)]]
        rows.append(replace(row, tokens=T))
    return rows


def _warm_task(task) -> float:
    dtype_name, T, index, shape, _ = task
    start = time.monotonic()
    record_launches(T, getattr(torch, dtype_name), **dict(shape), device="cuda", warm_index=index)
    return time.monotonic() - start


def _warm_groups(tokens, shape: dict = PHIXTRAL_SHAPE, quant=()) -> list:
    """(token counts, shape items) to warm: the default chain at every T; float experts also the legacy chain at the T
    where it differs (T <= DECODE_MAX_TOKENS), which benchmarks/bench_moe.py times against the default."""
    groups = [(tuple(tokens), s) for s in _shapes(shape, quant=quant)]
    decode_tokens = tuple(T for T in tokens if T <= moe_triton.DECODE_MAX_TOKENS)
    if decode_tokens and not quant:
        groups += [(decode_tokens, s) for s in _shapes(shape, path="legacy")]
    return groups


def _warm_tasks(groups, dtypes) -> list:
    """One task (dtype, T, launch index, shape, description) per distinct launch, the first (dtype, T, shape) that makes
    it. groups: (token counts, shape items).

    With a GPU the launches are recorded on empty CUDA tensors, so that they carry this GPU's choices (its capability's
    heuristic, its tuned table) as the warm processes will; without one (--dry-run) on meta tensors."""
    cuda = torch.cuda.is_available()
    tasks, seen = [], set()
    for tokens, shape in groups:
        for dtype in dtypes:
            name = str(dtype).replace("torch.", "")
            for T in tokens:
                launches = (
                    record_launches(T, dtype, **dict(shape), device="cuda") if cuda else _launches(T, name, shape)
                )
                for index, launch in enumerate(launches):
                    if launch_key(launch) not in seen:
                        seen.add(launch_key(launch))
                        what = " ".join(
                            filter(None, (launch.kernel.__name__.strip("_"), _variant(launch), name, f"T={T}"))
                        )
                        tasks.append((name, T, index, shape, what))
    return tasks


def warm_cache(tokens, dtypes, jobs: int | None = None, shape: dict = PHIXTRAL_SHAPE, quant=()) -> int:
    """Compile every distinct launch fused_moe makes at these shapes for this machine's GPU, into Triton's cache.

    The launchers run on empty CUDA tensors with each kernel swapped for `JITFunction.warmup`, so the cache key is the
    JIT's own and a later process launching the same shapes finds the binary. Returns the number of compiles.
    """
    if INTERPRET:
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    if not torch.cuda.is_available():
        raise RuntimeError("--warm compiles for the GPU of this machine, and torch sees no CUDA GPU")
    tasks = _warm_tasks(_warm_groups(tokens, shape, quant), dtypes)
    run_tasks(_warm_task, tasks, jobs or default_jobs(), lambda t: t[4], "warmed")
    return len(tasks)


def format_table(rows) -> str:
    """The rows as a markdown table: shared memory in KB against the target's limit (and the estimate the configs are
    fitted by, for grouped GEMMs), registers and stack per thread, the tensor-core and TMA instructions."""
    head = (
        "| kernel | variant | arch | dtype | T | warps | stages | shared KB | limit KB | estimate KB | regs | stack B "
        "| tensor cores | wgmma | TMA |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        tc = "wgmma" if r.wgmma else "mma" if r.tensor_core else "-"
        arch = f"{r.arch} (info)" if r.info_only else r.arch
        estimate = "-" if r.shared_estimate is None else f"{r.shared_estimate / 1024:.1f}"
        over = " OVER" if r.shared_bytes > r.shared_limit else ""
        lines.append(
            f"| {r.kernel} | {r.variant} | {arch} | {r.dtype} | {r.tokens} | {r.num_warps} | {r.num_stages} | "
            f"{r.shared_bytes / 1024:.1f}{over} | {r.shared_limit / 1024:.0f} | {estimate} | {r.registers} | "
            f"{r.spill_bytes} | {tc} | {r.wgmma} | {r.tma} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument(
        "--dtypes", nargs="+", default=["float16", "bfloat16"], choices=["float16", "bfloat16", "float32"]
    )
    parser.add_argument("--backward", action="store_true", help="the launches of fused_moe's backward instead")
    parser.add_argument(
        "--quant",
        nargs="+",
        default=[],
        metavar="SCHEME",
        help="the launches of quantized experts instead, per scheme: w4g128, w4g128za, w8c, ...",
    )
    parser.add_argument(
        "--path",
        default="auto",
        choices=list(moe_triton.DECODE_PATHS),
        help="the forward chain to report (PHIXTRAL_MOE_DECODE_PATH's names; default: auto)",
    )
    parser.add_argument(
        "--tma", action="store_true", help="the forward's launches with every GEMM config's TMA flag set"
    )
    parser.add_argument(
        "--archs",
        type=int,
        nargs="+",
        choices=CAPABILITIES,
        default=list(CAPABILITIES),
        help="the checked targets (default: all; sm_75 is reported for information beside sm_80)",
    )
    parser.add_argument(
        "--jobs", type=int, default=None, help="compiles at once, in processes (default: the CPUs available)"
    )
    parser.add_argument(
        "--warm", action="store_true", help="compile for this machine's GPU into Triton's cache instead of reporting"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--dry-run", action="store_true", help="list the compiles, compile nothing (no GPU needed)")
    args = parser.parse_args(argv)
    if INTERPRET:
        parser.error(
            "unset TRITON_INTERPRET: under the interpreter the kernels are Python functions and the configs differ"
        )
    if sum(map(bool, (args.backward, args.quant, args.tma))) > 1:
        parser.error("--backward, --quant and --tma report different launches: pass one of them")
    if args.tma and args.warm:
        parser.error("--warm compiles the launches fused_moe makes here; --tma is for the report")
    if args.path != "auto" and (args.backward or args.warm):
        parser.error(
            "--path picks the forward chain to report: not with --backward or --warm (which warms both chains)"
        )
    for scheme in args.quant:
        try:
            parse_quant_scheme(scheme)
        except ValueError as e:
            parser.error(str(e))
    dtypes = [getattr(torch, d) for d in args.dtypes]
    # sm_75's row is the float GEMM's, beside sm_80's: the other reports add nothing there
    info = () if args.quant or args.tma or 80 not in args.archs else INFO_CAPABILITIES
    start = time.monotonic()
    if args.dry_run:
        shapes = _shapes(PHIXTRAL_SHAPE, args.backward and not args.warm, args.quant, args.path, args.tma)
        if args.warm:
            lines = [t[4] for t in _warm_tasks(_warm_groups(args.tokens, quant=args.quant), dtypes)]
        else:
            tasks, first = _report_tasks(args.tokens, dtypes, tuple(args.archs), info, shapes)
            lines = [_describe_compile(tasks[i]) for i in sorted(set(first.values()))]
        print("\n".join(lines + [f"aot --dry-run: {len(lines)} distinct compiles{' (--warm)' if args.warm else ''}"]))
        return 0
    if args.warm:
        count = warm_cache(args.tokens, dtypes, args.jobs, quant=args.quant)
        gpu, seconds = torch.cuda.get_device_name(), time.monotonic() - start
        print(f"aot --warm: {count} distinct launches compiled for {gpu} in {seconds:.1f} s")
        return 0
    rows = compile_report(
        args.tokens,
        dtypes,
        tuple(args.archs),
        info,
        jobs=args.jobs,
        backward=args.backward,
        quant=args.quant,
        path=args.path,
        tma=args.tma,
    )
    bad = [r for r in rows if r.problem]
    if args.json:
        print(json.dumps({"rows": [asdict(r) for r in rows], "problems": len(bad)}))
    else:
        print(format_table(rows))
    print(
        f"\n{len(rows)} rows in {time.monotonic() - start:.0f} s, {len(bad)} with spills, over the target's shared "
        f"memory, without tensor-core instructions or (TMA asked for, on sm_90) without TMA copies"
        f" (sm_75 rows are information: the kernels are gated off below sm_80)",
        file=sys.stderr,
    )
    return 1 if bad else 0


if __name__ == "__main__":
    # Through the package, not this file's __main__: the pool's workers import the same module by its name.
    from phixtral_kernels.aot import main as package_main

    sys.exit(package_main())
