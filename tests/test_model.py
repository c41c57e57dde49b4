"""The decoder against transformers' Phi and against the original phixtral forward (CPU, fp32, tiny random models)."""

import json

import pytest
import torch
from helpers_models import (
    hf_phi_checkpoint,
    hf_to_msft,
    load_hf,
    msft_config,
    msft_moe_checkpoint,
    read_tensors,
    reference_phixtral_forward,
    write_checkpoint,
)

import phixtral

ATOL = 1e-4  # fp32 logits


def random_ids(B, S, vocab=512, seed=0):
    return torch.randint(0, vocab, (B, S), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def hf_folder():
    return hf_phi_checkpoint()


@pytest.fixture(scope="module")
def hf_model(hf_folder):
    return load_hf(hf_folder)


@pytest.fixture(scope="module")
def model(hf_folder):
    return phixtral.from_pretrained(hf_folder, backend="torch")


@pytest.fixture(scope="module")
def moe_model():
    return phixtral.from_pretrained(msft_moe_checkpoint(), backend="torch")


# --- parity with transformers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "variant",
    [dict(), dict(kv_heads=2, partial_rotary_factor=0.5, rope_theta=500.0)],
    ids=["phi2-like", "gqa-rope-theta-500"],
)
def test_logits_match_transformers(variant):
    folder = hf_phi_checkpoint(**variant)
    hf, ours = load_hf(folder), phixtral.from_pretrained(folder, backend="torch")
    assert ours.config.model_type == "phi"
    ids = random_ids(2, 19)
    with torch.no_grad():
        expected = hf(ids).logits
    got = ours(ids)
    assert got.shape == (2, 19, 512) and got.dtype == torch.float32
    assert (got - expected).abs().max().item() <= ATOL


def test_greedy_tokens_match_transformers(hf_model, model):
    ids = random_ids(1, 7, seed=3)
    expected = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
    got = model.generate(ids, max_new_tokens=20)
    assert expected.shape == (1, 27), "the prompt was chosen so that transformers runs all 20 steps"
    assert torch.equal(got, expected)


def test_greedy_text_matches_transformers(hf_model, model):
    prompt = "def f12(x, y):\n"
    tok = model.tokenizer
    ids = torch.tensor([tok(prompt)["input_ids"]])
    expected = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
    new = expected[0, ids.shape[1] :].tolist()
    if model.eos_token_ids[0] in new:
        new = new[: new.index(model.eos_token_ids[0])]
    assert model.generate(prompt, max_new_tokens=20) == tok.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("experts", [None, 4], ids=["phi-msft-dense", "phi-msft-moe-identical-experts"])
def test_msft_layouts_of_transformers_weights_match(hf_model, experts, tmp_path):
    """The HF weights rewritten under phi-msft names: dense, and as E identical experts (top-2 of them = the MLP)."""
    cfg = hf_model.config
    tensors = hf_to_msft(hf_model.state_dict(), cfg.num_hidden_layers, experts)
    config = msft_config(
        hidden=cfg.hidden_size, layers=cfg.num_hidden_layers, heads=cfg.num_attention_heads, vocab=cfg.vocab_size,
        n_positions=cfg.max_position_embeddings, rotary_dim=6, experts=experts, top_k=2 if experts else None,
        n_inner=cfg.intermediate_size,
    )  # fmt: skip
    write_checkpoint(tmp_path, tensors, config, n_shards=3)
    ours = phixtral.from_pretrained(tmp_path, backend="torch")
    assert ours.config.num_local_experts == (experts or 1) and ours.config.rotary_dim == 6
    ids = random_ids(2, 13, seed=1)
    with torch.no_grad():
        expected = hf_model(ids).logits
    assert (ours(ids) - expected).abs().max().item() <= ATOL


# --- parity with the original phixtral forward ----------------------------------------------------------------------
@pytest.mark.parametrize("top_k", [None, 1, 3], ids=["checkpoint-top2", "override-top1", "override-top3"])
def test_moe_logits_match_original_forward(top_k):
    folder = msft_moe_checkpoint()
    tensors = read_tensors(folder)
    cfg = json.loads((folder / "config.json").read_text())
    ours = phixtral.from_pretrained(folder, backend="torch", num_experts_per_tok=top_k)
    if top_k is not None:
        cfg["num_experts_per_tok"] = top_k
    assert ours.config.num_experts_per_tok == cfg["num_experts_per_tok"]
    ids = random_ids(2, 11, seed=2)
    expected = reference_phixtral_forward(tensors, cfg, ids)
    assert (ours(ids) - expected).abs().max().item() <= ATOL


def test_moe_routing_is_not_trivial(moe_model):
    """Guard for the test above: the random router really sends tokens to different experts."""
    x = moe_model.h[0].ln(moe_model.wte(random_ids(1, 32, seed=2)))[0]
    picks = (x @ moe_model.h[0].moe.gate.weight.t()).topk(2, dim=-1).indices
    assert picks.unique().numel() == 4


# --- KV cache and padding -------------------------------------------------------------------------------------------
@torch.inference_mode()
def test_kv_cached_decoding_equals_full_forward(moe_model):
    ids = random_ids(2, 12, seed=4)
    full = moe_model(ids)  # [2, 12, V]
    moe_model.setup_caches(2, 20)
    prefill = moe_model(ids[:, :5], input_pos=torch.arange(5))
    assert (prefill - full[:, :5]).abs().max().item() <= ATOL
    for t in range(5, 12):
        step = moe_model(ids[:, t : t + 1], input_pos=torch.tensor([t]))
        assert (step[:, 0] - full[:, t]).abs().max().item() <= ATOL, f"decode step at position {t}"


@torch.inference_mode()
def test_left_padded_batch_equals_prompts_one_by_one(moe_model):
    lengths = [3, 9, 6]
    prompts = [random_ids(1, n, seed=10 + n)[0] for n in lengths]
    S = max(lengths)
    ids = torch.stack([torch.cat([torch.zeros(S - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(S - len(p)), torch.ones(len(p))]) for p in prompts]).long()
    batched_logits = moe_model(ids, attention_mask=mask)
    batched_ids = moe_model.generate(ids, attention_mask=mask, max_new_tokens=8)
    assert batched_ids.shape == (3, S + 8)
    for b, p in enumerate(prompts):
        alone = moe_model(p[None])
        assert (batched_logits[b, S - len(p) :] - alone[0]).abs().max().item() <= ATOL
        alone_ids = moe_model.generate(p[None], max_new_tokens=8)
        assert torch.equal(batched_ids[b, S:], alone_ids[0, len(p) :]), f"row {b}"


def test_batch_of_strings_equals_strings_one_by_one(moe_model):
    prompts = ["def f3(x", "the quick brown fox jumps over", "seven"]
    batched = moe_model.generate(prompts, max_new_tokens=6)
    assert isinstance(batched, list) and len(batched) == 3
    assert batched == [moe_model.generate(p, max_new_tokens=6) for p in prompts]


# --- MoE backends and fp16 ------------------------------------------------------------------------------------------
def test_triton_torch_and_naive_backends_agree():
    """Triton under the interpreter (tests/conftest.py) on a tiny model: hidden 64, 2 layers, 5 tokens."""
    model = phixtral.from_pretrained(msft_moe_checkpoint(), backend="triton")
    ids = random_ids(1, 5, seed=5)
    logits = {}
    for backend in ("triton", "torch", "naive"):
        model.set_backend(backend)
        assert model.backend == backend
        logits[backend] = model(ids)
    assert (logits["triton"] - logits["torch"]).abs().max().item() <= ATOL
    assert (logits["naive"] - logits["torch"]).abs().max().item() <= ATOL
    model.set_backend("triton")
    with_triton = model.generate(ids, max_new_tokens=2)
    model.set_backend("torch")
    assert torch.equal(with_triton, model.generate(ids, max_new_tokens=2))
    with pytest.raises(ValueError, match="backend"):
        model.set_backend("cuda")


@pytest.mark.parametrize("upcast", ["fp32", "scores"])
def test_fp16_attention_scores_beyond_fp16_range_stay_finite(upcast):
    """Biases that push q.k^T past 65504 (as phi-2's late layers do): fp16 scores would be inf and the logits NaN.
    In both attention modes (tests/test_attention_upcast.py emulates what GPU kernels do with them)."""
    folder = msft_moe_checkpoint()
    models = {dt: phixtral.from_pretrained(folder, backend="torch", dtype=dt) for dt in (torch.float32, torch.float16)}
    models[torch.float16].attention_upcast = upcast
    D = models[torch.float32].config.n_embd
    for m in models.values():
        with torch.no_grad():
            m.h[0].mixer.Wqkv.bias[: 2 * D] = 80.0  # q and k of every head ~ 80: q.k ~ 80 * 80 * head_dim 16
    ids = random_ids(1, 6, seed=6)
    m32 = models[torch.float32]
    h = m32.h[0].ln(m32.wte(ids))
    q, k = m32.h[0].mixer.Wqkv(h)[..., : 2 * D].split(D, dim=-1)
    assert (q[0, :, :16] @ k[0, :, :16].t()).abs().max() > 65504, "the scores must overflow fp16 for this test to bite"
    out16 = models[torch.float16](ids)
    assert torch.isfinite(out16).all()
    assert (out16 - m32(ids)).abs().max().item() < 0.025  # measured 0.0100 in both modes


def test_forward_rejects_bad_input(model):
    with pytest.raises(ValueError, match="n_positions"):
        model(random_ids(1, 129))
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([[1, 512]]))
    with pytest.raises(TypeError, match="int64"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        model(torch.zeros(3, dtype=torch.long))


@torch.inference_mode()
def test_cached_forward_rejects_positions_and_batches_the_cache_cannot_hold(moe_model):
    moe_model.setup_caches(1, 16)
    with pytest.raises(ValueError, match=r"input_pos must have shape \[S=3\]"):
        moe_model(random_ids(1, 3), input_pos=torch.arange(2))
    with pytest.raises(ValueError, match="batch of 2 exceeds the KV cache's batch size 1"):
        moe_model(random_ids(2, 3), input_pos=torch.arange(3))
