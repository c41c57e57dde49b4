"""The grouped GEMM kernel itself (`_grouped_gemm_kernel`): one @triton.jit function that serves both GEMMs of
the MoE layer and the backward's, compile-time flags picking the prologue (gather of A rows by slot), the K loop
(float or packed quantized weights, pointer or TMA loads) and the epilogue (bias, GELU, routing weight, scatter,
top-2 pair sum). The launchers that check inputs and pick its arguments live in grouped_gemm.py.

Quantized weights (W_BITS 4 or 8, a `QuantizedExperts` in place of w): B's tile is loaded as packed int32 words (the
word of input row k holds P = 32 / W_BITS rows), unpacked and dequantized, (q - zero) * scale in fp32, then cast to the
activations' dtype for tl.dot, inside the K loop: the weights cross memory at 4 or 8 bits and no dequantized copy
exists. Where a K tile lies inside one group (no g_idx, BLOCK_K <= group size) it reads one scale row and one zero row;
with act-order (HAS_G_IDX) it looks up every element's group through g_idx. W_BITS = 0 compiles the float path alone.

K loop: EVEN_K (every split's K range inside K, the usual case at phixtral's shapes) drops the K masks; with
`GemmConfig.tma` the float weights' tiles come through a TMA tensor descriptor (tl.make_tensor_descriptor over the
[E * N, K] stack; cp.async.bulk.tensor on sm_90) instead of pointer loads. A rows stay pointer loads: GEMM 1 gathers
them by slot, which Hopper's TMA cannot.

The top-k sum inside GEMM 2 (PAIR_SUM, top_k = 2): each token's two weighted rows a, b (fp32, from tiles of two
different experts, in any order) meet in an int32 [T, D] pair buffer that holds the sentinel -1 (written by the fused
routing kernel). Each program atomically exchanges its fp32 row into the buffer: exactly one of the two gets the
sentinel back and stops; the other gets its partner's value, adds it to its own in fp32 and stores the cast sum to
out[t]. IEEE-754 addition is commutative, so partner + own is the same bits whichever program came second (a + b ==
b + a, signed zeros and infinities included; NaNs are given one bit pattern first, which also keeps them off the
sentinel, a NaN pattern that no arithmetic makes). The result is bit-identical from run to run with no fixed order,
no zeroed fp32 buffer and no cast launch; top_k = 1 stores its single row straight to out. Three or more addends would
not commute this way ((a + b) + c != a + (b + c)), so top_k > 2 and split-K keep `moe_combine`'s fixed-order sum.
"""

from ._triton import tl, triton

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
        return tl.make_tensor_descriptor(
            b_ptr, shape=[rows, K], strides=[stride_b_n, 1], block_shape=[BLOCK_N, BLOCK_K]
        )


_grouped_gemm_kernel = None  # no triton: the torch backend serves

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
        TMA_B: tl.constexpr,  # B tiles through a tensor descriptor (float, contiguous [E, N, K]): GemmConfig.tma
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
                    # one group per tile: K tiles start at BLOCK_K multiples
                    group = (pid_k * k_per_split + k) // GROUP_SIZE
                    if not EVEN_K:
                        # A split whose K range ends past K has whole tiles there, whose group would be G: one row past
                        # the expert's scales and zeros (the next expert's, or past the buffer: an inf there made NaN
                        # of A's masked zeros). The last group's row instead keeps B finite where A is zero.
                        group = tl.minimum(group, (K - 1) // GROUP_SIZE)
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
                c_ptr
                + pid_k.to(tl.int64) * stride_c_split
                + c_rows.to(tl.int64)[:, None] * stride_c_m
                + offs_n[None, :] * stride_c_n
            )
            tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_c)
