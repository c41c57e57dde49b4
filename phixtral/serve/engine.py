"""The engine: one thread owns the model and generates for the requests that the HTTP handlers submit.

Two schedulers (--batching), both first come first served:
    continuous (continuous.py, the default): the KV cache has one row per running request, each at its own position.
        At every decode step, finished rows leave and waiting requests join: a newcomer's prompt is prefilled in
        chunks between the decode steps of the running rows, so their streams keep flowing, and it joins their decode
        step as soon as its first token is out.
    static (static.py, the former engine): left-padded batches; a request that arrives while a batch runs waits for the
        whole batch to end. Kept for comparison (benchmarks/bench_serve.py).
Each row samples with its own settings and its own generator, so a request's tokens do not depend on the others in its
batch: greedy rows equal `model.generate(prompt)` and a seeded row draws as `model.generate(prompt, seed=...)`.
"""

import copy
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..model import Phixtral
from ..text import decode_text
from .continuous import run_continuous
from .metrics import Metrics
from .rows import Row
from .sampling import BatchSampler, TokenLogprob
from .static import run_static

_RowSampler = BatchSampler  # its name here before sampling.py held it

log = logging.getLogger("phixtral.serve")
BATCHING = ("continuous", "static")


class ContextLengthError(ValueError):
    """prompt + max_tokens does not fit the model's context (n_positions)."""


class EngineStopped(RuntimeError):
    """The engine is shutting down and takes no more requests."""


@dataclass
class SamplingParams:
    """Per-request settings (OpenAI's names): max_tokens >= 1, temperature 0 = greedy, top_p in (0, 1], top_k 0 = off;
    logprobs: report each token's log-probability, top_logprobs: and that many alternatives."""

    max_tokens: int
    temperature: float = 0.0
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0


# Events a request's `emit` receives, in order: any number of Piece, then one Done or one Failed.
@dataclass
class Piece:
    text: str
    logprobs: Optional[list[TokenLogprob]] = None  # the tokens since the previous piece, when the request asked


@dataclass
class Done:
    finish_reason: str  # "stop" (eos or a stop string) | "length" (max_tokens) | "cancelled" (client gone, shutdown)
    logprobs: Optional[list[TokenLogprob]] = None  # tokens not yet reported in a piece


@dataclass
class Failed:
    error: BaseException


class Request:
    """One generation: prompt ids in, events out through `emit` (called on the engine thread, must not block)."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, emit: Callable[[object], None]):
        self.prompt_ids, self.params, self.emit = list(prompt_ids), params, emit
        self.cancelled = False  # set by cancel() from any thread; read by the engine between steps
        self.completion_tokens = 0  # tokens generated for this row, the eos or stop-completing token included
        self.finish_reason: Optional[str] = None
        self.batch_size = 0  # most rows decoded together while it ran
        self.submitted = time.perf_counter()
        self.started: Optional[float] = None  # its prefill began
        self.first_token: Optional[float] = None
        self.last_token: Optional[float] = None
        self.finished: Optional[float] = None

    def cancel(self) -> None:
        """Stop generating for this request (the client went away); the engine frees its row at the next step."""
        self.cancelled = True


class Engine:
    """Owns `model` on one thread; `submit` requests from any thread. Start with start(), end with stop().

    batching: "continuous" or "static" (see the module docstring); max_batch_size: rows decoded together at most;
    prefill_chunk: prompt tokens prefilled between two decode steps at most (continuous batching).
    """

    def __init__(self, model: Phixtral, *, max_batch_size: int = 8, batching: str = "continuous",
                 prefill_chunk: int = 256):  # fmt: skip
        for name, value in (("max_batch_size", max_batch_size), ("prefill_chunk", prefill_chunk)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}, got {batching!r}")
        if model.tokenizer is None:
            raise ValueError("the server needs a checkpoint with a tokenizer")
        self.model, self.max_batch_size, self.batching = model, max_batch_size, batching
        self.prefill_chunk = prefill_chunk
        self.n_positions = model.config.n_positions
        self.eos = set(model.eos_token_ids)
        # Encoding runs on worker threads while the engine decodes; a fast tokenizer used from two threads at once
        # can fail ("Already borrowed"), so the encoders share a copy of their own and the engine keeps the original.
        self.encoder = copy.deepcopy(model.tokenizer)
        self.encoder_lock = threading.Lock()
        self.tokenizer_lock = threading.Lock()  # the engine's tokenizer, for the chat template and detokenizing
        self.max_token_chars = _max_token_chars(model.tokenizer)
        self.metrics = Metrics()
        self._waiting: deque[Request] = deque()
        self._cond = threading.Condition()
        self._closed = False  # no new requests, no new batches
        self._stopping = False  # also end the running rows at their next step
        self._hold = 0  # admit nothing until this many requests wait (see hold())
        self._thread: Optional[threading.Thread] = None
        # Counters for /health, /metrics and the tests.
        self.running = 0  # rows generating now
        self.batches = 0  # static batches run, or decode steps (continuous)
        self.largest_batch = 0  # most rows in one decode step
        self.completed = 0
        self.cancelled = 0

    # --- any thread --------------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (blocking: call it off the event loop)."""
        with self.encoder_lock:
            return self.encoder(text, verbose=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        with self.tokenizer_lock:
            return decode_text(self.model.tokenizer, ids)

    def surely_too_long(self, text: str, max_tokens: int) -> bool:
        """True when `text` cannot fit the context whatever its tokens (no token spans more than max_token_chars
        characters): a cheap check before tokenizing a huge prompt. Always False where that bound is unknown."""
        if self.max_token_chars is None:
            return False
        return len(text) > (self.n_positions - max_tokens) * self.max_token_chars

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """ContextLengthError unless prompt + max_tokens fit the context (OpenAI's message)."""
        if prompt_tokens + max_tokens > self.n_positions:
            raise ContextLengthError(
                f"This model's maximum context length is {self.n_positions} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} in the completion). "
                "Please reduce the length of the prompt or completion."
            )

    def submit(self, request: Request) -> None:
        """Queue a request (ContextLengthError if it can never run, EngineStopped after stop())."""
        if not request.prompt_ids:
            raise ValueError("empty prompt")
        self.check_fits(len(request.prompt_ids), request.params.max_tokens)
        with self._cond:
            if self._closed:
                raise EngineStopped("the server is shutting down")
            self._waiting.append(request)
            self.metrics.queued(len(request.prompt_ids))
            self._cond.notify()

    def hold(self, count: int) -> None:
        """Admit no request until `count` wait (or the engine closes), then release the hold: a way to fill a batch
        by count, never by time (the tests use it). 0 releases it now."""
        with self._cond:
            self._hold = count
            self._cond.notify()

    @property
    def waiting(self) -> int:
        """Requests queued whose clients are still there."""
        return sum(not r.cancelled for r in list(self._waiting))

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closed

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="phixtral-engine", daemon=True)
            self._thread.start()

    def shutdown(self, grace: float) -> None:
        """Begin a graceful stop: refuse new requests, fail the waiting ones with EngineStopped, let the running rows
        go on for up to `grace` seconds, then stop() (their unfinished requests end "cancelled"). Returns at once."""
        self._close()
        timer = threading.Timer(grace, self.stop)
        timer.daemon = True
        timer.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new requests, fail the waiting ones with EngineStopped, end the running rows at their next step (their
        requests end "cancelled"), and join the engine thread."""
        self._close()
        self._stopping = True
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _close(self) -> None:
        with self._cond:
            self._closed = True
            waiting, self._waiting = list(self._waiting), deque()
            self._cond.notify_all()
        for r in waiting:
            r.finished = time.perf_counter()
            emit(r, Failed(EngineStopped("the server is shutting down")))

    # --- the engine thread -------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        (run_continuous if self.batching == "continuous" else run_static)(self)

    def take(self, limit: int, *, block: bool, fits=None) -> Optional[list[Request]]:
        """Up to `limit` waiting requests in arrival order (cancelled ones are answered and dropped). block: wait for
        one first; None once the engine is closed. fits(requests so far, next) -> False stops at `next` (it and the
        ones behind it wait: none overtakes an older one)."""
        with self._cond:
            while True:
                while self._waiting and self._waiting[0].cancelled:
                    self.drop(self._waiting.popleft())
                if self._closed:
                    return None
                held = self._hold and len(self._waiting) < self._hold
                if (self._waiting and not held) or not block:
                    break
                self._cond.wait()
            if held:
                return []
            self._hold = 0
            out = []
            while self._waiting and len(out) < limit:
                r = self._waiting[0]
                if r.cancelled:
                    self.drop(self._waiting.popleft())
                    continue
                if fits is not None and out and not fits(out, r):
                    break
                out.append(self._waiting.popleft())
            return out

    @property
    def stopping(self) -> bool:
        return self._stopping

    def drop(self, r: Request) -> None:
        """Answer a request that never ran and whose client left."""
        r.finished = time.perf_counter()
        r.finish_reason = "cancelled"
        self.cancelled += 1
        self.metrics.finished(r)
        emit(r, Done("cancelled"))

    def accept(self, row: Row, token: int, logprob: Optional[TokenLogprob]) -> None:
        """Give `row` its next token: emit the text that can be shown, and finish the row on eos, a stop string or
        max_tokens."""
        r, text, now = row.request, row.text, time.perf_counter()
        r.completion_tokens += 1
        if r.first_token is None:
            r.first_token = now
            self.metrics.first_token(now - r.submitted)
        else:
            self.metrics.inter_token(now - r.last_token)
        r.last_token = now
        self.metrics.tokens(1)
        piece = text.push(token)
        if row.logprobs is not None and token not in self.eos:
            row.logprobs.append(logprob)
        if text.finish_reason is None and r.completion_tokens == r.params.max_tokens:
            piece += text.flush()
            text.finish_reason = "length"
        if text.finish_reason is not None:
            if piece:
                emit(r, Piece(piece, self._take_logprobs(row)))
            self.finish(row, text.finish_reason)
        elif piece:
            emit(r, Piece(piece, self._take_logprobs(row)))

    def _take_logprobs(self, row: Row) -> Optional[list[TokenLogprob]]:
        if row.logprobs is None:
            return None
        out, row.logprobs = row.logprobs, []
        return out

    def finish(self, row: Row, reason: str) -> None:
        """End a row: its request gets Done(reason) with the log-probabilities not yet sent."""
        r = row.request
        row.done = True
        r.finished = time.perf_counter()
        r.finish_reason = reason
        if reason == "cancelled":
            self.cancelled += 1
        else:
            self.completed += 1
        self.metrics.finished(r)
        emit(r, Done(reason, self._take_logprobs(row) if reason != "cancelled" else None))

    def fail(self, rows: list[Row], error: BaseException) -> None:
        for row in rows:
            if not row.done:
                row.done = True
                row.request.finished = time.perf_counter()
                self.metrics.finished(row.request)
                emit(row.request, Failed(error))


def _max_token_chars(tokenizer) -> Optional[int]:
    """The most characters of text one token can cover: its longest vocabulary entry, which spells each byte (byte-level
    BPE) or character of the text at least once. None when a normalizer may drop characters before tokenizing (then a
    token can cover more) or the vocabulary cannot be read."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.normalizer is not None:
        return None
    try:
        return max(map(len, tokenizer.get_vocab()), default=1)
    except (AttributeError, NotImplementedError):
        return None


def emit(r: Request, event) -> None:
    try:
        r.emit(event)
    except Exception:  # the receiver is gone (its event loop closed): nobody to tell, stop generating for it
        r.cancelled = True
