"""What the serve tests share: one bundled model for all their modules, a server on a free port of 127.0.0.1 in a
thread, plain HTTP requests, waiting for the engine to go idle. The HTTP stack loads only when a server starts."""

import functools
import http.client
import json
import socket
import threading
import time

import phixtral
from phixtral.serve.limits import Limits

NAME = "tiny-phixtral"


@functools.lru_cache(maxsize=1)
def tiny_model():
    """The bundled tiny phixtral with the torch MoE backend, loaded once for every serve test module (each engine
    holds the model's generation lock while it runs, so modules never share it at the same time)."""
    return phixtral.from_pretrained(phixtral.default_model_path(), backend="torch")


# The module servers' limits: max_tokens and max_prompts low enough to test, a body cap above the 10 MB fault test.
LIMITS = Limits(max_tokens=500, max_prompts=8, max_request_bytes=16 * 2**20)


def start_server(engine, limits=LIMITS):
    """(uvicorn Server, its thread, port) serving `engine` on a free port of 127.0.0.1, started."""
    import uvicorn

    from phixtral.serve.app import Server, create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(create_app(engine, NAME, limits), log_level="warning", timeout_graceful_shutdown=5)
    srv = Server(config, engine, grace=1)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    return srv, thread, sock.getsockname()[1]


def raw(server, method, path, body=None, *, headers=None):
    """(status, parsed JSON) of one plain HTTP request; body: a dict (sent as JSON) or bytes (sent as they are)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    status, payload = resp.status, resp.read()
    conn.close()
    return status, json.loads(payload)


def settle(engine, timeout=30):
    """Wait until the engine has no request running or waiting."""
    deadline = time.monotonic() + timeout
    while engine.running or engine.waiting:
        assert time.monotonic() < deadline, "the engine did not go idle"
        time.sleep(0.02)
