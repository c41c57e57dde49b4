"""`phixtral::fused_moe`: phixtral_kernels.fused_moe as a torch custom op, for models that torch.compile traces.

vLLM compiles its models' forward with torch.compile. Traced as plain Python, fused_moe's torch backend (the CPU path)
reads the per-expert counts on the host, a graph break that vLLM's full-graph compile refuses. As a custom op it is one
opaque node whose output is shaped like x; the backend runs eagerly inside it (Triton on CUDA, torch on the CPU).
Plain torch (no vLLM), so the default tests check it.
"""

import torch

from phixtral_kernels import fused_moe


@torch.library.custom_op("phixtral::fused_moe", mutates_args=())
def fused_moe_op(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    top_k: int,
    backend: str,
) -> torch.Tensor:
    """fused_moe(x [T, D], gate_weight [E, D], w1 [E, F, D], b1 [E, F], w2 [E, D, F], b2 [E, D], top_k) -> [T, D]."""
    return fused_moe(x, gate_weight, w1, b1, w2, b2, top_k, backend=backend)


@fused_moe_op.register_fake
def _(x, gate_weight, w1, b1, w2, b2, top_k, backend):
    return torch.empty_like(x)
