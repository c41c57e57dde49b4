"""fused_moe's Triton forward: the launch chains from x to out, no host sync in any of them.

Slot s = (t, k), expert e = topk_ids[t, k], w_s its routing weight (softmax over the token's k picked logits):
    out[t] = sum_k w_s (gelu_tanh(x[t] @ w1[e]^T + b1[e]) @ w2[e]^T + b2[e])

Two chains, picked by token count (or PHIXTRAL_MOE_DECODE_PATH):
    prefill  logits (torch matmul), top-k + softmax, align (routing.py), GEMM 1, GEMM 2 (grouped_gemm.py), the combine
             (unpermute.py): 6 launches
    decode   routing in one program from x and the router weight, GEMM 1, GEMM 2 summing each token's top_k <= 2 rows
             itself (`expert_gemm2_sum`): 3 launches. Its logits are the routing kernel's own sums, not the torch
             matmul's: near-tied experts may be picked differently than the prefill chain would pick them.
The forward returns the routing map and h as well: moe_backward.FusedMoEFunction keeps them for its backward.
"""

import os

import torch

from .gemm_configs import moe_gemm_configs, topk_sum_fits
from .grouped_gemm import expert_gemm1, expert_gemm2, expert_gemm2_sum, pair_buffer
from .quant import is_quantized
from .routing import fused_routing_fits, moe_routing, moe_routing_fused
from .unpermute import moe_combine

# The forward's launch chains (PHIXTRAL_MOE_DECODE_PATH, or triton_moe_forward's `path`):
#   "auto"    the decode chain up to DECODE_MAX_TOKENS tokens, the prefill chain above
#   "decode"  the decode chain at every T (its routing is one program: slow at large T; for tests and timing)
#   "legacy"  the chain before the decode chain existed, grids over every tile of the padded map: to time against
DECODE_PATHS = ("auto", "decode", "legacy")
# Tokens up to which "auto" routes in one program: its logits GEMV walks D once per 16 tokens on one SM, so its time
# grows with T while the launches it saves cost the same at any T. phixtral decodes T = batch size tokens.
DECODE_MAX_TOKENS = 16


def decode_path() -> str:
    """The launch chain named by PHIXTRAL_MOE_DECODE_PATH (default "auto"), read at each call."""
    path = os.environ.get("PHIXTRAL_MOE_DECODE_PATH", "") or "auto"
    if path not in DECODE_PATHS:
        raise ValueError(f"PHIXTRAL_MOE_DECODE_PATH must be one of {DECODE_PATHS}, got {path!r}")
    return path


def moe_config_args(x, w1, w2) -> dict:
    """moe_gemm_configs' keywords for this layer (x [T, D], w1 [E, F, D], w2): its shape, dtype and device. Quantized
    experts keep the heuristic of no particular GPU: the tuned tables and Hopper's prefill tiles were sized for float
    weights. The forward and the backward both ask with these, so they pick the same configs."""
    quantized = is_quantized(w1) or is_quantized(w2)
    return dict(dims=(x.shape[1], w1.shape[1]), dtype=x.dtype, device=None if quantized else x.device)


def triton_moe_forward(x, gate_weight, w1, b1, w2, b2, top_k, *, path: str | None = None):
    """The Triton forward: -> (out [T, D] in x's dtype, the RoutingMap, h [R, F] sorted rows). Inputs checked by the
    caller.

    path: "auto", "decode" or "legacy" (see DECODE_PATHS); None reads PHIXTRAL_MOE_DECODE_PATH. No host sync on any.
      prefill  logits (torch matmul), top-k, align, GEMM 1, GEMM 2, combine: 6 launches
      decode   fused routing (logits, top-k, align, pair buffer), GEMM 1, GEMM 2 summing each token's rows: 3 launches
               (top_k > 2: GEMM 2 writes slot rows and the combine sums them, 4)
      legacy   the prefill chain with grids over every tile of the padded map
    """
    path = decode_path() if path is None else path
    if path not in DECODE_PATHS:
        raise ValueError(f"path must be one of {DECODE_PATHS}, got {path!r}")
    T, D = x.shape
    E = w1.shape[0]
    decode = path == "decode" or (path == "auto" and T <= DECODE_MAX_TOKENS)
    decode = decode and fused_routing_fits(T, E)
    gemm1, gemm2 = moe_gemm_configs(T, top_k, E, sum_in_gemm2=decode, **moe_config_args(x, w1, w2))
    if not decode:
        tight = path != "legacy"
        routing = moe_routing(x @ gate_weight.t(), top_k, gemm1.block_m)  # [T, E] logits in x's dtype, as the original
        h = expert_gemm1(x, w1, b1, routing, gemm1, tight_grid=tight)  # [R, F] sorted rows
        y = expert_gemm2(h, w2, b2, routing, gemm2, tight_grid=tight)  # [P, S, D] fp32, slot order
        return moe_combine(y, top_k, x.dtype), routing, h  # [T, D]
    sum_in_gemm2 = topk_sum_fits(top_k, gemm2)
    out = torch.empty(T, D, dtype=x.dtype, device=x.device)
    pair = pair_buffer(out, top_k) if sum_in_gemm2 else None  # [T, D] int32 or None; filled with -1 by the routing
    routing = moe_routing_fused(x, gate_weight, top_k, gemm1.block_m, pair=pair)
    h = expert_gemm1(x, w1, b1, routing, gemm1)  # [R, F] sorted rows
    if sum_in_gemm2:
        return expert_gemm2_sum(h, w2, b2, routing, gemm2, out, pair), routing, h
    y = expert_gemm2(h, w2, b2, routing, gemm2)  # top_k > 2: [P, S, D] fp32, summed in a fixed order below
    return moe_combine(y, top_k, x.dtype), routing, h


__all__ = ["DECODE_MAX_TOKENS", "DECODE_PATHS", "decode_path", "moe_config_args", "triton_moe_forward"]
