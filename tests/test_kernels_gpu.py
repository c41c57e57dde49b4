"""GPU tier: compiled kernels at phixtral-4x2_8 shapes in fp16 and bf16, and fused_moe inside a CUDA graph.

Skipped without CUDA. benchmarks/gpu_check.sh runs it on a GPU machine. The decode chain sums its router logits with
tl.dot in 256-wide chunks, cuBLAS in other chunks: near-tied experts can be picked differently, so results are compared
on the routing the forward returns (checked to be a top-k up to near-ties), not on a top-k of cuBLAS logits.
"""

import pytest
import torch
from kernel_cases import assert_top_k_up_to_ties, moe_layer, reference_moe

from phixtral_kernels import fused_moe, moe_routing, moe_routing_torch
from phixtral_kernels.moe_triton import triton_moe_forward

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

D, F, E, TOP_K = 2560, 10240, 4, 2


@pytest.fixture(scope="module")
def layers():
    """One phixtral-sized layer per dtype."""
    return {dtype: moe_layer(4096, D, F, E, dtype, device="cuda") for dtype in (torch.float16, torch.bfloat16)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 2, 5, 16, 64, 200, 1024, 4096])
def test_phixtral_shapes_match_fp32_reference(layers, dtype, T):
    """fused_moe's forward against the fp32 reference, both on the forward's own picks; bound: 2x the same reference's
    error run in the test dtype, plus a floor."""
    x, *weights = layers[dtype]
    x = x[:T]
    out, routing, _ = triton_moe_forward(x, *weights, TOP_K)  # what fused_moe returns, and the routing it ran on
    assert_top_k_up_to_ties(routing.topk_ids, x, weights[0])
    ref = reference_moe(x, *weights, TOP_K, dtype=torch.float32, device="cuda", topk_ids=routing.topk_ids)
    same_dtype = reference_moe(x, *weights, TOP_K, dtype=dtype, device="cuda", topk_ids=routing.topk_ids)
    err = (out.float() - ref).abs().max().item()
    same_dtype_err = (same_dtype.float() - ref).abs().max().item()
    assert err <= 2 * same_dtype_err + 1e-2, f"fused {err:.3g} vs the reference in {dtype}: {same_dtype_err:.3g}"


@pytest.mark.parametrize("T", [1, 8, 64])
def test_routing_matches_torch_on_gpu(T):
    logits = torch.randn(T, E, device="cuda")
    a, b = moe_routing(logits, TOP_K, 16), moe_routing_torch(logits, TOP_K, 16)
    assert torch.equal(a.topk_ids, b.topk_ids) and torch.equal(a.expert_offsets, b.expert_offsets)
    rows = int(b.expert_offsets[-1])
    assert torch.equal(a.sorted_token_ids[:rows], b.sorted_token_ids[:rows])


@pytest.mark.parametrize("T", [1, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_moe_replays_in_a_cuda_graph(layers, dtype, T):
    """Capture proves there is no host sync in the path; replays with new inputs must match eager runs."""
    x, *weights = layers[dtype]
    static_x = x[:T].clone()
    fused_moe(static_x, *weights, TOP_K)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fused_moe(static_x, *weights, TOP_K)
    for step in range(3):
        new_x = x[T * (step + 1) : T * (step + 2)]
        static_x.copy_(new_x)
        graph.replay()
        torch.testing.assert_close(static_out, fused_moe(new_x, *weights, TOP_K), rtol=0, atol=0)


def test_fused_moe_is_deterministic(layers):
    x, *weights = layers[torch.bfloat16]
    assert torch.equal(fused_moe(x[:512], *weights, TOP_K), fused_moe(x[:512], *weights, TOP_K))
