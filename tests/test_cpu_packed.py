"""torch's packed CPU kernels for quantized Linears (phixtral_kernels.cpu_packed): every scheme against dequantize-then-
matmul, the shapes they refuse, the model repacking at load and again when its buffers change, and the torch backend
taking them for decode rows only."""

import itertools
import json

import pytest
import torch
from helpers_models import dequantize_gptq_tensors, gptq_moe_checkpoint, read_tensors, reference_phixtral_forward

import phixtral
from phixtral.quant import QuantizedExpertLinear, QuantizedLinear
from phixtral_kernels import (
    QuantizedExperts,
    act_order_g_idx,
    dequantize_experts,
    fused_moe,
    quantize_rtn,
    quantized_linear,
    topk_softmax_torch,
)
from phixtral_kernels.cpu_packed import cpu_packing_unsupported, pack_for_cpu

if not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
    pytest.skip(f"torch {torch.__version__} has no packed CPU kernels", allow_module_level=True)

# The packed path rounds x and the scales to bf16 and returns bf16; against the exact product of bf16-rounded x and the
# fp32 dequantized weight, measured relative errors are about 2e-3 (an output rounding of bf16 is 2^-9 = 2e-3).
REL_TOL = 6e-3


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).norm() / want.norm()).item()


@pytest.mark.parametrize(
    "bits, group_size, sym, act_order",
    [
        c
        for c in itertools.product((4, 8), (-1, 32, 64, 128, 512), (True, False), (False, True))
        if not (c[3] and c[1] == -1)
    ],
)
def test_packed_linear_matches_dequantize_then_matmul(bits, group_size, sym, act_order):
    E, N, K = 3, 48, 1024
    g = torch.Generator().manual_seed(bits * 1000 + group_size)
    w = torch.randn(E, N, K, generator=g) * 0.05
    g_idx = None
    if act_order:
        g_idx = act_order_g_idx(torch.stack([torch.randperm(K, generator=g) for _ in range(E)]), group_size)
    q = quantize_rtn(w, bits, group_size, sym=sym, g_idx=g_idx)
    packed = pack_for_cpu(q)
    assert packed.mode == ("int4" if bits == 4 else "int8" if group_size == -1 else "int8x2")
    assert (packed.offsets is None) == sym and (packed.perm is None) == (not act_order)
    dense = dequantize_experts(q, torch.float32)
    x = torch.randn(5, K, generator=g).bfloat16()
    for e in range(E):
        bias = torch.randn(N, generator=g).bfloat16()
        want = x.float() @ dense[e].t() + bias.float()
        got = packed.linear(x, e, bias)
        assert got.dtype == torch.bfloat16 and got.shape == (5, N)
        assert _rel_err(got, want) < REL_TOL, (e, _rel_err(got, want))
        got32 = packed.linear(x.float(), e)  # fp32 in, fp32 out: computed in bf16 all the same
        assert got32.dtype == torch.float32 and _rel_err(got32, want - bias.float()) < REL_TOL


def test_a_wrong_packing_is_caught():
    """The check above can fail: another expert's packing, or the wrong zero points, are far outside REL_TOL."""
    w = torch.randn(2, 32, 64) * 0.05
    q = quantize_rtn(w, 4, 32, sym=False)
    packed = pack_for_cpu(q)
    x = torch.randn(3, 64).bfloat16()
    want = x.float() @ dequantize_experts(q, torch.float32)[0].t()
    assert _rel_err(packed.linear(x, 1), want) > 0.5
    no_zeros = pack_for_cpu(QuantizedExperts(q.qweight, None, q.scales, None, 4, 32))
    assert _rel_err(no_zeros.linear(x, 0), want) > 0.1


@pytest.mark.parametrize(
    "bits, group_size, shape, reason",
    [
        (4, 32, (2, 40, 64), "N=40 are not a multiple of 16"),
        (4, 16, (1, 32, 64), "groups of 16 rows"),
        (8, 32, (1, 36, 64), "N=36 are not a multiple of 8"),
        (8, -1, (1, 20, 48), "K=48 are not a multiple of 32"),
    ],
)
def test_shapes_the_ops_refuse_get_a_reason(bits, group_size, shape, reason):
    q = quantize_rtn(torch.randn(*shape), bits, group_size)
    assert reason in cpu_packing_unsupported(q)
    with pytest.raises(ValueError, match="cannot pack for the CPU kernels"):
        pack_for_cpu(q)


def test_per_channel_int8_takes_any_out_features():
    q = quantize_rtn(torch.randn(1, 20, 64) * 0.05, 8, -1, sym=False)
    assert cpu_packing_unsupported(q) is None and pack_for_cpu(q).mode == "int8"


def test_a_container_with_a_mismatched_packing_is_refused():
    q = quantize_rtn(torch.randn(2, 32, 64), 4, 32)
    other = pack_for_cpu(quantize_rtn(torch.randn(2, 48, 64), 4, 32))
    with pytest.raises(ValueError, match="cpu_packed holds"):
        QuantizedExperts(q.qweight, q.qzeros, q.scales, q.g_idx, 4, 32, cpu_packed=other)


def _count_calls(monkeypatch):
    calls = {"int4": 0, "int8": 0}
    int4, int8 = torch._weight_int4pack_mm_for_cpu, torch._weight_int8pack_mm

    def count4(*args):
        calls["int4"] += 1
        return int4(*args)

    def count8(*args):
        calls["int8"] += 1
        return int8(*args)

    monkeypatch.setattr(torch, "_weight_int4pack_mm_for_cpu", count4)
    monkeypatch.setattr(torch, "_weight_int8pack_mm", count8)
    return calls


def test_torch_backend_takes_the_packed_ops_for_decode_rows_only(monkeypatch):
    E, D, F = 4, 64, 128
    g = torch.Generator().manual_seed(1)
    gate = torch.randn(E, D, generator=g).bfloat16()
    q1, q2 = (
        quantize_rtn(torch.randn(E, F, D, generator=g) * 0.1, 4, 32),
        quantize_rtn(torch.randn(E, D, F, generator=g) * 0.1, 4, 32),
    )
    b1, b2 = torch.randn(E, F, generator=g).bfloat16(), torch.randn(E, D, generator=g).bfloat16()
    p1 = QuantizedExperts(q1.qweight, q1.qzeros, q1.scales, None, 4, 32, cpu_packed=pack_for_cpu(q1))
    p2 = QuantizedExperts(q2.qweight, q2.qzeros, q2.scales, None, 4, 32, cpu_packed=pack_for_cpu(q2))
    calls = _count_calls(monkeypatch)
    max_rows = p1.cpu_packed.max_rows
    for T in (1, 3, max_rows // 2, max_rows // 2 + 1, 3 * max_rows):  # 2 slots per token over 4 experts
        x = torch.randn(T, D, generator=g).bfloat16()
        want = fused_moe(x.float(), gate.float(), dequantize_experts(q1, torch.float32), b1.float(),
                         dequantize_experts(q2, torch.float32), b2.float(), 2, backend="torch")  # fmt: skip
        calls["int4"] = 0
        got = fused_moe(x, gate, p1, b1, p2, b2, 2, backend="torch")
        assert got.dtype == torch.bfloat16 and _rel_err(got, want) < 0.02, T
        rows = torch.bincount(topk_softmax_torch(x @ gate.t(), 2)[1].flatten().long(), minlength=E)
        # two packed GEMMs per expert with 1..max_rows rows; one with more (a long prefill) dequantizes instead
        assert calls["int4"] == 2 * int(((rows > 0) & (rows <= max_rows)).sum()), (T, rows)
    assert int(rows.max()) > max_rows, "the last T tried both paths"
    x = torch.randn(2, D, generator=g)
    calls["int4"] = 0
    fused_moe(x, gate.float(), p1, b1.float(), p2, b2.float(), 2, backend="torch")
    assert calls["int4"] == 0, "fp32 activations keep the exact fp32 path"
    calls["int4"] = 0
    y = quantized_linear(x.bfloat16(), p1.select(0), None, backend="torch")  # select drops the packing
    assert calls["int4"] == 0 and y.shape == (2, F)


def _reference(folder, bits, ids):
    cfg = json.loads((folder / "config.json").read_text())
    return reference_phixtral_forward(dequantize_gptq_tensors(read_tensors(folder), bits), cfg, ids)


@pytest.mark.parametrize(
    "bits, group_size, sym, act_order", [(4, 32, False, True), (8, -1, True, False), (8, 32, True, True)]
)
def test_gptq_checkpoint_on_the_cpu_defaults_to_bf16_and_the_packed_ops(monkeypatch, bits, group_size, sym, act_order):
    folder = gptq_moe_checkpoint(bits, group_size, sym, act_order)
    model = phixtral.from_pretrained(folder, device="cpu", backend="torch")
    assert model.dtype == torch.bfloat16, "bf16 is the activation dtype the packed CPU ops are fast with"
    packed_modules = [m for m in model.modules() if isinstance(m, QuantizedExpertLinear)]
    assert packed_modules and all(m._cache.get(True) for m in packed_modules), "repacked at load"
    S = 24
    ids = torch.randint(0, 512, (1, S + 1), generator=torch.Generator().manual_seed(2))
    # (a prefill of S tokens runs packed too: S <= max_rows; the count below is of the decode step alone)
    want = _reference(folder, bits, ids)
    calls = _count_calls(monkeypatch)
    model.setup_caches(1, 32)
    with torch.inference_mode():
        model.hidden_states(ids[:, :S], None, torch.arange(S))
        calls.update(int4=0, int8=0)
        step = model.lm_head(model.hidden_states(ids[:, S:], None, torch.tensor([S]))).float()
    per_layer = 2 + 2 * model.config.num_experts_per_tok  # Wqkv, out_proj, and fc1 + fc2 of each chosen expert
    assert sum(calls.values()) == per_layer * len(model.h), "decode runs every quantized Linear through the packed ops"
    # bf16 through the whole 2-layer model: logits (std 0.8) within a few bf16 roundings of the fp32 reference, measured
    # 0.017-0.020 for the three schemes.
    torch.testing.assert_close(step[0, -1], want[0, -1], rtol=0, atol=0.05)
    exact = phixtral.from_pretrained(folder, device="cpu", dtype="float32", backend="torch")
    assert not any(m._cache.get(True) for m in exact.modules() if isinstance(m, QuantizedExpertLinear))
    torch.testing.assert_close(exact(ids), want, rtol=0, atol=1e-4)


def test_the_packing_follows_the_buffers():
    """Replacing or writing into a buffer repacks at the next call, so the packed path never runs stale weights."""
    N, K = 32, 64
    layer = QuantizedLinear(N, K, 4, 32).to(torch.bfloat16)
    layer.bias.data.zero_()
    first = quantize_rtn(torch.randn(1, N, K) * 0.1, 4, 32)
    layer.set_weight(first)
    x = torch.randn(1, K).bfloat16()
    with torch.no_grad():
        a = layer(x)
        assert layer.weight_for(x) is layer.weight_for(x), "cached between calls"
        second = quantize_rtn(torch.randn(1, N, K) * 0.1, 4, 32)
        layer.set_weight(second)
        b = layer(x)
        want = x.float() @ dequantize_experts(second, torch.float32)[0].t()
        assert _rel_err(b, want) < REL_TOL and _rel_err(a, want) > 0.5
        layer.qweight.copy_(first.qweight)  # in place: the version counter moves
        layer.scales.copy_(first.scales)
        want = x.float() @ dequantize_experts(first, torch.float32)[0].t()
        assert _rel_err(layer(x), want) < REL_TOL


# --- one copy of the weights -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bits, group_size, sym, act_order", [(4, 32, False, True), (8, -1, True, False), (8, 32, True, True)]
)
def test_a_bf16_cpu_model_keeps_one_copy_of_its_weights_and_reads_the_codes_back_exactly(
    tmp_path, bits, group_size, sym, act_order
):
    """qweight gives way to the packed form (a meta placeholder), and what needs it gets the checkpoint's codes back
    bit for bit: state_dict and a save, the same logits as with both copies, a cast to fp32."""
    from phixtral_kernels.cpu_packed import int4_layout_known

    if bits == 4 and not int4_layout_known():
        pytest.skip("this torch's int4 CPU layout is not known: both copies stay")
    folder = gptq_moe_checkpoint(bits, group_size, sym, act_order)
    model = phixtral.from_pretrained(folder, device="cpu", backend="torch")
    packed = [m for m in model.modules() if isinstance(m, QuantizedExpertLinear)]
    assert all(m.qweight.device.type == "meta" and m.cpu_weights is not None for m in packed)
    held = sum(t.numel() * t.element_size() for t in model.buffers() if t is not None and t.device.type != "meta")
    reference = phixtral.from_pretrained(folder, device="cpu", backend="torch")
    for m in reference.modules():
        if isinstance(m, QuantizedExpertLinear):
            m.materialize_qweight()  # as before: the GPTQ qweight beside the packed form
    both = sum(t.numel() * t.element_size() for t in reference.buffers() if t is not None)
    qweights = sum(m.qweight.numel() * 4 for m in reference.modules() if isinstance(m, QuantizedExpertLinear))
    assert both - held == qweights, "exactly the GPTQ qweights are gone"
    model.save_pretrained(tmp_path / "released")
    reference.save_pretrained(tmp_path / "both")
    released, kept = read_tensors(tmp_path / "released"), read_tensors(tmp_path / "both")
    assert released.keys() == kept.keys() and any(n.endswith(".qweight") for n in kept)
    for name, t in kept.items():
        assert torch.equal(released[name], t), name
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        assert torch.equal(model(ids), reference(ids))
    model.float()
    assert all(m.qweight.device.type == "cpu" for m in packed), "a cast reads the codes back"
    assert torch.equal(model(ids), reference.float()(ids))


@pytest.mark.parametrize("bits, group_size", [(4, 32), (8, 32), (8, -1)])
def test_a_released_layer_runs_long_prefills_other_backends_and_loads(bits, group_size):
    """Past the packed kernels' rows the layer dequantizes from the codes it reads back; the triton backend (the
    interpreter here) and load_state_dict get a real qweight."""
    N, K = 64, 128
    layer = QuantizedLinear(N, K, bits, group_size).to(torch.bfloat16)
    q = quantize_rtn(torch.randn(1, N, K) * 0.1, bits, group_size)
    layer.set_weight(q)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(600, K).bfloat16()  # past every mode's max_rows
    with torch.no_grad():
        want_long, want_short = layer(x), layer(x[:3])
        layer.release_qweight()
        assert layer.qweight.device.type == "meta"
        assert torch.equal(layer(x), want_long) and torch.equal(layer(x[:3]), want_short)
        assert torch.equal(layer.state_dict()["qweight"], q.qweight)
        got = quantized_linear(x[:3], layer.weight_for(x), layer.bias[0], backend="triton")
        torch.testing.assert_close(got.float(), want_short.float(), rtol=0, atol=3e-2)
        assert layer.qweight.device.type == "meta", "another backend reads the codes back without keeping them"
        layer.load_state_dict(state)
        assert torch.equal(layer(x[:3]), want_short) and layer.qweight.device.type == "meta"
