"""Every Triton kernel against its PyTorch twin, and fused_moe against the naive loop, on small shapes.

On a CPU-only machine the kernels run under the Triton interpreter (tests/conftest.py turns it on); with a GPU the same
tests run the compiled kernels on CUDA tensors.
"""

import pytest
import torch
from kernel_cases import (
    DEVICE,
    ERROR_FLOOR,
    HOST_SYNC_OPS,
    RecordOps,
    assert_close_to_reference,
    assert_same_routing,
    moe_layer,
)
from torch._subclasses.fake_tensor import FakeTensorMode

from phixtral_kernels import (
    GemmConfig,
    expert_gemm1,
    expert_gemm1_torch,
    expert_gemm2,
    expert_gemm2_torch,
    fused_moe,
    moe_combine,
    moe_combine_torch,
    moe_gemm_configs,
    moe_routing,
    moe_routing_torch,
    naive_moe,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ----------------------------------------------------------------------------------------------------------- routing


@pytest.mark.parametrize(
    "T, E, top_k, block_m",
    [
        (0, 4, 2, 16),
        (1, 4, 2, 16),
        (37, 4, 2, 32),
        (100, 8, 3, 32),
        (5, 1, 1, 16),
        (70, 4, 4, 32),
        (300, 2, 1, 64),
        (33, 8, 8, 16),
    ],
)
def test_routing_matches_torch(T, E, top_k, block_m):
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(T)).to(DEVICE)
    assert_same_routing(moe_routing(logits, top_k, block_m), moe_routing_torch(logits, top_k, block_m))


def test_routing_invariants():
    T, E, top_k, block_m = 123, 8, 2, 32
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    r = moe_routing(logits, top_k, block_m)
    offsets = r.expert_offsets.cpu().long()
    ids = r.sorted_token_ids.cpu().long()
    assert offsets[0] == 0 and torch.all(offsets % block_m == 0) and torch.all(offsets[1:] >= offsets[:-1])
    used = ids[: offsets[-1]]
    real = used[used < T * top_k]
    assert torch.equal(real.sort().values, torch.arange(T * top_k)), "every slot exactly once"
    flat_ids = r.topk_ids.cpu().long().reshape(-1)
    for e in range(E):
        group = ids[offsets[e] : offsets[e + 1]]
        slots = group[group < T * top_k]
        assert torch.all(flat_ids[slots] == e)
        assert torch.all(slots[1:] > slots[:-1]), "slots ascend inside an expert"
        assert torch.all(group[len(slots) :] == T * top_k), "padding holds the sentinel"
        assert len(group) - len(slots) < block_m
    torch.testing.assert_close(r.topk_weights.sum(-1).cpu(), torch.ones(T))


def test_routing_ties_go_to_lowest_index():
    """phixtral-4x2_8's router rows are identical: every logit ties, experts 0 and 1 must run at 0.5 each."""
    logits = torch.full((50, 4), 0.75, device=DEVICE)
    r = moe_routing(logits, 2, 16)
    assert torch.equal(r.topk_ids.cpu(), torch.tensor([[0, 1]] * 50, dtype=torch.int32))
    assert torch.equal(r.topk_weights.cpu(), torch.full((50, 2), 0.5))
    partial_tie = torch.tensor([[1.0, 3.0, 3.0, 3.0], [-1.0, -1.0, 2.0, -1.0]], device=DEVICE)
    assert moe_routing(partial_tie, 2, 16).topk_ids.cpu().tolist() == [[1, 2], [2, 0]]


def test_routing_handles_minus_inf_logits():
    logits = torch.tensor([[float("-inf"), 0.0, float("-inf"), float("-inf")]] * 3, device=DEVICE)
    r = moe_routing(logits, 2, 16)
    assert r.topk_ids.cpu().tolist() == [[1, 0]] * 3, "a -inf logit is still a distinct pick"
    assert r.topk_weights.cpu().tolist() == [[1.0, 0.0]] * 3


def test_routing_nan_logits_rank_first_like_torch():
    nan = float("nan")
    logits = torch.tensor([[1.0, nan, 0.5, 2.0], [nan, nan, nan, nan], [0.1, 0.2, nan, 0.3], [3.0, 1.0, 2.0, 0.0]])
    for top_k in (1, 2, 4):
        a, b = moe_routing(logits.to(DEVICE), top_k, 16), moe_routing_torch(logits, top_k, 16)
        assert torch.equal(a.topk_ids.cpu(), b.topk_ids), top_k
        assert torch.all(a.topk_ids.cpu() < 4)
        torch.testing.assert_close(a.topk_weights.cpu(), b.topk_weights, equal_nan=True)
        rows = int(b.expert_offsets[-1])
        assert torch.equal(a.sorted_token_ids[:rows].cpu(), b.sorted_token_ids[:rows])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_nan_token_leaves_the_other_tokens_alone(backend):
    x, *weights = moe_layer(8, 64, 64, 4)
    x[3] = float("nan")
    out = fused_moe(x, *weights, 2, backend=backend)
    assert torch.isnan(out[3]).all()
    finite = [t for t in range(8) if t != 3]
    assert_close_to_reference(out[finite], x[finite], *weights, 2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_routing_reads_logits_in_any_float_dtype(dtype):
    logits = torch.randn(40, 4, generator=torch.Generator().manual_seed(3)).to(device=DEVICE, dtype=dtype)
    assert_same_routing(moe_routing(logits, 2, 32), moe_routing_torch(logits, 2, 32))


# -------------------------------------------------------------------------------------------------------- the GEMMs


def _routing_for(x, gate_weight, top_k, block_m):
    return moe_routing(x @ gate_weight.t(), top_k, block_m)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, D, F, E, top_k", [(1, 64, 96, 4, 2), (45, 72, 200, 4, 2), (20, 40, 130, 8, 3)])
def test_expert_gemm1_matches_torch(dtype, T, D, F, E, top_k):
    x, g, w1, b1, _, _ = moe_layer(T, D, F, E, dtype)
    cfg = GemmConfig(block_m=32, block_n=64, block_k=32, num_stages=1)
    r = _routing_for(x, g, top_k, cfg.block_m)
    h, ref = expert_gemm1(x, w1, b1, r, cfg), expert_gemm1_torch(x, w1, b1, r)
    rows = r.sorted_token_ids[: int(r.expert_offsets[-1])] < r.num_slots
    got, want = h[: len(rows)][rows].float(), ref[: len(rows)][rows].float()
    torch.testing.assert_close(got, want, rtol=0, atol=ERROR_FLOOR[dtype] * 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split_k", [1, 3])
def test_expert_gemm2_matches_torch(dtype, split_k):
    T, D, F, E, top_k = 29, 72, 200, 4, 2
    x, g, w1, b1, w2, b2 = moe_layer(T, D, F, E, dtype)
    cfg = GemmConfig(block_m=32, block_n=64, block_k=32, split_k=split_k, num_stages=1)
    r = _routing_for(x, g, top_k, cfg.block_m)
    h = expert_gemm1_torch(x, w1, b1, r)
    y = expert_gemm2(h, w2, b2, r, cfg)
    assert y.shape == (split_k, T * top_k, D) and y.dtype == torch.float32
    torch.testing.assert_close(y.sum(0), expert_gemm2_torch(h, w2, b2, r), rtol=0, atol=ERROR_FLOOR[dtype] * 2)


def test_gemm_padding_rows_are_not_read():
    """Fill h's padding rows with NaN: GEMM 2 must mask them, not multiply them by zero weights."""
    T, D, F, E, top_k = 7, 64, 64, 4, 2
    x, g, w1, b1, w2, b2 = moe_layer(T, D, F, E)
    cfg = GemmConfig(block_m=32, block_n=64, block_k=64, num_stages=1)
    r = _routing_for(x, g, top_k, cfg.block_m)
    h = expert_gemm1(x, w1, b1, r, cfg)
    padding = r.sorted_token_ids >= r.num_slots
    h[padding] = float("nan")
    y = expert_gemm2(h, w2, b2, r, cfg)
    assert not torch.isnan(y).any()
    torch.testing.assert_close(y[0], expert_gemm2_torch(h.nan_to_num(0.0), w2, b2, r), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "field, value", [("block_n", 48), ("block_k", 8), ("block_m", 16.0), ("split_k", 0), ("num_warps", True)]
)
def test_gemm_config_rejects_tiles_tl_dot_cannot_run(field, value):
    args = dict(block_m=16, block_n=64, block_k=64)
    with pytest.raises(ValueError, match=f"GemmConfig.{field}"):
        GemmConfig(**{**args, field: value})


def test_routing_rejects_bad_arguments():
    logits = torch.randn(4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="top_k must be an int"):
        moe_routing(logits, 2.0, 16)
    with pytest.raises(ValueError, match="block_m must be a power of two >= 16"):
        moe_routing(logits, 2, 8)
    with pytest.raises(ValueError, match="block_m must be a power of two >= 16"):
        moe_routing(logits, 2, 16.0)


def test_gemm_config_must_match_routing_block():
    x, g, w1, b1, _, _ = moe_layer(4, 64, 64, 4)
    r = _routing_for(x, g, 2, 16)
    with pytest.raises(ValueError, match="block_m"):
        expert_gemm1(x, w1, b1, r, GemmConfig(block_m=32, block_n=64, block_k=64))
    with pytest.raises(ValueError, match="split_k"):
        expert_gemm1(x, w1, b1, r, GemmConfig(block_m=16, block_n=64, block_k=64, split_k=2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_gpu_config_is_correct(dtype):
    """The configs the GPU picks for decode and prefill, run at small shapes (their tiles exceed D and F here)."""
    T, D, F, E, top_k = 24, 96, 160, 4, 2
    x, g, w1, b1, w2, b2 = moe_layer(T, D, F, E, dtype)
    decode = (GemmConfig(16, 64, 128, num_stages=1), GemmConfig(16, 64, 128, split_k=4, num_stages=1))
    mid = (GemmConfig(32, 64, 128, num_stages=1), GemmConfig(32, 64, 128, split_k=2, num_stages=1))
    for gemm1, gemm2 in (decode, mid):
        r = _routing_for(x, g, top_k, gemm1.block_m)
        out = moe_combine(expert_gemm2(expert_gemm1(x, w1, b1, r, gemm1), w2, b2, r, gemm2), top_k, dtype)
        assert_close_to_reference(out, x, g, w1, b1, w2, b2, top_k)


# ----------------------------------------------------------------------------------------------------------- combine


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits, top_k", [(1, 2), (4, 2), (2, 3), (1, 1)])
def test_combine_matches_torch(dtype, splits, top_k):
    y = torch.randn(splits, 37 * top_k, 300, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    out = moe_combine(y, top_k, dtype)
    assert out.shape == (37, 300) and out.dtype == dtype
    # bf16: the interpreter truncates where GPUs round, one ulp apart
    rtol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 2**-7}[dtype]
    torch.testing.assert_close(out, moe_combine_torch(y, top_k, dtype), rtol=rtol, atol=1e-5)


def test_combine_is_bit_identical_run_to_run():
    y = torch.randn(4, 64 * 2, 256, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    assert torch.equal(moe_combine(y, 2, torch.float32), moe_combine(y, 2, torch.float32))


# --------------------------------------------------------------------------------------- fused_moe against the loop

EDGE_CASES = {
    "one_token": dict(T=1, D=64, F=96, E=4, top_k=2),
    "tokens_not_block_multiple": dict(T=37, D=64, F=128, E=4, top_k=2),
    "dims_not_block_multiple": dict(T=19, D=72, F=200, E=4, top_k=2),
    "top_k_1": dict(T=30, D=64, F=64, E=4, top_k=1),
    "top_k_equals_E": dict(T=21, D=64, F=64, E=4, top_k=4),
    "one_expert": dict(T=16, D=64, F=64, E=1, top_k=1),
    "two_experts": dict(T=16, D=64, F=64, E=2, top_k=2),
    "eight_experts": dict(T=40, D=64, F=64, E=8, top_k=2),
}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_fused_moe_matches_naive(case, dtype, backend):
    c = EDGE_CASES[case]
    layer = moe_layer(c["T"], c["D"], c["F"], c["E"], dtype)
    assert_close_to_reference(fused_moe(*layer, c["top_k"], backend=backend), *layer, c["top_k"])


@pytest.mark.parametrize("backend", ["triton", "torch", "naive"])
def test_zero_tokens(backend):
    layer = moe_layer(0, 64, 64, 4)
    out = fused_moe(*layer, 2, backend=backend)
    assert out.shape == (0, 64) and out.dtype == torch.float32


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_expert_with_no_tokens(backend):
    x, gate, *weights = moe_layer(33, 64, 64, 4)
    x = x.abs()
    gate[3] = -gate[:3].abs().sum(0) - 1.0  # on positive inputs, logit 3 is below every other logit
    assert not (moe_routing(x @ gate.t(), 2, 32).topk_ids == 3).any()
    assert_close_to_reference(fused_moe(x, gate, *weights, 2, backend=backend), x, gate, *weights, 2)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_all_tokens_on_one_expert(backend):
    x, gate, *weights = moe_layer(50, 64, 64, 4)
    x = x.abs()
    gate = torch.zeros_like(gate)
    gate[2] = 1.0  # positive inputs: expert 2 always wins
    assert torch.all(moe_routing(x @ gate.t(), 1, 32).topk_ids == 2)
    assert_close_to_reference(fused_moe(x, gate, *weights, 1, backend=backend), x, gate, *weights, 1)


@pytest.mark.parametrize("backend", ["triton", "torch", "naive"])
def test_identical_router_rows_run_experts_0_and_1(backend):
    x, gate, w1, b1, w2, b2 = moe_layer(12, 64, 64, 4)
    gate = gate[:1].expand(4, -1).contiguous()
    out = fused_moe(x, gate, w1, b1, w2, b2, 2, backend=backend)
    only_01 = 0.5 * fused_moe(x, gate[:1], w1[:1], b1[:1], w2[:1], b2[:1], 1, backend="naive")
    only_01 += 0.5 * fused_moe(x, gate[:1], w1[1:2], b1[1:2], w2[1:2], b2[1:2], 1, backend="naive")
    torch.testing.assert_close(out, only_01, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_non_contiguous_x(backend):
    x, *rest = moe_layer(20, 128, 64, 4)
    x_strided = x[:, ::2]  # [20, 64] with row stride 128, column stride 2
    weights = moe_layer(20, 64, 64, 4, seed=1)[1:]
    assert not x_strided.is_contiguous()
    assert_close_to_reference(fused_moe(x_strided, *weights, 2, backend=backend), x_strided, *weights, 2)


def test_row_offsets_past_int32():
    """x rows 2**15 + 64 elements apart: row x stride passes 2**31 past token 65535. Only touched pages are backed."""
    T, D, F, E, stride = 2**16 + 40, 32, 32, 2, 2**15 + 64
    storage = torch.empty((T - 1) * stride + D, dtype=torch.float16, device=DEVICE)
    x = storage.as_strided((T, D), (stride, 1))
    x.copy_(torch.randn(T, D, generator=torch.Generator().manual_seed(0)).to(torch.float16))
    _, gate, w1, b1, w2, b2 = moe_layer(2, D, F, E, torch.float16)
    cfg = GemmConfig(block_m=256, block_n=32, block_k=32, num_stages=1)  # big tiles: few interpreted programs
    r = _routing_for(x, gate, 1, cfg.block_m)
    h = expert_gemm1(x, w1, b1, r, cfg)
    rows = torch.arange(r.max_rows, device=DEVICE)
    tail = rows[(r.sorted_token_ids >= T - 50) & (r.sorted_token_ids < T) & (rows < r.expert_offsets[-1])]
    assert len(tail) == 50
    torch.testing.assert_close(h[tail], expert_gemm1_torch(x, w1, b1, r)[tail], rtol=0, atol=2e-3)


# --------------------------------------------------------------------------------------------------- host syncs


def test_triton_path_has_no_host_sync():
    layer = moe_layer(9, 64, 64, 4)
    with RecordOps() as rec:
        fused_moe(*layer, 2, backend="triton")
    assert rec.ops and not rec.ops & HOST_SYNC_OPS, sorted(rec.ops & HOST_SYNC_OPS)
    with RecordOps() as control:  # the recorder sees the naive loop's boolean masks
        fused_moe(*layer, 2, backend="naive")
    assert "bool_index" in control.ops


# ------------------------------------------------------------------------------------------------------ bad input


def _bad(**changes):
    x, g, w1, b1, w2, b2 = moe_layer(4, 64, 32, 4)
    args = dict(x=x, gate_weight=g, w1=w1, b1=b1, w2=w2, b2=b2, top_k=2)
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "changes, error, words",
    [
        (dict(top_k=0), ValueError, "top_k"),
        (dict(top_k=5), ValueError, "top_k"),
        (dict(top_k=2.0), ValueError, "top_k"),
        (dict(x=torch.ones(4, 64, dtype=torch.int64)), TypeError, "x must be a floating-point"),
        (dict(x=torch.ones(4, 63)), ValueError, "gate_weight must have shape"),
        (dict(x=torch.ones(4, 2, 64)), ValueError, "x must have 2 dims"),
        (dict(gate_weight=torch.ones(3, 64)), ValueError, "gate_weight must have shape"),
        (dict(w2=torch.ones(3, 64, 32)), ValueError, "w2 must have shape"),
        (dict(b1=torch.ones(4, 33)), ValueError, "b1 must have shape"),
        (dict(b2=torch.ones(4, 64, dtype=torch.float16)), TypeError, "b2 is torch.float16"),
        (dict(w1="weights"), TypeError, "w1 must be a torch.Tensor"),
    ],
)
@pytest.mark.parametrize("fn", [fused_moe, naive_moe])
def test_bad_input_names_the_argument(fn, changes, error, words):
    args = _bad(**changes)
    if DEVICE != "cpu":
        args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(error, match=words):
        fn(**args)


def test_bad_backend_and_devices():
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_moe(**_bad(), backend="cuda")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="w1 is on cpu"):
            fused_moe(**{**_bad(x=_bad()["x"].cuda()), "gate_weight": _bad()["gate_weight"].cuda()})


def test_configs_share_block_m():
    for T in (1, 8, 64, 512, 16384):
        gemm1, gemm2 = moe_gemm_configs(T, 2, 4)
        assert gemm1.block_m == gemm2.block_m and gemm1.split_k == 1


def test_triton_older_than_tested_falls_back_to_torch(monkeypatch):
    import phixtral_kernels._triton as triton_support
    from phixtral_kernels import triton_unavailable_reason

    monkeypatch.setattr(triton_support.triton, "__version__", "3.2.0")
    assert "triton 3.2.0 is older than 3.3" in triton_unavailable_reason(torch.device(DEVICE))
    layer = moe_layer(5, 64, 64, 4)
    with pytest.raises(RuntimeError, match="older than 3.3"):
        fused_moe(*layer, 2, backend="triton")
    assert_close_to_reference(fused_moe(*layer, 2), *layer, 2)  # auto: the torch path


def test_float64_goes_to_the_torch_backend():
    """The Triton path computes in fp32 at most (its interpreter's fp64 tl.dot even returned garbage): "auto" takes the
    torch backend for float64, "triton" refuses it."""
    layer = moe_layer(9, 64, 64, 4, torch.float64)
    out = fused_moe(*layer, 2)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, naive_moe(*layer, 2), rtol=1e-6, atol=1e-6)  # torch routes with fp32 weights
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        fused_moe(*layer, 2, backend="triton")


@pytest.fixture
def fake_gpu(monkeypatch):
    """use(capability, name): triton_unavailable_reason then sees a CUDA GPU of that capability."""
    from phixtral_kernels import _triton

    def use(capability, name):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: name)
        _triton._cuda_reason.cache_clear()

    yield use
    _triton._cuda_reason.cache_clear()  # before monkeypatch restores torch.cuda: the next call asks the real GPU


def _fake_cuda_layer(dtype=torch.float16, T=8, D=64, F=96, E=4):
    """Empty MoE tensors that claim device cuda:0: FakeTensorMode needs no GPU, and nothing here reads their data."""
    with FakeTensorMode():
        shapes = [(T, D), (E, D), (E, F, D), (E, F), (E, D, F), (E, D)]
        return [torch.empty(shape, dtype=dtype, device="cuda:0") for shape in shapes]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpus_below_sm80_fall_back_to_torch(fake_gpu, monkeypatch, dtype):
    """T4 (sm_75): no tensor-core path in Triton and no bf16. "auto" takes the torch path; "triton" says why it
    cannot."""
    from phixtral_kernels import moe, triton_unavailable_reason

    monkeypatch.setattr(moe, "_moe_torch", lambda *args: "torch path")
    monkeypatch.setattr(moe, "triton_moe_forward", lambda *args: ("triton path",))
    layer = _fake_cuda_layer(dtype)
    fake_gpu((7, 5), "Tesla T4")
    reason = triton_unavailable_reason(torch.device("cuda", 0))
    assert "cuda:0 (Tesla T4) is sm_75" in reason and "sm_80 or newer" in reason
    assert fused_moe(*layer, 2) == "torch path"
    with pytest.raises(RuntimeError, match="backend='triton' cannot run: cuda:0 \\(Tesla T4\\) is sm_75"):
        fused_moe(*layer, 2, backend="triton")
    for capability, name in (((8, 0), "NVIDIA A100"), ((9, 0), "NVIDIA H200"), ((12, 0), "NVIDIA RTX PRO 6000")):
        fake_gpu(capability, name)
        assert triton_unavailable_reason(torch.device("cuda", 0)) is None
        assert fused_moe(*layer, 2) == "triton path" == fused_moe(*layer, 2, backend="triton")
