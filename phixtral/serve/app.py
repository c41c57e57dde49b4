"""The HTTP layer: OpenAI's /v1/completions, /v1/chat/completions (JSON or server-sent events), /v1/models, /health.

Handlers run on uvicorn's event loop and never touch the model: they validate, tokenize, hand Requests to the Engine
and await its events on an asyncio queue (the engine thread puts them there with call_soon_threadsafe). A client that
goes away cancels its requests, so the engine frees their rows at its next step. Every request is logged in one line
when its response is over, with tokens/s for generations.
"""

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Optional

import uvicorn
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from .engine import ContextLengthError, Done, Engine, EngineStopped, Failed, Piece, Request, SamplingParams
from .protocol import COMPLETION_MAX_TOKENS, ChatBody, CompletionBody, OpenAIError, bad_request, parse

log = logging.getLogger("phixtral.serve")
_CLIENT_GONE = 499  # nginx's status for a request whose client closed the connection first: for the log line only
_LOG_KEY = "phixtral.log"  # scope key of the request's _LogEntry, filled by the handlers, written by _LogRequests


def create_app(engine: Engine, model_name: str) -> FastAPI:
    """The ASGI app serving `engine`'s model under `model_name`. Its lifespan starts and stops the engine."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="phixtral", lifespan=lifespan)
    created = int(time.time())

    @app.exception_handler(OpenAIError)
    async def openai_error(request, exc: OpenAIError):
        _log_entry(request.scope).error = exc.message
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):  # unknown route, wrong method
        return JSONResponse(OpenAIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(request, exc: Exception):
        log.exception("unexpected error")
        return JSONResponse(OpenAIError(500, f"{type(exc).__name__}: {exc}").body(), status_code=500)

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "error", "message": "the engine is not running"}, status_code=503)
        return {"status": "ok", "running": engine.running, "waiting": engine.waiting}

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "phixtral",
                "max_model_len": engine.n_positions}  # fmt: skip

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        _check_model(name, model_name)
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = parse(CompletionBody, await request.body())
        _check_model(body.model, model_name)
        body.check_unsupported()
        prompts = _completion_prompts(engine, body.prompt)
        params = body.sampling(COMPLETION_MAX_TOKENS if body.max_tokens is None else body.max_tokens)
        for ids in prompts:
            _check_fits(engine, len(ids), params.max_tokens, "prompt")
        echo = [""] * len(prompts)
        if body.echo:
            given = [body.prompt] if isinstance(body.prompt, str) or isinstance(body.prompt[0], int) else body.prompt
            echo = [p if isinstance(p, str) else engine.decode(p) for p in given]
        job = _Job(engine, request, "cmpl", model_name, prompts, params)
        if body.stream:
            return _SSE(job, _completion_chunks(job, echo, body.include_usage))
        answer = await job.collect()
        if answer is None:
            return Response(status_code=_CLIENT_GONE)
        texts, reasons = answer
        choices = [
            {"index": i, "text": echo[i] + t, "logprobs": None, "finish_reason": r}
            for i, (t, r) in enumerate(zip(texts, reasons))
        ]
        return {"id": job.id, "object": "text_completion", "created": job.created, "model": model_name,
                "choices": choices, "usage": job.usage()}  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        body = parse(ChatBody, await request.body())
        _check_model(body.model, model_name)
        body.check_unsupported()
        ids = engine.encode(_chat_prompt(engine, body))
        if not ids:
            raise bad_request("the chat template gave an empty prompt", "messages")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is None:
            max_tokens = max(engine.n_positions - len(ids), 1)  # up to the end of the context, as vLLM
        params = body.sampling(max_tokens)
        _check_fits(engine, len(ids), params.max_tokens, "messages")
        job = _Job(engine, request, "chatcmpl", model_name, [ids], params)
        if body.stream:
            return _SSE(job, _chat_chunks(job, body.include_usage))
        answer = await job.collect()
        if answer is None:
            return Response(status_code=_CLIENT_GONE)
        texts, reasons = answer
        choice = {"index": 0, "message": {"role": "assistant", "content": texts[0]}, "logprobs": None,
                  "finish_reason": reasons[0]}  # fmt: skip
        return {"id": job.id, "object": "chat.completion", "created": job.created, "model": model_name,
                "choices": [choice], "usage": job.usage()}  # fmt: skip

    app.add_middleware(_LogRequests)
    return app


class Server(uvicorn.Server):
    """uvicorn's server, telling the engine when the shutdown begins (uvicorn itself waits for the responses in flight,
    then cancels them without a word to their clients): the engine answers the waiting requests with a 503 at once and
    ends the running batch after `grace` seconds, so that every open stream ends with an error event and [DONE]."""

    def __init__(self, config: uvicorn.Config, engine: Engine, *, grace: float):
        super().__init__(config)
        self.engine, self.grace = engine, grace

    async def shutdown(self, sockets=None):
        self.engine.shutdown(self.grace)
        await super().shutdown(sockets=sockets)


# --- checks ----------------------------------------------------------------------------------------------------------
def _check_model(name: Optional[str], served: str) -> None:
    if name is not None and name != served:
        raise OpenAIError(404, f"The model `{name}` does not exist. This server serves `{served}`.", param="model",
                          code="model_not_found")  # fmt: skip


def _check_fits(engine: Engine, prompt_tokens: int, max_tokens: int, param: str) -> None:
    try:
        engine.check_fits(prompt_tokens, max_tokens)
    except ContextLengthError as e:
        raise bad_request(str(e), param, code="context_length_exceeded") from None


def _completion_prompts(engine: Engine, prompt) -> list[list[int]]:
    """/v1/completions' prompt (a string, strings, token ids, or lists of token ids) as token id lists."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise bad_request("prompt must not be empty", "prompt")
    V = engine.model.config.vocab_size
    out = []
    for p in prompt:
        ids = engine.encode(p) if isinstance(p, str) else p
        if not ids:
            raise bad_request("prompt must not be empty: give at least one token", "prompt")
        if not all(0 <= t < V for t in ids):
            raise bad_request(f"prompt token ids must lie in [0, {V})", "prompt")
        out.append(ids)
    return out


def _chat_prompt(engine: Engine, body: ChatBody) -> str:
    tok = engine.model.tokenizer
    if not getattr(tok, "chat_template", None):
        raise bad_request("this model's tokenizer has no chat template: use /v1/completions", "messages")
    messages = [m.as_template_input() for m in body.messages]
    try:
        with engine.tokenizer_lock:
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # the template rejects these messages (jinja raise_exception, a role it does not know)
        raise bad_request(f"the chat template cannot format these messages: {e}", "messages") from None


# --- one HTTP request's generations -----------------------------------------------------------------------------------
class _Job:
    """The engine requests of one HTTP request (one per prompt), their events on one asyncio queue, and its log line."""

    def __init__(
        self, engine: Engine, http: HTTPRequest, prefix: str, model_name: str, prompts, params: SamplingParams
    ):
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model_name = model_name
        self.http = http
        self.queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.requests = []
        for i, ids in enumerate(prompts):
            emit = lambda event, i=i: loop.call_soon_threadsafe(self.queue.put_nowait, (i, event))  # noqa: E731
            self.requests.append(Request(ids, params, emit))
        _log_entry(http.scope).job = self
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

    async def collect(self) -> Optional[tuple[list[str], list[str]]]:
        """Wait for the whole answer: (texts, finish reasons), or None when the client went away first (then the
        requests are cancelled)."""
        texts, reasons = [""] * len(self.requests), [""] * len(self.requests)

        async def gather():
            async for i, event in self.events():
                if isinstance(event, Piece):
                    texts[i] += event.text
                else:
                    reasons[i] = event.finish_reason

        try:
            if not await _unless_disconnected(gather(), self.http.receive):
                return None
        finally:
            self.cancel()  # a no-op for finished requests
        return texts, reasons

    def usage(self) -> dict:
        prompt = sum(len(r.prompt_ids) for r in self.requests)
        completion = sum(r.completion_tokens for r in self.requests)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def chunk(self, obj: str, choices: list, usage=None) -> str:
        data = {"id": self.id, "object": obj, "created": self.created, "model": self.model_name, "choices": choices}
        if usage is not None:
            data["usage"] = usage
        return _sse(data)

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
        return (
            f"{self.id}: prompt {u['prompt_tokens']} + completion {u['completion_tokens']} tokens in {run:.3f} s "
            f"({speed} tokens/s), queued {min(started) - min(r.submitted for r in rs):.3f} s, "
            f"batch {max(r.batch_size for r in rs)}, finish {reasons}"
        )


async def _unless_disconnected(work, receive: Receive) -> bool:
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


def _sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _completion_chunks(job: _Job, echo: list[str], include_usage: bool):
    usage = {"usage": None} if include_usage else {}
    for i, text in enumerate(echo):
        if text:
            yield job.chunk("text_completion", [{"index": i, "text": text, "logprobs": None, "finish_reason": None}],
                            **usage)  # fmt: skip
    async for i, event in job.events():
        text, reason = (event.text, None) if isinstance(event, Piece) else ("", event.finish_reason)
        choice = {"index": i, "text": text, "logprobs": None, "finish_reason": reason}
        yield job.chunk("text_completion", [choice], **usage)
    if include_usage:
        yield job.chunk("text_completion", [], job.usage())


async def _chat_chunks(job: _Job, include_usage: bool):
    usage = {"usage": None} if include_usage else {}
    first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    yield job.chunk("chat.completion.chunk", [first], **usage)
    async for _, event in job.events():
        if isinstance(event, Piece):
            choice = {"index": 0, "delta": {"content": event.text}, "logprobs": None, "finish_reason": None}
        else:
            choice = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": event.finish_reason}
        yield job.chunk("chat.completion.chunk", [choice], **usage)
    if include_usage:
        yield job.chunk("chat.completion.chunk", [], job.usage())


class _SSE(StreamingResponse):
    """A server-sent event stream that ends with `data: [DONE]`, cancels its job as soon as the client goes away (not
    only at the next write), and reports an error inside the stream once the 200 headers are out."""

    def __init__(self, job: _Job, chunks):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(chunks, headers=headers, media_type="text/event-stream")
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if not await _unless_disconnected(self._stream(send), receive):
                _log_entry(scope).status = _CLIENT_GONE
        except OSError:  # the connection broke while writing
            _log_entry(scope).status = _CLIENT_GONE
        finally:
            self.job.cancel()  # a no-op for finished requests; frees the rows of the others

    async def _stream(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        try:
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
        except OpenAIError as e:
            log.error("%s: %s", self.job.id, e.message)
            await send({"type": "http.response.body", "body": _sse(e.body()).encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


@dataclass
class _LogEntry:
    job: Optional[_Job] = None
    status: Optional[int] = None  # overrides the status sent (499: the client left during a stream)
    error: Optional[str] = None


def _log_entry(scope: Scope) -> _LogEntry:
    return scope.setdefault(_LOG_KEY, _LogEntry())


class _LogRequests:
    """ASGI middleware: one log line per HTTP request once its response is over, with the generation's numbers."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        entry, sent, clock = _log_entry(scope), [0], time.perf_counter()

        async def send_status(message):
            if message["type"] == "http.response.start":
                sent[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except Exception:
            sent[0] = sent[0] or 500  # the app's error handler answers once this middleware has passed it on
            raise
        finally:
            status = entry.status or sent[0] or "-"
            line = f"{scope['method']} {scope['path']} {status} {time.perf_counter() - clock:.3f} s"
            if entry.job is not None:
                line += f" {entry.job.log_line()}"
            if entry.error:
                line += f": {entry.error}"
            log.info(line)
