"""fused_moe's gradients (x, gate_weight, w1, b1, w2, b2) on every backend against the naive loop's autograd.

On a CPU-only machine the Triton backward runs in the interpreter (tests/conftest.py); with a GPU, compiled on CUDA.
Each gradient is compared with an fp64 reference routed as the test dtype routes; its error may be at most twice the
naive loop's own error in the test dtype, plus a floor of the dtype's rounding times the gradient's size.
"""

import pytest
import torch
from kernel_cases import DEVICE, ERROR_FLOOR, HOST_SYNC_OPS, RecordOps, moe_layer

from phixtral_kernels import fused_moe, moe_routing
from phixtral_kernels import moe_backward as backward_module
from phixtral_kernels.moe_backward import act_backward, expert_weight_grads
from phixtral_kernels.moe_triton import triton_moe_forward
from phixtral_kernels.reference import (
    expert_gemm1_torch,
    expert_weight_grads_torch,
    gelu_tanh,
    moe_routing_torch,
    topk_lowest_index,
)

NAMES = ("x", "gate_weight", "w1", "b1", "w2", "b2")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def reference_grads(layer, top_k, dout):
    """Gradients of sum(out * dout) in fp64 on the CPU, expert by expert. Routed on the test dtype's logits (every
    backend routes so), while the routing weights' softmax runs on the fp64 logits so gate_weight gets its gradient."""
    experts = topk_lowest_index((layer[0] @ layer[1].t()).detach().cpu(), top_k)[1]  # [T, top_k]
    x, gate, w1, b1, w2, b2 = params = [t.detach().cpu().double().requires_grad_() for t in layer]
    weights = torch.softmax((x @ gate.t()).gather(1, experts), dim=-1)
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        tokens, picks = torch.where(experts == e)
        h = gelu_tanh(torch.addmm(b1[e], x[tokens], w1[e].t()))
        out = out.index_add(0, tokens, weights[tokens, picks, None] * torch.addmm(b2[e], h, w2[e].t()))
    return torch.autograd.grad(out, params, dout.cpu().double())


def grads_of(backend, layer, top_k, dout, requires=NAMES):
    """(out, {name: gradient}) of fused_moe on fresh leaves, only `requires` asking for gradients."""
    leaves = [t.detach().clone().requires_grad_(name in requires) for name, t in zip(NAMES, layer)]
    out = fused_moe(*leaves, top_k, backend=backend)
    asked = [t for t in leaves if t.requires_grad]
    return out, dict(zip([n for n in NAMES if n in requires], torch.autograd.grad(out, asked, dout)))


def assert_grads_close(backend, layer, top_k, dout=None, requires=NAMES):
    if dout is None:
        dout = torch.randn(layer[0].shape, generator=torch.Generator().manual_seed(7)).to(layer[0])
    dtype = layer[0].dtype
    out, grads = grads_of(backend, layer, top_k, dout, requires)
    assert out.grad_fn is not None
    ref = dict(zip(NAMES, reference_grads(layer, top_k, dout)))
    _, naive = grads_of("naive", layer, top_k, dout, requires)
    for name, grad in grads.items():
        assert grad.dtype == dtype and grad.shape == ref[name].shape, name
        scale = ref[name].abs().max().item() + 1e-3  # floor on a gradient of order 1; zero gradients stay near zero
        err = (grad.double().cpu() - ref[name]).abs().max().item()
        naive_err = (naive[name].double().cpu() - ref[name]).abs().max().item()
        bound = 2 * naive_err + ERROR_FLOOR[dtype] * scale
        assert err <= bound, (
            f"d{name}: max error {err:.3g} > bound {bound:.3g} (naive loop in {dtype}: {naive_err:.3g})"
        )


def _layer_with_empty_expert(T, D, F, E, dtype):
    x, gate, *weights = moe_layer(T, D, F, E, dtype)
    x = x.abs()
    gate[E - 1] = -gate[: E - 1].abs().sum(0) - 1.0  # on positive inputs, the last expert's logit is the lowest
    return (x, gate, *weights)


def _layer_with_tied_logits(T, D, F, E, dtype):
    x, gate, *weights = moe_layer(T, D, F, E, dtype)
    return (x, gate[:1].expand(E, -1).contiguous(), *weights)  # phixtral-4x2_8's router: every logit ties


CASES = {
    "top_k_2": (lambda dtype: moe_layer(37, 64, 96, 4, dtype), 2),
    "top_k_1": (lambda dtype: moe_layer(30, 64, 64, 4, dtype), 1),
    "one_token": (lambda dtype: moe_layer(1, 64, 96, 4, dtype), 2),
    "fewer_tokens_than_experts": (lambda dtype: moe_layer(3, 64, 64, 8, dtype), 2),
    "expert_with_no_tokens": (lambda dtype: _layer_with_empty_expert(33, 64, 64, 4, dtype), 2),
    "tied_logits": (lambda dtype: _layer_with_tied_logits(12, 64, 64, 4, dtype), 2),
}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_gradients_match_naive(case, dtype, backend):
    make, top_k = CASES[case]
    assert_grads_close(backend, make(dtype), top_k)


def test_expert_with_no_tokens_gets_zero_gradients():
    layer = _layer_with_empty_expert(33, 64, 64, 4, torch.float32)
    assert not (moe_routing(layer[0] @ layer[1].t(), 2, 32).topk_ids == 3).any()
    _, grads = grads_of("triton", layer, 2, torch.ones(33, 64, device=DEVICE))
    for name in ("w1", "b1", "w2", "b2"):
        assert torch.count_nonzero(grads[name][3]) == 0, name


@pytest.mark.parametrize("requires", [("gate_weight",), ("x", "gate_weight")], ids=["gate_only", "x_and_gate"])
def test_router_training_gradients(requires, monkeypatch):
    """Router training: only the requested gradients, and only the launches they need (no recompute for the gate
    alone)."""
    calls = []
    for name in ("expert_preact", "expert_grad_input", "expert_weight_grad"):
        real = getattr(backward_module, name)
        monkeypatch.setattr(
            backward_module, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k)
        )
    layer = moe_layer(37, 64, 96, 4)
    assert_grads_close("triton", layer, 2, requires=requires)
    expected = ["expert_preact", "expert_grad_input"] if "x" in requires else []
    assert calls == expected


def test_only_gate_requires_grad_returns_only_its_gradient():
    leaves = [t.requires_grad_(name == "gate_weight") for name, t in zip(NAMES, moe_layer(20, 64, 64, 4))]
    fused_moe(*leaves, 2, backend="triton").square().sum().backward()
    assert leaves[1].grad is not None and leaves[1].grad.dtype == torch.float32
    assert all(t.grad is None for t in leaves[:1] + leaves[2:])


@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])
def test_output_has_grad_fn(backend):
    layer = [t.requires_grad_() for t in moe_layer(9, 64, 64, 4)]
    out = fused_moe(*layer, 2, backend=backend)
    assert out.requires_grad and out.grad_fn is not None
    if backend != "torch":
        assert type(out.grad_fn).__name__ == "FusedMoEFunctionBackward"


def test_sum_loss_gradient_with_zero_strides():
    """out.sum()'s upstream gradient is an expanded tensor with strides (0, 0): the backward GEMM reads it by stride."""
    layer = moe_layer(19, 64, 64, 4)
    assert_grads_close("triton", layer, 2, dout=torch.ones(1, 1, device=DEVICE).expand(19, 64))


def test_inference_path_unchanged():
    """No grad needed: the plain forward (no Function), bit-identical to the pipeline run op by op and to the
    Function's."""
    layer = moe_layer(37, 64, 96, 4, torch.float16)
    plain = fused_moe(*layer, 2, backend="triton")
    assert plain.grad_fn is None
    assert torch.equal(plain, triton_moe_forward(*layer, 2)[0])
    leaves = [t.clone().requires_grad_() for t in layer]
    with torch.no_grad():
        no_grad = fused_moe(*leaves, 2, backend="triton")
    assert no_grad.grad_fn is None and torch.equal(no_grad, plain)
    with_grad = fused_moe(*leaves, 2, backend="triton")
    assert with_grad.grad_fn is not None and torch.equal(with_grad.detach(), plain)


def test_gradients_are_bit_identical_run_to_run():
    layer = moe_layer(37, 64, 96, 4, torch.float16)
    dout = torch.randn(37, 64, generator=torch.Generator().manual_seed(3)).to(layer[0])
    first, second = (grads_of("triton", layer, 2, dout)[1] for _ in range(2))
    assert all(torch.equal(first[name], second[name]) for name in NAMES)


def test_zero_tokens_backward():
    layer = [t.requires_grad_() for t in moe_layer(0, 64, 64, 4)]
    out = fused_moe(*layer, 2, backend="triton")
    assert out.shape == (0, 64) and out.grad_fn is not None
    grads = torch.autograd.grad(out.sum(), layer)
    assert all(g.shape == t.shape and not g.any() for g, t in zip(grads, layer))


def test_padding_rows_join_no_sum():
    """u, a and h hold NaN on every row the map does not fill: da, dwts and the weight gradients must stay finite, and
    the weight gradients match their torch twin."""
    T, D, F, E, top_k = 21, 64, 64, 4, 2
    x, gate, w1, b1, w2, b2 = moe_layer(T, D, F, E)
    routing = moe_routing_torch(x @ gate.t(), top_k, 32)  # rows past expert_offsets[E] hold the sentinel too
    real = (routing.sorted_token_ids < routing.num_slots)[:, None]
    h = torch.where(real, expert_gemm1_torch(x, w1, b1, routing), float("nan"))
    u = torch.where(real, torch.randn(h.shape, device=DEVICE), float("nan"))
    a = torch.where(real, torch.randn(h.shape, device=DEVICE), float("nan"))
    g = torch.randn(T, D, device=DEVICE)
    da, dwts = act_backward(u, a, h, g, b2, routing, compute_da=True, compute_dwts=True)
    rows = int(routing.expert_offsets[-1])
    assert torch.isfinite(da[:rows]).all() and torch.isfinite(dwts).all()
    assert not da[:rows][~real[:rows, 0]].any(), "da is zero on padding rows"
    grads = expert_weight_grads(x, g, h, da, routing, (True, True, True, True))
    for grad, ref, name in zip(grads, expert_weight_grads_torch(x, g, h, da, routing), ("w1", "b1", "w2", "b2")):
        assert torch.isfinite(grad).all(), name
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-5, msg=name)


def test_backward_has_no_host_sync(monkeypatch):
    """No aten op that reads device data, and no .tolist() / .item() (below the dispatcher) in forward or backward."""
    leaves = [t.requires_grad_() for t in moe_layer(9, 64, 64, 4)]

    def refuse(*args, **kwargs):
        raise AssertionError("host read in the triton backward")

    with RecordOps() as rec:
        out = fused_moe(*leaves, 2, backend="triton")
        monkeypatch.setattr(torch.Tensor, "tolist", refuse)
        monkeypatch.setattr(torch.Tensor, "item", refuse)
        torch.autograd.grad(out, leaves, torch.ones_like(out))
        monkeypatch.undo()
    assert rec.ops and not rec.ops & HOST_SYNC_OPS, sorted(rec.ops & HOST_SYNC_OPS)


# torch.autograd.gradcheck needs float64, and the Triton path does not compute in float64: its GEMMs accumulate and
# its routing weights are fp32 (fused_moe sends float64 to the torch backend under "auto" and rejects it for "triton").
# The fp64 reference above, with fp32 tolerances as tight as 1e-5 of each gradient's size, takes its place.
