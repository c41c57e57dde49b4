"""fp16 attention with attention_upcast="scores": q, k, v stay fp16 and q is pre-scaled by a power of two.

On a CPU, torch's SDPA computes fp16 attention in fp32 inside, so the two modes give the same logits here; what a GPU
kernel does is emulated instead, on phi-like activations (a massive shared channel in q and k, so that q.k^T exceeds
the fp16 range while the softmax still has something to choose): a fused kernel in the way of flash / memory-efficient
attention (fp16 operands, q.k^T and the softmax in fp32, P rounded to fp16 for P.V, fp32 accumulation) and, as the worst
case, a kernel that stores q.k^T in fp16. tests/test_decode_graph_gpu.py measures the real kernels.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import phixtral
from phixtral.config import PhixtralConfig
from phixtral.model import ATTENTION_UPCAST, Attention

HD = 80  # phi-2's head dim


def phi_like_qkv(seed: int, L: int = 48, heads: int = 4):
    """q [1, H, 1, hd], k, v [1, H, L, hd] fp32, already fp16-representable. Four channels carry a massive value shared
    by every key (q.k ~ 4 * 150 * 140 = 84,000 before the 1/sqrt(80) scale, ~9,400 after), the other channels a per-key
    variation of a few units of the scaled score, so that the softmax spreads over several keys."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, 1, HD, generator=g) * 0.5
    k = torch.randn(1, heads, L, HD, generator=g) * 2
    q[..., :4] += 150.0
    k[..., :4] = 140.0
    v = torch.randn(1, heads, L, HD, generator=g)
    return q.half().float(), k.half().float(), v.half().float()


def reference(q, k, v):
    """Today's fp32 mode: q, k, v (fp16 values) upcast to fp32, scale 1/sqrt(hd)."""
    return F.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(HD))


def fused_fp16_kernel(q16, k16, v16, scale):
    """A flash-style kernel: fp16 operands; q.k^T accumulated in fp32 (products of fp16 numbers are exact in fp32) and
    scaled in fp32; softmax in fp32; P rounded to fp16 for the second product; fp32 accumulation; fp16 output."""
    s = (q16.float() @ k16.float().transpose(-1, -2)) * scale
    p = s.softmax(-1).half().float()
    return (p @ v16.float()).half()


def fp16_scores_kernel(q16, k16, v16, scale):
    """The worst case: q.k^T stored in fp16 before the scale (fp16 matmul output), the rest in fp32."""
    s = (q16 @ k16.transpose(-1, -2)).float() * scale
    return (s.softmax(-1) @ v16.float()).half()


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_the_setting_reaches_every_layer_and_is_checked():
    model = phixtral.from_pretrained(phixtral.default_model_path(), backend="torch")
    assert model.attention_upcast == "fp32" and ATTENTION_UPCAST == ("fp32", "scores")
    model.attention_upcast = "scores"
    assert {b.mixer.upcast for b in model.h} == {"scores"}
    with pytest.raises(ValueError, match="attention_upcast must be one of"):
        model.attention_upcast = "bf16"
    assert model.attention_upcast == "scores"


@pytest.mark.parametrize("head_dim, prescale", [(80, 1 / 8), (64, 1 / 8), (16, 1 / 4), (128, 1 / 8), (256, 1 / 16)])
def test_prescale_is_a_power_of_two_leaving_at_most_half_the_scale(head_dim, prescale):
    attn = Attention(
        PhixtralConfig(n_embd=2 * head_dim, n_head=2, rotary_dim=8, n_inner=8, vocab_size=8, n_layer=1, n_positions=16)
    )
    assert attn.head_dim == head_dim and attn.prescale == prescale
    rest = 1 / math.sqrt(head_dim) / prescale  # what SDPA still applies
    assert 0.5 < rest <= 1.0


@pytest.mark.parametrize("seed", range(4))
def test_prescaled_fp16_attention_stays_within_fp16_tolerance_where_raw_scores_overflow(seed):
    q, k, v = phi_like_qkv(seed)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=1 / math.sqrt(HD))
    # Scores near 9,400 carry fp32 rounding of ~1e-3 (fp32's spacing at 84,000 is 0.008): today's path is that far off.
    assert rel(reference(q, k, v), exact) < 2e-3
    assert (q @ k.transpose(-1, -2)).abs().max() > 65504, "the raw scores must overflow fp16 for this test to bite"
    probs = ((q @ k.transpose(-1, -2)) / math.sqrt(HD)).softmax(-1)
    assert probs.max() < 0.9, "the softmax must not be one-hot, or any rounding would pass"
    q16, k16, v16 = q.half(), k.half(), v.half()
    prescale = Attention(
        PhixtralConfig(n_embd=4 * HD, n_head=4, rotary_dim=32, n_inner=8, vocab_size=8, n_layer=1, n_positions=16)
    ).prescale
    qs = q16 * prescale
    assert torch.equal(qs.float(), q * prescale), "a power-of-two pre-scale is exact in fp16"
    rest = 1 / math.sqrt(HD) / prescale

    # A kernel that stores q.k^T in fp16: the raw product overflows, the pre-scaled one (at most 2x the score) does not.
    assert not fp16_scores_kernel(q16, k16, v16, 1 / math.sqrt(HD)).isfinite().all()
    assert fp16_scores_kernel(qs, k16, v16, rest).isfinite().all()
    # A fused kernel keeps the scores in fp32: as accurate as today's fp32 path (measured: 0.7-0.9e-3 for both).
    assert rel(fused_fp16_kernel(qs, k16, v16, rest), exact) < 2e-3
    assert rel(fused_fp16_kernel(q16, k16, v16, 1 / math.sqrt(HD)), exact) < 2e-3
    # torch's CPU kernel on the fp16 tensors of the "scores" mode (measured: ~2e-3).
    out = F.scaled_dot_product_attention(qs, k16, v16, scale=rest)
    assert out.dtype == torch.float16 and rel(out, exact) < 5e-3


def test_scores_mode_matches_fp32_mode_on_the_bundled_model():
    """A trained model in fp16 on the CPU: both modes within fp16 rounding of the fp32 model and of each other (the CPU
    kernel computes in fp32 inside, and the pre-scale is exact), the same greedy tokens."""
    folder = phixtral.default_model_path()
    m16 = phixtral.from_pretrained(folder, backend="torch", dtype=torch.float16)
    m32 = phixtral.from_pretrained(folder, backend="torch", dtype=torch.float32)
    ids = m16.tokenizer("def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1)", return_tensors="pt")[
        "input_ids"
    ]
    with torch.inference_mode():
        ref = m32(ids)
        fp32_mode = m16(ids)
        m16.attention_upcast = "scores"
        scores = m16(ids)
    assert torch.isfinite(scores).all()
    assert rel(fp32_mode, ref) < 2e-3 and rel(scores, ref) < 2e-3
    assert rel(scores, fp32_mode) < 1e-3
    tokens = m16.generate(ids, max_new_tokens=8)
    m16.attention_upcast = "fp32"
    assert torch.equal(tokens, m16.generate(ids, max_new_tokens=8))
