"""Sampling and generation: prefill the prompt into the static KV cache, then decode one token per step.

The only host sync per step is reading the new tokens, which eos / stop strings / streaming need. On CUDA that read is
a non-blocking copy issued before the next step is queued, so the GPU computes step i + 1 while the host looks at
token i. Sampling draws with exponential noise (argmax(p / q), q ~ Exp(1)) instead of torch.multinomial, which syncs.
On CUDA with the Triton MoE kernels, each decode step's forward is replayed from a CUDA graph (decode_graph.py).
"""

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from . import decode_graph
from .generation_lock import LockedStream, generation_lock
from .model import Phixtral
from .runtime import check_compile
from .text import TextStream, decode_text, find_stop, left_pad, pad_id, row_text

# The KV cache length is rounded up to this, so that prompts of similar length reuse one allocation.
_CACHE_ROUND = 64
# Devices whose next decode step is queued before the host reads the current token (asynchronous devices).
LOOKAHEAD_DEVICE_TYPES = ("cuda",)


@dataclass
class GenerationStats:
    """Counts and wall times of the last generate(): prefill up to the first token on the host, decode after it."""

    batch_size: int
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    cuda_graph: bool = False  # decode steps were replayed from a CUDA graph
    compiled: bool = False  # decode steps ran compiled by torch.compile (phixtral/compiled_decode.py)
    compile_s: float = 0.0  # of decode_s: the first compiled step, compile (or cache lookup) included

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.batch_size * self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        # The first new token comes out of prefill; decode steps produce the others.
        steps = self.new_tokens - 1
        return self.batch_size * steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")

    def __str__(self) -> str:
        return (
            f"batch {self.batch_size}: prompt {self.prompt_tokens} tokens in {self.prefill_s:.3f} s "
            f"({self.prompt_tokens_per_s:.1f} tokens/s); decode {self.new_tokens} tokens in {self.decode_s:.3f} s "
            f"({self.decode_tokens_per_s:.1f} tokens/s{', CUDA graph' if self.cuda_graph else ''}"
            f"{f', compiled in {self.compile_s:.1f} s' if self.compiled else ''})"
        )


class NonFiniteLogitsError(RuntimeError):
    """The model produced NaN or inf logits: its weights or its arithmetic (e.g. fp16 overflow) are broken."""


# --- sampling --------------------------------------------------------------------------------------------------------
def check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty) -> None:
    """Raise a ValueError / TypeError naming the first invalid sampling argument."""

    def number(name, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{name} must be finite, got {value!r}")

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise TypeError(f"max_new_tokens must be an int, got {type(max_new_tokens).__name__}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    number("temperature", temperature)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int):
            raise TypeError(f"top_k must be an int or None, got {type(top_k).__name__}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 or None = off), got {top_k}")
    if top_p is not None:
        number("top_p", top_p)
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    number("repetition_penalty", repetition_penalty)
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {repetition_penalty}")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' rule: logits [B, V] of tokens already seen ([B, V] bool) are divided by penalty if > 0, else
    multiplied by it."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def filter_logits(logits: torch.Tensor, top_k: Optional[int], top_p: Optional[float]) -> torch.Tensor:
    """Set to -inf the logits [B, V] outside the top_k and the top_p nucleus (transformers' warpers, same order)."""
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= 1 - top_p
        drop[..., -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, temperature: float, top_k=None, top_p=None, generator=None) -> torch.Tensor:
    """logits [B, V] fp32 -> token ids [B] int64: argmax at temperature 0, else a draw from the filtered softmax."""
    if temperature < torch.finfo(torch.float32).tiny:  # 0, or so small that fp32 would hold it as 0
        return logits.argmax(-1)
    # Shift the maximum to 0 before dividing: a tiny temperature then sends the others to -inf, never inf - inf = NaN.
    logits = logits - logits.amax(-1, keepdim=True)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(-1)  # a draw from probs, without a host sync


# --- the loop --------------------------------------------------------------------------------------------------------
def _host_reader(tok: torch.Tensor):
    """Start copying tok to the host; return a function that waits for that copy only and gives the list."""
    if tok.device.type != "cuda":
        return tok.tolist
    buf = torch.empty(tok.shape, dtype=tok.dtype, pin_memory=True)
    buf.copy_(tok, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return lambda: (done.synchronize(), buf.tolist())[1]


@torch.inference_mode()
def generate_tokens(
    model: Phixtral,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    repetition_penalty: float = 1.0,
    generator: Optional[torch.Generator] = None,
    sampler: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    stats: Optional[dict] = None,
    cuda_graph=None,
    compile=None,
) -> Iterator[list[int]]:
    """Yield each step's new token of every row as a host list [B]; stop early by closing the iterator.

    input_ids [B, S] on the model's device, left-padded where attention_mask [B, S] (1 real, 0 pad) says so.
    sampler, when given, replaces `sample` (and temperature, top_k, top_p, generator): logits [B, V] fp32 -> token ids
    [B] int64, called once per step in step order; a server uses it to sample each row with its own settings.
    stats, when given, receives prefill_s and decode_s (time spent in here, not in the consumer), cuda_graph = True
    when the decode steps were replayed from a CUDA graph, compiled = True and compile_s when they ran compiled.
    cuda_graph: "auto", True, False, or None for model.cuda_graph (see phixtral.decode_graph): the forward of each
    decode step replayed from a CUDA graph. Sampling runs eagerly either way, so the tokens are the same.
    compile: "auto", True, False, or None for model.compile_decode (see phixtral.compiled_decode): each decode step's
    forward compiled by torch.compile.
    """
    B, S = input_ids.shape
    device = input_ids.device
    length = min(-(-(S + max_new_tokens) // _CACHE_ROUND) * _CACHE_ROUND, model.config.n_positions)
    model.setup_caches(B, length)
    valid = None  # [B, L] key slots that hold real tokens; None = all of them
    if attention_mask is not None:
        valid = torch.ones(B, model.cache_length, dtype=torch.bool, device=device)
        valid[:, :S] = attention_mask.bool()
    seen = None  # [B, V] tokens in the prompt or generated so far, for the repetition penalty
    if repetition_penalty != 1.0:
        V = model.config.vocab_size
        seen = torch.zeros(B, V + 1, dtype=torch.bool, device=device)
        ids = input_ids if attention_mask is None else input_ids.masked_fill(~attention_mask.bool(), V)
        seen = seen.scatter_(1, ids, True)[:, :V]

    decode = decode_graph.decode_step(
        model, valid, cuda_graph=cuda_graph, compile=compile, steps=max_new_tokens - 1, stats=stats
    )

    def next_token(logits):
        """logits [B, V] fp32 -> (tok [B], tok with -1 on rows whose logits are not all finite: what the host reads)."""
        finite = torch.isfinite(logits).all(-1)  # [B], read with the token: no extra sync
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        tok = sample(logits, temperature, top_k, top_p, generator) if sampler is None else sampler(logits)  # [B]
        if seen is not None:
            seen.scatter_(1, tok[:, None], True)
        return tok, torch.where(finite, tok, -1)

    clock = time.perf_counter()
    input_pos = torch.arange(S, device=device)
    hidden = model.hidden_states(input_ids, valid, input_pos)  # prefill
    tok, checked = next_token(model.lm_head(hidden[:, -1]).float())  # only the last position is needed
    del hidden
    input_pos = input_pos[-1:] + 1
    lookahead = device.type in LOOKAHEAD_DEVICE_TYPES
    for step in range(max_new_tokens):
        read = _host_reader(checked)
        if lookahead and step + 1 < max_new_tokens:  # queue step + 1 before waiting for this token
            tok, checked = next_token(decode(tok, input_pos))
            input_pos = input_pos + 1
        host = read()
        if min(host) < 0:
            raise NonFiniteLogitsError(
                f"non-finite logits (NaN or inf) at generation step {step} in row {host.index(min(host))}: "
                f"{locate_nonfinite(model, input_ids, attention_mask)}"
            )
        if stats is not None:
            stats["prefill_s" if step == 0 else "decode_s"] += time.perf_counter() - clock
        yield host
        clock = time.perf_counter()
        if not lookahead and step + 1 < max_new_tokens:
            tok, checked = next_token(decode(tok, input_pos))
            input_pos = input_pos + 1


@torch.inference_mode()
def locate_nonfinite(model: Phixtral, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> str:
    """Name the first module whose output holds a NaN or inf in a forward over input_ids [B, S] (no cache).

    A diagnosis for an error message: one forward with a hook (and a host read) per module, so never on a hot path.
    """
    found = []

    def check(name):
        def hook(module, args, out):
            if not found and isinstance(out, torch.Tensor) and out.is_floating_point() and not out.isfinite().all():
                found.append(name)

        return hook

    handles = [m.register_forward_hook(check(name)) for name, m in model.named_modules() if name]
    try:
        model(input_ids, attention_mask)
    finally:
        for h in handles:
            h.remove()
    if found:
        return f"the first non-finite value is in the output of {found[0]} (on the prompt's forward)"
    return "the prompt's forward is finite: the overflow happened on a generated token"


# --- text in, text out -----------------------------------------------------------------------------------------------
def generate(
    model: Phixtral,
    prompt,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    repetition_penalty: float = 1.0,
    stop=None,
    seed: Optional[int] = None,
    stream: bool = False,
    attention_mask: Optional[torch.Tensor] = None,
    cuda_graph=None,
    compile=None,
):
    """Generate from a prompt.

    prompt: str -> str (the new text); list[str] -> list[str] (batched, left-padded); LongTensor [B, S] (optionally
    left-padded with attention_mask) -> LongTensor [B, S + n], prompt and new ids, rows that ended early padded with
    the pad (else eos) id, as transformers does.
    temperature 0 is greedy; top_k / top_p filter before sampling; repetition_penalty as transformers (1 = off).
    Generation of a row ends at an eos id (tokenizer + config) or a stop string; text results exclude both.
    seed makes sampling reproducible. stream=True (one prompt) returns an iterator of text pieces instead.
    The KV cache belongs to the model, so generations on one model run one at a time: a call from another thread waits
    for the running one (a stream holds the model until it is exhausted or closed); a second generation started by the
    thread that holds an open stream raises a RuntimeError. A stream's close() may come from another thread: see
    `phixtral.generation_lock.LockedStream`. Non-finite logits raise NonFiniteLogitsError.
    cuda_graph: "auto", True or False; None takes model.cuda_graph ("auto" unless set). On CUDA with the Triton MoE
    kernels, "auto" replays each decode step's forward from a CUDA graph (phixtral/decode_graph.py: same tokens, much
    less host time per step); True insists (an error says why it cannot); False decodes eagerly.
    compile: "auto", True or False; None takes model.compile_decode ("auto" unless set). On the CPU, "auto" runs
    generations of COMPILE_MIN_STEPS new tokens or more through a decode step compiled by torch.compile
    (phixtral/compiled_decode.py; last_generation_stats.compile_s says what compiling cost); PHIXTRAL_COMPILE=0 turns
    "auto" off.
    """
    # 1. Check every argument before the model is touched.
    stops = _check_arguments(
        max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, seed, stream, cuda_graph, compile
    )
    # 2. Encode: token ids [B, S] on the model's device, left-padded where mask says so.
    kind, ids, mask = _encode(model, prompt, attention_mask)
    _check_fits(model, kind, ids, max_new_tokens, stream, stops)
    B, S = ids.shape
    eos = set(model.eos_token_ids)
    timing = {"prefill_s": 0.0, "decode_s": 0.0, "cuda_graph": False, "compiled": False, "compile_s": 0.0}

    def record(new_tokens):
        model.last_generation_stats = GenerationStats(B, S, new_tokens, **timing)

    # 3. The token loop, holding the model until it ends.
    generator = _sampling_generator(model, seed)
    lock = generation_lock(model)
    lock.acquire()
    steps = generate_tokens(
        model, ids, mask, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, generator=generator, stats=timing, cuda_graph=cuda_graph,
        compile=compile,
    )  # fmt: skip
    if stream:
        return LockedStream(_stream(model, steps, eos, stops, record), lock)
    rows, n = _run_rows(model, steps, B, eos, stops, record, lock)
    # 4. Detokenize: ids back in the prompt's kind.
    if kind == "tensor":
        pad = pad_id(model)
        new = torch.tensor([r + [pad] * (n - len(r)) for r in rows], dtype=torch.int64, device=ids.device)
        return torch.cat([prompt.to(ids.device, torch.int64), new], dim=1)
    texts = [row_text(lambda r: decode_text(model.tokenizer, r), r, eos, stops) for r in rows]
    return texts[0] if kind == "str" else texts


def _check_arguments(
    max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, seed, stream, cuda_graph, compile
):
    """generate()'s checks that need no model, in its argument order; returns the stop strings as a list."""
    check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    stops = _check_stop(stop)
    if not isinstance(stream, bool):
        raise TypeError(f"stream must be a bool, got {type(stream).__name__}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if seed is not None and not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    if cuda_graph is not None:
        decode_graph.check_mode(cuda_graph)
    if compile is not None:
        check_compile(compile)
    return stops


def _check_stop(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        raise TypeError(f"stop must be a string or a list of strings, got {stop!r}")
    if any(s == "" for s in stops):
        raise ValueError("stop strings must not be empty")
    return list(stops)


def _check_fits(model: Phixtral, kind: str, ids: torch.Tensor, max_new_tokens: int, stream: bool, stops) -> None:
    """generate()'s checks that need the encoded prompt."""
    S = ids.shape[1]
    if S + max_new_tokens > model.config.n_positions:
        raise ValueError(
            f"prompt ({S} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's n_positions "
            f"({model.config.n_positions})"
        )
    if stream and (kind != "str"):
        raise ValueError("stream=True takes a single string prompt")
    if stops and model.tokenizer is None:
        raise ValueError("stop strings need a tokenizer, and this checkpoint ships none")


def _encode(model: Phixtral, prompt, attention_mask):
    """-> (kind "str" | "list" | "tensor", input_ids [B, S], attention_mask [B, S] or None), on the model's device."""
    V = model.config.vocab_size
    if isinstance(prompt, torch.Tensor):
        if prompt.dtype not in (torch.int64, torch.int32) or prompt.dim() != 2 or 0 in prompt.shape:
            raise ValueError(
                "a tensor prompt must be int64 token ids [B, S] with B, S >= 1, "
                f"got {prompt.dtype} {tuple(prompt.shape)}"
            )
        ids = prompt.to(model.device, torch.int64)
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(ids.shape):
                raise ValueError(f"attention_mask must be a tensor of shape {tuple(ids.shape)}")
            mask = attention_mask.to(model.device, torch.int64)
            if not ((mask == 0) | (mask == 1)).all():
                raise ValueError("attention_mask must hold only 0 and 1")
            if not mask[:, -1].all() or not (mask[:, 1:] >= mask[:, :-1]).all():
                raise ValueError("attention_mask must be left-padded (zeros, then ones, ending on a real token)")
            attention_mask = None if mask.all() else mask
        lo, hi = ids.aminmax()
        if lo < 0 or hi >= V:
            raise ValueError(f"token ids must lie in [0, vocab_size={V}), got values in [{int(lo)}, {int(hi)}]")
        return "tensor", ids, attention_mask
    if attention_mask is not None:
        raise ValueError("attention_mask is only for tensor prompts; text prompts are padded here")
    if isinstance(prompt, str):
        kind, prompts = "str", [prompt]
    elif isinstance(prompt, (list, tuple)):
        if not prompt:
            raise ValueError("empty list of prompts")
        if not all(isinstance(p, str) for p in prompt):
            raise TypeError("a list prompt must hold only strings")
        kind, prompts = "list", list(prompt)
    else:
        raise TypeError(f"prompt must be a str, a list of str or a LongTensor [B, S], got {type(prompt).__name__}")
    if model.tokenizer is None:
        raise ValueError("this checkpoint ships no tokenizer: pass token ids as a LongTensor [B, S]")
    rows = [model.tokenizer(p, verbose=False)["input_ids"] for p in prompts]  # the length check names the limit
    empty = [i for i, (p, r) in enumerate(zip(prompts, rows)) if not p or not r]
    if empty:
        raise ValueError(f"empty prompt (index {empty[0]}): give at least one token of text")
    ids, mask = left_pad(rows, pad_id(model), model.device)
    return kind, ids, mask


def _sampling_generator(model: Phixtral, seed: Optional[int]) -> torch.Generator:
    generator = torch.Generator(device=model.device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def _run_rows(model, steps, B: int, eos, stops, record, lock) -> tuple[list[list[int]], int]:
    """Run the token loop until every row has ended; -> (each row's tokens, its eos or stop-completing token included;
    the steps run). Records the stats and frees the model however the loop ends."""
    rows, done, n = [[] for _ in range(B)], [False] * B, 0
    try:
        for step in steps:
            n += 1
            for b, t in enumerate(step):
                if done[b]:
                    continue
                rows[b].append(t)
                done[b] = t in eos or (bool(stops) and find_stop(decode_text(model.tokenizer, rows[b]), stops) >= 0)
            if all(done):
                break
    finally:
        steps.close()
        record(n)
        lock.release()
    return rows, n


def _stream(model, steps, eos, stops, record) -> Iterator[str]:
    """Yield the new text of the first row piece by piece (see TextStream)."""
    text, n = TextStream(lambda ids: decode_text(model.tokenizer, ids), eos, stops), 0
    try:
        for step in steps:
            n += 1
            piece = text.push(step[0])
            if piece:
                yield piece
            if text.finish_reason is not None:
                return
        piece = text.flush()
        if piece:
            yield piece
    finally:
        steps.close()
        record(n)


def chat(model: Phixtral, messages, **kwargs):
    """Apply the tokenizer's chat template to messages ([{"role": ..., "content": ...}, ...]) and generate the reply.

    kwargs as `generate`; returns the reply text (or an iterator of pieces with stream=True).
    """
    tok = model.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise ValueError("this checkpoint's tokenizer has no chat template: use generate() with a plain prompt")
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"each message must be a dict with string 'role' and 'content', got {m!r}")
    text = tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return generate(model, text, **kwargs)


# Names these helpers had here before phixtral.text and phixtral.generation_lock held them.
_pad_id, _find_stop = pad_id, find_stop
__all__ = [
    "GenerationStats", "NonFiniteLogitsError", "TextStream", "apply_repetition_penalty", "chat", "check_sampling",
    "filter_logits", "generate", "generate_tokens", "generation_lock", "locate_nonfinite", "sample",
]  # fmt: skip
