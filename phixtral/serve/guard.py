"""What a request must pass before any handler runs (an ASGI middleware), each refusal in OpenAI's error format:

Host      bound to a loopback address, the Host header must name a loopback host (localhost, 127.x.y.z, [::1]):
          a DNS-rebinding page whose name resolves to 127.0.0.1 sends its own name, and is refused (403);
Origin    a request a browser sends from another site's page carries that page's Origin: refused (403), so that no
          web page can drive the server (answers to the chat page at / come from the server's own origin);
API key   with --api-key, every /v1/ route wants `Authorization: Bearer KEY` (401, as OpenAI answers);
JSON      a POST must say Content-Type: application/json (415): a page can send text/plain or form bodies to any
          address without a CORS preflight, never JSON;
size      a body over --max-request-bytes is refused (413) from its Content-Length before it is read, or as soon
          as a chunked body passes the limit; a body under it is read here and replayed to the app.
"""

import hmac
import json

from .limits import Limits, is_loopback
from .protocol import OpenAIError


def _host_name(value: str) -> str:
    """The name part of a Host header ("localhost:8000" -> "localhost", "[::1]:8000" -> "::1")."""
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Guard:
    """The middleware: refuses what the module docstring lists, then passes the request (and its body) on."""

    def __init__(self, app, limits: Limits):
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            self._check_headers(scope)
            if scope["method"] == "POST":
                receive = await self._read_body(scope, receive)
        except OpenAIError as e:
            scope.setdefault("phixtral.refused", e.message)
            return await _answer(send, e)
        await self.app(scope, receive, send)

    def _check_headers(self, scope) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host")
        if self.limits.loopback_only and host is not None and not is_loopback(_host_name(host)):
            message = (f"Host {host!r} is not a loopback name: this server only answers requests for localhost "
                       "(a page whose name resolves here is refused)")  # fmt: skip
            raise OpenAIError(403, message, code="host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and origin not in (f"http://{host}", f"https://{host}"):
            raise OpenAIError(403, f"cross-origin requests are refused (Origin {origin!r})", code="origin_not_allowed")
        key = self.limits.api_key
        if key is not None and scope["path"].startswith("/v1/"):
            given = headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                what = "no API key" if not given else "an incorrect API key"
                message = (f"You didn't provide a valid API key: the request carries {what}. Send "
                           "`Authorization: Bearer KEY` with the server's --api-key.")  # fmt: skip
                raise OpenAIError(401, message, code="invalid_api_key")
        if scope["method"] == "POST":
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            if media != "application/json":
                raise OpenAIError(415, f"Content-Type must be application/json, got {media or 'none'!r}",
                                  code="unsupported_media_type")  # fmt: skip
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.limits.max_request_bytes:
                raise self._too_large(int(length))

    def _too_large(self, size: int) -> OpenAIError:
        message = (f"the request body ({size} bytes) exceeds this server's limit of {self.limits.max_request_bytes} "
                   "bytes (--max-request-bytes)")  # fmt: skip
        return OpenAIError(413, message, code="request_too_large")

    async def _read_body(self, scope, receive):
        """Read the body (at most max_request_bytes, else 413) and return a receive that replays it, then goes on
        with the connection's own messages (the disconnect the handlers watch for)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                replay = [message]
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limits.max_request_bytes:
                raise self._too_large(size)
            if not message.get("more_body", False):
                replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
                break

        async def replaying():
            return replay.pop(0) if replay else await receive()

        return replaying


async def _answer(send, error: OpenAIError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if error.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
