"""Sampling (against transformers' logits processors), stop strings, eos, streaming, seeds, chat and bad arguments."""

import importlib

import pytest
import torch
from helpers_models import msft_moe_checkpoint

import phixtral
from phixtral.generate import apply_repetition_penalty, filter_logits, sample
from phixtral.text import TextStream, find_stop, left_pad, row_text

PROMPT = "def f7(x, y):\n"


@pytest.fixture(scope="module")
def model():
    return phixtral.from_pretrained(msft_moe_checkpoint(), backend="torch")


# --- sampling against transformers ------------------------------------------------------------------------------------
def test_top_k_top_p_and_repetition_penalty_match_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 3
    ids = torch.randint(0, 50, (4, 7), generator=g)
    for k, p in [(5, None), (None, 0.7), (10, 0.5), (60, 0.99), (None, 0.01)]:
        expected = logits.clone()
        if k:
            expected = TopKLogitsWarper(k)(ids, expected)
        if p is not None:
            expected = TopPLogitsWarper(p)(ids, expected)
        assert torch.equal(filter_logits(logits, k, p), expected), (k, p)
    seen = torch.zeros(4, 50, dtype=torch.bool).scatter_(1, ids, True)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    assert torch.allclose(apply_repetition_penalty(logits, seen, 1.3), expected)


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(40_000, 4)
    draws = sample(logits, 1.0, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    assert (freq - probs).abs().max() < 0.01
    top2 = sample(logits, 1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(top2.tolist()) == {0, 1}
    assert torch.equal(sample(logits[:3], 0.0), torch.zeros(3, dtype=torch.long))


# --- generation behaviour --------------------------------------------------------------------------------------------
def test_seed_makes_sampling_reproducible(model):
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.95)
    a, b = model.generate(PROMPT, seed=1, **kw), model.generate(PROMPT, seed=1, **kw)
    assert a == b
    others = {model.generate(PROMPT, seed=s, **kw) for s in (2, 3, 4)}
    assert others - {a}, "different seeds should give different samples"


def test_top_k_1_sampling_is_greedy(model):
    greedy = model.generate(PROMPT, max_new_tokens=10)
    assert model.generate(PROMPT, max_new_tokens=10, temperature=0.8, top_k=1, seed=0) == greedy


def test_repetition_penalty_prevents_repeats(model):
    ids = model.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    plain = model.generate(ids, max_new_tokens=30)[0].tolist()
    assert len(set(plain)) < len(plain), "without a penalty this model repeats itself"
    penalized = model.generate(ids, max_new_tokens=30, repetition_penalty=1e6)[0].tolist()
    assert len(set(penalized)) == len(penalized)


def test_stop_string_cuts_the_text(model):
    full = model.generate(PROMPT, max_new_tokens=24)
    stop = full[10:13]
    assert len(full) > 13 and stop
    cut = full[: full.find(stop)]
    assert model.generate(PROMPT, max_new_tokens=24, stop=stop) == cut
    assert model.generate(PROMPT, max_new_tokens=24, stop=["\x00never", stop]) == cut
    assert "".join(model.generate(PROMPT, max_new_tokens=24, stop=stop, stream=True)) == cut
    ids = model.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=24, stop=stop)
    assert out.shape[1] < ids.shape[1] + 24, "tensor output stops after the token that completes the stop string"


def test_stream_yields_the_same_text_in_pieces(model):
    full = model.generate(PROMPT, max_new_tokens=20)
    pieces = list(model.generate(PROMPT, max_new_tokens=20, stream=True))
    assert len(pieces) > 1 and all(isinstance(p, str) for p in pieces)
    assert "".join(pieces) == full
    stats = model.last_generation_stats
    assert stats.new_tokens == 20 and stats.prompt_tokens == len(model.tokenizer(PROMPT)["input_ids"])
    assert stats.decode_tokens_per_s > 0 and stats.prompt_tokens_per_s > 0


def test_text_stream_holds_back_what_a_stop_string_or_eos_may_change():
    pieces = {1: "ab", 2: "<", 3: "/s", 4: ">", 5: "c", 6: "\ufffd", 0: ""}
    decode = lambda ids: "".join(pieces[i] for i in ids)  # noqa: E731
    text = TextStream(decode, eos={0}, stops=["</s>"])
    assert [text.push(t) for t in (1, 2, 3, 5)] == ["ab", "", "", "</sc"]  # "<", "</s": prefixes of the stop string
    assert text.finish_reason is None and text.flush() == ""
    text = TextStream(decode, eos={0}, stops=["</s>"])
    assert [text.push(t) for t in (1, 2, 3, 4)] == ["ab", "", "", ""] and text.finish_reason == "stop"
    assert text.flush() == ""
    text = TextStream(decode, eos={0}, stops=[])
    assert [text.push(t) for t in (1, 6)] == ["ab", ""]  # a partial UTF-8 character waits for the next token
    assert text.push(0) == "\ufffd" and text.finish_reason == "stop"  # eos: the rest, as generate() returns it
    text = TextStream(decode, eos={0}, stops=["</s>"])
    assert [text.push(t) for t in (5, 2)] == ["c", ""] and text.flush() == "<"  # out of tokens: the rest


def test_left_pad_row_text_and_find_stop():
    ids, mask = left_pad([[5, 6, 7], [8]], pad=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = left_pad([[1, 2], [3, 4]], pad=0)
    assert ids.dtype == torch.int64 and mask is None  # no row padded: no mask, as generate() passes none
    assert find_stop("a</s>b\n\n", ["\n\n", "</s>"]) == 1 and find_stop("abc", ["x"]) == -1
    pieces = {1: "ab", 2: "</s>", 3: "c", 0: ""}
    decode = lambda ids: "".join(pieces[i] for i in ids)  # noqa: E731
    assert row_text(decode, [1, 3, 0, 3], eos={0}, stops=[]) == "abc"  # up to the first eos
    assert row_text(decode, [1, 2, 3], eos={0}, stops=["</s>"]) == "ab"  # before the first stop string


def test_helpers_keep_their_old_names():
    from phixtral import text
    from phixtral.cli import cmd_generate
    from phixtral.commands.generate import run

    gen = importlib.import_module("phixtral.generate")
    assert (gen._pad_id, gen._find_stop, gen.TextStream) == (text.pad_id, text.find_stop, text.TextStream)
    assert cmd_generate is run


def test_generation_ends_at_eos():
    model = phixtral.from_pretrained(msft_moe_checkpoint(), backend="torch")
    eos = model.tokenizer.eos_token_id
    ids = model.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    first = model.generate(ids, max_new_tokens=1)[0, -1].item()
    with torch.no_grad():
        model.lm_head.linear.bias[eos] = model.lm_head.linear.bias[first] + 1e3  # eos always wins
    out = model.generate(ids, max_new_tokens=10)
    assert out.shape == (1, ids.shape[1] + 1) and out[0, -1].item() == eos
    assert model.generate(PROMPT, max_new_tokens=10) == ""
    assert list(model.generate(PROMPT, max_new_tokens=10, stream=True)) == []


def test_rows_that_end_early_are_padded(model):
    """A batch where one row hits eos: as transformers, the row keeps its eos and is padded with the pad (= eos) id."""
    texts = ["def f7(x", "seven wizards"]
    rows = model.tokenizer(texts)["input_ids"]
    n = min(map(len, rows))
    batch = torch.tensor([r[:n] for r in rows])
    greedy = model.generate(batch, max_new_tokens=6)[:, n:].tolist()
    text_greedy = [model.generate(t, max_new_tokens=6) for t in texts]
    eos = model.tokenizer.eos_token_id
    stopper = greedy[0][2]
    assert stopper not in greedy[1], "pick prompts where only row 0 meets the extra eos id"
    model.eos_token_ids = [eos, stopper]  # row 0 ends at its third new token
    try:
        out = model.generate(batch, max_new_tokens=6)
        text_ids = model.tokenizer(texts[0])["input_ids"]
        first_text = model.generate(torch.tensor([text_ids]), max_new_tokens=6)[0, len(text_ids) :].tolist()
        texts_out = model.generate(texts, max_new_tokens=6)
    finally:
        model.eos_token_ids = [eos]
    assert out[0, n:].tolist() == greedy[0][:3] + [eos] * 3
    assert out[1, n:].tolist() == greedy[1]
    assert texts_out[1] == text_greedy[1]
    ended = first_text[-1] in (eos, stopper)  # the text result leaves out the eos token
    assert texts_out[0] == model.tokenizer.decode(first_text[:-1] if ended else first_text)


def test_tensor_prompt_returns_prompt_and_new_ids(model):
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    out = model.generate(ids, max_new_tokens=5)
    assert out.shape == (2, 9) and out.dtype == torch.int64 and torch.equal(out[:, :4], ids)


def test_chat_uses_the_tokenizer_template(model):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "def f1(x"}]
    text = model.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert model.chat(messages, max_new_tokens=8) == model.generate(text, max_new_tokens=8)
    with pytest.raises(ValueError, match="each message must be a dict"):
        model.chat([{"role": "user"}])
    with pytest.raises(ValueError, match="non-empty list"):
        model.chat([])


def test_chat_without_template_is_an_error():
    model = phixtral.from_pretrained(msft_moe_checkpoint(), backend="torch")
    model.tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        model.chat([{"role": "user", "content": "hi"}])


# --- bad arguments ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(max_new_tokens=0), ValueError, "max_new_tokens must be >= 1"),
        (dict(max_new_tokens=2.5), TypeError, "max_new_tokens must be an int"),
        (dict(temperature=-0.1), ValueError, "temperature must be >= 0"),
        (dict(temperature=float("nan")), ValueError, "temperature must be finite"),
        (dict(temperature="hot"), TypeError, "temperature must be a number"),
        (dict(top_k=-1), ValueError, "top_k must be >= 0"),
        (dict(top_k=2.0), TypeError, "top_k must be an int"),
        (dict(top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
        (dict(repetition_penalty=0.0), ValueError, "repetition_penalty must be > 0"),
        (dict(stop=""), ValueError, "stop strings must not be empty"),
        (dict(stop=[1]), TypeError, "stop must be a string"),
        (dict(seed="1"), TypeError, "seed must be an int"),
        (dict(stream="yes"), TypeError, "stream must be a bool"),
    ],
)
def test_invalid_sampling_values(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        model.generate(PROMPT, **kwargs)


@pytest.mark.parametrize(
    "prompt, kwargs, error, match",
    [
        ("", {}, ValueError, "empty prompt"),
        (["ok", ""], {}, ValueError, r"empty prompt \(index 1\)"),
        ([], {}, ValueError, "empty list of prompts"),
        (["ok", 3], {}, TypeError, "only strings"),
        (3.5, {}, TypeError, "prompt must be a str"),
        (torch.zeros(1, 3), {}, ValueError, "int64 token ids"),
        (torch.zeros(1, 0, dtype=torch.long), {}, ValueError, "int64 token ids"),
        (torch.tensor([[1, 600]]), {}, ValueError, r"lie in \[0, vocab_size=512\)"),
        (torch.tensor([[1, 2]]), dict(attention_mask=torch.tensor([[1, 0]])), ValueError, "left-padded"),
        (
            torch.tensor([[1, 2]]),
            dict(attention_mask=torch.tensor([[1]])),
            ValueError,
            "attention_mask must be a tensor",
        ),
        ("hi", dict(attention_mask=torch.tensor([[1]])), ValueError, "only for tensor prompts"),
        (["a", "b"], dict(stream=True, max_new_tokens=4), ValueError, "single string prompt"),
        ("hello " * 60, dict(max_new_tokens=100), ValueError, r"exceeds the model's n_positions \(128\)"),
    ],
)
def test_invalid_prompts(model, prompt, kwargs, error, match):
    with pytest.raises(error, match=match):
        model.generate(prompt, **kwargs)


def test_text_prompt_without_tokenizer_is_an_error():
    model = phixtral.from_pretrained(msft_moe_checkpoint(), backend="torch")
    model.tokenizer = None
    with pytest.raises(ValueError, match="ships no tokenizer"):
        model.generate("hi")
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2).shape == (1, 5)


def test_queued_next_step_gives_the_same_tokens(model, monkeypatch):
    """On CUDA the next decode step is queued before the host reads the current token: same tokens, same stats."""
    prompts = ["def f(x):", "import os"]
    greedy = model.generate(prompts, max_new_tokens=10)
    sampled = model.generate(prompts[0], max_new_tokens=10, temperature=0.8, seed=3)
    monkeypatch.setattr(importlib.import_module("phixtral.generate"), "LOOKAHEAD_DEVICE_TYPES", ("cpu",))
    assert model.generate(prompts, max_new_tokens=10) == greedy
    assert model.generate(prompts[0], max_new_tokens=10, temperature=0.8, seed=3) == sampled
    assert "".join(model.generate(prompts[0], max_new_tokens=10, temperature=0.8, seed=3, stream=True)) == sampled
    assert model.last_generation_stats.new_tokens == 10
