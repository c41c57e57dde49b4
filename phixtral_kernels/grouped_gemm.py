"""Grouped expert GEMMs over the sorted slot map, with the permutation in the prologue and the MLP in the epilogues.

    GEMM 1 (`expert_gemm1`): h[r]     = gelu_tanh(x[slot_r // top_k] @ w1[e_r]^T + b1[e_r])     h [R, F] in x's dtype
    GEMM 2 (`expert_gemm2`): y[p, s_r] = w[s_r] * (h[r, Kp] @ w2[e_r, :, Kp]^T + [p == 0] b2[e_r])  y [P, S, D] fp32
    GEMM 2, top-k summed in it (`expert_gemm2_sum`, top_k <= 2, no K-split): out[t] = sum_k y[t * top_k + k]  [T, D]

r is a row of the sorted map (R = S + E * (block_m - 1) rows by upper bound), s_r its slot, e_r its expert, p one of P
K-splits. GEMM 1 gathers x's rows by slot inside the kernel, so no permuted copy of x exists; it writes h in sorted
order so GEMM 2 streams its A rows contiguously, then scatters its rows back to slot order in the epilogue. Bias, GELU
and the routing weight act on the fp32 accumulator. Padding rows (sentinel slot) are neither read as data nor written.

One kernel serves both GEMMs, and the backward's (moe_backward.py: transposed weight views, no bias); compile-time flags
pick the prologue and epilogue. Its grid is an upper bound computed from shapes alone (`RoutingMap.max_tiles`: the most
tiles T * top_k slots can fill, not every tile of the padded map); tiles past expert_offsets[E] exit at once, so
launching needs no host sync. Tiles and launch options come in a `GemmConfig`, chosen in gemm_configs.py.

The kernel, its K loop (float and packed quantized weights, pointer and TMA loads) and the top-2 pair sum are in
grouped_gemm_kernel.py; this module holds the launchers.
"""

import functools

import torch

from ._triton import INTERPRET, debug_checks, next_power_of_2, triton, triton_unavailable_reason
from .gemm_configs import (  # noqa: F401 -- SM90_*, heuristic_configs, moe_gemm_configs: their home before gemm_configs.py
    SM90_PREFILL,
    SM90_PREFILL_MIN_ROWS,
    GemmConfig,
    heuristic_configs,
    moe_gemm_configs,
    quantized_config,
    shared_limit,
    topk_sum_fits,
)
from .grouped_gemm_kernel import HAS_TENSOR_DESCRIPTORS, _grouped_gemm_kernel
from .quant import is_quantized
from .routing import RoutingMap
from .shared_memory import fit_shared_memory


def check_gemm_inputs(
    name: str, a: torch.Tensor, w, bias: torch.Tensor | None, routing: RoutingMap, config: GemmConfig
) -> None:
    """Raise a ValueError, TypeError or RuntimeError, prefixed with the launcher's `name`, when one grouped GEMM's
    inputs do not fit together or Triton cannot run on their device: a [rows, K], w [E, N, K] float (a's dtype) or a
    QuantizedExperts, bias [E, N] or None (the backward's GEMMs have none), all on a's device, config.block_m the
    map's."""
    bias_shape = None if bias is None else tuple(bias.shape)
    if a.dim() != 2 or len(w.shape) != 3 or (bias is not None and bias.dim() != 2):
        raise ValueError(
            f"{name}: expected a [rows, K], w [E, N, K], bias [E, N]; "
            f"got {tuple(a.shape)}, {tuple(w.shape)}, {bias_shape}"
        )
    E, N, K = w.shape
    if a.shape[1] != K or (bias is not None and bias_shape != (E, N)) or E != routing.num_experts:
        raise ValueError(
            f"{name}: shapes disagree: a {tuple(a.shape)}, w {tuple(w.shape)}, bias {bias_shape}, "
            f"routing over {routing.num_experts} experts"
        )
    if not is_quantized(w) and a.dtype != w.dtype:  # quantized: the scales may be in any float dtype
        raise TypeError(f"{name}: activations are {a.dtype} but weights are {w.dtype}")
    weights = w.qweight if is_quantized(w) else w
    for what, t in (
        ("weights", weights),
        ("bias", weights if bias is None else bias),
        ("routing map", routing.sorted_token_ids),
    ):
        if t.device != a.device:
            raise ValueError(f"{name}: activations are on {a.device} but the {what} on {t.device}")
    if config.block_m != routing.block_m:
        raise ValueError(f"{name}: config.block_m={config.block_m} but the routing map is aligned to {routing.block_m}")
    reason = triton_unavailable_reason(a.device)
    if reason is not None:
        raise RuntimeError(f"{name} cannot run: {reason}")


def _weight_args(w, like: torch.Tensor) -> tuple:
    """(b, scales, zeros, g_idx, their strides, the quantization constexprs) for one launch: float weights pass `like`
    for the pointers they never read."""
    if not is_quantized(w):
        return (w, like, like, like, (w.stride(0), w.stride(1), w.stride(2)), (0,) * 8,
                dict(W_BITS=0, GROUP_SIZE=0, HAS_ZEROS=False, HAS_G_IDX=False))  # fmt: skip
    zeros = w.qzeros if w.qzeros is not None else w.qweight
    g_idx = w.g_idx if w.g_idx is not None else w.qweight
    strides = (
        w.scales.stride(0),
        w.scales.stride(1),
        w.scales.stride(2),
        zeros.stride(0),
        zeros.stride(1),
        zeros.stride(2),
    )
    strides += (g_idx.stride(0), g_idx.stride(1)) if w.g_idx is not None else (0, 0)
    meta = dict(
        W_BITS=w.bits, GROUP_SIZE=w.kernel_group_size, HAS_ZEROS=w.qzeros is not None, HAS_G_IDX=w.g_idx is not None
    )
    b_strides = (w.qweight.stride(0), w.qweight.stride(2), w.qweight.stride(1))  # (expert, n, packed row)
    return w.qweight, w.scales, zeros, g_idx, b_strides, strides, meta


def tma_applies(config: GemmConfig, w) -> bool:
    """Whether a launch with `config` on weights `w` loads its B tiles through a tensor descriptor."""
    if not (config.tma and HAS_TENSOR_DESCRIPTORS) or is_quantized(w):
        return False
    E, N, K = w.shape
    # TMA: last stride 1, the other strides and the base 16-byte aligned; the kernel treats w as one [E * N, K] matrix.
    # (torch allocations are 256-byte aligned: the storage offset decides the base's alignment.)
    return (w.stride(2) == 1 and w.stride(1) == K and w.stride(0) == N * K and (K * w.element_size()) % 16 == 0
            and (w.storage_offset() * w.element_size()) % 16 == 0)  # fmt: skip


def _k_loop_meta(config: GemmConfig, w, K: int, k_per_split: int) -> dict:
    """The K loop's constexprs: EVEN_K when every split's K range lies inside K, TMA_B (see `tma_applies`)."""
    tma = tma_applies(config, w)
    if tma and not INTERPRET:
        _ensure_allocator()
    return dict(EVEN_K=k_per_split * config.split_k == K, TMA_B=tma)


def _fit_to_device(config: GemmConfig, a: torch.Tensor, w, c: torch.Tensor) -> GemmConfig:
    """config as it fits the shared memory of a's GPU (`fit_shared_memory`, with the weights' packing and c's element
    size), whoever chose it: unchanged off CUDA and wherever it fits."""
    limit = shared_limit(a.device)
    if limit is None:
        return config
    quant = ()
    if is_quantized(w):
        quant = (("w_bits", w.bits), ("act_order", w.g_idx is not None), ("group_size", w.kernel_group_size),
                 ("zeros", w.qzeros is not None), ("scale_bytes", w.scales.element_size()))  # fmt: skip
    return _fitted(config, *limit, a.element_size(), c.element_size(), quant)


@functools.lru_cache(maxsize=1024)  # a handful of configs per process: the fit costs a dictionary lookup per launch
def _fitted(config: GemmConfig, capability, shared_bytes: int, element: int, out_bytes: int, quant: tuple):
    return fit_shared_memory(config, shared_bytes, element, capability, out_bytes=out_bytes, **dict(quant))


def _ensure_allocator() -> None:
    """In-kernel descriptors live in global scratch that Triton asks an allocator for: one from torch's caching
    allocator (graph-capture safe) unless the caller set one."""
    try:
        # Here, not at the top: triton is optional (the torch backend runs without it) and _allocation is one of its
        # private modules, which a release may move; only a TMA launch on a GPU needs it.
        from triton.runtime import _allocation

        if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):  # internals moved: set ours
        pass
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


def launch_grouped_gemm(
    a,
    w,
    bias,
    c,
    routing: RoutingMap,
    config: GemmConfig,
    *,
    gather_a: bool,
    scatter_c: bool,
    activation: str,
    mul_routing_weight: bool,
    pair=None,
    tight_grid: bool = True,
) -> None:
    """One launch of the grouped GEMM over the routing map's sorted rows r: c = epilogue(a[row] @ w[e_r]^T + bias[e_r]).
    No host sync; inputs are the caller's to check (`check_gemm_inputs`), outputs the caller's to allocate.

    a: gather_a: x [T, K], row slot_r // top_k (the permutation in the prologue); else h [R, K] in sorted order.
    w: any strided [E, N, K] view (the backward passes transposed weights) or a QuantizedExperts; bias [E, N] or None.
    c: scatter_c: y [split_k, S, N] fp32 partials in slot order (bias in split 0), or with `pair` the token rows
    out [T, N]; else [R, N] in sorted order. activation: "gelu_tanh" or "" (on the fp32 accumulator);
    mul_routing_weight: each row times its slot's routing weight. pair: the int32 [T, N] buffer of the top-2 sum (see
    grouped_gemm_kernel.py).
    tight_grid: row tiles up to RoutingMap.max_tiles; False launches every tile of the padded map (the grid before the
    bound, kept to time the two against each other).
    """
    E, N, K = w.shape
    if is_quantized(w):
        config = quantized_config(config, w)
    config = _fit_to_device(config, a, w, c)
    pair_sum = pair is not None
    c_split_stride = c.stride(0) if scatter_c and not pair_sum else 0
    c_2d = c[0] if scatter_c and not pair_sum else c
    has_bias = bias is not None
    if not has_bias:
        bias = c_2d[:1, :1]  # any pointer: never read
    if not pair_sum:
        pair = routing.topk_ids  # any pointer: never read
    b, scales, zeros, g_idx, b_strides, q_strides, q_meta = _weight_args(w, c_2d)
    num_pid_m = routing.max_tiles if tight_grid else triton.cdiv(routing.max_rows, config.block_m)
    grid = (num_pid_m * triton.cdiv(N, config.block_n), config.split_k)
    k_per_split = triton.cdiv(triton.cdiv(K, config.block_k), config.split_k) * config.block_k
    _grouped_gemm_kernel[grid](
        a, b, scales, zeros, g_idx, bias, c_2d,
        routing.sorted_token_ids, routing.expert_offsets, routing.topk_weights, pair,
        N, K, k_per_split, routing.num_slots, num_pid_m, E,
        a.stride(0), a.stride(1),
        *b_strides,
        *q_strides,
        bias.stride(0), bias.stride(1),
        c_split_stride, c_2d.stride(0), c_2d.stride(1), pair.stride(0),
        TOP_K=routing.top_k, E_PAD=next_power_of_2(E),
        GATHER_A=gather_a, SCATTER_C=scatter_c, PAIR_SUM=pair_sum, XCHG_AS_INT=INTERPRET and pair_sum,
        HAS_BIAS=has_bias, ACTIVATION=activation, MUL_ROUTING_WEIGHT=mul_routing_weight,
        DOT_IN_FP32=INTERPRET and a.dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        **q_meta, **_k_loop_meta(config, w, K, k_per_split),
        SPLIT_K=config.split_k, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        GROUP_M=config.group_m, num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip


def expert_gemm1(
    x: torch.Tensor, w1, b1: torch.Tensor, routing: RoutingMap, config: GemmConfig, *, tight_grid=True
) -> torch.Tensor:
    """h = gelu_tanh(x[slot // top_k] @ w1[e]^T + b1[e]) for every sorted row: x [T, D], w1 [E, F, D] (float, or a
    QuantizedExperts of that shape), b1 [E, F].

    Returns h [R, F] in x's dtype, in sorted order; padding rows are left unwritten (never read by `expert_gemm2`).
    """
    check_gemm_inputs("expert_gemm1", x, w1, b1, routing, config)
    if config.split_k != 1:
        raise ValueError("expert_gemm1: split_k must be 1 (GELU is applied to the full sum)")
    h = torch.empty(routing.max_rows, w1.shape[1], dtype=x.dtype, device=x.device)
    if routing.num_slots:
        launch_grouped_gemm(
            x,
            w1,
            b1,
            h,
            routing,
            config,
            gather_a=True,
            scatter_c=False,
            activation="gelu_tanh",
            mul_routing_weight=False,
            tight_grid=tight_grid,
        )
    return h


def expert_gemm2(
    h: torch.Tensor, w2, b2: torch.Tensor, routing: RoutingMap, config: GemmConfig, *, tight_grid=True
) -> torch.Tensor:
    """y[p, slot] = w[slot] * (h[r] @ w2[e]^T + b2[e]) back in slot order: h [R, F], w2 [E, D, F] (float, or a
    QuantizedExperts of that shape), b2 [E, D].

    Returns y [split_k, S, D] fp32: partial sums over K-splits (b2 in split 0), summed by `moe_combine`.
    """
    check_gemm_inputs("expert_gemm2", h, w2, b2, routing, config)
    if h.shape[0] != routing.max_rows:
        raise ValueError(f"expert_gemm2: h must have the routing map's {routing.max_rows} rows, got {h.shape[0]}")
    y = torch.empty(config.split_k, routing.num_slots, w2.shape[1], dtype=torch.float32, device=h.device)
    if routing.num_slots:
        launch_grouped_gemm(
            h,
            w2,
            b2,
            y,
            routing,
            config,
            gather_a=False,
            scatter_c=True,
            activation="",
            mul_routing_weight=True,
            tight_grid=tight_grid,
        )
    return y


def pair_buffer(out: torch.Tensor, top_k: int) -> torch.Tensor | None:
    """The int32 [T, D] buffer `expert_gemm2_sum` pairs rows in at top_k = 2 (None at top_k = 1): out itself, viewed
    as int32, when out is fp32 (the second row of each pair overwrites the first's bits with the sum), else a new one.
    It must hold the sentinel -1 everywhere when GEMM 2 starts: `moe_routing_fused(..., pair=)` writes it."""
    if top_k != 2:
        return None
    if out.dtype == torch.float32:
        return out.view(torch.int32)
    return torch.empty(out.shape, dtype=torch.int32, device=out.device)


def expert_gemm2_sum(h: torch.Tensor, w2, b2: torch.Tensor, routing: RoutingMap, config: GemmConfig, out: torch.Tensor,
                     pair: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """out[t] = sum_k w[t, k] * (h[r] @ w2[e]^T + b2[e]) over the token's top_k <= 2 rows, summed in this launch (no
    `moe_combine`): h [R, F], w2 [E, D, F] (float or QuantizedExperts), b2 [E, D], out [T, D] (any float dtype,
    contiguous along D), written whole.

    top_k = 1: each row stored to its token. top_k = 2: pair = `pair_buffer(out, 2)` (see grouped_gemm_kernel.py:
    the sum is bit-identical from run to run). config.split_k must be 1.

    Precondition, top_k = 2: every element of pair holds the sentinel -1 when this launch starts, written since the
    last launch that used the buffer (`moe_routing_fused(..., pair=pair)` writes it, or `pair.fill_(-1)`). The launch
    consumes it: afterwards the buffer holds row bits (and for fp32 out, which is its own pair buffer, the sums). A
    stale buffer is not detected by the kernel: a token's first row then finds a stale value, takes it for its
    partner's and stores a wrong sum, and whichever of the token's two stores lands last decides its output.
    PHIXTRAL_DEBUG=1 reads the buffer before the launch and raises a ValueError when it is not all -1 (a host read:
    skipped while a CUDA graph captures).
    """
    check_gemm_inputs("expert_gemm2_sum", h, w2, b2, routing, config)
    T, D = routing.num_tokens, w2.shape[1]
    if not topk_sum_fits(routing.top_k, config):
        raise ValueError(
            f"expert_gemm2_sum: needs top_k <= 2 and split_k == 1, got top_k={routing.top_k}, split_k={config.split_k}"
        )
    if h.shape[0] != routing.max_rows:
        raise ValueError(f"expert_gemm2_sum: h must have the routing map's {routing.max_rows} rows, got {h.shape[0]}")
    if tuple(out.shape) != (T, D) or (D > 1 and out.stride(1) != 1):
        raise ValueError(f"expert_gemm2_sum: out must be [{T}, {D}] contiguous along D, got {tuple(out.shape)}")
    if (pair is None) != (routing.top_k == 1):
        raise ValueError("expert_gemm2_sum: top_k = 2 needs the pair buffer (pair_buffer), top_k = 1 none")
    if pair is not None and (
        pair.dtype != torch.int32 or tuple(pair.shape) != (T, D) or (D > 1 and pair.stride(1) != 1)
    ):
        raise ValueError(
            f"expert_gemm2_sum: pair must be int32 [{T}, {D}] contiguous along D, got {pair.dtype} {tuple(pair.shape)}"
        )
    if pair is not None and debug_checks():
        _check_pair_is_fresh(pair)
    if routing.num_slots:
        c = out if pair is not None else out.unsqueeze(0)  # top_k = 1: the slot rows are the token rows
        launch_grouped_gemm(
            h,
            w2,
            b2,
            c,
            routing,
            config,
            gather_a=False,
            scatter_c=True,
            activation="",
            mul_routing_weight=True,
            pair=pair,
        )
    return out


def _check_pair_is_fresh(pair: torch.Tensor) -> None:
    """Raise a ValueError unless the pair buffer holds the sentinel -1 everywhere (PHIXTRAL_DEBUG)."""
    if pair.is_cuda and torch.cuda.is_current_stream_capturing():
        return  # no host read inside a capture; the eager steps before it were checked
    stale = int((pair != -1).sum())
    if stale:
        raise ValueError(
            f"expert_gemm2_sum: the pair buffer must hold -1 everywhere when GEMM 2 starts, but {stale} of "
            f"{pair.numel()} elements do not: a buffer left from an earlier launch? Refill it "
            f"(moe_routing_fused(..., pair=pair) writes the sentinel, or pair.fill_(-1))"
        )


__all__ = [
    "check_gemm_inputs",
    "expert_gemm1",
    "expert_gemm2",
    "expert_gemm2_sum",
    "launch_grouped_gemm",
    "pair_buffer",
    "tma_applies",
]
