"""Grouped expert GEMMs over the sorted slot map, with the permutation in the prologue and the MLP in the epilogues.

    GEMM 1 (`expert_gemm1`): h[r]     = gelu_tanh(x[slot_r // top_k] @ w1[e_r]^T + b1[e_r])     h [R, F] in x's dtype
    GEMM 2 (`expert_gemm2`): y[p, s_r] = w[s_r] * (h[r, Kp] @ w2[e_r, :, Kp]^T + [p == 0] b2[e_r])  y [P, S, D] fp32
    GEMM 2, top-k summed in it (`expert_gemm2_sum`, top_k <= 2, no K-split): out[t] = sum_k y[t * top_k + k]  [T, D]

r is a row of the sorted map (R = S + E * (block_m - 1) rows by upper bound), s_r its slot, e_r its expert, p one of P
K-splits. GEMM 1 gathers x's rows by slot inside the kernel, so no permuted copy of x exists; it writes h in sorted order
so GEMM 2 streams its A rows contiguously, then scatters its rows back to slot order in the epilogue. Bias, GELU and the
routing weight act on the fp32 accumulator. Padding rows (sentinel slot) are neither read as data nor written.

Quantized weights (W_BITS 4 or 8, a `QuantizedExperts` in place of w): B's tile is loaded as packed int32 words (the
word of input row k holds P = 32 / W_BITS rows), unpacked and dequantized, (q - zero) * scale in fp32, then cast to the
activations' dtype for tl.dot, inside the K loop: the weights cross memory at 4 or 8 bits and no dequantized copy
exists. Where a K tile lies inside one group (no g_idx, BLOCK_K <= group size) it reads one scale row and one zero row;
with act-order (HAS_G_IDX) it looks up every element's group through g_idx. W_BITS = 0 compiles the float path alone.

K loop: EVEN_K (every split's K range inside K, the usual case at phixtral's shapes) drops the K masks; with
`GemmConfig.tma` the float weights' tiles come through a TMA tensor descriptor (tl.make_tensor_descriptor over the
[E * N, K] stack; cp.async.bulk.tensor on sm_90) instead of pointer loads. A rows stay pointer loads: GEMM 1 gathers
them by slot, which Hopper's TMA cannot.

One kernel serves both GEMMs, and the backward's (moe_backward.py: transposed weight views, no bias); compile-time flags
pick the prologue and epilogue. Its grid is an upper bound computed from shapes alone (`RoutingMap.max_tiles`: the most
tiles T * top_k slots can fill, not every tile of the padded map); tiles past expert_offsets[E] exit at once, so
launching needs no host sync. Tiles and launch options come in a `GemmConfig`, chosen in gemm_configs.py.

The top-k sum inside GEMM 2 (PAIR_SUM, top_k = 2): each token's two weighted rows a, b (fp32, from tiles of two
different experts, in any order) meet in an int32 [T, D] pair buffer that holds the sentinel -1 (written by the fused
routing kernel). Each program atomically exchanges its fp32 row into the buffer: exactly one of the two gets the
sentinel back and stops; the other gets its partner's value, adds it to its own in fp32 and stores the cast sum to
out[t]. IEEE-754 addition is commutative, so partner + own is the same bits whichever program came second (a + b ==
b + a, signed zeros and infinities included; NaNs are given one bit pattern first, which also keeps them off the
sentinel, a NaN pattern that no arithmetic makes). The result is bit-identical from run to run with no fixed order, no zeroed fp32
buffer and no cast launch; top_k = 1 stores its single row straight to out. Three or more addends would not commute
this way ((a + b) + c != a + (b + c)), so top_k > 2 and split-K keep `moe_combine`'s fixed-order sum.
"""

import torch

from ._triton import INTERPRET, next_power_of_2, tl, triton, triton_unavailable_reason
from .gemm_configs import GemmConfig, quantized_config, topk_sum_fits
from .gemm_configs import SM90_PREFILL, SM90_PREFILL_MIN_ROWS, heuristic_configs, moe_gemm_configs  # noqa: F401 -- their home before gemm_configs.py
from .quant import is_quantized
from .routing import RoutingMap


# In-kernel tensor descriptors: tl.make_tensor_descriptor from triton 3.4 on (3.6 and 3.9 checked); 3.3 has only
# tl._experimental_make_tensor_descriptor, and there the flag is ignored. The kernel reaches the API through
# `_weight_descriptor`, None where it is missing: Triton 3.3 resolves every attribute a kernel names when it hashes the
# kernel, even in a branch that never compiles, so the kernel itself must not name tl.make_tensor_descriptor.
HAS_TENSOR_DESCRIPTORS = tl is not None and hasattr(tl, "make_tensor_descriptor")
_weight_descriptor = None

if HAS_TENSOR_DESCRIPTORS:

    @triton.jit
    def _weight_descriptor(b_ptr, rows, K, stride_b_n, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """A descriptor of B tiles [BLOCK_N, BLOCK_K] over the weights as one [rows, K] matrix, K contiguous."""
        return tl.make_tensor_descriptor(b_ptr, shape=[rows, K], strides=[stride_b_n, 1], block_shape=[BLOCK_N, BLOCK_K])


if triton is not None:

    @triton.jit
    def _grouped_gemm_kernel(
        # pointers
        a_ptr,  # GATHER_A: x [T, K]; else h [R, K] in sorted order
        b_ptr,  # [E, N, K] stacked torch Linear weights; W_BITS: qweight [E, K / P, N] int32, P = 32 / W_BITS
        scales_ptr,  # W_BITS: [E, G, N]
        zeros_ptr,  # W_BITS and HAS_ZEROS: qzeros [E, G, N / P] int32 (zero point - 1, packed along N)
        g_idx_ptr,  # W_BITS and HAS_G_IDX: [E, K] int32, group of each input row
        bias_ptr,  # [E, N] (read when HAS_BIAS)
        c_ptr,  # SCATTER_C: y [SPLIT_K, S, N] in slot order; else h [R, N] in sorted order
        sorted_token_ids_ptr,  # [R] int32: sorted row -> slot, sentinel S on padding rows
        expert_offsets_ptr,  # [E + 1] int32: first row of each expert, rows in use at [E]
        topk_weights_ptr,  # [S] fp32: routing weight of each slot (read when MUL_ROUTING_WEIGHT)
        pair_ptr,  # PAIR_SUM: [T, N] int32, the sentinel -1 until a token's first row arrives
        # sizes
        N,
        K,
        k_per_split,  # multiple of BLOCK_K: cdiv(cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
        num_slots,
        num_pid_m,  # row tiles the grid covers: RoutingMap.max_tiles (or every tile of the map)
        E,
        # strides
        stride_a_m,
        stride_a_k,
        stride_b_e,
        stride_b_n,
        stride_b_k,  # W_BITS: stride of a packed row of P input rows
        stride_s_e,
        stride_s_g,
        stride_s_n,
        stride_z_e,
        stride_z_g,
        stride_z_n,
        stride_g_e,
        stride_g_k,
        stride_bias_e,
        stride_bias_n,
        stride_c_split,
        stride_c_m,
        stride_c_n,
        stride_pair_t,
        # meta
        TOP_K: tl.constexpr,
        E_PAD: tl.constexpr,
        GATHER_A: tl.constexpr,
        SCATTER_C: tl.constexpr,
        PAIR_SUM: tl.constexpr,  # SCATTER_C, TOP_K = 2, SPLIT_K = 1: c is out [T, N], each token's two rows summed here
        XCHG_AS_INT: tl.constexpr,  # PAIR_SUM under the interpreter, which has no float atomic exchange
        HAS_BIAS: tl.constexpr,  # False in the backward GEMMs, which have no bias
        ACTIVATION: tl.constexpr,  # "gelu_tanh" or ""
        MUL_ROUTING_WEIGHT: tl.constexpr,
        DOT_IN_FP32: tl.constexpr,  # interpreter + bf16 only: its bf16 arithmetic is wrong, upcast first
        DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (GPUs would otherwise round them to tf32)
        W_BITS: tl.constexpr,  # 0: float weights; 4 or 8: packed quantized weights, dequantized in the K loop
        GROUP_SIZE: tl.constexpr,  # W_BITS: input rows per group; 0 for one group over K (per channel)
        HAS_ZEROS: tl.constexpr,  # W_BITS: zero points from zeros_ptr; else symmetric, zero = 2^(W_BITS - 1)
        HAS_G_IDX: tl.constexpr,  # W_BITS: groups from g_idx (act-order); else k // GROUP_SIZE
        SPLIT_K: tl.constexpr,
        EVEN_K: tl.constexpr,  # every split's K range lies inside K (K == SPLIT_K * k_per_split): no K masks
        TMA_B: tl.constexpr,  # B tiles through a tensor descriptor (float weights, contiguous [E, N, K]); see `GemmConfig.tma`
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        """Grid: (num_pid_m * cdiv(N, BLOCK_N), SPLIT_K)."""
        # --- program -> tile: GROUP_M row tiles share their B columns while they sit in L2
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        first_pid_m = (pid // num_pid_in_group) * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
        pid_n = (pid % num_pid_in_group) // group_size_m

        row_start = pid_m * BLOCK_M
        if row_start >= tl.load(expert_offsets_ptr + E):
            return  # past the rows in use: the grid is an upper bound
        offs_e = tl.arange(0, E_PAD)
        expert_ends = tl.load(expert_offsets_ptr + 1 + offs_e, mask=offs_e < E, other=row_start + 1)
        expert = tl.sum((expert_ends <= row_start).to(tl.int32), axis=0)  # tiles never straddle experts

        offs_m = row_start + tl.arange(0, BLOCK_M)
        slots = tl.load(sorted_token_ids_ptr + offs_m)
        mask_m = slots < num_slots
        if GATHER_A:
            a_rows = slots // TOP_K  # the permutation, fused into the load
        else:
            a_rows = offs_m
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N

        # --- pointers: int64 row offsets, row x stride passes 2**31 at large T
        offs_k = pid_k * k_per_split + tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + a_rows.to(tl.int64)[:, None] * stride_a_m + offs_k[None, :] * stride_a_k
        if TMA_B:
            # w as a 2-D stack [E * N, K] (contiguous: the launcher checks), expert e's row n at e * N + n. Columns of a
            # tile past N read the next expert's rows (or zeros past the stack) into accumulator columns the store masks
            # off; K past the end reads zeros.
            b_desc = _weight_descriptor(b_ptr, E * N, K, stride_b_n, BLOCK_N, BLOCK_K)
            b_row = expert * N + pid_n * BLOCK_N
            b_col = pid_k * k_per_split
        elif W_BITS == 0:
            b_ptrs = (
                b_ptr
                + expert.to(tl.int64) * stride_b_e
                + offs_n.to(tl.int64)[None, :] * stride_b_n
                + offs_k[:, None] * stride_b_k
            )
        else:
            PACK: tl.constexpr = 32 // W_BITS
            offs_w = pid_k * (k_per_split // PACK) + tl.arange(0, BLOCK_K // PACK)  # packed rows: each word read once
            b_ptrs = (
                b_ptr
                + expert.to(tl.int64) * stride_b_e
                + offs_n.to(tl.int64)[None, :] * stride_b_n
                + offs_w[:, None] * stride_b_k
            )
            shifts = (tl.arange(0, PACK) * W_BITS)[None, :, None]  # [1, P, 1]: field j of a word is input row w * P + j
            s_ptrs = scales_ptr + expert.to(tl.int64) * stride_s_e + offs_n[None, :] * stride_s_n  # [1, BLOCK_N]
            z_ptrs = zeros_ptr + expert.to(tl.int64) * stride_z_e + (offs_n // PACK)[None, :] * stride_z_n
            z_shifts = ((offs_n % PACK) * W_BITS)[None, :]
            g_ptrs = g_idx_ptr + expert.to(tl.int64) * stride_g_e + offs_k * stride_g_k
            if GROUP_SIZE == 0 and not HAS_G_IDX:  # one group: scale and zero rows read once, outside the loop
                scale = tl.load(s_ptrs, mask=mask_n[None, :], other=0.0).to(tl.float32)
                if HAS_ZEROS:
                    zero = ((tl.load(z_ptrs, mask=mask_n[None, :], other=0) >> z_shifts) & ((1 << W_BITS) - 1)) + 1
                else:
                    zero = tl.full([1, BLOCK_N], 1 << (W_BITS - 1), tl.int32)

        # --- K loop, fp32 accumulator
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in tl.range(0, k_per_split, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
            else:
                mask_k = offs_k < K - k
                a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            if TMA_B:
                b = tl.trans(b_desc.load([b_row, b_col + k]))  # [BLOCK_N, BLOCK_K] -> [BLOCK_K, BLOCK_N]
            elif W_BITS == 0:
                if EVEN_K:
                    b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
                else:
                    b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            else:
                mask_k = offs_k < K - k  # the quantized tiles keep their K masks (group and word lookups use them)
                mask_w = offs_w < (K - k) // PACK  # K is a multiple of P: a word is all in or all out
                words = tl.load(b_ptrs, mask=mask_w[:, None] & mask_n[None, :], other=0)  # [BLOCK_K / P, BLOCK_N]
                q = tl.reshape((words[:, None, :] >> shifts) & ((1 << W_BITS) - 1), [BLOCK_K, BLOCK_N])
                # --- the group of each input row: per element (act-order), per row, or one per tile
                if HAS_G_IDX:
                    group = tl.load(g_ptrs, mask=mask_k, other=0)[:, None]  # [BLOCK_K, 1]
                elif GROUP_SIZE == 0:
                    group = 0  # unused: scale and zero were read before the loop
                elif GROUP_SIZE % BLOCK_K == 0:
                    group = (pid_k * k_per_split + k) // GROUP_SIZE  # one group per tile: K tiles start at BLOCK_K multiples
                else:
                    group = ((offs_k + k) // GROUP_SIZE)[:, None]  # several groups per tile
                if HAS_G_IDX or (GROUP_SIZE != 0 and GROUP_SIZE % BLOCK_K != 0):
                    mask_g = mask_k[:, None] & mask_n[None, :]
                else:
                    mask_g = mask_n[None, :]
                if HAS_G_IDX or GROUP_SIZE != 0:
                    group_off = group.to(tl.int64)
                    scale = tl.load(s_ptrs + group_off * stride_s_g, mask=mask_g, other=0.0).to(tl.float32)
                    if HAS_ZEROS:
                        zw = tl.load(z_ptrs + group_off * stride_z_g, mask=mask_g, other=0)
                        zero = ((zw >> z_shifts) & ((1 << W_BITS) - 1)) + 1
                    else:
                        zero = tl.full([1, BLOCK_N], 1 << (W_BITS - 1), tl.int32)
                b = (q - zero).to(tl.float32) * scale  # exact q - zero, one rounding: as dequantize_experts
                if not DOT_IN_FP32:
                    b = b.to(a.dtype)
            if DOT_IN_FP32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K * stride_a_k
            if W_BITS == 0:
                if not TMA_B:
                    b_ptrs += BLOCK_K * stride_b_k
            else:
                b_ptrs += (BLOCK_K // PACK) * stride_b_k
                if HAS_G_IDX:
                    g_ptrs += BLOCK_K * stride_g_k

        # --- epilogue on the fp32 accumulator: bias (first K-split only), activation, routing weight
        if HAS_BIAS:
            bias = tl.load(
                bias_ptr + expert.to(tl.int64) * stride_bias_e + offs_n * stride_bias_n,
                mask=offs_n + pid_k * N < N,  # mask_n on split 0, all-false on the others
                other=0.0,
            )
            acc += bias.to(tl.float32)[None, :]
        if ACTIVATION == "gelu_tanh":
            # 0.5 x (1 + tanh(z)) == x * sigmoid(2z), z = sqrt(2/pi) (x + 0.044715 x^3)
            acc = acc * tl.sigmoid(1.5957691216057308 * (acc + 0.044715 * acc * acc * acc))
        if MUL_ROUTING_WEIGHT:
            acc *= tl.load(topk_weights_ptr + slots, mask=mask_m, other=0.0)[:, None]

        # --- masked store: sorted rows (GEMM 1), back to slot order (GEMM 2), or token rows summed in pairs
        mask_c = mask_m[:, None] & mask_n[None, :]
        if PAIR_SUM:
            # the top-2 sum by atomic exchange, see the module docstring. No fence: the pair of exchanges on an element
            # is its only synchronization, and the second program's store comes after both (fp32: out is the pair
            # buffer, the store overwrites the bits it exchanged in), when no other program touches that element.
            tokens = (slots // TOP_K).to(tl.int64)
            acc = tl.where(acc != acc, float("nan"), acc)  # every NaN as one pattern, never the sentinel's
            pair_ptrs = pair_ptr + tokens[:, None] * stride_pair_t + offs_n[None, :]
            if XCHG_AS_INT:  # the interpreter has no float exchange: the same 32 bits, as int32
                bits = tl.atomic_xchg(pair_ptrs, acc.to(tl.int32, bitcast=True), mask=mask_c, sem="relaxed")
                partner = bits.to(tl.float32, bitcast=True)
            else:
                # a float exchange (atom.exch.b32 all the same): the accumulator's bits as int32 into the exchange,
                # its result then used, broke triton 3.9's layout pass ("Assertion `operandEnc' failed"; 3.6 took it)
                partner = tl.atomic_xchg(pair_ptrs.to(tl.pointer_type(tl.float32)), acc, mask=mask_c, sem="relaxed")
            second = partner.to(tl.int32, bitcast=True) != -1  # the first program's exchange returned the sentinel
            c_ptrs = c_ptr + tokens[:, None] * stride_c_m + offs_n[None, :] * stride_c_n
            tl.store(c_ptrs, (partner + acc).to(c_ptr.dtype.element_ty), mask=mask_c & second)
        else:
            if SCATTER_C:
                c_rows = slots
            else:
                c_rows = offs_m
            c_ptrs = (
                c_ptr + pid_k.to(tl.int64) * stride_c_split + c_rows.to(tl.int64)[:, None] * stride_c_m + offs_n[None, :] * stride_c_n
            )
            tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_c)


def check_gemm_inputs(name: str, a: torch.Tensor, w, bias: torch.Tensor | None, routing: RoutingMap, config: GemmConfig) -> None:
    """Raise a ValueError, TypeError or RuntimeError, prefixed with the launcher's `name`, when one grouped GEMM's inputs
    do not fit together or Triton cannot run on their device: a [rows, K], w [E, N, K] float (a's dtype) or a
    QuantizedExperts, bias [E, N] or None (the backward's GEMMs have none), all on a's device, config.block_m the map's."""
    bias_shape = None if bias is None else tuple(bias.shape)
    if a.dim() != 2 or len(w.shape) != 3 or (bias is not None and bias.dim() != 2):
        raise ValueError(f"{name}: expected a [rows, K], w [E, N, K], bias [E, N]; got {tuple(a.shape)}, {tuple(w.shape)}, {bias_shape}")
    E, N, K = w.shape
    if a.shape[1] != K or (bias is not None and bias_shape != (E, N)) or E != routing.num_experts:
        raise ValueError(
            f"{name}: shapes disagree: a {tuple(a.shape)}, w {tuple(w.shape)}, bias {bias_shape}, routing over {routing.num_experts} experts"
        )
    if not is_quantized(w) and a.dtype != w.dtype:  # quantized: the scales may be in any float dtype
        raise TypeError(f"{name}: activations are {a.dtype} but weights are {w.dtype}")
    weights = w.qweight if is_quantized(w) else w
    for what, t in (("weights", weights), ("bias", weights if bias is None else bias), ("routing map", routing.sorted_token_ids)):
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
    strides = (w.scales.stride(0), w.scales.stride(1), w.scales.stride(2), zeros.stride(0), zeros.stride(1), zeros.stride(2))
    strides += (g_idx.stride(0), g_idx.stride(1)) if w.g_idx is not None else (0, 0)
    meta = dict(W_BITS=w.bits, GROUP_SIZE=w.kernel_group_size, HAS_ZEROS=w.qzeros is not None, HAS_G_IDX=w.g_idx is not None)
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


def _ensure_allocator() -> None:
    """In-kernel descriptors live in global scratch that Triton asks an allocator for: one from torch's caching allocator
    (graph-capture safe) unless the caller set one."""
    try:
        # Here, not at the top: triton is optional (the torch backend runs without it) and _allocation is one of its
        # private modules, which a release may move; only a TMA launch on a GPU needs it.
        from triton.runtime import _allocation

        if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):  # internals moved: set ours
        pass
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


def launch_grouped_gemm(a, w, bias, c, routing: RoutingMap, config: GemmConfig, *, gather_a: bool, scatter_c: bool,
                        activation: str, mul_routing_weight: bool, pair=None, tight_grid: bool = True) -> None:  # fmt: skip
    """One launch of the grouped GEMM over the routing map's sorted rows r: c = epilogue(a[row] @ w[e_r]^T + bias[e_r]).
    No host sync; inputs are the caller's to check (`check_gemm_inputs`), outputs the caller's to allocate.

    a: gather_a: x [T, K], row slot_r // top_k (the permutation in the prologue); else h [R, K] in sorted order.
    w: any strided [E, N, K] view (the backward passes transposed weights) or a QuantizedExperts; bias [E, N] or None.
    c: scatter_c: y [split_k, S, N] fp32 partials in slot order (bias in split 0), or with `pair` the token rows out
    [T, N]; else [R, N] in sorted order. activation: "gelu_tanh" or "" (on the fp32 accumulator); mul_routing_weight:
    each row times its slot's routing weight. pair: the int32 [T, N] buffer of the top-2 sum (see the module
    docstring). tight_grid: row tiles up to RoutingMap.max_tiles; False launches every tile of the padded map (the grid
    before the bound, kept to time the two against each other).
    """
    E, N, K = w.shape
    if is_quantized(w):
        config = quantized_config(config, w)
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
        a, b, scales, zeros, g_idx, bias, c_2d, routing.sorted_token_ids, routing.expert_offsets, routing.topk_weights, pair,
        N, K, k_per_split, routing.num_slots, num_pid_m, E,
        a.stride(0), a.stride(1),
        *b_strides,
        *q_strides,
        bias.stride(0), bias.stride(1),
        c_split_stride, c_2d.stride(0), c_2d.stride(1), pair.stride(0),
        TOP_K=routing.top_k, E_PAD=next_power_of_2(E),
        GATHER_A=gather_a, SCATTER_C=scatter_c, PAIR_SUM=pair_sum, XCHG_AS_INT=INTERPRET and pair_sum, HAS_BIAS=has_bias, ACTIVATION=activation, MUL_ROUTING_WEIGHT=mul_routing_weight,
        DOT_IN_FP32=INTERPRET and a.dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        **q_meta, **_k_loop_meta(config, w, K, k_per_split),
        SPLIT_K=config.split_k, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        GROUP_M=config.group_m, num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip


def expert_gemm1(x: torch.Tensor, w1, b1: torch.Tensor, routing: RoutingMap, config: GemmConfig, *, tight_grid=True) -> torch.Tensor:
    """h = gelu_tanh(x[slot // top_k] @ w1[e]^T + b1[e]) for every sorted row: x [T, D], w1 [E, F, D] (float, or a
    QuantizedExperts of that shape), b1 [E, F].

    Returns h [R, F] in x's dtype, in sorted order; padding rows are left unwritten (never read by `expert_gemm2`).
    """
    check_gemm_inputs("expert_gemm1", x, w1, b1, routing, config)
    if config.split_k != 1:
        raise ValueError("expert_gemm1: split_k must be 1 (GELU is applied to the full sum)")
    h = torch.empty(routing.max_rows, w1.shape[1], dtype=x.dtype, device=x.device)
    if routing.num_slots:
        launch_grouped_gemm(x, w1, b1, h, routing, config, gather_a=True, scatter_c=False, activation="gelu_tanh", mul_routing_weight=False,
                tight_grid=tight_grid)  # fmt: skip
    return h


def expert_gemm2(h: torch.Tensor, w2, b2: torch.Tensor, routing: RoutingMap, config: GemmConfig, *, tight_grid=True) -> torch.Tensor:
    """y[p, slot] = w[slot] * (h[r] @ w2[e]^T + b2[e]) back in slot order: h [R, F], w2 [E, D, F] (float, or a
    QuantizedExperts of that shape), b2 [E, D].

    Returns y [split_k, S, D] fp32: partial sums over K-splits (b2 in split 0), summed by `moe_combine`.
    """
    check_gemm_inputs("expert_gemm2", h, w2, b2, routing, config)
    if h.shape[0] != routing.max_rows:
        raise ValueError(f"expert_gemm2: h must have the routing map's {routing.max_rows} rows, got {h.shape[0]}")
    y = torch.empty(config.split_k, routing.num_slots, w2.shape[1], dtype=torch.float32, device=h.device)
    if routing.num_slots:
        launch_grouped_gemm(h, w2, b2, y, routing, config, gather_a=False, scatter_c=True, activation="", mul_routing_weight=True,
                tight_grid=tight_grid)  # fmt: skip
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

    top_k = 1: each row stored to its token. top_k = 2: pair = `pair_buffer(out, 2)` filled with -1 beforehand (see
    the module docstring: the sum is bit-identical from run to run). config.split_k must be 1.
    """
    check_gemm_inputs("expert_gemm2_sum", h, w2, b2, routing, config)
    T, D = routing.num_tokens, w2.shape[1]
    if not topk_sum_fits(routing.top_k, config):
        raise ValueError(f"expert_gemm2_sum: needs top_k <= 2 and split_k == 1, got top_k={routing.top_k}, split_k={config.split_k}")
    if h.shape[0] != routing.max_rows:
        raise ValueError(f"expert_gemm2_sum: h must have the routing map's {routing.max_rows} rows, got {h.shape[0]}")
    if tuple(out.shape) != (T, D) or (D > 1 and out.stride(1) != 1):
        raise ValueError(f"expert_gemm2_sum: out must be [{T}, {D}] contiguous along D, got {tuple(out.shape)}")
    if (pair is None) != (routing.top_k == 1):
        raise ValueError("expert_gemm2_sum: top_k = 2 needs the pair buffer (pair_buffer), top_k = 1 none")
    if pair is not None and (pair.dtype != torch.int32 or tuple(pair.shape) != (T, D) or (D > 1 and pair.stride(1) != 1)):
        raise ValueError(f"expert_gemm2_sum: pair must be int32 [{T}, {D}] contiguous along D, got {pair.dtype} {tuple(pair.shape)}")
    if routing.num_slots:
        c = out if pair is not None else out.unsqueeze(0)  # top_k = 1: the slot rows are the token rows
        launch_grouped_gemm(h, w2, b2, c, routing, config, gather_a=False, scatter_c=True, activation="", mul_routing_weight=True, pair=pair)
    return out


__all__ = [
    "check_gemm_inputs",
    "expert_gemm1",
    "expert_gemm2",
    "expert_gemm2_sum",
    "launch_grouped_gemm",
    "pair_buffer",
    "tma_applies",
]
