"""Engine events as OpenAI's answers: the job of one HTTP request, whole JSON bodies, server-sent event streams, and
log-probabilities in the completions and chat shapes.

A job holds one engine request per choice (prompt i, choice j has index i * n + j, as OpenAI numbers them) and their
events on one asyncio queue (the engine thread puts them there with call_soon_threadsafe). A client that goes away
cancels the job's requests, so the engine frees their rows at its next step.
"""

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Optional

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from .engine import Done, Engine, EngineStopped, Failed, Piece, Request, SamplingParams
from .protocol import OpenAIError
from .sampling import TokenLogprob

log = logging.getLogger("phixtral.serve")
CLIENT_GONE = 499  # nginx's status for a request whose client closed the connection first: for the log line only
LOG_KEY = "phixtral.log"  # scope key of the request's LogEntry, filled by the handlers, written by the log middleware


class Job:
    """The engine requests of one HTTP request (one per choice), their events on one asyncio queue, and its log line.

    choices: (prompt ids, sampling params) in choice order; prompt_tokens: the prompts' tokens, each counted once
    (usage counts a prompt once whatever n is)."""

    def __init__(self, engine: Engine, http, prefix: str, model_name: str, choices, prompt_tokens: int):
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model_name = model_name
        self.http = http
        self.prompt_tokens = prompt_tokens
        self.queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.requests: list[Request] = []
        for i, (ids, params) in enumerate(choices):
            emit = lambda event, i=i: loop.call_soon_threadsafe(self.queue.put_nowait, (i, event))  # noqa: E731
            self.requests.append(Request(ids, params, emit))
        log_entry(http.scope).job = self
        try:
            for r in self.requests:
                engine.submit(r)
        except EngineStopped as e:
            self.cancel()
            raise OpenAIError(503, str(e)) from None

    def cancel(self) -> None:
        for r in self.requests:
            r.cancel()

    async def events(self):
        """(index, Piece | Done) until every request is done. A failure, or a request the engine cancelled while its
        client is still here (the server is stopping), raises an OpenAIError."""
        pending = len(self.requests)
        while pending:
            i, event = await self.queue.get()
            if isinstance(event, Failed):
                self.cancel()
                if isinstance(event.error, EngineStopped):
                    raise OpenAIError(503, str(event.error))
                raise OpenAIError(500, f"{type(event.error).__name__}: {event.error}")
            if isinstance(event, Done):
                if event.finish_reason == "cancelled":
                    self.cancel()
                    raise OpenAIError(503, "the server is shutting down")
                pending -= 1
            yield i, event

    async def collect(self) -> Optional[tuple[list[str], list[str], list[list[TokenLogprob]]]]:
        """Wait for the whole answer: (texts, finish reasons, log-probabilities) per choice, or None when the client
        went away first (then the requests are cancelled)."""
        n = len(self.requests)
        texts, reasons, logprobs = [""] * n, [""] * n, [[] for _ in range(n)]

        async def gather():
            async for i, event in self.events():
                if isinstance(event, Piece):
                    texts[i] += event.text
                else:
                    reasons[i] = event.finish_reason
                logprobs[i] += event.logprobs or []

        try:
            if not await unless_disconnected(gather(), self.http.receive):
                return None
        finally:
            self.cancel()  # a no-op for finished requests
        return texts, reasons, logprobs

    def usage(self) -> dict:
        completion = sum(r.completion_tokens for r in self.requests)
        total = self.prompt_tokens + completion
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion, "total_tokens": total}

    def chunk(self, obj: str, choices: list, usage=None) -> str:
        data = {"id": self.id, "object": obj, "created": self.created, "model": self.model_name, "choices": choices}
        if usage is not None:
            data["usage"] = usage
        return sse(data)

    def log_line(self) -> str:
        rs, now = self.requests, time.perf_counter()
        u = self.usage()
        # A request cancelled just now (its client left) may not have reached the engine's next step yet.
        reasons = ",".join(sorted({r.finish_reason or ("cancelled" if r.cancelled else "-") for r in rs}))
        started = [r.started for r in rs if r.started is not None]
        if not started:
            return f"{self.id}: prompt {u['prompt_tokens']} tokens, never ran, finish {reasons}"
        run = max(r.finished or now for r in rs) - min(started)
        speed = f"{u['completion_tokens'] / run:.1f}" if run > 0 else "-"
        first = [r.first_token - r.submitted for r in rs if r.first_token is not None]
        ttft = f", first token {min(first):.3f} s" if first else ""
        return (
            f"{self.id}: prompt {u['prompt_tokens']} + completion {u['completion_tokens']} tokens in {run:.3f} s "
            f"({speed} tokens/s), queued {min(started) - min(r.submitted for r in rs):.3f} s{ttft}, "
            f"batch {max(r.batch_size for r in rs)}, finish {reasons}"
        )


def per_choice(params: SamplingParams, n: int) -> list[SamplingParams]:
    """The params of a prompt's n choices: choice j of a seeded request samples with seed + j (mod 2**64), so that
    the choices differ and choice 0 equals generate(seed=seed)."""
    if params.seed is None or n == 1:
        return [params] * n
    return [SamplingParams(**{**params.__dict__, "seed": (params.seed + j) % 2**64}) for j in range(n)]


async def unless_disconnected(work, receive: Receive) -> bool:
    """Run the coroutine `work` until it ends (True; its exception propagates) or the client goes away (False; `work`
    is cancelled). The request body is already read, so the next message `receive` gives is the disconnect."""

    async def disconnect():
        while (await receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnect())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()
        watch.cancel()
    if task.done() and not task.cancelled():
        task.result()
        return True
    return False


def sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


# --- log-probabilities ------------------------------------------------------------------------------------------------
def completion_logprobs(entries: Optional[list[TokenLogprob]], offset: int = 0) -> Optional[dict]:
    """/v1/completions' shape: tokens, token_logprobs, top_logprobs ({token: logprob}), text_offset (characters
    before each token, from `offset`)."""
    if entries is None:
        return None
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [dict(e.top) for e in entries],
        "text_offset": offsets,
    }


def chat_logprobs(entries: Optional[list[TokenLogprob]]) -> Optional[dict]:
    """/v1/chat/completions' shape: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    if entries is None:
        return None

    def one(token, logprob):
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, v) for t, v in e.top]} for e in entries]}


# --- streams ----------------------------------------------------------------------------------------------------------
async def completion_chunks(job: Job, echo: list[str], include_usage: bool, logprobs: bool):
    usage = {"usage": None} if include_usage else {}
    offsets = [len(text) for text in echo]
    for i, text in enumerate(echo):
        if text:
            choice = {"index": i, "text": text, "logprobs": None, "finish_reason": None}
            yield job.chunk("text_completion", [choice], **usage)
    async for i, event in job.events():
        text, reason = (event.text, None) if isinstance(event, Piece) else ("", event.finish_reason)
        lp = completion_logprobs(event.logprobs if logprobs else None, offsets[i])
        offsets[i] += sum(len(e.token) for e in event.logprobs or [])
        choice = {"index": i, "text": text, "logprobs": lp, "finish_reason": reason}
        yield job.chunk("text_completion", [choice], **usage)
    if include_usage:
        yield job.chunk("text_completion", [], job.usage())


async def chat_chunks(job: Job, include_usage: bool, logprobs: bool):
    usage = {"usage": None} if include_usage else {}
    for i in range(len(job.requests)):
        first = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        yield job.chunk("chat.completion.chunk", [first], **usage)
    async for i, event in job.events():
        lp = chat_logprobs(event.logprobs) if logprobs and event.logprobs else None
        if isinstance(event, Piece):
            choice = {"index": i, "delta": {"content": event.text}, "logprobs": lp, "finish_reason": None}
        else:
            choice = {"index": i, "delta": {}, "logprobs": lp, "finish_reason": event.finish_reason}
        yield job.chunk("chat.completion.chunk", [choice], **usage)
    if include_usage:
        yield job.chunk("chat.completion.chunk", [], job.usage())


class SSE(StreamingResponse):
    """A server-sent event stream that ends with `data: [DONE]`, cancels its job as soon as the client goes away (not
    only at the next write), and reports an error inside the stream once the 200 headers are out."""

    def __init__(self, job: Job, chunks):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(chunks, headers=headers, media_type="text/event-stream")
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if not await unless_disconnected(self._stream(send), receive):
                log_entry(scope).status = CLIENT_GONE
        except OSError:  # the connection broke while writing
            log_entry(scope).status = CLIENT_GONE
        finally:
            self.job.cancel()  # a no-op for finished requests; frees the rows of the others

    async def _stream(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        try:
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
        except OpenAIError as e:
            log.error("%s: %s", self.job.id, e.message)
            await send({"type": "http.response.body", "body": sse(e.body()).encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


@dataclass
class LogEntry:
    job: Optional[Job] = None
    status: Optional[int] = None  # overrides the status sent (499: the client left during a stream)
    error: Optional[str] = None


def log_entry(scope: Scope) -> LogEntry:
    return scope.setdefault(LOG_KEY, LogEntry())
