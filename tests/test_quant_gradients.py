"""Gradients through quantized experts (x, the router, the biases; the packed weights take none): fused_moe's torch
path on QuantizedExperts against autograd through the same MoE on the dequantized float weights.

The quantized path dequantizes each expert and runs the float path's ops, so its forward and gradients are the float
path's bits; the naive loop (another order of the same sums) bounds them at fp32 rounding. With bfloat16 activations
on the CPU, experts carrying torch's packed CPU form dequantize instead when autograd records the forward (the packed
ops have no derivative).
"""

import dataclasses

import pytest
import torch
from kernel_cases import moe_layer

from phixtral_kernels import act_order_g_idx, dequantize_experts, fused_moe, quantize_rtn
from phixtral_kernels.cpu_packed import cpu_packing_unsupported, pack_for_cpu

SCHEMES = {"w4_g32_zeros_act_order": (4, 32, False, True), "w8_per_channel_sym": (8, -1, True, False)}
E, D, F, T = 4, 64, 96, 12
NAMES = ("x", "gate_weight", "b1", "b2")


def quantized_layer(scheme):
    """x, gate [E, D], w1 / w2 as QuantizedExperts (RTN; act-order: a random column order per expert), b1, b2: fp32."""
    bits, group_size, sym, act_order = SCHEMES[scheme]
    x, gate, w1, b1, w2, b2 = moe_layer(T, D, F, E, torch.float32, device="cpu")
    g = torch.Generator().manual_seed(1)

    def quantize(w):
        K = w.shape[2]
        order = torch.stack([torch.randperm(K, generator=g) for _ in range(E)]) if act_order else None
        g_idx = act_order_g_idx(order, group_size) if act_order else None
        return quantize_rtn(w, bits, group_size, sym=sym, g_idx=g_idx)

    return x, gate, quantize(w1), b1, quantize(w2), b2


def output_and_grads(layer, w1, w2, backend, dtype=torch.float32):
    """(out, {name: gradient}) of fused_moe on fresh leaves of x, gate, b1, b2 in dtype, for one fixed dout."""
    x, gate, _, b1, _, b2 = layer
    leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (x, gate, b1, b2)]
    out = fused_moe(leaves[0], leaves[1], w1, leaves[2], w2, leaves[3], 2, backend=backend)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    return out, dict(zip(NAMES, torch.autograd.grad(out, leaves, dout)))


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_gradients_equal_autograd_on_the_dequantized_weights(scheme):
    layer = quantized_layer(scheme)
    _, _, q1, _, q2, _ = layer
    f1, f2 = dequantize_experts(q1, torch.float32), dequantize_experts(q2, torch.float32)
    out, grads = output_and_grads(layer, q1, q2, "auto")  # auto: torch, the path with a backward for quantized experts
    float_out, float_grads = output_and_grads(layer, f1, f2, "torch")
    _, naive_grads = output_and_grads(layer, f1, f2, "naive")
    assert torch.equal(out, float_out)
    for name in NAMES:
        assert torch.equal(grads[name], float_grads[name]), name
        # Gradients of order 1-5; measured at most 7.2e-7 from the naive loop's.
        torch.testing.assert_close(grads[name], naive_grads[name], rtol=0, atol=2e-6, msg=name)
        assert grads[name].abs().max() > 0.1, f"{name}: the comparison must bite"


def test_triton_backend_refuses_to_train_through_quantized_experts():
    layer = quantized_layer("w8_per_channel_sym")
    with pytest.raises(NotImplementedError, match="backend='triton' has no backward for quantized experts"):
        output_and_grads(layer, layer[2], layer[4], "triton")


def test_bf16_gradients_through_cpu_packed_experts():
    layer = quantized_layer("w4_g32_zeros_act_order")
    _, _, q1, _, q2, _ = layer
    if cpu_packing_unsupported(q1) or cpu_packing_unsupported(q2):
        pytest.skip(f"no packed CPU kernels here: {cpu_packing_unsupported(q1) or cpu_packing_unsupported(q2)}")
    p1, p2 = (dataclasses.replace(q, cpu_packed=pack_for_cpu(q, torch.bfloat16)) for q in (q1, q2))
    out, grads = output_and_grads(layer, p1, p2, "torch", torch.bfloat16)
    bf1, bf2 = dequantize_experts(q1, torch.bfloat16), dequantize_experts(q2, torch.bfloat16)
    float_out, float_grads = output_and_grads(layer, bf1, bf2, "torch", torch.bfloat16)
    assert torch.equal(out, float_out)
    for name in NAMES:
        assert torch.equal(grads[name], float_grads[name]), name
