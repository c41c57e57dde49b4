"""GPU tier: compiled kernels at phixtral-4x2_8 shapes in fp16 and bf16, and fused_moe inside a CUDA graph.

Skipped without CUDA. benchmarks/gpu_check.sh runs it on a GPU machine.
"""

import pytest
import torch
from kernel_cases import moe_layer

from phixtral_kernels import fused_moe, moe_routing, moe_routing_torch, naive_moe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

D, F, E, TOP_K = 2560, 10240, 4, 2


@pytest.fixture(scope="module")
def layers():
    """One phixtral-sized layer per dtype, plus its fp32 copy for the reference."""
    out = {}
    for dtype in (torch.float16, torch.bfloat16):
        layer = moe_layer(4096, D, F, E, dtype, device="cuda")
        out[dtype] = (layer, [t.float() for t in layer])
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 2, 5, 16, 64, 200, 1024, 4096])
def test_phixtral_shapes_match_fp32_reference(layers, dtype, T):
    (x, *weights), (x32, *weights32) = layers[dtype]
    x, x32 = x[:T], x32[:T]
    out = fused_moe(x, *weights, TOP_K, backend="triton")
    # Route the fp32 reference on the low-precision logits, as every backend does.
    ref = torch.empty_like(x32)
    r = moe_routing_torch(x @ weights[0].t(), TOP_K, 16)
    w1, b1, w2, b2 = weights32[1:]
    ref.zero_()
    for k in range(TOP_K):
        e = r.topk_ids[:, k].long()
        for ex in range(E):
            rows = (e == ex).nonzero().squeeze(1)
            h = torch.nn.functional.gelu(x32[rows] @ w1[ex].t() + b1[ex], approximate="tanh")
            ref[rows] += r.topk_weights[rows, k, None] * (h @ w2[ex].t() + b2[ex])
    naive = naive_moe(x, *weights, TOP_K)
    err = (out.float() - ref).abs().max().item()
    naive_err = (naive.float() - ref).abs().max().item()
    assert err <= 2 * naive_err + 1e-2, f"fused {err:.3g} vs naive {naive_err:.3g}"


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
    (x, *weights), _ = layers[dtype]
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
    (x, *weights), _ = layers[torch.bfloat16]
    assert torch.equal(fused_moe(x[:512], *weights, TOP_K), fused_moe(x[:512], *weights, TOP_K))
