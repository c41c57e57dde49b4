"""OpenAI's request bodies (the fields this server reads, with their types and ranges) and its error format.

Bodies are parsed strictly ("0.5" is not a number, 1.0 is not an int, NaN and inf are refused); fields this server does
not know are ignored, as vLLM does, so that newer clients keep working. Fields that would change the answer and are
not implemented (penalties, logit_bias, tools, ...) are refused with a 400 rather than silently ignored.
"""

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from .engine import SamplingParams

# OpenAI's defaults: /v1/completions generates 16 tokens unless told; chat goes on up to the context's end.
COMPLETION_MAX_TOKENS = 16
DEFAULT_TEMPERATURE = 1.0
MAX_TEMPERATURE = 2.0
MAX_STOP = 4  # OpenAI's limit: each stop string is searched in the text after every token
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat (5 for completions); vLLM allows 20 for both


class OpenAIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None  # not OpenAI's; vLLM and llama-server take it (0 or -1 = off)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: Optional[bool] = False
    stream_options: Optional[dict[str, Any]] = None
    n: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, Any]] = None
    user: Optional[str] = None

    def sampling(self, max_tokens: int, *, logprobs: bool = False, top_logprobs: int = 0) -> SamplingParams:
        """SamplingParams from the body, or an OpenAIError naming the first bad field."""
        if max_tokens < 1:
            raise bad_request(f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
        if self.n is not None and self.n < 1:
            raise bad_request(f"n must be at least 1, got {self.n}", "n")
        temperature = DEFAULT_TEMPERATURE if self.temperature is None else self.temperature
        if not 0 <= temperature <= MAX_TEMPERATURE:
            raise bad_request(f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {temperature}", "temperature")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise bad_request(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        top_k = self.top_k
        if top_k is not None and top_k < -1:
            raise bad_request(f"top_k must be >= 1, or 0 / -1 for no limit, got {top_k}", "top_k")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise bad_request(f"seed must be in [0, 2**64), got {self.seed}", "seed")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP:
            raise bad_request(f"stop takes at most {MAX_STOP} strings, got {len(stops)}", "stop")
        if any(s == "" for s in stops):
            raise bad_request("stop strings must not be empty", "stop")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise bad_request(f"{name} is not supported by this server (use 0)", name)
        if self.logit_bias:
            raise bad_request("logit_bias is not supported by this server", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=self.top_p,
            top_k=top_k if top_k and top_k > 0 else None,
            seed=self.seed,
            stop=stops,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
        )

    @property
    def choices(self) -> int:
        """Choices asked per prompt (n)."""
        return 1 if self.n is None else self.n

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.get("include_usage"))


class CompletionBody(_Body):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: Optional[bool] = False
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    def check_unsupported(self) -> None:
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise bad_request(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}", "logprobs")
        if self.best_of not in (None, 1):
            raise bad_request(f"best_of must be 1, got {self.best_of}", "best_of")
        if self.suffix:
            raise bad_request("suffix is not supported by this server", "suffix")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None

    def as_template_input(self) -> dict:
        """{"role", "content": str} for the chat template ("developer" is OpenAI's newer name for "system")."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class ChatBody(_Body):
    messages: list[Message]
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list[Any]] = None
    response_format: Optional[dict[str, Any]] = None

    def check_unsupported(self) -> None:
        if not self.messages:
            raise bad_request("messages must hold at least one message", "messages")
        if self.top_logprobs is not None:
            if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
                raise bad_request(
                    f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}", "top_logprobs"
                )
            if not self.logprobs:
                raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
        if self.tools:
            raise bad_request("tools are not supported by this server", "tools")
        if self.response_format and self.response_format.get("type") != "text":
            raise bad_request("response_format other than {'type': 'text'} is not supported", "response_format")


def parse(kind: type[_Body], raw: bytes) -> _Body:
    """A request body of `kind` from raw JSON bytes, or a 400 OpenAIError naming the first bad field."""
    try:
        return kind.model_validate_json(raw)
    except ValidationError as e:
        err = e.errors()[0]
        if err["type"] == "json_invalid":
            raise bad_request(f"the request body is not valid JSON: {err['msg']}") from None
        loc = [str(x) for x in err["loc"]]
        if not loc:
            raise bad_request(f"the request body must be a JSON object: {err['msg']}") from None
        # Union members add their type names to the location (prompt.str, prompt.list[int]): keep the field's own path.
        path = ".".join(x for x in loc if not x.startswith(("str", "list[", "dict[", "int", "float", "bool")))
        raise bad_request(f"{path}: {err['msg']}", param=loc[0]) from None
