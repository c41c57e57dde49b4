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


def _k_per_split(K, cfg):
    """As the launcher splits K: whole BLOCK_K tiles, the same count per split."""
    tiles = -(-K // cfg.block_k)
    return -(-tiles // cfg.split_k) * cfg.block_k


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
    return _k_loop_meta(cfg1, w1, D, _k_per_split(D, cfg1)), _k_loop_meta(cfg2, w2, F, _k_per_split(F, cfg2))


@pytest.mark.parametrize(
    "K, block_k, split_k, even",
    [(64, 32, 1, True), (72, 32, 1, False), (128, 32, 2, True), (160, 32, 2, False), (2560, 64, 1, True),
     (2560, 128, 1, True), (10240, 128, 4, True), (10240, 128, 8, True), (10240, 128, 3, False),
     (10240, 256, 3, False)],
)  # fmt: skip
def test_even_k_when_every_split_lies_inside_k(K, block_k, split_k, even):
    """phixtral's D = 2560 and F = 10240 take the maskless loop with every decode and prefill K tile; the interpreter
    runs both loops in the other tests here and in test_kernels.py (K = 64 even, 72 and 200 not)."""
    cfg = GemmConfig(block_m=16, block_n=64, block_k=block_k, split_k=split_k)
    assert _k_loop_meta(cfg, torch.empty(1, 64, K), K, _k_per_split(K, cfg))["EVEN_K"] is even


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D, F, even", [(64, 160, (True, False)), (72, 128, (False, True))])
def test_tma_weight_loads_match_torch(dtype, D, F, even):
    """GEMM 1 (K = D) and GEMM 2 (K = F, two splits) with TMA weight loads, one on whole K tiles (EVEN_K), the other
    masked: F = 160 in 32-deep tiles and two splits leaves the second split's last tile past K, which TMA reads as
    zeros. N (F or D) is no multiple of 64 in two of the GEMMs: a tile past N reads the next expert's rows into
    columns the store drops. bf16 takes the interpreter's upcast before tl.dot, after the transposed descriptor load."""
    cfg1 = GemmConfig(block_m=32, block_n=64, block_k=32, num_stages=1, tma=True)
    cfg2 = GemmConfig(block_m=32, block_n=64, block_k=32, split_k=2, num_stages=1, tma=True)
    meta1, meta2 = _run_both(13, D, F, dtype, cfg1, cfg2)
    assert (meta1["EVEN_K"], meta2["EVEN_K"]) == even
    assert meta1["TMA_B"] == meta2["TMA_B"] == grouped_gemm.HAS_TENSOR_DESCRIPTORS


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
