"""The decode chain of fused_moe's Triton forward (moe_triton.triton_moe_forward): one-program routing, GEMM 1, and
GEMM 2 summing each token's top_k <= 2 rows itself; grids of RoutingMap.max_tiles row tiles.

Launch counts per MoE layer, results against the fp64 reference over T x top_k x E, the top-2 sum bit for bit against
the fixed-order combine, the exact tile bound, and the PHIXTRAL_MOE_DECODE_PATH switch. Runs under the interpreter on
a CPU and compiled on a GPU (benchmarks/gpu_check.sh), where the atomic exchange's arrival order really varies.

The decode chain's routing sums its logits with tl.dot, the reference with a torch matmul: on a GPU near-tied experts
can be picked differently, so results are compared on the routing the chain returns (its picks checked to be a top-k
up to near-ties), never on a top-k recomputed from other logits.
"""

import pytest
import torch
from kernel_cases import DEVICE, CountLaunches, assert_close_to_reference, assert_top_k_up_to_ties, moe_layer

from phixtral_kernels import (
    GemmConfig,
    expert_gemm1,
    expert_gemm1_torch,
    expert_gemm2_torch,
    fused_moe,
    moe_combine,
    moe_routing,
)
from phixtral_kernels.grouped_gemm import expert_gemm2, expert_gemm2_sum, pair_buffer
from phixtral_kernels.moe_triton import DECODE_MAX_TOKENS, triton_moe_forward
from phixtral_kernels.routing import RoutingMap, moe_routing_fused

# (E, top_k): every top_k of 1 to 4 that E allows
EXPERTS_TOP_K = [(1, 1), (4, 1), (4, 2), (4, 3), (4, 4), (8, 1), (8, 2), (8, 3), (8, 4)]
# T x (E, top_k) x dtype: decode T in fp32 and fp16, the prefill chain's T in fp16 (the interpreter's time grows with T:
# about 0.6 s a case at T = 257). On a GPU every case compiles its own kernel variants: fewer of them there.
if DEVICE == "cpu":
    CASES = [(T, dtype) for T in (1, 2, 3, 8) for dtype in (torch.float32, torch.float16)] + [
        (64, torch.float16),
        (257, torch.float16),
    ]
else:
    CASES = [(T, torch.float16) for T in (1, 8, 257)]
D, F = 32, 64  # one GEMM tile each under the interpreter: its cost is per program


# ------------------------------------------------------------------------------------------------------ launches


@pytest.mark.parametrize(
    "T, dtype", [(T, torch.float16) for T in range(1, 9)] + [(1, torch.float32), (8, torch.float32)], ids=str
)
def test_decode_layer_launches_three_kernels(T, dtype):
    """phixtral decode (E = 4, top_k = 2): routing, GEMM 1, GEMM 2; no router matmul, no combine, no fill, no cast."""
    layer = moe_layer(T, D, F, 4, dtype, seed=T)
    with CountLaunches() as counted:
        fused_moe(*layer, 2, backend="triton")
    assert counted.launches == ["fused_routing_kernel", "grouped_gemm_kernel", "grouped_gemm_kernel"]


@pytest.mark.parametrize(
    "path, T, top_k, expected",
    [
        ("legacy", 1, 2, ["mm", "topk_softmax_kernel", "align_kernel", "grouped_gemm_kernel", "grouped_gemm_kernel",
                          "combine_kernel"]),
        ("auto", 1, 1, ["fused_routing_kernel", "grouped_gemm_kernel", "grouped_gemm_kernel"]),
        ("auto", 5, 4, ["fused_routing_kernel", "grouped_gemm_kernel", "grouped_gemm_kernel",
                        "combine_kernel"]),  # 4 rows: combine
        ("auto", DECODE_MAX_TOKENS + 1, 2, ["mm", "topk_softmax_kernel", "align_kernel", "grouped_gemm_kernel",
                                            "grouped_gemm_kernel", "combine_kernel"]),
        ("decode", 40, 2, ["fused_routing_kernel", "grouped_gemm_kernel", "grouped_gemm_kernel"]),
    ],
)  # fmt: skip
def test_launches_of_each_chain(monkeypatch, path, T, top_k, expected):
    """The chain PHIXTRAL_MOE_DECODE_PATH names, as fused_moe runs it (triton_moe_forward, which also returns the
    routing to compare on); the legacy chain is the one before this change."""
    monkeypatch.setenv("PHIXTRAL_MOE_DECODE_PATH", path)
    layer = moe_layer(T, D, F, 4, torch.float16, seed=T)
    with CountLaunches() as counted:
        out, routing, _ = triton_moe_forward(*layer, top_k)
    assert counted.launches == expected
    assert_close_to_reference(out, *layer, top_k, routing=routing)


def test_decode_path_switch_rejects_unknown_names(monkeypatch):
    monkeypatch.setenv("PHIXTRAL_MOE_DECODE_PATH", "fast")
    with pytest.raises(ValueError, match="PHIXTRAL_MOE_DECODE_PATH must be one of"):
        fused_moe(*moe_layer(1, D, F, 4), 2, backend="triton")
    with pytest.raises(ValueError, match="path must be one of"):
        triton_moe_forward(*moe_layer(1, D, F, 4), 2, path="fast")


# ----------------------------------------------------------------------------------------------------- results


@pytest.mark.parametrize("T, dtype", CASES, ids=str)
@pytest.mark.parametrize("E, top_k", EXPERTS_TOP_K)
def test_fused_moe_matches_reference(E, top_k, T, dtype):
    """The default chain: the decode chain up to DECODE_MAX_TOKENS tokens, the prefill chain (tight grids) above."""
    layer = moe_layer(T, D, F, E, dtype, seed=1000 * E + 10 * T + top_k)
    out, routing, _ = triton_moe_forward(*layer, top_k)  # fused_moe's forward, with the routing it ran on
    assert_close_to_reference(out, *layer, top_k, routing=routing)


@pytest.mark.parametrize(
    "T, E, top_k, dtype",
    [(64, 4, 2, torch.float32), (257, 8, 2, torch.float16), (257, 8, 3, torch.float16), (100, 1, 1, torch.float16)],
    ids=str,
)
def test_decode_chain_at_many_tokens(T, E, top_k, dtype):
    """The decode chain forced past DECODE_MAX_TOKENS: its routing walks several blocks of tokens in one program, and
    the top-2 sum meets rows from many tiles."""
    layer = moe_layer(T, D, F, E, dtype, seed=T + E)
    out, routing, _ = triton_moe_forward(*layer, top_k, path="decode")
    assert_close_to_reference(out, *layer, top_k, routing=routing)


@pytest.mark.parametrize("T, top_k", [(1, 2), (3, 3), (8, 2)])
def test_legacy_chain_matches_reference(T, top_k):
    layer = moe_layer(T, D, F, 4, torch.float16, seed=T)
    out, routing, _ = triton_moe_forward(*layer, top_k, path="legacy")
    assert_close_to_reference(out, *layer, top_k, routing=routing)


def test_comparing_on_the_chains_own_routing_still_catches_a_wrong_pick(monkeypatch):
    """Planted bug: the decode chain's routing on the negated router weight (the lowest logits picked). The comparison
    on the chain's own routing must still fail: its picks are no top-k. A near-tie (expert 1 a fraction of an fp16 ulp
    below expert 0) may go either way; a clear loser may not."""
    from phixtral_kernels import moe_triton

    real = moe_triton.moe_routing_fused
    monkeypatch.setattr(moe_triton, "moe_routing_fused", lambda x, gate, *a, **kw: real(x, -gate, *a, **kw))
    layer = moe_layer(4, D, F, 4, torch.float16, seed=4)
    out, routing, _ = triton_moe_forward(*layer, 2, path="decode")
    with pytest.raises(AssertionError, match="below others"):
        assert_close_to_reference(out, *layer, 2, routing=routing)

    x, gate = layer[0][:1], layer[1].clone()
    gate[0] = x[0]  # expert 0 on top by far
    gate[1] = gate[0] * (1 - 2**-12)
    assert_top_k_up_to_ties(torch.tensor([[1]]), x, gate)
    with pytest.raises(AssertionError, match="below others"):
        assert_top_k_up_to_ties(torch.tensor([[2]]), x, gate)


# ---------------------------------------------------------------------------------------------- the top-2 sum


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_top2_sum_equals_the_fixed_order_combine_bit_for_bit(dtype):
    """GEMM 2 summing pairs by atomic exchange == GEMM 2's slot rows summed by moe_combine in slot order, bit for bit:
    the same fp32 rows, and a + b == b + a. The rows arrive in both orders here (a token's first pick in a later tile
    than its second, or an earlier one), and in an order that varies from run to run on a GPU."""
    T = 40
    x, gate, w1, b1, w2, b2 = moe_layer(T, D, F, 4, dtype, seed=T)
    cfg = GemmConfig(block_m=16, block_n=32, block_k=64, num_stages=1)
    out = torch.full((T, D), float("nan"), dtype=dtype, device=DEVICE)
    pair = pair_buffer(out, 2)
    routing = moe_routing_fused(x, gate, 2, cfg.block_m, pair=pair)
    assert torch.all(pair == -1), "the routing fills the pair buffer with the sentinel"
    ids = routing.topk_ids
    assert (ids[:, 0] < ids[:, 1]).any() and (ids[:, 0] > ids[:, 1]).any(), "both arrival orders"
    h = expert_gemm1(x, w1, b1, routing, cfg)
    summed = expert_gemm2_sum(h, w2, b2, routing, cfg, out, pair)
    combined = moe_combine(expert_gemm2(h, w2, b2, routing, cfg), 2, dtype)
    assert torch.equal(summed, combined)
    out_again = torch.empty_like(out)
    pair_again = pair_buffer(out_again, 2)  # fp32: out itself
    again = expert_gemm2_sum(
        h, w2, b2, moe_routing_fused(x, gate, 2, cfg.block_m, pair=pair_again), cfg, out_again, pair_again
    )
    assert torch.equal(summed, again), "run to run"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_a_stale_pair_buffer_raises_in_debug_mode(monkeypatch, dtype):
    """expert_gemm2_sum needs its pair buffer all -1 at the start of each launch. Planted bug: a caller reusing the
    buffer (and for fp32, out itself) without the routing's refill. PHIXTRAL_DEBUG=1 turns that into a ValueError;
    a fresh buffer passes in debug mode and gives the same bits as without it."""
    T = 8
    x, gate, w1, b1, w2, b2 = moe_layer(T, D, F, 4, dtype, seed=T)
    cfg = GemmConfig(block_m=16, block_n=32, block_k=64, num_stages=1)
    out = torch.empty(T, D, dtype=dtype, device=DEVICE)
    pair = pair_buffer(out, 2)
    routing = moe_routing_fused(x, gate, 2, cfg.block_m, pair=pair)
    h = expert_gemm1(x, w1, b1, routing, cfg)
    monkeypatch.setenv("PHIXTRAL_DEBUG", "1")
    fresh = expert_gemm2_sum(h, w2, b2, routing, cfg, out, pair).clone()
    with pytest.raises(ValueError, match=r"pair buffer must hold -1 everywhere .* Refill it"):
        expert_gemm2_sum(h, w2, b2, routing, cfg, out, pair)
    monkeypatch.setenv("PHIXTRAL_DEBUG", "0")
    pair.fill_(-1)
    assert torch.equal(expert_gemm2_sum(h, w2, b2, routing, cfg, out, pair), fresh)


# ------------------------------------------------------------------------------------------------- tile bound


def _max_tiles_by_search(T: int, top_k: int, E: int, block_m: int) -> int:
    """Most tiles over every count vector a routing can make: 0 <= c_e <= T, sum c_e = T * top_k (dynamic
    programming)."""
    S = T * top_k
    best = {0: 0}  # slots given to the experts so far -> most tiles
    for _ in range(E):
        step = {}
        for used, tiles in best.items():
            for c in range(min(T, S - used) + 1):
                step[used + c] = max(step.get(used + c, -1), tiles + -(-c // block_m))
        best = step
    return best[S]


def _shape_only_map(T, top_k, E, block_m) -> RoutingMap:
    i32 = dict(dtype=torch.int32, device="meta")
    S = T * top_k
    return RoutingMap(torch.empty(T, top_k, device="meta"), torch.empty(T, top_k, **i32),
                      torch.empty(S + E * (block_m - 1), **i32), torch.empty(E + 1, **i32), block_m)  # fmt: skip


def test_max_tiles_is_the_exact_bound():
    for block_m in (16, 32):
        for E in (1, 2, 3, 4, 8):
            for top_k in sorted({1, min(2, E), E}):
                for T in (0, 1, 2, 3, 5, 8, 15, 16, 17, 31, 33, 40):
                    r = _shape_only_map(T, top_k, E, block_m)
                    assert r.max_tiles == _max_tiles_by_search(T, top_k, E, block_m), (T, top_k, E, block_m)
                    assert r.max_tiles <= -(-r.max_rows // block_m)


def test_gemms_cover_the_fullest_routing():
    """A routing with as many tiles as max_tiles allows (expert counts 33, 33, 1, 13 at block_m 16: 8 tiles), every row
    computed: a bound one tile short would leave a token's output NaN."""
    T, E, top_k, block_m = 40, 4, 2, 16
    order = [0] * 33 + [1] * 33 + [2] * 1 + [3] * 13  # slot i -> expert; token t gets order[t] and order[t + T]
    logits = torch.zeros(T, E)
    for t in range(T):
        logits[t, order[t]], logits[t, order[t + T]] = 2.0, 1.0
    routing = moe_routing(logits.to(DEVICE), top_k, block_m)
    assert int(routing.expert_offsets[-1]) == routing.max_tiles * block_m == 8 * block_m
    x, _, w1, b1, w2, b2 = moe_layer(T, D, F, E)
    cfg = GemmConfig(block_m=block_m, block_n=32, block_k=32, num_stages=1)
    h = expert_gemm1(x, w1, b1, routing, cfg)
    out = torch.full((T, D), float("nan"), device=DEVICE)
    pair = torch.full((T, D), -1, dtype=torch.int32, device=DEVICE)
    expert_gemm2_sum(h, w2, b2, routing, cfg, out, out.view(torch.int32).copy_(pair))
    want = expert_gemm2_torch(expert_gemm1_torch(x, w1, b1, routing), w2, b2, routing).view(T, top_k, D).sum(1)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
