"""fused_moe: the whole MoE layer as route -> GEMM 1 (gather, bias, GELU) -> GEMM 2 (bias, routing weight) -> combine.

On the Triton backend a decode step (T <= 16 tokens) takes three launches: routing in one program from x and the router
weight, GEMM 1, and GEMM 2 summing each token's top_k <= 2 rows itself (moe_triton.triton_moe_forward);
PHIXTRAL_MOE_DECODE_PATH=legacy selects the six-launch chain it replaced, to time one against the other.

Backends:
    "triton"  the Triton kernels: compiled for CUDA tensors, interpreted for CPU tensors under TRITON_INTERPRET=1.
              No host sync anywhere, so a decode step can be captured in a CUDA graph.
    "torch"   the same sorted pipeline in vectorized PyTorch (one GEMM pair per expert, no loop over tokens): the fast
              path on CPUs. It reads the per-expert counts on the host, so it syncs on CUDA tensors.
    "naive"   the original phixtral loop (`naive_moe`).
    "auto"    "triton" where it can run (CUDA, or the interpreter on CPU) and the dtype is fp16, bf16 or fp32, else
              "torch".

Quantized experts: w1 and / or w2 may be a `QuantizedExperts` (quant.py). "triton" dequantizes weight tiles inside the
grouped GEMMs' K loop; "torch" runs torch's packed CPU kernels when the container carries them (cpu_packed.py: bfloat16
rows on a CPU, up to max_rows per expert), else dequantizes one expert at a time before its matmul; "naive" dequantizes
the whole stack.
Gradients flow to x and gate_weight only, through the torch path ("auto" takes it when grad is needed; the Triton
backward has no quantized GEMMs).

Every backend is differentiable. "triton" runs its own backward (`moe_backward.FusedMoEFunction`) when grad mode is on
and an input requires grad; otherwise it runs the plain forward, with no autograd bookkeeping. "torch" and "naive" are
differentiated by autograd through their PyTorch ops.
"""

import torch

from ._triton import triton_unavailable_reason
from .checks import BACKENDS, TRITON_DTYPES, check_moe_inputs
from .cpu_packed import with_qweight
from .gemm_configs import moe_gemm_configs
from .grouped_gemm import launch_grouped_gemm
from .moe_backward import FusedMoEFunction
from .moe_triton import triton_moe_forward
from .quant import QuantizedExperts, dense_weight, dequantize_experts, is_quantized
from .reference import naive_moe, topk_softmax_torch
from .routing import RoutingMap


def _moe_torch(x, gate_weight, w1, b1, w2, b2, top_k):
    T, D = x.shape
    E = w1.shape[0]
    if E == 1:  # a dense layer: one expert at weight softmax([logit]) = 1, so no router
        return _expert_ffn(x, w1, b1, w2, b2, 0)
    weights, experts = topk_softmax_torch(x @ gate_weight.t(), top_k)  # [T, top_k] fp32, int32
    weights = weights.to(x.dtype)
    if T == 1:  # decode: the token's top_k experts in turn, nothing sorted or gathered
        y = torch.cat([_expert_ffn(x, w1, b1, w2, b2, e) for e in experts[0].tolist()])  # [top_k, D]
        return weights @ y  # [1, D]
    flat_experts = experts.reshape(-1).long()  # slot -> expert
    order = torch.sort(flat_experts, stable=True).indices  # sorted row -> slot
    counts = torch.bincount(flat_experts, minlength=E).tolist()  # host read: this path is for CPUs
    x_sorted = x[order // top_k]  # [S, D]
    y_sorted = torch.empty_like(x_sorted)
    start = 0
    for e, count in enumerate(counts):
        if count:
            rows = slice(start, start + count)
            y_sorted[rows] = _expert_ffn(x_sorted[rows], w1, b1, w2, b2, e)
        start += count
    y = torch.empty_like(y_sorted)
    y[order] = y_sorted  # back to slot order
    out = torch.bmm(weights.unsqueeze(1), y.view(T, top_k, D))  # weighted top-k sum, [T, 1, D]
    return out.view(T, D)


def _expert_ffn(x, w1, b1, w2, b2, e: int) -> torch.Tensor:
    """Expert e on rows x [R, D]: gelu_tanh(x @ w1[e]^T + b1[e]) @ w2[e]^T + b2[e] -> [R, D]. GELU as one op (the same
    tanh formula as `gelu_tanh`, within a rounding)."""
    h = torch.nn.functional.gelu(_expert_linear(x, w1, e, b1[e]), approximate="tanh")
    return _expert_linear(h, w2, e, b2[e])


def _expert_linear(x: torch.Tensor, w, e: int, bias) -> torch.Tensor:
    """x [T, K] @ expert e's weight^T + bias: a float stack's view; a QuantizedExperts through torch's packed CPU
    kernels when it carries them, x is up to `max_rows` rows of their activation dtype and no gradient flows through
    x or bias, else that one expert dequantized."""
    if not is_quantized(w):
        return torch.nn.functional.linear(x, w[e], bias)
    packed = w.cpu_packed
    fits = packed is not None and x.device.type == "cpu" and x.dtype == packed.dtype and x.shape[0] <= packed.max_rows
    # torch's packed ops have no derivative: a forward that autograd records dequantizes instead.
    recorded = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
    if fits and not recorded:
        return packed.linear(x, e, bias)
    return torch.nn.functional.linear(x, dequantize_experts(with_qweight(w, e), x.dtype)[0], bias)


def fused_moe(x, gate_weight, w1, b1, w2, b2, top_k=2, *, backend="auto"):
    """The phixtral MoE layer: x [T, D] -> [T, D] in x's dtype.

    gate_weight [E, D] (router, no bias); w1 [E, F, D], b1 [E, F], w2 [E, D, F], b2 [E, D] (stacked torch Linear
    weights).
    logits = x @ gate_weight^T; top-k over the raw logits (ties to the lowest expert index); softmax over the k picks;
    out[t] = sum_k w[t, k] * (gelu_tanh(x[t] @ w1[e]^T + b1[e]) @ w2[e]^T + b2[e]).
    w1, w2: float stacks or QuantizedExperts of the same shapes (weight-only quantization, see quant.py).
    backend: "auto", "triton", "torch" or "naive" (see the module docstring). The Triton decode chain sums the logits
    in its routing kernel, in another order than the torch matmul of the other paths: experts whose logits lie within
    an ulp of x's dtype may be picked differently there (exact ties go to the lowest index everywhere).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_moe_inputs(x, gate_weight, w1, b1, w2, b2, top_k)
    quantized = is_quantized(w1) or is_quantized(w2)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, gate_weight, w1, b1, w2, b2) if isinstance(t, torch.Tensor)
    )
    if backend == "auto":
        backend = "triton" if triton_unavailable_reason(x.device) is None and x.dtype in TRITON_DTYPES else "torch"
        if quantized and needs_grad:
            backend = "torch"  # the Triton backward has no quantized GEMMs
    if backend != "torch":  # the torch path reads a released qweight's codes from the CPU form itself
        w1, w2 = (with_qweight(w) if is_quantized(w) else w for w in (w1, w2))
    if backend == "naive":
        return naive_moe(x, gate_weight, dense_weight(w1, x.dtype), b1, dense_weight(w2, x.dtype), b2, top_k)
    if x.shape[0] == 0 and not needs_grad:
        return x.new_empty(0, x.shape[1])
    if backend == "torch":
        return _moe_torch(x, gate_weight, w1, b1, w2, b2, top_k)
    reason = triton_unavailable_reason(x.device)
    if reason is not None:
        raise RuntimeError(f"backend='triton' cannot run: {reason}")
    if x.dtype not in TRITON_DTYPES:
        raise TypeError(
            f"backend='triton' takes float16, bfloat16 or float32 tensors, got {x.dtype} (backend='torch' takes any)"
        )
    if needs_grad:
        if quantized:
            raise NotImplementedError(
                "backend='triton' has no backward for quantized experts: use backend='torch' (or 'auto') to train "
                "through them"
            )
        return FusedMoEFunction.apply(x, gate_weight, w1, b1, w2, b2, top_k)
    return triton_moe_forward(x, gate_weight, w1, b1, w2, b2, top_k)[0]


def quantized_linear(x: torch.Tensor, w: QuantizedExperts, bias=None, *, backend: str = "auto") -> torch.Tensor:
    """y = x @ W^T + bias for one quantized Linear: x [T, K], w a QuantizedExperts of one expert ([1, N, K]), bias [N]
    or None -> [T, N] in x's dtype.

    "triton" runs the MoE's grouped GEMM as one expert at top-1 (an identity slot map built from shapes alone: no host
    sync), dequantizing inside its K loop; "torch" and "naive" take torch's packed CPU kernels when w carries them
    (w.cpu_packed: bfloat16 rows on the CPU, up to its max_rows), else dequantize to x's dtype and call F.linear.
    "auto" picks as fused_moe does (torch when grad is needed).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not is_quantized(w) or w.num_experts != 1:
        raise TypeError(f"w must be a QuantizedExperts of one expert, got {getattr(w, 'shape', type(w).__name__)}")
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != w.in_features:
        raise ValueError(
            f"x must have shape [T, {w.in_features}] (w's in features), got {tuple(getattr(x, 'shape', ()))}"
        )
    if bias is not None and (tuple(bias.shape) != (w.out_features,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be a {x.dtype} tensor [{w.out_features}], got {bias.dtype} {tuple(bias.shape)}")
    if backend == "auto":
        usable = triton_unavailable_reason(x.device) is None and x.dtype in TRITON_DTYPES
        backend = "triton" if usable and not (torch.is_grad_enabled() and x.requires_grad) else "torch"
    if backend != "triton":
        return _expert_linear(x, w, 0, bias)
    w = with_qweight(w)
    reason = triton_unavailable_reason(x.device)
    if reason is not None:
        raise RuntimeError(f"backend='triton' cannot run: {reason}")
    T, N = x.shape[0], w.out_features
    out = torch.empty(1, T, N, dtype=x.dtype, device=x.device)
    if T == 0:
        return out[0]
    config = moe_gemm_configs(T, 1, 1)[0]
    routing = _identity_routing(T, config.block_m, x.device)
    bias = None if bias is None else bias[None]
    launch_grouped_gemm(
        x, w, bias, out, routing, config, gather_a=True, scatter_c=True, activation="", mul_routing_weight=False
    )
    return out[0]


def _identity_routing(T: int, block_m: int, device) -> RoutingMap:
    """Every token to expert 0 at weight 1, slot order kept: the slot map of a dense layer, from shapes alone."""
    rows = -(-T // block_m) * block_m
    ids = torch.arange(T + block_m - 1, dtype=torch.int32, device=device).clamp_(max=T)  # sentinel T past the tokens
    offsets = torch.arange(2, dtype=torch.int32, device=device) * rows  # [0, rows], made on the device (graph-safe)
    return RoutingMap(
        torch.ones(T, 1, device=device), torch.zeros(T, 1, dtype=torch.int32, device=device), ids, offsets, block_m
    )
