"""Weight-only quantized experts: the packed layout (GPTQ v1), the container's checks, the RTN quantizer, and the
grouped GEMM's in-loop dequantization against dequantize-then-matmul.

On a CPU-only machine the kernels run under the Triton interpreter (tests/conftest.py); on a GPU they are compiled.
"""

import itertools

import pytest
import torch
from kernel_cases import DEVICE, ERROR_FLOOR, HOST_SYNC_OPS, RecordOps, assert_close_to_reference, moe_layer

from phixtral_kernels import (
    GemmConfig,
    QuantizedExperts,
    absorb_act_order,
    act_order_g_idx,
    dequantize_experts,
    expert_gemm1,
    expert_gemm1_torch,
    expert_gemm2,
    expert_gemm2_torch,
    fused_moe,
    moe_routing,
    quant,
    quantize_rtn,
    quantized_linear,
)
from phixtral_kernels.quant import pack_cols, pack_rows, unpack_cols, unpack_rows

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _act_order(E, K, group_size, seed=0):
    """g_idx [E, K] of a random column order per expert, as GPTQ with act-order writes it."""
    g = _gen(seed)
    return act_order_g_idx(torch.stack([torch.randperm(K, generator=g) for _ in range(E)]), group_size)


def _quantize(w, bits, group_size, sym=True, act_order=False, seed=0):
    g_idx = _act_order(w.shape[0], w.shape[2], group_size, seed).to(w.device) if act_order else None
    return quantize_rtn(w, bits, group_size, sym=sym, g_idx=g_idx)


# ------------------------------------------------------------------------------------------------------------ layout


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_is_gptq_v1(bits):
    """Row k of column n in word k // P at bit (k % P) * bits, low bits first; qzeros the same along N."""
    per = 32 // bits
    q = torch.randint(0, 2**bits, (2, 3 * per, 5), generator=_gen(bits), dtype=torch.int32)
    want = torch.zeros(2, 3, 5, dtype=torch.int64)
    for k in range(3 * per):
        want[:, k // per] |= q[:, k].long() << ((k % per) * bits)
    want = want - (want >= 2**31).long() * 2**32  # the same 32 bits as int32
    assert torch.equal(pack_rows(q, bits), want.to(torch.int32))
    assert torch.equal(unpack_rows(pack_rows(q, bits), bits), q)
    z = q.transpose(1, 2).contiguous()  # [2, 5, 3P]: packed along the last dim
    assert torch.equal(pack_cols(z, bits), want.transpose(1, 2).to(torch.int32))
    assert torch.equal(unpack_cols(pack_cols(z, bits), bits), z)


def test_dequantize_follows_the_formula_element_by_element():
    bits, group_size, E, N, K = 4, 8, 2, 16, 32
    g = _gen(1)
    q = torch.randint(0, 16, (E, K, N), generator=g, dtype=torch.int32)
    z = torch.randint(0, 15, (E, K // group_size, N), generator=g, dtype=torch.int32)  # stored zero - 1
    s = torch.rand(E, K // group_size, N, generator=g) + 0.5
    g_idx = _act_order(E, K, group_size).long()
    w = QuantizedExperts(pack_rows(q, bits), pack_cols(z, bits), s, g_idx.int(), bits, group_size)
    got = dequantize_experts(w)
    for e, n, k in itertools.product(range(E), range(N), range(K)):
        grp = g_idx[e, k]
        assert got[e, n, k] == s[e, grp, n] * (q[e, k, n] - (z[e, grp, n] + 1))
    sym = QuantizedExperts(pack_rows(q, bits), None, s, None, bits, group_size)
    want = s.repeat_interleave(group_size, 1) * (q - 8)  # zero 2^(bits-1), groups k // group_size
    assert torch.equal(dequantize_experts(sym), want.transpose(1, 2))


def _valid(**changes):
    E, N, K, bits, group_size = 2, 16, 64, 4, 32
    args = dict(
        qweight=torch.zeros(E, K * bits // 32, N, dtype=torch.int32),
        qzeros=torch.zeros(E, K // group_size, N * bits // 32, dtype=torch.int32),
        scales=torch.ones(E, K // group_size, N, dtype=torch.float16),
        g_idx=(torch.arange(K, dtype=torch.int32) // group_size).expand(E, K).contiguous(),
        bits=bits,
        group_size=group_size,
    )
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(bits=3), "bits must be 4 or 8"),
        (dict(scales=None), "scales is required"),
        (dict(qweight=torch.zeros(2, 8, 16)), "qweight must be an int32"),
        (dict(qweight=torch.zeros(2, 7, 16, dtype=torch.int32)), "does not divide K=56 \\(the in features qweight"),
        (
            dict(qweight=torch.zeros(2, 12, 16, dtype=torch.int32)),
            "scales must be a float tensor \\[E, G, N\\] = \\(2, 3, 16\\)",
        ),
        (dict(group_size=48), "group_size 48 does not divide K=64"),
        (dict(group_size=0), "group_size must be -1"),
        (dict(scales=torch.ones(2, 2, 15)), "scales must be a float tensor"),
        (dict(qzeros=torch.zeros(2, 2, 3, dtype=torch.int32)), "qzeros must be an int32 tensor"),
        (dict(qweight=torch.zeros(2, 8, 12, dtype=torch.int32), scales=torch.ones(2, 2, 12)), "qzeros: N=12"),
        (dict(g_idx=torch.zeros(2, 63, dtype=torch.int32)), "g_idx must be an int32 tensor"),
        (
            dict(g_idx=torch.full((2, 64), 2, dtype=torch.int32)),
            "g_idx holds groups in \\[2, 2\\], outside \\[0, G=2\\)",
        ),
        (dict(g_idx=torch.full((2, 64), -1, dtype=torch.int32)), "g_idx holds groups"),
    ],
)
def test_container_errors_name_the_tensor(changes, words):
    with pytest.raises(ValueError, match=words):
        QuantizedExperts(**_valid(**changes))


def test_container_sizes():
    w = QuantizedExperts(**_valid())
    assert w.shape == (2, 16, 64) and (w.num_experts, w.out_features, w.in_features, w.num_groups) == (2, 16, 64, 2)
    per_channel = QuantizedExperts(**_valid(scales=torch.ones(2, 1, 16), qzeros=None, g_idx=None, group_size=-1))
    assert per_channel.num_groups == 1 and per_channel.kernel_group_size == 0
    assert torch.equal(per_channel.zero_points(), torch.full((2, 1, 16), 8, dtype=torch.int32))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, -1])
def test_rtn_error_is_at_most_half_a_step(bits, sym, group_size):
    """RTN is off by at most half a step, plus the grid's drift from rounding the scale to fp16 (2^-11 relative over
    2^bits - 1 steps). The symmetric grid's clipped top code (xmax / scale = 2^(bits-1) - 0.5) is half a step too."""
    w = torch.randn(3, 40, 128, generator=_gen(bits))
    q = quantize_rtn(w, bits, group_size, sym=sym)
    err = (dequantize_experts(q, torch.float32) - w).abs()
    step = q.scales.float().repeat_interleave(128 // q.num_groups, 1).transpose(1, 2)  # [E, N, K]
    assert torch.all(err <= step * (0.5 + (2**bits - 1) * 2.0**-11) + 1e-6)
    if not sym:
        assert torch.all(q.zero_points() >= 1), "a stored zero - 1 is never negative"


def test_rtn_act_order_groups_follow_g_idx():
    w = torch.randn(2, 24, 64, generator=_gen(2))
    g_idx = _act_order(2, 64, 16)
    q = quantize_rtn(w, 8, 16, sym=False, g_idx=g_idx)
    assert torch.equal(q.g_idx, g_idx)
    for e in range(2):
        for grp in range(4):
            cols = (g_idx[e] == grp).nonzero().flatten()
            lo, hi = w[e][:, cols].min(1).values.clamp(max=0), w[e][:, cols].max(1).values.clamp(min=0)
            assert torch.allclose(q.scales[e, grp].float(), (hi - lo) / 255, rtol=2e-3)


# --------------------------------------------------------------------------------------------------------- the GEMMs


def _gemm_case(bits, group_size, sym, act_order, D=64, F=128, T=19, E=4, top_k=2, dtype=torch.float32):
    x, gate, w1, b1, w2, b2 = moe_layer(T, D, F, E, dtype)
    q1 = _quantize(w1.float(), bits, group_size, sym, act_order, seed=1)
    q2 = _quantize(w2.float(), bits, group_size, sym, act_order, seed=2)
    return x, gate, q1, b1, q2, b2, top_k


def _check_gemms(x, gate, q1, b1, q2, b2, top_k, cfg1, cfg2):
    r = moe_routing(x @ gate.t(), top_k, cfg1.block_m)
    q1, q2 = q1.to(DEVICE), q2.to(DEVICE)
    h = expert_gemm1(x, q1, b1, r, cfg1)
    ref = expert_gemm1_torch(x, dequantize_experts(q1, torch.float32), b1, r)
    rows = r.sorted_token_ids[: int(r.expert_offsets[-1])] < r.num_slots
    torch.testing.assert_close(h[: len(rows)][rows], ref[: len(rows)][rows], rtol=0, atol=ERROR_FLOOR[x.dtype] * 2)
    y = expert_gemm2(ref, q2, b2, r, cfg2)
    torch.testing.assert_close(
        y.sum(0),
        expert_gemm2_torch(ref, dequantize_experts(q2, torch.float32), b2, r),
        rtol=0,
        atol=ERROR_FLOOR[x.dtype] * 2,
    )


@pytest.mark.parametrize(
    "bits, group_size, sym, act_order", list(itertools.product([4, 8], [32, 64, -1], [True, False], [False, True]))
)
def test_quantized_gemms_match_dequantize_then_matmul(bits, group_size, sym, act_order):
    """Every layout the kernel branches on, fp32 (exact dequantization, ieee dot): GEMM 1 with its gather and GELU,
    GEMM 2 with split-K, the routing weight and the scatter."""
    case = _gemm_case(bits, group_size, sym, act_order)
    _check_gemms(*case, GemmConfig(32, 64, 64, num_stages=1), GemmConfig(32, 64, 64, split_k=2, num_stages=1))


@pytest.mark.parametrize("group_size", [16, 48])
def test_group_sizes_that_are_not_a_tile_multiple(group_size):
    """16: K tiles cut down to one group each; 48 (not a power of two): each input row looks up its group."""
    case = _gemm_case(4, group_size, False, False, D=96, F=96)
    _check_gemms(*case, GemmConfig(32, 64, 32, num_stages=1), GemmConfig(32, 32, 64, split_k=1, num_stages=1))


def test_every_gpu_config_dequantizes_correctly():
    """The decode and mid configs the GPU picks (K tiles of 128, cut to the group size where groups are contiguous)."""
    x, gate, q1, b1, q2, b2, top_k = _gemm_case(4, 32, False, True, D=128, F=128, T=24)
    decode = (GemmConfig(16, 64, 128, num_stages=1), GemmConfig(16, 64, 128, split_k=4, num_stages=1))
    mid = (GemmConfig(32, 64, 128, num_stages=1), GemmConfig(32, 64, 128, split_k=2, num_stages=1))
    for cfg1, cfg2 in (decode, mid):
        _check_gemms(x, gate, q1, b1, q2, b2, top_k, cfg1, cfg2)


def _poisoned(q: QuantizedExperts, poison: float = float("inf")) -> QuantizedExperts:
    """q with scales and qzeros as views into buffers one group longer per expert, that extra row (just past each
    expert's groups) holding `poison` in the scales and all-ones bits in the zeros: a read of group G shows."""
    E, G, N = q.scales.shape
    scales = torch.full((E, G + 1, N), poison, dtype=q.scales.dtype, device=DEVICE)
    scales[:, :G] = q.scales
    qzeros = None
    if q.qzeros is not None:
        qzeros = torch.full((E, G + 1, q.qzeros.shape[2]), -1, dtype=torch.int32, device=DEVICE)
        qzeros[:, :G] = q.qzeros
        qzeros = qzeros[:, :G]
    return QuantizedExperts(q.qweight.to(DEVICE), qzeros, scales[:, :G], None, q.bits, q.group_size)


@pytest.mark.parametrize("sym, poison", [(True, float("inf")), (False, float("nan"))])
def test_split_k_past_k_reads_no_scale_row_past_the_groups(sym, poison):
    """K = 96 in groups of 32, split_k = 2 over K tiles of 32: the second split's last tile starts at K, where the
    one-group-per-tile lookup names group G = 3, one row past each expert's scales and zeros. An inf or NaN row there
    (and all-ones zeros) must not reach the output: both GEMMs' weights (w1 through GEMM 1's gather, w2 through GEMM 2's
    scatter), finite and equal to the twin on the dequantized weights."""
    from phixtral_kernels.grouped_gemm import launch_grouped_gemm

    T, D, F, E, top_k, split_k = 19, 96, 96, 4, 2, 2
    x, gate, q1, b1, q2, b2, _ = _gemm_case(4, 32, sym, False, D=D, F=F, T=T, E=E, top_k=top_k)
    q1, q2 = _poisoned(q1, poison), _poisoned(q2, poison)
    cfg = GemmConfig(32, 32, 32, split_k=split_k, num_stages=1)
    assert D % (split_k * cfg.block_k) and F % (split_k * cfg.block_k), "the case must leave a split's last tile past K"
    r = moe_routing(x @ gate.t(), top_k, cfg.block_m)
    slots = torch.arange(r.num_slots, device=DEVICE)
    experts = r.topk_ids.reshape(-1).long()

    # w1 (K = D) through the kernel's gather prologue, split-K partials per slot: x[slot // top_k] @ w1[e]^T + b1[e]
    y1 = torch.empty(split_k, r.num_slots, F, dtype=torch.float32, device=DEVICE)
    launch_grouped_gemm(x, q1, b1, y1, r, cfg, gather_a=True, scatter_c=True, activation="", mul_routing_weight=False)
    w1 = dequantize_experts(q1, torch.float32)
    want1 = torch.einsum("sd,sfd->sf", x[slots // top_k].float(), w1[experts]) + b1[experts].float()
    assert torch.isfinite(y1).all(), f"{(~torch.isfinite(y1)).sum()} of {y1.numel()} partials not finite"
    torch.testing.assert_close(y1.sum(0), want1, rtol=0, atol=ERROR_FLOOR[x.dtype] * 2)

    # w2 (K = F) through expert_gemm2, split-K partials scattered back to slot order
    h = expert_gemm1_torch(x, dequantize_experts(q1, torch.float32), b1, r)
    y2 = expert_gemm2(h, q2, b2, r, cfg)
    assert torch.isfinite(y2).all(), f"{(~torch.isfinite(y2)).sum()} of {y2.numel()} partials not finite"
    want2 = expert_gemm2_torch(h, dequantize_experts(q2, torch.float32), b2, r)
    torch.testing.assert_close(y2.sum(0), want2, rtol=0, atol=ERROR_FLOOR[x.dtype] * 2)


# -------------------------------------------------------------------------------------------------------- fused_moe

EDGE_CASES = {
    "one_token": dict(T=1),
    "fewer_tokens_than_experts": dict(T=3),
    "tokens_not_block_multiple": dict(T=37),
}
SCHEMES = {"w4_g32_zeros_act_order": (4, 32, False, True), "w8_per_channel_sym": (8, -1, True, False)}


def _quantized_layer(T, dtype, scheme, E=4, D=64, F=96):
    bits, group_size, sym, act_order = SCHEMES[scheme]
    x, gate, w1, b1, w2, b2 = moe_layer(T, D, F, E, dtype)
    q1 = _quantize(w1.float().cpu(), bits, group_size, sym, act_order, seed=1).to(DEVICE)
    q2 = _quantize(w2.float().cpu(), bits, 32 if group_size > 0 else -1, sym, act_order, seed=2).to(DEVICE)
    return x, gate, q1, b1, q2, b2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_fused_moe_quantized_matches_dequantized_reference(case, scheme, dtype):
    """fused_moe on QuantizedExperts against the MoE run on the dequantized weights (fp64 reference, bound by the naive
    loop's own error in the test dtype)."""
    x, gate, q1, b1, q2, b2 = _quantized_layer(EDGE_CASES[case]["T"], dtype, scheme)
    out = fused_moe(x, gate, q1, b1, q2, b2, 2, backend="triton")
    assert_close_to_reference(out, x, gate, dequantize_experts(q1, dtype), b1, dequantize_experts(q2, dtype), b2, 2)


@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_torch_backends_take_quantized_experts(backend):
    x, gate, q1, b1, q2, b2 = _quantized_layer(29, torch.float32, "w4_g32_zeros_act_order")
    out = fused_moe(x, gate, q1, b1, q2, b2, 2, backend=backend)
    assert_close_to_reference(out, x, gate, dequantize_experts(q1, x.dtype), b1, dequantize_experts(q2, x.dtype), b2, 2)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_quantized_expert_with_no_tokens_and_a_float_w1(backend):
    """Only w2 quantized; expert 3 gets no token."""
    x, gate, w1, b1, w2, b2 = moe_layer(33, 64, 64, 4)
    x = x.abs()
    gate[3] = -gate[:3].abs().sum(0) - 1.0
    assert not (moe_routing(x @ gate.t(), 2, 32).topk_ids == 3).any()
    q2 = _quantize(w2.cpu(), 4, 32, sym=False).to(DEVICE)
    out = fused_moe(x, gate, w1, b1, q2, b2, 2, backend=backend)
    assert_close_to_reference(out, x, gate, w1, b1, dequantize_experts(q2, x.dtype), b2, 2)


def test_zero_tokens_quantized():
    x, gate, q1, b1, q2, b2 = _quantized_layer(0, torch.float32, "w8_per_channel_sym")
    assert fused_moe(x, gate, q1, b1, q2, b2, 2, backend="triton").shape == (0, 64)


def test_triton_path_dequantizes_in_the_kernel_without_host_sync(monkeypatch):
    """No dequantized copy of the weights is made on the Triton path, and nothing reads device data on the host."""
    layer = _quantized_layer(9, torch.float16, "w4_g32_zeros_act_order")

    def refuse(*args, **kwargs):
        raise AssertionError("dequantize_experts called on the triton path")

    monkeypatch.setattr(quant, "dequantize_experts", refuse)
    with RecordOps() as rec:
        fused_moe(*layer, 2, backend="triton")
    assert rec.ops and not rec.ops & HOST_SYNC_OPS, sorted(rec.ops & HOST_SYNC_OPS)


def test_absorbed_act_order_computes_the_same_moe():
    """fc2's act-order moved into a permutation of each expert's hidden units: g_idx gone, same output."""
    x, gate, q1, b1, q2, b2 = _quantized_layer(21, torch.float32, "w4_g32_zeros_act_order")
    assert q2.g_idx is not None
    a1, ab1, a2 = absorb_act_order(q1.to("cpu"), b1.cpu(), q2.to("cpu"))
    assert a2.g_idx is None and torch.equal(a1.g_idx, q1.g_idx.cpu())
    a1, ab1, a2 = a1.to(DEVICE), ab1.to(DEVICE), a2.to(DEVICE)
    want = fused_moe(x, gate, q1, b1, q2, b2, 2, backend="torch")
    for backend in ("triton", "torch"):
        torch.testing.assert_close(fused_moe(x, gate, a1, ab1, a2, b2, 2, backend=backend), want, rtol=1e-5, atol=1e-5)
    w1 = dequantize_experts(q1, torch.float32)  # a float fc1 is permuted the same way
    f1, fb1, f2 = absorb_act_order(w1, b1, q2)
    torch.testing.assert_close(fused_moe(x, gate, f1, fb1, f2, b2, 2, backend="torch"), want, rtol=1e-5, atol=1e-5)


def test_gradients_reach_x_and_the_router_through_quantized_experts():
    x, gate, q1, b1, q2, b2 = _quantized_layer(12, torch.float32, "w8_per_channel_sym")
    x.requires_grad_(True)
    gate.requires_grad_(True)
    fused_moe(x, gate, q1, b1, q2, b2, 2).square().sum().backward()  # auto: the torch path
    assert x.grad is not None and gate.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(NotImplementedError, match="no backward for quantized experts"):
        fused_moe(x, gate, q1, b1, q2, b2, 2, backend="triton")


def test_bad_quantized_input_names_the_argument():
    x, gate, q1, b1, q2, b2 = _quantized_layer(4, torch.float32, "w8_per_channel_sym")
    with pytest.raises(ValueError, match=r"w2 must have shape \(4, 64, 96\).*qweight"):
        fused_moe(x, gate, q1, b1, q1, b2, 2)
    with pytest.raises(TypeError, match="w1 must be a torch.Tensor or a QuantizedExperts"):
        fused_moe(x, gate, "w1", b1, q2, b2, 2)


# ------------------------------------------------------------------------------------------------- dense layers


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme", [(4, 32, False, True), (8, -1, True, False)])
@pytest.mark.parametrize("T", [1, 45])
def test_quantized_linear_is_the_grouped_gemm_at_one_expert(T, scheme, dtype):
    bits, group_size, sym, act_order = scheme
    g = _gen(T)
    w = torch.randn(1, 96, 64, generator=g) * 0.125
    q = _quantize(w, bits, group_size, sym, act_order).to(DEVICE)
    x = torch.randn(T, 64, generator=g).to(DEVICE, dtype)
    bias = (0.1 * torch.randn(96, generator=g)).to(DEVICE, dtype)
    want = torch.nn.functional.linear(x.double(), dequantize_experts(q, dtype).double()[0], bias.double())
    for backend in ("triton", "torch"):
        out = quantized_linear(x, q, bias, backend=backend)
        assert out.shape == (T, 96) and out.dtype == dtype
        torch.testing.assert_close(out.double(), want, rtol=0, atol=ERROR_FLOOR[dtype] * 4)
    assert quantized_linear(x[:0], q, None, backend="triton").shape == (0, 96)
