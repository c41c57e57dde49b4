"""The grouped GEMM's K-loop variants against the torch twins: EVEN_K (no K masks when every split's K range lies inside
K) and TMA weight loads (a tensor descriptor over the [E * N, K] weight stack), and where TMA must not be taken.

On a CPU these run in the Triton interpreter, which runs tensor descriptors too (triton 3.6 and 3.9); the TMA copy
instructions themselves are checked in the compiled PTX (tests/test_compile.py)."""

import pytest
import torch
from kernel_cases import ERROR_FLOOR, moe_layer

from phixtral_kernels import (
    GemmConfig,
    expert_gemm1,
    expert_gemm1_torch,
    expert_gemm2,
    expert_gemm2_torch,
    grouped_gemm,
    moe_routing,
    quantize_rtn,
)
from phixtral_kernels.grouped_gemm import _k_loop_meta, tma_applies

DTYPES = [torch.float16, torch.bfloat16]  # fp16: the exact path (fp32 runs the same); bf16: its upcast before tl.dot


def _run_both(T, D, F, dtype, cfg1, cfg2):
    """GEMM 1 and GEMM 2 against their twins; -> the K-loop constexprs each launch got."""
    x, g, w1, b1, w2, b2 = moe_layer(T, D, F, 4, dtype)
    r = moe_routing(x @ g.t(), 2, cfg1.block_m)
    h, ref = expert_gemm1(x, w1, b1, r, cfg1), expert_gemm1_torch(x, w1, b1, r)
    rows = r.sorted_token_ids[: int(r.expert_offsets[-1])] < r.num_slots
    tol = ERROR_FLOOR[dtype] * 2
    torch.testing.assert_close(h[: len(rows)][rows].float(), ref[: len(rows)][rows].float(), rtol=0, atol=tol)
    y = expert_gemm2(ref, w2, b2, r, cfg2)
    torch.testing.assert_close(y.sum(0), expert_gemm2_torch(ref, w2, b2, r), rtol=0, atol=tol)
    k1 = -(-D // cfg1.block_k) * cfg1.block_k
    k2 = -(-(-(-F // cfg2.block_k)) // cfg2.split_k) * cfg2.block_k
    return _k_loop_meta(cfg1, w1, D, k1), _k_loop_meta(cfg2, w2, F, k2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("D, F, even", [(64, 160, (True, False)), (72, 128, (False, True))])
def test_even_k_and_tma_match_torch(dtype, tma, D, F, even):
    """GEMM 1 (K = D) and GEMM 2 (K = F, two splits): one of them on whole K tiles (EVEN_K), the other masked.
    F = 160 with 32-deep tiles in two splits: the second split's last tile is past K. N = F or D is no multiple of 64
    in two cases: a TMA tile past N reads the next expert's rows into columns the store drops."""
    cfg1 = GemmConfig(block_m=32, block_n=64, block_k=32, num_stages=1, tma=tma)
    cfg2 = GemmConfig(block_m=32, block_n=64, block_k=32, split_k=2, num_stages=1, tma=tma)
    meta1, meta2 = _run_both(13, D, F, dtype, cfg1, cfg2)
    assert (meta1["EVEN_K"], meta2["EVEN_K"]) == even
    assert meta1["TMA_B"] == meta2["TMA_B"] == (tma and grouped_gemm.HAS_TENSOR_DESCRIPTORS)


def test_tma_is_taken_only_where_it_can_serve(monkeypatch):
    tma = GemmConfig(block_m=32, block_n=64, block_k=32, num_stages=1, tma=True)
    w = torch.randn(4, 96, 64, dtype=torch.float16)
    assert tma_applies(tma, w) == grouped_gemm.HAS_TENSOR_DESCRIPTORS
    assert not tma_applies(GemmConfig(32, 64, 32), w)  # off by default
    assert not tma_applies(tma, w.transpose(1, 2))  # the backward's transposed views
    assert not tma_applies(tma, torch.randn(4, 96, 36, dtype=torch.float16))  # rows of 72 B: not 16-byte multiples
    assert not tma_applies(tma, torch.randn(4, 96, 65, dtype=torch.float16)[..., 1:])  # base off 16-byte alignment
    assert not tma_applies(tma, quantize_rtn(w, bits=8, group_size=32))
    monkeypatch.setattr(grouped_gemm, "HAS_TENSOR_DESCRIPTORS", False)  # a triton without tl.make_tensor_descriptor
    assert not tma_applies(tma, w)


def test_tma_flag_falls_back_to_pointer_loads(monkeypatch):
    """Weights TMA cannot take (rows of 72 bytes) and a triton without descriptors: the flag is ignored, same result."""
    cfg = GemmConfig(block_m=32, block_n=64, block_k=32, num_stages=1, tma=True)
    meta1, meta2 = _run_both(9, 36, 64, torch.float16, cfg, cfg)
    assert not meta1["TMA_B"] and meta2["TMA_B"] == grouped_gemm.HAS_TENSOR_DESCRIPTORS
    monkeypatch.setattr(grouped_gemm, "HAS_TENSOR_DESCRIPTORS", False)
    meta1, meta2 = _run_both(9, 64, 64, torch.float16, cfg, cfg)
    assert not meta1["TMA_B"] and not meta2["TMA_B"]
