"""Fused Triton kernels for the phixtral Mixture-of-Experts layer, with plain-PyTorch twins of every op."""

from ._triton import triton_unavailable_reason
from .checks import BACKENDS, TRITON_DTYPES, check_moe_inputs
from .gemm_configs import GemmConfig, moe_gemm_configs
from .grouped_gemm import expert_gemm1, expert_gemm2
from .moe import fused_moe, quantized_linear
from .quant import (
    QuantizedExperts,
    absorb_act_order,
    act_order_g_idx,
    dequantize_experts,
    is_quantized,
    pack_cols,
    pack_rows,
    quant_grid,
    quantize_rtn,
    quantize_values,
    unpack_cols,
    unpack_rows,
)
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
    "QuantizedExperts",
    "RoutingMap",
    "TRITON_DTYPES",
    "absorb_act_order",
    "act_order_g_idx",
    "check_moe_inputs",
    "dequantize_experts",
    "expert_gemm1",
    "expert_gemm1_torch",
    "expert_gemm2",
    "expert_gemm2_torch",
    "fused_moe",
    "gelu_tanh",
    "is_quantized",
    "moe_align_torch",
    "moe_combine",
    "moe_combine_torch",
    "moe_gemm_configs",
    "moe_routing",
    "moe_routing_torch",
    "naive_moe",
    "pack_cols",
    "pack_rows",
    "quant_grid",
    "quantize_rtn",
    "quantize_values",
    "quantized_linear",
    "topk_softmax_torch",
    "triton_unavailable_reason",
    "unpack_cols",
    "unpack_rows",
]
