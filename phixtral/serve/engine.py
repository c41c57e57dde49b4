"""The batching engine: one thread owns the model and runs the requests that wait, a left-padded batch at a time.

Policy (static batches, first come first served):
    - A request is checked on submit (prompt + max_tokens must fit n_positions) and joins the waiting queue.
    - When the model is free, the engine takes the longest run of waiting requests, in arrival order, that fits one
      batch: at most max_batch_size rows, and longest prompt + largest max_tokens <= n_positions (the batch shares one
      KV cache of that length). The others wait for the next batch; none overtakes an older one.
    - The batch is prefilled together and decoded one token per step for all rows. Each row stops on its own (eos,
      stop string, max_tokens, or its client went away) and gets no more tokens; the batch ends when every row has
      stopped. A request that arrives meanwhile waits for the end of the running batch: it does not join mid-batch
      (that would need a KV cache row per request with its own positions, which the static cache does not have).
    - Limits: a short request that lands behind a long one waits up to the long one's whole decode; rows that stopped
      early still ride along in the batch's forward passes until the batch ends.
Each row samples with its own settings and its own generator, so a request's tokens do not depend on the others in
its batch: greedy rows equal `model.generate(prompt)` and a seeded row draws as `model.generate(prompt, seed=...)`.
"""

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..generate import generate_tokens, sample
from ..generation_lock import generation_lock
from ..model import Phixtral
from ..text import TextStream, decode_text, left_pad, pad_id

log = logging.getLogger("phixtral.serve")


class ContextLengthError(ValueError):
    """prompt + max_tokens does not fit the model's context (n_positions)."""


class EngineStopped(RuntimeError):
    """The engine is shutting down and takes no more requests."""


@dataclass
class SamplingParams:
    """Per-request settings (OpenAI's names): max_tokens >= 1, temperature 0 greedy, top_p in (0, 1], top_k 0 off."""

    max_tokens: int
    temperature: float = 0.0
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)


# Events a request's `emit` receives, in order: any number of Piece, then one Done or one Failed.
@dataclass
class Piece:
    text: str


@dataclass
class Done:
    finish_reason: str  # "stop" (eos or a stop string) | "length" (max_tokens) | "cancelled" (client gone, shutdown)


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
        self.batch_size = 0  # rows in the batch that ran it
        self.submitted = time.perf_counter()
        self.started: Optional[float] = None  # its batch began (prefill)
        self.finished: Optional[float] = None

    def cancel(self) -> None:
        """Stop generating for this request (the client went away); the engine frees its row at the next step."""
        self.cancelled = True


class _RowSampler:
    """Per-row sampling for generate_tokens: one argmax for the greedy rows, `sample` row by row for the others, each
    with the request's own generator (a [1, V] draw per step, as generate() makes for a single prompt)."""

    def __init__(self, batch: list[Request], device: torch.device):
        self.rows = []  # (row, params, generator) of the sampled rows
        for b, r in enumerate(batch):
            p = r.params
            if p.temperature > 0:
                g = torch.Generator(device=device)
                if p.seed is None:
                    g.seed()
                else:
                    g.manual_seed(p.seed)
                self.rows.append((b, p, g))
        self.live = [True] * len(batch)  # rows still generating, updated by the engine

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        # logits [B, V] fp32 -> token ids [B]
        tok = logits.argmax(-1)
        for b, p, g in self.rows:
            if self.live[b]:
                tok[b] = sample(logits[b : b + 1], p.temperature, p.top_k, p.top_p, g)[0]
        return tok


class Engine:
    """Owns `model` on one thread; `submit` requests from any thread. Start with start(), end with stop()."""

    def __init__(self, model: Phixtral, *, max_batch_size: int = 8):
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an int >= 1, got {max_batch_size!r}")
        if model.tokenizer is None:
            raise ValueError("the server needs a checkpoint with a tokenizer")
        self.model, self.max_batch_size = model, max_batch_size
        self.n_positions = model.config.n_positions
        self.tokenizer_lock = threading.Lock()  # the event loop encodes while the engine decodes
        self._waiting: deque[Request] = deque()
        self._cond = threading.Condition()
        self._closed = False  # no new requests, no new batches
        self._stopping = False  # also end the running batch at its next step
        self._thread: Optional[threading.Thread] = None
        # Counters for /health and the tests.
        self.running = 0  # rows of the running batch still generating
        self.batches = 0
        self.largest_batch = 0
        self.completed = 0
        self.cancelled = 0

    # --- any thread ---------------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        with self.tokenizer_lock:
            return self.model.tokenizer(text, verbose=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        with self.tokenizer_lock:
            return decode_text(self.model.tokenizer, ids)

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
            self._cond.notify()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closed

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="phixtral-engine", daemon=True)
            self._thread.start()

    def shutdown(self, grace: float) -> None:
        """Begin a graceful stop: refuse new requests, fail the waiting ones with EngineStopped, let the running batch
        go on for up to `grace` seconds, then stop() (its unfinished requests end "cancelled"). Returns at once."""
        self._close()
        timer = threading.Timer(grace, self.stop)
        timer.daemon = True
        timer.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new requests, fail the waiting ones with EngineStopped, end the running batch at its next step (its
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
            _emit(r, Failed(EngineStopped("the server is shutting down")))

    # --- the engine thread -------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            except BaseException as e:  # never let one batch take the engine down
                log.exception("batch of %d failed", len(batch))
                for r in batch:
                    if r.finished is None:
                        r.finished = time.perf_counter()
                        _emit(r, Failed(e))
            finally:
                self.running = 0

    def _next_batch(self) -> Optional[list[Request]]:
        """Wait for requests; take the longest arrival-order run that fits one batch. None once stopping."""
        with self._cond:
            while True:
                while self._waiting and self._waiting[0].cancelled:
                    self._drop(self._waiting.popleft())
                if self._closed:
                    return None
                if self._waiting:
                    break
                self._cond.wait()
            batch, longest, most = [], 0, 0
            while self._waiting and len(batch) < self.max_batch_size:
                r = self._waiting[0]
                if r.cancelled:
                    self._drop(self._waiting.popleft())
                    continue
                n, m = max(longest, len(r.prompt_ids)), max(most, r.params.max_tokens)
                if batch and n + m > self.n_positions:
                    break  # it waits for the next batch, and so do the ones behind it
                batch.append(self._waiting.popleft())
                longest, most = n, m
            return batch

    def _drop(self, r: Request) -> None:
        r.finished = time.perf_counter()
        r.finish_reason = "cancelled"
        self.cancelled += 1
        _emit(r, Done("cancelled"))

    @torch.inference_mode()
    def _run(self, batch: list[Request]) -> None:
        model = self.model
        B = len(batch)
        ids, mask = left_pad([r.prompt_ids for r in batch], pad_id(model), model.device)  # as generate() pads
        eos = set(model.eos_token_ids)
        texts = [TextStream(self.decode, eos, r.params.stop) for r in batch]
        sampler = _RowSampler(batch, model.device)
        live = sampler.live
        self.batches += 1
        self.largest_batch = max(self.largest_batch, B)
        self.running = B
        started = time.perf_counter()
        for r in batch:
            r.started, r.batch_size = started, B
        lock = generation_lock(model)  # a generate() from another thread of this process waits for the batch
        lock.acquire()
        steps = None
        try:
            steps = generate_tokens(
                model, ids, mask, max_new_tokens=max(r.params.max_tokens for r in batch), sampler=sampler
            )
            for host in steps:
                for b, r in enumerate(batch):
                    if not live[b]:
                        continue
                    if r.cancelled or self._stopping:
                        self._finish(r, "cancelled")
                        live[b] = False
                        continue
                    r.completion_tokens += 1
                    text = texts[b]
                    piece = text.push(host[b])
                    if text.finish_reason is None and r.completion_tokens == r.params.max_tokens:
                        piece += text.flush()
                        text.finish_reason = "length"
                    if piece:
                        _emit(r, Piece(piece))
                    if text.finish_reason is not None:
                        self._finish(r, text.finish_reason)
                        live[b] = False
                self.running = sum(live)
                if not any(live):
                    break
        finally:
            if steps is not None:
                steps.close()
            lock.release()

    def _finish(self, r: Request, reason: str) -> None:
        r.finished = time.perf_counter()
        r.finish_reason = reason
        if reason == "cancelled":
            self.cancelled += 1
        else:
            self.completed += 1
        _emit(r, Done(reason))


def _emit(r: Request, event) -> None:
    try:
        r.emit(event)
    except Exception:  # the receiver is gone (its event loop closed): nobody to tell, stop generating for it
        r.cancelled = True
