"""Expert Linears as custom ops (torch.library), so that torch.compile takes a whole decode step, MoE included, as one
graph with no host read in it.

Which expert a token runs is data: the router's top-k. In a traced graph, picking expert e's weights either copies them
(`w[ids]` gathers whole matrices: twice the bytes a memory-bound decode step reads) or reads ids on the host (a graph
break). These ops take the stacked weights of all E experts and the ids, and pick inside, where the compiler does not
look: the graph around them (router, top-k, softmax, GELU, the weighted sum, attention, norms) compiles, and each op is
one call from the compiled code.

    expert_linear(x, ids, weight, bias)         y[t] = x[t] @ weight[ids[t]]^T + bias[ids[t]]     float stacks
    packed_expert_linear(x, ids, <packed>)      the same through torch's packed int8 / int4 CPU kernels (cpu_packed)
    fused_moe_triton(x, gate, <w1>, b1, ...)    the whole layer on the Triton forward (GPU), weights as plain tensors
    quantized_linear_triton(x, <w>, bias)       one GPTQ-packed Linear on the Triton grouped GEMM (GPU)

x [T, K]; ids [T] (int32 / int64), or None for expert 0 (a dense Linear is a stack of one); weight [E, N, K]; bias
[E, N] or None -> y [T, N] in x's dtype. Rows that share an expert run as one GEMM: at decode (T = 1) one GEMV.
A MoE layer with top_k experts per token is then 2 * top_k calls: `moe_by_expert_ops` below.

torch.library.custom_op needs torch 2.4; HAS_GRAPH_OPS says whether this torch has it (compiled decode is off without).
"""

from typing import Optional

import torch
import torch.nn.functional as F

from .cpu_packed import packed_linear
from .moe import quantized_linear
from .moe_triton import triton_moe_forward
from .quant import QuantizedExperts
from .reference import topk_softmax_torch

HAS_GRAPH_OPS = hasattr(torch.library, "custom_op")


def is_compiling() -> bool:
    """True while torch.compile traces the caller (the model's layers then take these ops)."""
    check = getattr(torch.compiler, "is_compiling", None)
    return bool(check and check())


def _by_expert(x: torch.Tensor, ids: Optional[torch.Tensor], out_features: int, run) -> torch.Tensor:
    """run(rows of x, e) for each expert e in ids, scattered back to x's row order."""
    if ids is None:
        return run(x, 0)
    if x.shape[0] == 1:
        return run(x, int(ids[0]))  # decode: one host read of one id, inside the op
    out = x.new_empty(x.shape[0], out_features)
    for e in torch.unique(ids).tolist():
        rows = (ids == e).nonzero()[:, 0]
        out[rows] = run(x[rows], e)
    return out


def _expert_linear(
    x: torch.Tensor, ids: Optional[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    return _by_expert(
        x, ids, weight.shape[1], lambda rows, e: F.linear(rows, weight[e], None if bias is None else bias[e])
    )


def _packed_expert_linear(
    x: torch.Tensor,
    ids: Optional[torch.Tensor],
    weights: torch.Tensor,
    scales: torch.Tensor,
    offsets: Optional[torch.Tensor],
    perm: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    mode: str,
    group_size: int,
    out_features: int,
) -> torch.Tensor:
    def run(rows, e):
        o = None if offsets is None else offsets[e]
        p = None if perm is None else perm[e]
        b = None if bias is None else bias[e]
        return packed_linear(rows, weights[e], scales[e], o, p, b, mode, group_size, out_features)

    return _by_expert(x, ids, out_features, run)


def _weights(w: torch.Tensor, qzeros, scales, g_idx, bits: int, group_size: int):
    """An expert stack from an op's plain arguments: a float [E, N, K] (bits 0) or a QuantizedExperts."""
    if bits == 0:
        return w
    return QuantizedExperts(w, qzeros, scales, g_idx, bits, group_size, check=False)


def _fused_moe_triton(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    w1: torch.Tensor,
    qzeros1: Optional[torch.Tensor],
    scales1: Optional[torch.Tensor],
    g_idx1: Optional[torch.Tensor],
    b1: torch.Tensor,
    w2: torch.Tensor,
    qzeros2: Optional[torch.Tensor],
    scales2: Optional[torch.Tensor],
    g_idx2: Optional[torch.Tensor],
    b2: torch.Tensor,
    top_k: int,
    bits: list[int],
    group_sizes: list[int],
) -> torch.Tensor:
    w1 = _weights(w1, qzeros1, scales1, g_idx1, bits[0], group_sizes[0])
    w2 = _weights(w2, qzeros2, scales2, g_idx2, bits[1], group_sizes[1])
    return triton_moe_forward(x, gate_weight, w1, b1, w2, b2, top_k)[0]


def _quantized_linear_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: Optional[torch.Tensor],
    scales: torch.Tensor,
    g_idx: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    bits: int,
    group_size: int,
) -> torch.Tensor:
    w = QuantizedExperts(qweight, qzeros, scales, g_idx, bits, group_size, check=False)
    return quantized_linear(x, w, bias, backend="triton")


if HAS_GRAPH_OPS:
    expert_linear = torch.library.custom_op("phixtral_kernels::expert_linear", mutates_args=())(_expert_linear)
    packed_expert_linear = torch.library.custom_op("phixtral_kernels::packed_expert_linear", mutates_args=())(
        _packed_expert_linear
    )

    @expert_linear.register_fake
    def _(x, ids, weight, bias):
        return x.new_empty(x.shape[0], weight.shape[1])

    @packed_expert_linear.register_fake
    def _(x, ids, weights, scales, offsets, perm, bias, mode, group_size, out_features):
        return x.new_empty(x.shape[0], out_features)

    # The Triton forward as one op: its launches never read device memory on the host, so a compiled step holding it
    # can be captured in a CUDA graph (phixtral/decode_graph.py) like the eager one.
    fused_moe_triton = torch.library.custom_op("phixtral_kernels::fused_moe_triton", mutates_args=())(_fused_moe_triton)
    quantized_linear_triton = torch.library.custom_op("phixtral_kernels::quantized_linear_triton", mutates_args=())(
        _quantized_linear_triton
    )

    @fused_moe_triton.register_fake
    def _(x, gate_weight, w1, qzeros1, scales1, g_idx1, b1, w2, qzeros2, scales2, g_idx2, b2, top_k, bits, groups):
        return torch.empty_like(x)

    @quantized_linear_triton.register_fake
    def _(x, qweight, qzeros, scales, g_idx, bias, bits, group_size):
        return x.new_empty(x.shape[0], scales.shape[-1])

else:  # torch < 2.4: plain functions (eager only)
    expert_linear, packed_expert_linear = _expert_linear, _packed_expert_linear
    fused_moe_triton, quantized_linear_triton = _fused_moe_triton, _quantized_linear_triton


def moe_by_expert_ops(x: torch.Tensor, gate_weight: torch.Tensor, fc1, fc2, top_k: int) -> torch.Tensor:
    """fused_moe's math with the experts run through these ops, for a compiled graph: x [T, D] -> [T, D] in x's dtype.

    fc1(x, ids) -> [T, F] and fc2(h, ids) -> [T, D]: an expert Linear bound to its weights (expert_linear or
    packed_expert_linear), ids [T] the expert of each row (None: a dense layer, E = 1, no router). Routing as the torch
    backend does it (top-k over the raw logits, ties to the lowest index, softmax over the k picks), the k slots summed
    as one bmm, as the torch backend sums them.
    """
    if gate_weight.shape[0] == 1:
        return fc2(F.gelu(fc1(x, None), approximate="tanh"), None)
    weights, experts = topk_softmax_torch(x @ gate_weight.t(), top_k)  # [T, top_k] fp32, int32
    slots = [fc2(F.gelu(fc1(x, experts[:, k]), approximate="tanh"), experts[:, k]) for k in range(top_k)]
    y = torch.stack(slots, dim=1)  # [T, top_k, D]
    return torch.bmm(weights.to(x.dtype).unsqueeze(1), y).squeeze(1)


__all__ = [
    "HAS_GRAPH_OPS",
    "expert_linear",
    "fused_moe_triton",
    "is_compiling",
    "moe_by_expert_ops",
    "packed_expert_linear",
    "quantized_linear_triton",
]
