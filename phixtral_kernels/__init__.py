"""Fused Triton kernels for the phixtral Mixture-of-Experts layer, with plain-PyTorch twins of every op."""

from ._triton import triton_unavailable_reason
from .grouped_gemm import GemmConfig, expert_gemm1, expert_gemm2, moe_gemm_configs
from .moe import BACKENDS, check_moe_inputs, fused_moe
from .reference import (
    expert_gemm1_torch,
    expert_gemm2_torch,
    gelu_tanh,
    moe_align_torch,
    moe_combine_torch,
    moe_routing_torch,
    naive_moe,
    topk_softmax_torch,
)
from .routing import RoutingMap, moe_routing
from .unpermute import moe_combine

__all__ = [
    "BACKENDS",
    "GemmConfig",
    "RoutingMap",
    "check_moe_inputs",
    "expert_gemm1",
    "expert_gemm1_torch",
    "expert_gemm2",
    "expert_gemm2_torch",
    "fused_moe",
    "gelu_tanh",
    "moe_align_torch",
    "moe_combine",
    "moe_combine_torch",
    "moe_gemm_configs",
    "moe_routing",
    "moe_routing_torch",
    "naive_moe",
    "topk_softmax_torch",
    "triton_unavailable_reason",
]
