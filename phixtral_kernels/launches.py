"""Every Triton kernel launch fused_moe (or its backward, or a quantized Linear) makes, recorded instead of run.

The launchers run on empty tensors (meta tensors: nothing is allocated, nothing runs) with each kernel swapped for a
recorder, so a recorded launch holds the very arguments, constexprs and configs the launchers pick at that shape.
aot.py compiles them ahead of time and reports on them; tests count launches through KERNEL_MODULES; the warm path
(`recording(warm=True)`, `record_launches(..., warm_index=)`) compiles one launch into Triton's cache on a GPU.
"""

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, replace
from unittest import mock

import torch

from . import gemm_configs, grouped_gemm, moe, moe_backward, routing, unpermute
from .quant import QuantizedExperts

PHIXTRAL_SHAPE = dict(D=2560, F=10240, E=4, top_k=2)  # phixtral-4x2_8's MoE layer: the shapes the reports cover
# Every kernel the launchers call, by the module whose global the launcher looks it up in (the one to patch).
KERNEL_MODULES = {
    "_fused_routing_kernel": routing,
    "_topk_softmax_kernel": routing,
    "_align_kernel": routing,
    "_grouped_gemm_kernel": grouped_gemm,
    "_combine_kernel": unpermute,
    "_act_backward_kernel": moe_backward,
    "_weight_grad_kernel": moe_backward,
}


@dataclass
class Launch:
    """One recorded kernel launch: the kernel and the arguments it was called with (grid aside)."""

    kernel: object  # the JITFunction
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a kernel: records each launch; the launch numbered `warm_index` is compiled for the current GPU
    (JITFunction.warmup: the JIT's own cache key, so a later launch with the same arguments finds it) but not run."""

    def __init__(self, kernel, launches, warm_index=None):
        self.kernel, self.launches, self.warm_index = kernel, launches, warm_index

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if len(self.launches) == self.warm_index:
                self.kernel.warmup(*args, grid=grid, **kwargs)
            self.launches.append(Launch(self.kernel, args, kwargs))

        return launch


@contextmanager
def _recording(warm_index=None, capability: int | None = None, tma: bool = False):
    """Swap every kernel for a recorder and let the launchers accept meta tensors. capability (80, 90, ...): the GPU the
    config heuristic sees (meta tensors have none); tma: every GEMM config with its TMA flag set."""
    launches = []
    patches = [
        mock.patch.object(mod, name, _Recorder(getattr(mod, name), launches, warm_index))
        for name, mod in KERNEL_MODULES.items()
    ]
    patches += [
        mock.patch.object(mod, "triton_unavailable_reason", lambda *args: None)
        for mod in (routing, grouped_gemm, unpermute, moe)
    ]
    if capability is not None:
        patches.append(mock.patch.object(gemm_configs, "_capability", lambda device: divmod(capability, 10)))
    if tma:
        heuristic = gemm_configs.heuristic_configs
        with_tma = lambda *args, **kw: tuple(replace(c, tma=True) for c in heuristic(*args, **kw))  # noqa: E731
        patches.append(mock.patch.object(gemm_configs, "heuristic_configs", with_tma))
    for p in patches:
        p.start()
    try:
        yield launches
    finally:
        for p in patches:
            p.stop()


def recording(warm: bool = False):
    """Context manager: the kernel launches made inside are recorded, not run (a list, yielded); with `warm`, the first
    is compiled for the current GPU into Triton's cache (JITFunction.warmup), as a first real launch would."""
    return _recording(0 if warm else None)


def parse_quant_scheme(scheme: str) -> tuple[int, int, bool, bool]:
    """'w4g128za' -> (bits 4, group_size 128, zero points, act-order); 'w8c' -> (8, -1, False, False)."""
    m = re.fullmatch(r"w(4|8)(?:g(\d+)|c)(z?)(a?)", scheme)
    if not m:
        raise ValueError(
            f"quant scheme {scheme!r}: expected w<4|8>g<group> or w<4|8>c, then z (zero points), a (act-order)"
        )
    return int(m.group(1)), int(m.group(2) or -1), bool(m.group(3)), bool(m.group(4))


def empty_quantized(E: int, N: int, K: int, scheme: str, scales_dtype, device, *, act_order: bool) -> QuantizedExperts:
    """A QuantizedExperts of empty tensors (meta: no memory) in the layout of `scheme`; g_idx only if act_order and the
    scheme has it."""
    bits, group_size, zeros, has_act_order = parse_quant_scheme(scheme)
    G = K // group_size if group_size > 0 else 1
    i32 = dict(device=device, dtype=torch.int32)
    return QuantizedExperts(
        torch.empty(E, K * bits // 32, N, **i32),
        torch.empty(E, G, N * bits // 32, **i32) if zeros else None,
        torch.empty(E, G, N, device=device, dtype=scales_dtype),
        torch.empty(E, K, **i32) if act_order and has_act_order else None,
        bits, group_size, check=False,
    )  # fmt: skip


def record_launches(
    T: int,
    dtype: torch.dtype,
    D: int,
    F: int,
    E: int,
    top_k: int,
    *,
    quant: str = "",
    path: str = "auto",
    device="meta",
    warm_index=None,
    capability: int | None = None,
    tma: bool = False,
) -> list:
    """The kernel launches of one fused_moe call on empty tensors of these shapes (meta tensors: nothing runs).

    quant: a scheme (see `parse_quant_scheme`): quantized w1 (with act-order's g_idx when the scheme has it) and w2
    (act-order absorbed at load), then one quantized dense Linear of Wqkv's shape [3D, D].
    path: the forward chain, as PHIXTRAL_MOE_DECODE_PATH names it ("auto", "decode" or "legacy"). capability: the
    target the configs are picked for (meta tensors); tma: the GEMM configs with their TMA flag set."""
    alloc = dict(device=device, dtype=dtype)
    x = torch.empty(T, D, **alloc)
    w1, w2 = torch.empty(E, F, D, **alloc), torch.empty(E, D, F, **alloc)
    if quant:
        w1 = empty_quantized(E, F, D, quant, dtype, device, act_order=True)
        w2 = empty_quantized(E, D, F, quant, dtype, device, act_order=False)
    weights = (torch.empty(E, D, **alloc), w1, torch.empty(E, F, **alloc), w2, torch.empty(E, D, **alloc))
    with (
        _recording(warm_index, capability, tma) as launches,
        mock.patch.dict(os.environ, {"PHIXTRAL_MOE_DECODE_PATH": path}),
    ):
        moe.fused_moe(x, *weights, top_k, backend="triton")
        if quant:
            wqkv = empty_quantized(1, 3 * D, D, quant, dtype, device, act_order=True)
            moe.quantized_linear(x, wqkv, torch.empty(3 * D, **alloc), backend="triton")
    return launches


def record_backward_launches(
    T: int, dtype: torch.dtype, D: int, F: int, E: int, top_k: int, *, capability: int | None = None
) -> list:
    """The kernel launches of one fused_moe backward with every gradient asked for, on meta tensors of these shapes."""
    meta = dict(device="meta", dtype=dtype)
    with _recording(capability=capability):
        gemm1, gemm2 = gemm_configs.moe_gemm_configs(T, top_k, E, dims=(D, F), dtype=dtype, device="meta")
    S, block_m = T * top_k, gemm1.block_m
    index = dict(device="meta", dtype=torch.int32)
    routing_map = routing.RoutingMap(
        torch.empty(T, top_k, device="meta"), torch.empty(T, top_k, **index),
        torch.empty(S + E * (block_m - 1), **index), torch.empty(E + 1, **index), block_m,
    )  # fmt: skip
    x, dout = torch.empty(T, D, **meta), torch.empty(T, D, **meta)
    w1, b1, w2, b2 = (
        torch.empty(E, F, D, **meta),
        torch.empty(E, F, **meta),
        torch.empty(E, D, F, **meta),
        torch.empty(E, D, **meta),
    )
    h = torch.empty(routing_map.max_rows, F, **meta)
    with _recording(capability=capability) as launches:
        u = moe_backward.expert_grad_hidden(dout, w2, routing_map, gemm1)
        a = moe_backward.expert_preact(x, w1, b1, routing_map, gemm1)
        da, _ = moe_backward.act_backward(u, a, h, dout, b2, routing_map, compute_da=True, compute_dwts=True)
        moe_backward.expert_grad_input(da, w1, routing_map, gemm2)
        moe_backward.expert_weight_grads(x, dout, h, da, routing_map, (True, True, True, True))
    return launches
