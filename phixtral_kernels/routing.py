"""Routing: router logits -> top-k experts and weights -> a block-aligned map of token slots sorted by expert.

    router_logits [T, E] -> topk_weights [T, top_k] fp32, topk_ids [T, top_k] int32,
                            sorted_token_ids [S + E * (block_m - 1)] int32, expert_offsets [E + 1] int32

Two launches, no host sync (no .item(), no data-dependent shapes): a decode step stays capturable in a CUDA graph.
  1. `_topk_softmax_kernel`, one program per block of BLOCK_T tokens: top-k by repeated max (ties to the lowest expert
     index), softmax over the k picked logits, and the block's per-expert slot counts.
  2. `_align_kernel`, same blocks: every program reads the whole (small) count table, so it knows each expert's padded
     offset and the number of its slots in earlier blocks, and writes its slots to their sorted positions. Program 0 also
     writes expert_offsets and the sentinel into each expert's padding.
Each token's k experts are distinct, so a slot's rank inside its expert is the number of earlier tokens routed there:
an exclusive cumsum over tokens, which keeps slots in ascending order inside each expert.
"""

from dataclasses import dataclass

import torch

from ._triton import next_power_of_2, tl, triton, triton_unavailable_reason

# Every program of the align kernel loads the whole [num_blocks, E] count table: keep at most this many blocks.
_MAX_TOKEN_BLOCKS = 128


@dataclass(frozen=True)
class RoutingMap:
    """Where each token slot goes. Slot s = t * top_k + k is the k-th expert choice of token t; S = T * top_k.

    topk_weights     [T, top_k] fp32   softmax over the token's k picked logits
    topk_ids         [T, top_k] int32  experts, by descending logit, ties to the lowest index
    sorted_token_ids [S + E * (block_m - 1)] int32  sorted row -> slot. Expert e owns rows
                     [expert_offsets[e], expert_offsets[e + 1]): its slots in ascending order, then the sentinel S up to a
                     multiple of block_m. Rows from expert_offsets[E] on are never read.
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


if triton is not None:

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
        logits = tl.where(mask_t[:, None], logits, 0.0)  # rows past T: finite, so no inf - inf below

        # --- top-k by repeated max; `taken` (not -inf) marks picked experts so -inf logits still route
        taken = offs_e[None, :] >= E  # padding columns count as taken
        taken = taken | (offs_t[:, None] < 0)  # broadcast to [BLOCK_T, E_PAD]
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
        out_offs = offs_t[:, None] * TOP_K + offs_k[None, :]
        mask_out = mask_t[:, None] & (offs_k[None, :] < TOP_K)
        tl.store(topk_weights_ptr + out_offs, weights, mask=mask_out)
        tl.store(topk_ids_ptr + out_offs, ids, mask=mask_out)
        tl.store(block_counts_ptr + pid * E + offs_e, counts, mask=mask_e)

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

        # --- this block's slots: rank = slots of earlier blocks + earlier tokens of this block on the same expert
        offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        mask_t = offs_t < T
        routed = tl.zeros([BLOCK_T, E_PAD], dtype=tl.int32)
        for k in tl.static_range(TOP_K):
            ids = tl.load(topk_ids_ptr + offs_t * TOP_K + k, mask=mask_t, other=E_PAD)
            routed += (offs_e[None, :] == ids[:, None]).to(tl.int32)
        before = tl.cumsum(routed, axis=0) - routed
        base = before + (starts + earlier)[None, :]
        for k in tl.static_range(TOP_K):
            ids = tl.load(topk_ids_ptr + offs_t * TOP_K + k, mask=mask_t, other=E_PAD)
            pos = tl.sum(tl.where(offs_e[None, :] == ids[:, None], base, 0), axis=1)
            tl.store(sorted_token_ids_ptr + pos, offs_t * TOP_K + k, mask=mask_t)

        # --- program 0: expert offsets, and the sentinel in each expert's padding rows
        if pid == 0:
            tl.store(expert_offsets_ptr + offs_e, starts, mask=mask_e)
            tl.store(expert_offsets_ptr + E, tl.sum(padded, axis=0))
            offs_pad = tl.arange(0, BLOCK_M)
            pad_rows = (starts + totals)[:, None] + offs_pad[None, :]
            mask_pad = mask_e[:, None] & (offs_pad[None, :] < (padded - totals)[:, None])
            sentinel = tl.full([E_PAD, BLOCK_M], 0, tl.int32) + num_slots
            tl.store(sorted_token_ids_ptr + pad_rows, sentinel, mask=mask_pad)


def _token_block(T: int) -> int:
    """Tokens per routing program: at least 32 (the interpreter's cost is per op, not per element), and few enough
    programs that the count table every align program reads stays small."""
    return max(32, next_power_of_2(-(-T // _MAX_TOKEN_BLOCKS)))


def moe_routing(router_logits: torch.Tensor, top_k: int, block_m: int) -> RoutingMap:
    """Top-k + softmax of the router logits and the block-aligned sorted slot map, in two Triton launches.

    router_logits [T, E] float (CUDA, or CPU under TRITON_INTERPRET=1); 1 <= top_k <= E; block_m a power of two,
    the M tile of the expert GEMMs that will read the map.
    """
    if router_logits.dim() != 2 or not router_logits.is_floating_point():
        raise ValueError(f"router_logits must be a float tensor [T, E], got {tuple(router_logits.shape)} {router_logits.dtype}")
    T, E = router_logits.shape
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise ValueError(f"top_k must be an int in [1, E={E}], got {top_k!r}")
    if isinstance(block_m, bool) or not isinstance(block_m, int) or block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16 (tl.dot needs M >= 16), got {block_m!r}")
    reason = triton_unavailable_reason(router_logits.device)
    if reason is not None:
        raise RuntimeError(f"moe_routing cannot run: {reason}")

    device = router_logits.device
    num_slots = T * top_k
    topk_weights = torch.empty(T, top_k, dtype=torch.float32, device=device)
    topk_ids = torch.empty(T, top_k, dtype=torch.int32, device=device)
    sorted_token_ids = torch.empty(num_slots + E * (block_m - 1), dtype=torch.int32, device=device)
    expert_offsets = torch.empty(E + 1, dtype=torch.int32, device=device)
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


__all__ = ["RoutingMap", "moe_routing"]
