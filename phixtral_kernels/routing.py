"""Routing: router logits -> top-k experts and weights -> a block-aligned map of token slots sorted by expert.

    router_logits [T, E] -> topk_weights [T, top_k] fp32, topk_ids [T, top_k] int32,
                            sorted_token_ids [S + E * (block_m - 1)] int32, expert_offsets [E + 1] int32

Two launches, no host sync (no .item(), no data-dependent shapes): a decode step stays capturable in a CUDA graph.
  1. `_topk_softmax_kernel`, one program per block of BLOCK_T tokens: top-k by repeated max (ties to the lowest expert
     index), softmax over the k picked logits, and the block's per-expert slot counts.
  2. `_align_kernel`, same blocks: every program reads the whole (small) count table, so it knows each expert's padded
     offset and the number of its slots in earlier blocks, and writes its slots to their sorted positions. Program 0
     also writes expert_offsets and the sentinel into each expert's padding.
Each token's k experts are distinct, so a slot's rank inside its expert is the number of earlier tokens routed there:
an exclusive cumsum over tokens, which keeps slots in ascending order inside each expert.

Decode (`moe_routing_fused`, few tokens): one launch, one program, from x and the router weight: logits GEMV, top-k +
softmax and the sort in two passes over the tokens (`_fused_routing_kernel`). It also writes the sentinel into the
buffer that GEMM 2 sums each token's two expert rows in (grouped_gemm.py, TOPK_SUM), which would otherwise take a
fill launch of its own. Its logits are its own sums (tl.dot over 256-wide chunks of D on a GPU), not the torch matmul
of the prefill chain and the torch and naive backends (cuBLAS on a GPU): rounded to x's dtype, logits within an ulp of
each other can order differently, so near-tied experts may be picked differently than those paths pick them. Exact ties
(identical router rows, as in phixtral-4x2_8) stay exact and go to the lowest index on every path.
"""

from dataclasses import dataclass

import torch

from ._triton import INTERPRET, next_power_of_2, tl, triton, triton_unavailable_reason

# Every program of the align kernel loads the whole [num_blocks, E] count table: keep at most this many blocks.
_MAX_TOKEN_BLOCKS = 128
# The fused routing kernel's logits tile is a tl.dot output: both of its sides at least 16.
_FUSED_MIN_TILE = 16


@dataclass(frozen=True)
class RoutingMap:
    """Where each token slot goes. Slot s = t * top_k + k is the k-th expert choice of token t; S = T * top_k.

    topk_weights     [T, top_k] fp32   softmax over the token's k picked logits
    topk_ids         [T, top_k] int32  experts, by descending logit, ties to the lowest index
    sorted_token_ids [S + E * (block_m - 1)] int32  sorted row -> slot. Expert e owns rows
                     [expert_offsets[e], expert_offsets[e + 1]): its slots in ascending order, then the sentinel S up
                     to a multiple of block_m. Rows from expert_offsets[E] on are never read.
    expert_offsets   [E + 1] int32     padded start row of each expert; expert_offsets[E] = rows in use
    block_m          rows per GEMM tile; each tile belongs to exactly one expert
    """

    topk_weights: torch.Tensor
    topk_ids: torch.Tensor
    sorted_token_ids: torch.Tensor
    expert_offsets: torch.Tensor
    block_m: int

    @property
    def num_tokens(self) -> int:
        return self.topk_ids.shape[0]

    @property
    def top_k(self) -> int:
        return self.topk_ids.shape[1]

    @property
    def num_slots(self) -> int:
        return self.topk_ids.numel()

    @property
    def num_experts(self) -> int:
        return self.expert_offsets.numel() - 1

    @property
    def max_rows(self) -> int:
        """Upper bound on rows in use, known without reading the device: S + E * (block_m - 1)."""
        return self.sorted_token_ids.numel()

    @property
    def max_tiles(self) -> int:
        """The most block_m-row tiles that can hold slots, from shapes alone (grids are sized by it: no host sync).

        Expert e holds c_e slots, 0 <= c_e <= T (a token picks an expert once), sum c_e = S, and takes
        ceil(c_e / block_m) tiles. Its first tile costs one slot, every further tile block_m more, and it has at most
        ceil(T / block_m).
        So at most n = min(E, S) experts open a tile, and the S - n slots left buy at most (S - n) // block_m further
        tiles, at most n * (ceil(T / block_m) - 1) of them. Both are reached together (the counts c_e = 1 + block_m j_e,
        the rest added where it opens no tile), so the bound is exact. It never exceeds cdiv(max_rows, block_m).
        """
        T, S, E, bm = self.num_tokens, self.num_slots, self.num_experts, self.block_m
        n = min(E, S)
        return n + min((S - n) // bm, n * (-(-T // bm) - 1))


if triton is not None:

    @triton.jit
    def _topk_softmax_tile(logits, mask_t, offs_e, E, TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr,
                           BLOCK_T: tl.constexpr):  # fmt: skip
        """Top-k + softmax of one tile of logits [BLOCK_T, E_PAD] fp32 (rows past T masked by mask_t, columns from E on
        ignored) -> (weights [BLOCK_T, K_PAD] fp32, ids [BLOCK_T, K_PAD] int32, counts [E_PAD] int32: the tile's slots
        per expert)."""
        logits = tl.where(mask_t[:, None], logits, 0.0)  # rows past T: finite, so no inf - inf below
        # --- top-k by repeated max; `taken` (not -inf) marks picked experts so -inf logits still route
        taken = (tl.zeros([BLOCK_T, E_PAD], dtype=tl.int32) + offs_e[None, :]) >= E  # padding columns count as taken
        top_logit = tl.max(tl.where(taken, float("-inf"), logits), axis=1)
        offs_k = tl.arange(0, K_PAD)
        weights = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
        ids = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
        counts = tl.zeros([E_PAD], dtype=tl.int32)
        is_nan = logits != logits
        for k in tl.static_range(TOP_K):
            # torch.topk's order: NaN above everything, then by value; ties to the lowest index. tl.max skips NaN,
            # so free NaNs are picked first explicitly (else a NaN row would run out of picks).
            free_nan = is_nan & (taken == 0)
            has_nan = tl.max(free_nan.to(tl.int32), axis=1) > 0
            free = tl.where(taken | is_nan, float("-inf"), logits)
            best = tl.max(free, axis=1)
            hit = tl.where(has_nan[:, None], free_nan, (free == best[:, None]) & (taken == 0))
            idx = tl.min(tl.where(hit, offs_e[None, :], E_PAD), axis=1)
            best = tl.where(has_nan, float("nan"), best)
            picked = offs_e[None, :] == idx[:, None]
            taken = taken | picked
            # exp(l - l_max), l_max the first pick: the softmax over the k picks once normalized below (NaN in, NaN out)
            weights = tl.where(offs_k[None, :] == k, tl.exp(best - top_logit)[:, None], weights)
            ids = tl.where(offs_k[None, :] == k, idx[:, None], ids)
            counts += tl.sum((picked & mask_t[:, None]).to(tl.int32), axis=0)
        weights = weights / tl.sum(weights, axis=1)[:, None]
        return weights, ids, counts

    @triton.jit
    def _topk_softmax_kernel(
        # pointers
        logits_ptr,  # [T, E] any float dtype
        topk_weights_ptr,  # [T, TOP_K] fp32, out
        topk_ids_ptr,  # [T, TOP_K] int32, out
        block_counts_ptr,  # [num_blocks, E] int32, out: slots of this block per expert
        # sizes
        T,
        E,
        # strides
        stride_logits_t,
        stride_logits_e,
        # meta
        TOP_K: tl.constexpr,
        K_PAD: tl.constexpr,
        E_PAD: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        """Grid: (cdiv(T, BLOCK_T),)."""
        pid = tl.program_id(0)
        offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_e = tl.arange(0, E_PAD)
        mask_t = offs_t < T
        mask_e = offs_e < E
        ptrs = logits_ptr + offs_t.to(tl.int64)[:, None] * stride_logits_t + offs_e[None, :] * stride_logits_e
        logits = tl.load(ptrs, mask=mask_t[:, None] & mask_e[None, :], other=float("-inf")).to(tl.float32)
        weights, ids, counts = _topk_softmax_tile(logits, mask_t, offs_e, E, TOP_K, K_PAD, E_PAD, BLOCK_T)
        offs_k = tl.arange(0, K_PAD)
        out_offs = offs_t[:, None] * TOP_K + offs_k[None, :]
        mask_out = mask_t[:, None] & (offs_k[None, :] < TOP_K)
        tl.store(topk_weights_ptr + out_offs, weights, mask=mask_out)
        tl.store(topk_ids_ptr + out_offs, ids, mask=mask_out)
        tl.store(block_counts_ptr + pid * E + offs_e, counts, mask=mask_e)

    @triton.jit
    def _place_slots(topk_ids_ptr, sorted_token_ids_ptr, offs_t, mask_t, offs_e, first_rows, TOP_K: tl.constexpr,
                     E_PAD: tl.constexpr, BLOCK_T: tl.constexpr):  # fmt: skip
        """Write the slots of tokens offs_t to their sorted rows; first_rows [E_PAD]: each expert's row for the first of
        these tokens routed to it. Rank inside the block = earlier tokens of the block on the same expert. Returns the
        block's slots per expert [E_PAD]."""
        routed = tl.zeros([BLOCK_T, E_PAD], dtype=tl.int32)
        for k in tl.static_range(TOP_K):
            ids = tl.load(topk_ids_ptr + offs_t * TOP_K + k, mask=mask_t, other=E_PAD)
            routed += (offs_e[None, :] == ids[:, None]).to(tl.int32)
        before = tl.cumsum(routed, axis=0) - routed
        base = before + first_rows[None, :]
        for k in tl.static_range(TOP_K):
            ids = tl.load(topk_ids_ptr + offs_t * TOP_K + k, mask=mask_t, other=E_PAD)
            pos = tl.sum(tl.where(offs_e[None, :] == ids[:, None], base, 0), axis=1)
            tl.store(sorted_token_ids_ptr + pos, offs_t * TOP_K + k, mask=mask_t)
        return tl.sum(routed, axis=0)

    @triton.jit
    def _write_offsets(expert_offsets_ptr, sorted_token_ids_ptr, starts, totals, padded, mask_e, E, num_slots,
                       E_PAD: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
        """expert_offsets from each expert's first row, and the sentinel in each expert's padding rows."""
        tl.store(expert_offsets_ptr + tl.arange(0, E_PAD), starts, mask=mask_e)
        tl.store(expert_offsets_ptr + E, tl.sum(padded, axis=0))
        offs_pad = tl.arange(0, BLOCK_M)
        pad_rows = (starts + totals)[:, None] + offs_pad[None, :]
        mask_pad = mask_e[:, None] & (offs_pad[None, :] < (padded - totals)[:, None])
        sentinel = tl.full([E_PAD, BLOCK_M], 0, tl.int32) + num_slots
        tl.store(sorted_token_ids_ptr + pad_rows, sentinel, mask=mask_pad)

    @triton.jit
    def _align_kernel(
        # pointers
        topk_ids_ptr,  # [T, TOP_K] int32
        block_counts_ptr,  # [num_blocks, E] int32
        sorted_token_ids_ptr,  # [S + E * (BLOCK_M - 1)] int32, out
        expert_offsets_ptr,  # [E + 1] int32, out
        # sizes
        T,
        E,
        num_blocks,
        # meta
        TOP_K: tl.constexpr,
        E_PAD: tl.constexpr,
        NUM_BLOCKS_PAD: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        """Grid: (num_blocks,), num_blocks = cdiv(T, BLOCK_T) as in `_topk_softmax_kernel`."""
        pid = tl.program_id(0)
        offs_e = tl.arange(0, E_PAD)
        mask_e = offs_e < E
        num_slots = T * TOP_K

        # --- per-expert totals, padded offsets and the slots of earlier blocks, from the count table
        offs_b = tl.arange(0, NUM_BLOCKS_PAD)
        table = tl.load(
            block_counts_ptr + offs_b[:, None] * E + offs_e[None, :],
            mask=(offs_b[:, None] < num_blocks) & mask_e[None, :],
            other=0,
        )
        totals = tl.sum(table, axis=0)
        earlier = tl.sum(tl.where(offs_b[:, None] < pid, table, 0), axis=0)
        padded = (totals + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        starts = tl.cumsum(padded, axis=0) - padded  # exclusive: first row of each expert

        # --- this block's slots, then (program 0) the expert offsets and the padding sentinels
        offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        _place_slots(
            topk_ids_ptr, sorted_token_ids_ptr, offs_t, offs_t < T, offs_e, starts + earlier, TOP_K, E_PAD, BLOCK_T
        )
        if pid == 0:
            _write_offsets(
                expert_offsets_ptr, sorted_token_ids_ptr, starts, totals, padded, mask_e, E, num_slots, E_PAD, BLOCK_M
            )

    @triton.jit
    def _fused_routing_kernel(
        # pointers
        x_ptr,  # [T, D]
        gate_ptr,  # [E, D] router weight, x's dtype
        topk_weights_ptr,  # [T, TOP_K] fp32, out
        topk_ids_ptr,  # [T, TOP_K] int32, out
        sorted_token_ids_ptr,  # [S + E * (BLOCK_M - 1)] int32, out
        expert_offsets_ptr,  # [E + 1] int32, out
        pair_ptr,  # INIT_PAIR: [T, D] int32, out: every element set to the sentinel -1 (see expert_gemm2's TOPK_SUM)
        # sizes
        T,
        D,
        E,
        # strides
        stride_x_t,
        stride_x_d,
        stride_gate_e,
        stride_gate_d,
        stride_pair_t,
        # meta
        TOP_K: tl.constexpr,
        K_PAD: tl.constexpr,
        E_PAD: tl.constexpr,  # >= 16: the logits tile is a tl.dot output
        INIT_PAIR: tl.constexpr,
        DOT_IN_FP32: tl.constexpr,  # interpreter + bf16 only: its bf16 arithmetic is wrong, upcast first
        DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs: tf32 logits would stray far past an ulp
        BLOCK_T: tl.constexpr,  # >= 16
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        """Grid: (1,). Router logits, top-k + softmax and the block-aligned sort of all T tokens in one program.

        Pass 1, per block of BLOCK_T tokens: logits = x @ gate^T (fp32 accumulator over BLOCK_D chunks, rounded to x's
        dtype like the torch matmul of the other paths, but summed in another order: near-ties may pick differently),
        top-k + softmax, stored; per-expert slot counts summed.
        Pass 2, after a barrier (it reads the ids pass 1 stored): padded offsets from the totals, then each block's
        slots to their sorted rows, ranks carried from block to block. Cost grows with T: the decode path only."""
        offs_e = tl.arange(0, E_PAD)
        mask_e = offs_e < E
        offs_k = tl.arange(0, K_PAD)
        num_slots = T * TOP_K

        # --- pass 1: logits, top-k, counts; and the sentinel into the pair buffer's rows as x's rows stream by
        totals = tl.zeros([E_PAD], dtype=tl.int32)
        for t0 in tl.range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            mask_t = offs_t < T
            acc = tl.zeros([BLOCK_T, E_PAD], dtype=tl.float32)
            for d0 in tl.range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                mask_d = offs_d < D
                xs = tl.load(
                    x_ptr + offs_t.to(tl.int64)[:, None] * stride_x_t + offs_d[None, :] * stride_x_d,
                    mask=mask_t[:, None] & mask_d[None, :],
                    other=0.0,
                )  # [BLOCK_T, BLOCK_D]
                gs = tl.load(
                    gate_ptr + offs_e[None, :] * stride_gate_e + offs_d[:, None] * stride_gate_d,
                    mask=mask_e[None, :] & mask_d[:, None],
                    other=0.0,
                )  # [BLOCK_D, E_PAD]
                if DOT_IN_FP32:
                    xs = xs.to(tl.float32)
                    gs = gs.to(tl.float32)
                acc = tl.dot(xs, gs, acc, input_precision=DOT_PRECISION)
                if INIT_PAIR:
                    sentinel = tl.full([BLOCK_T, BLOCK_D], -1, tl.int32)
                    pair_ptrs = pair_ptr + offs_t.to(tl.int64)[:, None] * stride_pair_t + offs_d[None, :]
                    tl.store(pair_ptrs, sentinel, mask=mask_t[:, None] & mask_d[None, :])
            logits = acc.to(x_ptr.dtype.element_ty).to(tl.float32)
            weights, ids, counts = _topk_softmax_tile(logits, mask_t, offs_e, E, TOP_K, K_PAD, E_PAD, BLOCK_T)
            out_offs = offs_t[:, None] * TOP_K + offs_k[None, :]
            mask_out = mask_t[:, None] & (offs_k[None, :] < TOP_K)
            tl.store(topk_weights_ptr + out_offs, weights, mask=mask_out)
            tl.store(topk_ids_ptr + out_offs, ids, mask=mask_out)
            totals += counts

        tl.debug_barrier()  # pass 2 reads ids that other threads of this program stored
        # --- pass 2: padded offsets, then the slots of each block in token order
        padded = (totals + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        starts = tl.cumsum(padded, axis=0) - padded  # exclusive: first row of each expert
        placed = tl.zeros([E_PAD], dtype=tl.int32)  # slots of earlier blocks per expert
        for t0 in tl.range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            placed += _place_slots(
                topk_ids_ptr, sorted_token_ids_ptr, offs_t, offs_t < T, offs_e, starts + placed, TOP_K, E_PAD, BLOCK_T
            )
        _write_offsets(
            expert_offsets_ptr, sorted_token_ids_ptr, starts, totals, padded, mask_e, E, num_slots, E_PAD, BLOCK_M
        )


def _token_block(T: int) -> int:
    """Tokens per routing program: at least 32 (the interpreter's cost is per op, not per element), and few enough
    programs that the count table every align program reads stays small."""
    return max(32, next_power_of_2(-(-T // _MAX_TOKEN_BLOCKS)))


def _check_routing_args(name: str, E: int, top_k, block_m, device) -> None:
    """The checks both routing entry points share: top_k in [1, E], block_m a power of two >= 16, Triton usable."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise ValueError(f"top_k must be an int in [1, E={E}], got {top_k!r}")
    if isinstance(block_m, bool) or not isinstance(block_m, int) or block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16 (tl.dot needs M >= 16), got {block_m!r}")
    reason = triton_unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"{name} cannot run: {reason}")


def _routing_outputs(T: int, E: int, top_k: int, block_m: int, device):
    """The RoutingMap's tensors, unfilled: topk_weights [T, top_k] fp32, topk_ids [T, top_k] int32, sorted_token_ids
    [T * top_k + E * (block_m - 1)] int32 (room for every expert's padding), expert_offsets [E + 1] int32."""
    return (
        torch.empty(T, top_k, dtype=torch.float32, device=device),
        torch.empty(T, top_k, dtype=torch.int32, device=device),
        torch.empty(T * top_k + E * (block_m - 1), dtype=torch.int32, device=device),
        torch.empty(E + 1, dtype=torch.int32, device=device),
    )


def moe_routing(router_logits: torch.Tensor, top_k: int, block_m: int) -> RoutingMap:
    """Top-k + softmax of the router logits and the block-aligned sorted slot map, in two Triton launches.

    router_logits [T, E] float (CUDA, or CPU under TRITON_INTERPRET=1); 1 <= top_k <= E; block_m a power of two,
    the M tile of the expert GEMMs that will read the map.
    """
    if router_logits.dim() != 2 or not router_logits.is_floating_point():
        raise ValueError(
            f"router_logits must be a float tensor [T, E], got {tuple(router_logits.shape)} {router_logits.dtype}"
        )
    T, E = router_logits.shape
    _check_routing_args("moe_routing", E, top_k, block_m, router_logits.device)

    device = router_logits.device
    topk_weights, topk_ids, sorted_token_ids, expert_offsets = _routing_outputs(T, E, top_k, block_m, device)
    if T == 0:
        expert_offsets.zero_()
        return RoutingMap(topk_weights, topk_ids, sorted_token_ids.fill_(0), expert_offsets, block_m)

    block_t = _token_block(T)
    num_blocks = triton.cdiv(T, block_t)
    block_counts = torch.empty(num_blocks, E, dtype=torch.int32, device=device)
    e_pad = next_power_of_2(E)
    _topk_softmax_kernel[(num_blocks,)](
        router_logits, topk_weights, topk_ids, block_counts,
        T, E,
        router_logits.stride(0), router_logits.stride(1),
        TOP_K=top_k, K_PAD=next_power_of_2(top_k), E_PAD=e_pad, BLOCK_T=block_t,
    )  # fmt: skip
    _align_kernel[(num_blocks,)](
        topk_ids, block_counts, sorted_token_ids, expert_offsets,
        T, E, num_blocks,
        TOP_K=top_k, E_PAD=e_pad, NUM_BLOCKS_PAD=next_power_of_2(num_blocks), BLOCK_T=block_t, BLOCK_M=block_m,
    )  # fmt: skip
    return RoutingMap(topk_weights, topk_ids, sorted_token_ids, expert_offsets, block_m)


def fused_routing_fits(num_tokens: int, num_experts: int) -> bool:
    """Whether `moe_routing_fused` takes these shapes (any T works; its cost grows with T, so callers keep it to
    decode)."""
    return num_experts <= 128


def moe_routing_fused(x: torch.Tensor, gate_weight: torch.Tensor, top_k: int, block_m: int, pair=None) -> RoutingMap:
    """`moe_routing(x @ gate_weight^T, top_k, block_m)` in one launch of one program, logits included.

    x [T, D], gate_weight [E, D] in x's dtype. The logits are accumulated in fp32 and rounded to x's dtype before the
    top-k, as the torch matmul the other paths route on rounds them, but summed in their own order (tl.dot over chunks
    of D): where two experts' logits lie within an ulp of x's dtype, this routing may pick the other one than
    `moe_routing(x @ gate_weight^T, ...)` on a GPU. Exact ties go to the lowest index on both. pair: None, or an int32
    [T, D] buffer (row stride free, contiguous along D) that comes back filled with the sentinel -1, ready for
    expert_gemm2's top-2 sum.
    Cost grows with T (one program walks every token twice): meant for decode, T up to a few dozen.
    """
    T, D = x.shape
    E = gate_weight.shape[0]
    _check_routing_args("moe_routing_fused", E, top_k, block_m, x.device)
    if not fused_routing_fits(T, E):
        raise ValueError(f"moe_routing_fused: E={E} experts do not fit one program's logits tile (at most 128)")
    if pair is not None and (
        pair.dtype != torch.int32 or tuple(pair.shape) != (T, D) or (D > 1 and pair.stride(1) != 1)
    ):
        raise ValueError(
            f"moe_routing_fused: pair must be int32 [{T}, {D}] contiguous along D, got {pair.dtype} {tuple(pair.shape)}"
        )

    device = x.device
    topk_weights, topk_ids, sorted_token_ids, expert_offsets = _routing_outputs(T, E, top_k, block_m, device)
    pair_arg = pair if pair is not None else topk_ids  # never written without INIT_PAIR
    # Interpreter: blocks of 32 tokens (a T of 64 or more walks several, as on a GPU) and wide D steps (its cost is per
    # op); GPU: 16-token blocks (decode T), 256-wide D steps.
    block_t, block_d = (32, 128) if INTERPRET else (_FUSED_MIN_TILE, 256)
    _fused_routing_kernel[(1,)](
        x, gate_weight, topk_weights, topk_ids, sorted_token_ids, expert_offsets, pair_arg,
        T, D, E,
        x.stride(0), x.stride(1), gate_weight.stride(0), gate_weight.stride(1), pair_arg.stride(0),
        TOP_K=top_k, K_PAD=next_power_of_2(top_k), E_PAD=max(_FUSED_MIN_TILE, next_power_of_2(E)),
        INIT_PAIR=pair is not None,
        DOT_IN_FP32=INTERPRET and x.dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_M=block_m,
        num_warps=4, num_stages=2,
    )  # fmt: skip
    return RoutingMap(topk_weights, topk_ids, sorted_token_ids, expert_offsets, block_m)


__all__ = ["RoutingMap", "fused_routing_fits", "moe_routing", "moe_routing_fused"]
