"""The HTTP layer: OpenAI's /v1/completions, /v1/chat/completions (JSON or server-sent events), /v1/models, /health,
/metrics (Prometheus) and the chat page at /.

Handlers run on uvicorn's event loop and never touch the model: guard.py has already refused what must not pass
(Host, Origin, API key, content type, body size); a handler checks what costs nothing first (fields, caps, a prompt
surely too long for the context), then parses, renders the chat template and tokenizes on worker threads, and hands
Requests to the Engine (responses.py turns its events into OpenAI's answers). Every request is logged in one line when
its response is over, with tokens/s for generations.
"""

import asyncio
import contextlib
import logging
import time
from importlib import resources
from typing import Optional

import uvicorn
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import PlainTextResponse, Response
from starlette.types import Receive, Scope, Send

from .engine import ContextLengthError, Engine
from .guard import Guard
from .limits import Limits
from .protocol import COMPLETION_MAX_TOKENS, ChatBody, CompletionBody, OpenAIError, bad_request, parse
from .responses import (
    CLIENT_GONE,
    SSE,
    Job,
    chat_chunks,
    chat_logprobs,
    completion_chunks,
    completion_logprobs,
    log_entry,
    per_choice,
)

log = logging.getLogger("phixtral.serve")
ROUTES = ("/", "/chat.js", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")
# The chat page runs only its own script, reaches only this server, and is never framed by another site.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def create_app(engine: Engine, model_name: str, limits: Optional[Limits] = None) -> FastAPI:
    """The ASGI app serving `engine`'s model under `model_name` within `limits` (default: Limits()). Its lifespan starts
    and stops the engine."""
    limits = limits if limits is not None else Limits()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="phixtral", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    static = resources.files(__package__) / "static"
    page = {name: (static / name).read_bytes() for name in ("index.html", "chat.js")}

    @app.exception_handler(OpenAIError)
    async def openai_error(request, exc: OpenAIError):
        log_entry(request.scope).error = exc.message
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):  # unknown route, wrong method
        return JSONResponse(OpenAIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(request, exc: Exception):
        log.exception("unexpected error")
        return JSONResponse(OpenAIError(500, f"{type(exc).__name__}: {exc}").body(), status_code=500)

    @app.get("/")
    async def chat_page():
        return Response(page["index.html"], media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    @app.get("/chat.js")
    async def chat_script():
        return Response(page["chat.js"], media_type="text/javascript; charset=utf-8", headers=PAGE_HEADERS)

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "error", "message": "the engine is not running"}, status_code=503)
        return {"status": "ok", "running": engine.running, "waiting": engine.waiting}

    @app.get("/metrics")
    async def metrics():
        text = engine.metrics.render(running=engine.running, waiting=engine.waiting)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

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
        body = await asyncio.to_thread(parse, CompletionBody, await request.body())
        _check_model(body.model, model_name)
        body.check_unsupported()
        max_tokens = COMPLETION_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        _check_max_tokens(limits, max_tokens, explicit=body.max_tokens is not None)
        params = body.sampling(max_tokens, logprobs=body.logprobs is not None, top_logprobs=body.logprobs or 0)
        given = _completion_prompts(body.prompt)
        _check_count(limits, len(given), body.choices)
        for p in given:
            if isinstance(p, str) and engine.surely_too_long(p, max_tokens):
                raise _too_long(engine, p, max_tokens, "prompt")
        prompts = await asyncio.to_thread(_encode_prompts, engine, given)
        for ids in prompts:
            _check_fits(engine, len(ids), max_tokens, "prompt")
        echo = [""] * len(prompts)
        if body.echo:
            echo = [p if isinstance(p, str) else await asyncio.to_thread(engine.decode, p) for p in given]
        n = body.choices
        echo = [text for text in echo for _ in range(n)]
        choices = [(ids, p) for ids in prompts for p in per_choice(params, n)]
        job = Job(engine, request, "cmpl", model_name, choices, sum(map(len, prompts)))
        if body.stream:
            return SSE(job, completion_chunks(job, echo, body.include_usage, body.logprobs is not None))
        answer = await job.collect()
        if answer is None:
            return Response(status_code=CLIENT_GONE)
        texts, reasons, logprobs = answer
        out = []
        for i, (t, r) in enumerate(zip(texts, reasons)):
            lp = completion_logprobs(logprobs[i], len(echo[i])) if body.logprobs is not None else None
            out.append({"index": i, "text": echo[i] + t, "logprobs": lp, "finish_reason": r})
        return {"id": job.id, "object": "text_completion", "created": job.created, "model": model_name,
                "choices": out, "usage": job.usage()}  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        body = await asyncio.to_thread(parse, ChatBody, await request.body())
        _check_model(body.model, model_name)
        body.check_unsupported()
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if asked is not None:
            _check_max_tokens(limits, asked, explicit=True)
        _check_count(limits, 1, body.choices)
        text = await asyncio.to_thread(_chat_prompt, engine, body)
        if engine.surely_too_long(text, asked or 1):
            raise _too_long(engine, text, asked or 1, "messages")
        ids = await asyncio.to_thread(engine.encode, text)
        if not ids:
            raise bad_request("the chat template gave an empty prompt", "messages")
        max_tokens = asked
        if max_tokens is None:  # up to the end of the context, as vLLM, within the server's cap
            max_tokens = min(max(engine.n_positions - len(ids), 1), limits.max_tokens or engine.n_positions)
        logprobs = bool(body.logprobs)
        params = body.sampling(max_tokens, logprobs=logprobs, top_logprobs=body.top_logprobs or 0)
        _check_fits(engine, len(ids), params.max_tokens, "messages")
        choices = [(ids, p) for p in per_choice(params, body.choices)]
        job = Job(engine, request, "chatcmpl", model_name, choices, len(ids))
        if body.stream:
            return SSE(job, chat_chunks(job, body.include_usage, logprobs))
        answer = await job.collect()
        if answer is None:
            return Response(status_code=CLIENT_GONE)
        texts, reasons, lps = answer
        out = [{"index": i, "message": {"role": "assistant", "content": t},
                "logprobs": chat_logprobs(lps[i]) if logprobs else None, "finish_reason": r}
               for i, (t, r) in enumerate(zip(texts, reasons))]  # fmt: skip
        return {"id": job.id, "object": "chat.completion", "created": job.created, "model": model_name,
                "choices": out, "usage": job.usage()}  # fmt: skip

    app.add_middleware(Guard, limits=limits)
    app.add_middleware(_LogRequests, engine=engine)
    return app


class Server(uvicorn.Server):
    """uvicorn's server, telling the engine when the shutdown begins (uvicorn itself waits for the responses in flight,
    then cancels them without a word to their clients): the engine answers the waiting requests with a 503 at once and
    ends the running rows after `grace` seconds, so that every open stream ends with an error event and [DONE]."""

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


def _check_max_tokens(limits: Limits, max_tokens: int, *, explicit: bool) -> None:
    if limits.max_tokens is not None and max_tokens > limits.max_tokens:
        raise bad_request(f"max_tokens must be at most {limits.max_tokens} on this server (--max-tokens), got "
                          f"{max_tokens}", "max_tokens" if explicit else None)  # fmt: skip


def _check_count(limits: Limits, prompts: int, n: int) -> None:
    if prompts * n > limits.max_prompts:
        message = (f"this server generates at most {limits.max_prompts} completions per request (--max-prompts): "
                   f"got {prompts} prompt(s) x n = {n}")  # fmt: skip
        raise bad_request(message, "prompt" if n == 1 else "n")


def _check_fits(engine: Engine, prompt_tokens: int, max_tokens: int, param: str) -> None:
    try:
        engine.check_fits(prompt_tokens, max_tokens)
    except ContextLengthError as e:
        raise bad_request(str(e), param, code="context_length_exceeded") from None


def _too_long(engine: Engine, text: str, max_tokens: int, param: str) -> OpenAIError:
    return bad_request(
        f"This model's maximum context length is {engine.n_positions} tokens. However, the {param} alone holds "
        f"{len(text)} characters, more than {engine.n_positions - max_tokens} tokens can hold with the "
        f"{max_tokens} completion tokens asked. Please reduce the length of the {param} or completion.",
        param, code="context_length_exceeded",
    )  # fmt: skip


def _completion_prompts(prompt) -> list:
    """/v1/completions' prompt (a string, strings, token ids, or lists of token ids) as a list of prompts."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise bad_request("prompt must not be empty", "prompt")
    return prompt


def _encode_prompts(engine: Engine, prompts: list) -> list[list[int]]:
    """Token ids of each prompt (strings encoded, id lists checked); runs on a worker thread."""
    V = engine.model.config.vocab_size
    out = []
    for p in prompts:
        ids = engine.encode(p) if isinstance(p, str) else p
        if not ids:
            raise bad_request("prompt must not be empty: give at least one token", "prompt")
        if not all(0 <= t < V for t in ids):
            raise bad_request(f"prompt token ids must lie in [0, {V})", "prompt")
        out.append(ids)
    return out


def _chat_prompt(engine: Engine, body: ChatBody) -> str:
    """The chat template applied to the messages (on the encoders' tokenizer; runs on a worker thread)."""
    tok = engine.encoder
    if not getattr(tok, "chat_template", None):
        raise bad_request("this model's tokenizer has no chat template: use /v1/completions", "messages")
    messages = [m.as_template_input() for m in body.messages]
    try:
        with engine.encoder_lock:
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # the template rejects these messages (jinja raise_exception, a role it does not know)
        raise bad_request(f"the chat template cannot format these messages: {e}", "messages") from None


class _LogRequests:
    """ASGI middleware: one log line per HTTP request once its response is over, with the generation's numbers; and
    the response counts of /metrics."""

    def __init__(self, app, engine: Engine):
        self.app, self.engine = app, engine

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        entry, sent, clock = log_entry(scope), [0], time.perf_counter()

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
            status = entry.status or sent[0]
            path = scope["path"]
            route = path if path in ROUTES else "/v1/models/{name}" if path.startswith("/v1/models/") else "other"
            self.engine.metrics.response(route, status or 0)
            line = f"{scope['method']} {path} {status or '-'} {time.perf_counter() - clock:.3f} s"
            if entry.job is not None:
                line += f" {entry.job.log_line()}"
            error = entry.error or scope.get("phixtral.refused")
            if error:
                line += f": {error}"
            log.info(line)
