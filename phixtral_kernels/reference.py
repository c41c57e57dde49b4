"""Plain-PyTorch twins of every op in the fused MoE pipeline: the specification the Triton kernels are tested against.

Shapes, fixed everywhere in this package:
    T tokens, D model dim, F expert hidden dim, E experts, top_k experts per token, S = T * top_k token slots.
    x [T, D]; gate_weight [E, D]; w1 [E, F, D], b1 [E, F]; w2 [E, D, F], b2 [E, D] (torch Linear layout, stacked).

The math:
    logits = x @ gate_weight^T
    top-k over the raw logits, ties going to the lowest expert index
    softmax over the k selected logits only
    out[t] = sum_k w[t, k] * (gelu_tanh(x[t] @ w1[e]^T + b1[e]) @ w2[e]^T + b2[e]),  e = topk_ids[t, k]

Slot s = t * top_k + k names the k-th choice of token t. The sorted map lists slots grouped by expert (slot order inside
an expert), each expert's group padded with the sentinel S up to a multiple of block_m.
"""

import math

import torch

from .checks import check_moe_inputs
from .quant import dense_weight
from .routing import RoutingMap

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """phi-2's gelu_new: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * torch.pow(x, 3.0))))


def topk_lowest_index(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row, equal values ordered by lowest column index (torch.topk leaves ties unspecified).

    logits [T, E] -> (values [T, top_k], indices [T, top_k] int64), values in descending order.
    """
    values, indices = torch.sort(logits, dim=-1, descending=True, stable=True)
    return values[:, :top_k], indices[:, :top_k]


def topk_softmax_torch(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights and experts: logits [T, E] -> (topk_weights [T, top_k] fp32, topk_ids [T, top_k] int32)."""
    values, indices = topk_lowest_index(logits.float(), top_k)
    return torch.softmax(values, dim=-1), indices.to(torch.int32)


def moe_align_torch(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sorted slot map of `topk_ids` [T, top_k]: see `RoutingMap` for the invariants.

    Returns (sorted_token_ids [S + E * (block_m - 1)] int32, expert_offsets [E + 1] int32). Entries past
    expert_offsets[E] are unspecified (the kernels never read them); here they hold the sentinel.
    """
    num_slots = topk_ids.numel()
    flat = topk_ids.reshape(-1).long()
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    expert_offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=topk_ids.device)
    expert_offsets[1:] = torch.cumsum(padded, 0)
    # Slot order inside each expert: a stable sort by expert keeps slots ascending.
    order = torch.sort(flat, stable=True).indices
    rank = torch.arange(num_slots, device=flat.device) - (torch.cumsum(counts, 0) - counts)[flat[order]]
    positions = expert_offsets[flat[order]] + rank
    sorted_token_ids = torch.full(
        (num_slots + num_experts * (block_m - 1),), num_slots, dtype=torch.int32, device=topk_ids.device
    )
    sorted_token_ids[positions] = order.to(torch.int32)
    return sorted_token_ids, expert_offsets.to(torch.int32)


def moe_routing_torch(router_logits: torch.Tensor, top_k: int, block_m: int) -> RoutingMap:
    """Twin of `phixtral_kernels.moe_routing`: router_logits [T, E] -> RoutingMap."""
    topk_weights, topk_ids = topk_softmax_torch(router_logits, top_k)
    sorted_token_ids, expert_offsets = moe_align_torch(topk_ids, router_logits.shape[1], block_m)
    return RoutingMap(topk_weights, topk_ids, sorted_token_ids, expert_offsets, block_m)


def _expert_groups(routing: RoutingMap):
    """Yield (expert, sorted rows holding a real slot, their slots) for each expert with tokens."""
    offsets = routing.expert_offsets.tolist()
    ids = routing.sorted_token_ids.long()
    for e in range(routing.num_experts):
        rows = torch.arange(offsets[e], offsets[e + 1], device=ids.device)
        rows = rows[ids[rows] < routing.num_slots]
        if rows.numel():
            yield e, rows, ids[rows]


def expert_gemm1_torch(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, routing: RoutingMap) -> torch.Tensor:
    """Twin of `expert_gemm1`: h[r] = gelu_tanh(x[slot_r // top_k] @ w1[e_r]^T + b1[e_r]) for each sorted row r.
    w1 [E, F, D] float or a QuantizedExperts (dequantized first).

    Returns h [S + E * (block_m - 1), F] in x's dtype, computed in fp32; padded rows are zero.
    """
    h = torch.zeros(routing.sorted_token_ids.numel(), w1.shape[1], dtype=x.dtype, device=x.device)
    w1 = dense_weight(w1, torch.float32)  # a QuantizedExperts: dequantized, the spec of the in-kernel dequantization
    for e, rows, slots in _expert_groups(routing):
        out = torch.addmm(b1[e].float(), x[slots // routing.top_k].float(), w1[e].float().t())
        h[rows] = gelu_tanh(out).to(x.dtype)
    return h


def expert_gemm2_torch(h: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, routing: RoutingMap) -> torch.Tensor:
    """Twin of `expert_gemm2`: y[slot_r] = w[slot_r] * (h[r] @ w2[e_r]^T + b2[e_r]), back in slot order.
    w2 [E, D, F] float or a QuantizedExperts (dequantized first).

    Returns y [S, D] fp32.
    """
    y = torch.zeros(routing.num_slots, w2.shape[1], dtype=torch.float32, device=h.device)
    weights = routing.topk_weights.reshape(-1)
    w2 = dense_weight(w2, torch.float32)
    for e, rows, slots in _expert_groups(routing):
        out = torch.addmm(b2[e].float(), h[rows].float(), w2[e].float().t())
        y[slots] = out * weights[slots, None]
    return y


def expert_weight_grads_torch(x, g, h, da, routing: RoutingMap):
    """Twin of `moe_backward.expert_weight_grads`, every gradient asked for: -> (dw1, db1, dw2, db2) in fp32.

    x [T, D], g [T, D] (dout), h [R, F] and da [R, F] in sorted order (padding rows never read).
    dw1[e] = sum da^T x[t], db1[e] = sum da; dw2[e] = sum (w_s g[t])^T h, db2[e] = sum w_s g[t], over expert e's slots.
    """
    E, F, D = routing.num_experts, h.shape[1], x.shape[1]
    dw1, db1 = x.new_zeros(E, F, D, dtype=torch.float32), x.new_zeros(E, F, dtype=torch.float32)
    dw2, db2 = x.new_zeros(E, D, F, dtype=torch.float32), x.new_zeros(E, D, dtype=torch.float32)
    weights = routing.topk_weights.reshape(-1)
    for e, rows, slots in _expert_groups(routing):
        x_rows, da_rows = x[slots // routing.top_k].float(), da[rows].float()
        wg_rows = weights[slots, None] * g[slots // routing.top_k].float()  # [rows, D]: w_s g[t]
        dw1[e], db1[e] = da_rows.t() @ x_rows, da_rows.sum(0)
        dw2[e], db2[e] = wg_rows.t() @ h[rows].float(), wg_rows.sum(0)
    return dw1, db1, dw2, db2


def moe_combine_torch(y: torch.Tensor, top_k: int, dtype: torch.dtype) -> torch.Tensor:
    """Twin of `moe_combine`: y [S, D] (or split partials [P, S, D]) -> out [T, D] in `dtype`, summed in fp32."""
    y = y.float().reshape(-1, y.shape[-2], y.shape[-1]).sum(0)
    return y.reshape(-1, top_k, y.shape[-1]).sum(1).to(dtype)


def naive_moe(x, gate_weight, w1, b1, w2, b2, top_k=2, *, backend="naive"):
    """The original phixtral MoE forward, step for step: the reference for tests and the baseline for benchmarks.

    x [T, D] -> [T, D] in x's dtype. repeat_interleave by top_k, a boolean mask per expert, expert MLPs in x's dtype,
    softmax weights in the logits' dtype, weighted sum. One change from the original: top-k ties go to the lowest expert
    index (torch.topk breaks ties differently on CPU and CUDA, and phixtral-4x2_8's router is all ties).
    `backend` is accepted for signature parity with `fused_moe` and must be "naive".
    """
    if backend != "naive":
        raise ValueError(f"naive_moe: backend must be 'naive', got {backend!r}")
    check_moe_inputs(x, gate_weight, w1, b1, w2, b2, top_k)
    scores = x @ gate_weight.t()
    expert_weights, expert_indices = topk_lowest_index(scores, top_k)
    expert_weights = expert_weights.softmax(dim=-1)
    flat_expert_indices = expert_indices.reshape(-1)
    x = x.repeat_interleave(top_k, dim=0)
    y = torch.empty_like(x)
    for e in range(w1.shape[0]):
        mask = flat_expert_indices == e
        hidden = gelu_tanh(torch.nn.functional.linear(x[mask], w1[e], b1[e]))
        y[mask] = torch.nn.functional.linear(hidden, w2[e], b2[e])
    y = (y.view(*expert_weights.shape, y.shape[-1]) * expert_weights.unsqueeze(-1)).sum(dim=1)
    return y
