"""GPU tier: decode steps replayed from real CUDA graphs give the eager path's tokens; fp16 attention in "scores" mode.

The bundled tiny phixtral (4 layers, D=256, trained, fp16 on the GPU, backend "auto" = triton). Skipped without CUDA;
benchmarks/gpu_check.sh runs it. Its Triton launches are those of phixtral's decode and short prefills, which the
check's warm stage compiles ahead.
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers_models import eager_and_graph_step_logits

import phixtral
from phixtral import decode_graph
from phixtral.generate import generate_tokens
from phixtral.serve.engine import Request, SamplingParams, _RowSampler

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = "cuda"

# 6, 7 and 8 tokens: prefills of 6 and 24 tokens, which take the decode shapes' kernel variants (warmed by
# gpu_check.sh).
PROMPTS = ["def fib(n):", "import os\nclass Config:", "for i in range(10):\n    "]
SAMPLED = dict(temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.2, seed=1234)


@pytest.fixture(scope="module")
def model():
    m = phixtral.from_pretrained(phixtral.default_model_path(), device=DEVICE, dtype=torch.float16)
    assert m.dtype == torch.float16
    reason = decode_graph.graph_unavailable_reason(m)
    if reason is not None:
        pytest.skip(f"no CUDA graphs on this GPU: {reason}")
    return m


def ids_of(model, prompts):
    """Left-padded token ids [B, S] and their mask (None when no row is padded), on the GPU."""
    rows = [model.tokenizer(p)["input_ids"] for p in prompts]
    S = max(map(len, rows))
    ids = torch.tensor([[0] * (S - len(r)) + r for r in rows], device=DEVICE)
    mask = torch.tensor([[0] * (S - len(r)) + [1] * len(r) for r in rows], device=DEVICE)
    return ids, (None if bool(mask.all()) else mask)


def both(model, ids, mask, n, **kw):
    """(eager ids, graph ids) [B, S + n] of generate; each took the path asked for."""
    eager = model.generate(ids, attention_mask=mask, max_new_tokens=n, cuda_graph=False, **kw)
    assert not model.last_generation_stats.cuda_graph
    graph = model.generate(ids, attention_mask=mask, max_new_tokens=n, cuda_graph=True, **kw)
    assert model.last_generation_stats.cuda_graph
    return eager, graph


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
@pytest.mark.parametrize("batch", [1, 3])
def test_graph_decode_gives_the_eager_tokens_across_cache_buckets(model, batch, sampling):
    """Cache lengths of 64 and 128 slots (generate rounds prompt + new tokens up to 64), then 64 again: each a new
    cache, a new capture, the same tokens as eager decoding. Batch 3 is left-padded (the graph's mask input)."""
    kw = SAMPLED if sampling == "seeded" else {}
    ids, mask = ids_of(model, PROMPTS[:batch])
    assert (mask is not None) == (batch > 1)
    S = ids.shape[1]
    for n in (64 - S, 128 - S, 40):
        eager, graph = both(model, ids, mask, n, **kw)
        assert model.cache_length == -(-(S + n) // 64) * 64
        assert torch.equal(graph, eager), (
            f"{batch=} {sampling} {n=} tokens: first difference at "
            f"{(graph != eager).nonzero()[0].tolist() if graph.shape == eager.shape else 'shape'}"
        )
    graphs = model.decode_graphs
    again = model.generate(ids, attention_mask=mask, max_new_tokens=40, **kw)  # "auto": the same graph
    assert torch.equal(again, eager) and model.decode_graphs is graphs and graphs.captures == 1


def test_graph_logits_equal_eager_logits_step_by_step(model):
    """Both runs fed the same tokens: the replayed step runs the eager step's kernels on the same inputs, so every
    step's logits are the eager step's bits."""
    ids, mask = ids_of(model, PROMPTS)
    eager, graph = eager_and_graph_step_logits(model, ids, mask, max_new_tokens=24)
    assert torch.isfinite(graph).all()
    assert torch.equal(graph, eager), f"largest difference {(graph - eager).abs().max().item():.3g}"


def test_serve_row_sampler_gives_the_same_tokens(model):
    rows = [model.tokenizer(p)["input_ids"] for p in PROMPTS]
    ids, mask = ids_of(model, PROMPTS)
    params = [SamplingParams(30), SamplingParams(30, temperature=0.8, top_p=0.9, seed=1),
              SamplingParams(30, temperature=1.2, top_k=20, seed=2)]  # fmt: skip
    out = {}
    for graph in (False, True):
        sampler = _RowSampler([Request(r, p, lambda e: None) for r, p in zip(rows, params)], model.device)
        stats = {"prefill_s": 0.0, "decode_s": 0.0}
        out[graph] = list(generate_tokens(model, ids, mask, max_new_tokens=30, sampler=sampler, stats=stats,
                                          cuda_graph=graph))  # fmt: skip
        assert stats.get("cuda_graph", False) is graph
    assert out[True] == out[False]


def test_torch_backend_decodes_eagerly_and_triton_captures_again(model):
    ids, _ = ids_of(model, PROMPTS[:1])
    expected = model.generate(ids, max_new_tokens=40, cuda_graph=False)
    model.generate(ids, max_new_tokens=40)
    assert model.last_generation_stats.cuda_graph and model.decode_graphs is not None
    try:
        model.set_backend("torch")  # reads expert counts on the host: no capture
        eager = model.generate(ids, max_new_tokens=40, cuda_graph=False)
        assert torch.equal(model.generate(ids, max_new_tokens=40), eager)
        assert not model.last_generation_stats.cuda_graph and model.decode_graphs is None
        with pytest.raises(RuntimeError, match="'torch' backend"):
            model.generate(ids, max_new_tokens=40, cuda_graph=True)
    finally:
        model.set_backend("auto")
    assert torch.equal(model.generate(ids, max_new_tokens=40), expected)
    assert model.last_generation_stats.cuda_graph


def test_scores_attention_mode_on_the_gpu(model):
    """fp16 q, k, v into SDPA (q pre-scaled) against today's fp32 upcast: logits within fp16 rounding of each other and
    of the fp32 model, and graph decode equal to eager decode in that mode too."""
    ids, mask = ids_of(model, PROMPTS)
    ref_model = phixtral.from_pretrained(
        phixtral.default_model_path(), device=DEVICE, dtype=torch.float32, backend="torch"
    )
    with torch.inference_mode():
        ref = ref_model(ids, mask).double()
        fp32_mode = model(ids, mask).double()
        model.attention_upcast = "scores"
        try:
            scores = model(ids, mask).double()
            valid = mask.bool()
            err = {
                name: ((x - ref)[valid].norm() / ref[valid].norm()).item()
                for name, x in (("fp32", fp32_mode), ("scores", scores))
            }
            assert torch.isfinite(scores).all()
            assert err["scores"] <= 2 * err["fp32"] + 2e-3, err
            eager, graph = both(model, ids, mask, 40)
            assert torch.equal(graph, eager)
        finally:
            model.attention_upcast = "fp32"
    del ref_model


def sdpa_kernel_refuses(backend: str, q, k, v, attn_mask):
    """Why the fused SDPA kernel `backend` does not take these inputs, by torch's own checks (the reasons its debug
    mode warns), or None when it does; MATH takes everything."""
    check = getattr(torch.backends.cuda, f"can_use_{backend.lower()}", None)
    if backend == "MATH":
        return None
    if check is None:
        return f"this torch has no torch.backends.cuda.can_use_{backend.lower()} to ask"
    try:
        params = torch.backends.cuda.SDPAParams(q, k, v, attn_mask, 0.0, False, False)  # ..., enable_gqa (torch 2.5+)
    except TypeError:
        params = torch.backends.cuda.SDPAParams(q, k, v, attn_mask, 0.0, False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if check(params, debug=True):
            return None
    return "; ".join(str(w.message).strip() for w in caught) or "refused"


@pytest.mark.parametrize("backend", ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"])
@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_kernels_on_fp16_scores_beyond_the_fp16_range(backend, masked):
    """phi-like q, k (q.k^T ~ 84,000, past 65504; the scaled score ~ 9,400 with a spread of a few units): each SDPA
    kernel on the "scores" mode's tensors (fp16, q pre-scaled by 1/8) against the exact result. The fused kernels
    accumulate q.k^T in fp32, so they are as accurate as fp32 attention (~1e-3 at these magnitudes)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if getattr(SDPBackend, backend, None) is None:
        pytest.skip(f"this torch has no SDPBackend.{backend}")
    g = torch.Generator().manual_seed(0)
    H, L, hd = 32, 256, 80
    q = torch.randn(1, H, 1, hd, generator=g) * 0.5
    k = torch.randn(1, H, L, hd, generator=g) * 2
    q[..., :4] += 150.0
    k[..., :4] = 140.0
    v = torch.randn(1, H, L, hd, generator=g)
    q, k, v = (t.half().to(DEVICE) for t in (q, k, v))
    attn_mask = torch.ones(1, 1, 1, L, dtype=torch.bool, device=DEVICE) if masked else None
    if masked:
        attn_mask[..., : L // 4] = False
    exact = F.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=attn_mask, scale=1 / math.sqrt(hd)
    )
    assert (q.float() @ k.float().transpose(-1, -2)).abs().max() > 65504
    refused = sdpa_kernel_refuses(backend, q * 0.125, k, v, attn_mask)
    if refused is not None:  # this kernel does not take these inputs (e.g. flash with a mask), by torch's own checks
        pytest.skip(f"{backend} does not take these inputs here: {refused[:160]}")
    with sdpa_kernel(getattr(SDPBackend, backend)):  # an error now is a failure, not a kernel that cannot run
        out = F.scaled_dot_product_attention(q * 0.125, k, v, attn_mask=attn_mask, scale=8 / math.sqrt(hd))
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    err = ((out.double() - exact).norm() / exact.norm()).item()
    assert torch.isfinite(out).all()
    if backend != "MATH":  # the math kernel stores the scaled scores in fp16: finite, not as accurate
        assert err < 3e-3, f"{backend}: rel err {err:.2e}"
