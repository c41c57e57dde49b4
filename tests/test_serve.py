"""`phixtral serve`: one server per module on a free port of 127.0.0.1, talked to with the official openai client
(answers equal the model's own generate), raw HTTP for the errors, 32 concurrent requests, a client that leaves
mid-stream, and the command itself (SIGTERM). test_serve_api.py covers the OpenAI features and the limits,
test_serve_engine.py the schedulers without HTTP, test_serve_page.py the chat page in a browser."""

import concurrent.futures
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from phixtral.cli import build_parser

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
from serve_helpers import raw, settle, start_server, tiny_model  # noqa: E402

from phixtral.commands.serve import served_name  # noqa: E402
from phixtral.serve.engine import Engine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAME = "tiny-phixtral"
PROMPTS = ["def fib(n):", "import os\nclass Config", "for i in range(10):\n    ", "The asyncio event loop"]
MESSAGES = [{"role": "user", "content": "Write a function that adds two numbers."}]


@pytest.fixture(scope="module")
def server():
    model = tiny_model()
    engine = Engine(model, max_batch_size=8)
    srv, thread, port = start_server(engine)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
    yield SimpleNamespace(port=port, model=model, engine=engine, client=client)
    srv.should_exit = True
    thread.join(timeout=30)
    assert not thread.is_alive() and not engine.alive


# --- answers equal the model's own generate ---------------------------------------------------------------------------
def test_models_and_health(server):
    assert [m.id for m in server.client.models.list().data] == [NAME]
    assert server.client.models.retrieve(NAME).id == NAME
    assert raw(server, "GET", "/health") == (200, {"status": "ok", "running": 0, "waiting": 0})


def test_completions_equal_greedy_generate(server):
    model, client = server.model, server.client
    for prompt in PROMPTS[:2]:
        expected = model.generate(prompt, max_new_tokens=12)
        out = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
        assert out.choices[0].text == expected and out.model == NAME and out.object == "text_completion"
        assert out.choices[0].finish_reason == "length"
        n_prompt = len(model.tokenizer(prompt)["input_ids"])
        assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
            n_prompt,
            12,
            n_prompt + 12,
        )
        stream = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True)
        chunks = list(stream)
        assert "".join(c.choices[0].text for c in chunks) == expected
        assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
        assert all(c.choices[0].finish_reason is None for c in chunks[:-1]) and len(chunks) > 2
    several = client.completions.create(model=NAME, prompt=PROMPTS, max_tokens=8, temperature=0)  # one batch
    assert [c.text for c in sorted(several.choices, key=lambda c: c.index)] == model.generate(PROMPTS, max_new_tokens=8)
    ids = model.tokenizer(PROMPTS[0])["input_ids"]
    by_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=8, temperature=0, echo=True)
    assert by_ids.choices[0].text == PROMPTS[0] + model.generate(PROMPTS[0], max_new_tokens=8)


def test_chat_equals_model_chat(server):
    expected = server.model.chat(MESSAGES, max_new_tokens=10)
    out = server.client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=10, temperature=0)
    assert out.choices[0].message.content == expected and out.choices[0].message.role == "assistant"
    assert out.object == "chat.completion" and out.usage.completion_tokens == 10
    stream = server.client.chat.completions.create(
        model=NAME, messages=MESSAGES, max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10  # include_usage: a last usage chunk
    default_budget = server.client.chat.completions.create(
        model=NAME, messages=MESSAGES, max_completion_tokens=3, temperature=0
    )
    assert default_budget.usage.completion_tokens == 3


def test_stop_strings_end_the_text_with_finish_reason_stop(server):
    full = server.model.generate(PROMPTS[0], max_new_tokens=24)
    stop = full[10:14]
    expected = server.model.generate(PROMPTS[0], max_new_tokens=24, stop=stop)
    assert expected == full[: full.find(stop)]
    out = server.client.completions.create(
        model=NAME, prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=[stop, "\x00"]
    )
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens < 24
    kw = dict(model=NAME, prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=stop)
    chunks = list(server.client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == expected and chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_equals_generate(server):
    kw = dict(temperature=0.9, top_p=0.95, seed=7)
    expected = server.model.generate(PROMPTS[1], max_new_tokens=16, **kw)
    first = server.client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=16, **kw).choices[0].text
    # The same request inside a batch of others samples the same tokens: each row has its own generator.
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [
            pool.submit(server.client.completions.create, model=NAME, prompt=p, max_tokens=16, **kw) for p in PROMPTS
        ]
        batched = futures[1].result().choices[0].text
    assert first == batched == expected
    other = server.client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=16, temperature=0.9, top_p=0.95,
                                             seed=8)  # fmt: skip
    assert other.choices[0].text != expected


# --- errors -----------------------------------------------------------------------------------------------------------
BAD_REQUESTS = [
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model_not_found", "model"),
    ("/v1/chat/completions", {"messages": MESSAGES, "model": "nope"}, 404, "model_not_found", "model"),
    ("/v1/completions", {"prompt": "x " * 600}, 400, "context_length_exceeded", "prompt"),
    ("/v1/completions", {"prompt": "x " * 300, "max_tokens": 300}, 400, "context_length_exceeded", "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 600}, 400, None, "max_tokens"),  # over the server's cap
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x " * 600}]},
        400,
        "context_length_exceeded",
        "messages",
    ),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, None, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, None, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, None, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, None, "top_p"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, None, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2.5}, 400, None, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, None, "n"),
    ("/v1/completions", {"prompt": "x", "n": 9}, 400, None, "n"),  # over the server's 8 completions per request
    ("/v1/completions", {"prompt": ["x"] * 9}, 400, None, "prompt"),
    ("/v1/completions", {"prompt": "x", "seed": -1}, 400, None, "seed"),
    ("/v1/completions", {"prompt": "x", "stop": ""}, 400, None, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": [1]}, 400, None, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, None, "stop"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, None, "stream"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 0.5}, 400, None, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, None, "logprobs"),
    ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, 400, None, "top_logprobs"),
    ("/v1/completions", {"prompt": ""}, 400, None, "prompt"),
    ("/v1/completions", {"prompt": [5, 10**9]}, 400, None, "prompt"),
    ("/v1/completions", {"max_tokens": 3}, 400, None, "prompt"),
    ("/v1/chat/completions", {"messages": []}, 400, None, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, None, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, None, "messages"),
    (
        "/v1/chat/completions",
        {"messages": MESSAGES, "stream_options": {"include_usage": True}},
        400,
        None,
        "stream_options",
    ),
    ("/v1/completions", b'{"prompt": "x", ', 400, None, None),
    ("/v1/completions", b"[1, 2]", 400, None, None),
    ("/v1/completions", b"\xff\xfe", 400, None, None),
]


def test_bad_requests_get_openai_errors_and_the_server_stays_healthy(server):
    for path, body, status, code, param in BAD_REQUESTS:
        got, payload = raw(server, "POST", path, body)
        assert got == status, (path, body, payload)
        error = payload["error"]
        assert isinstance(error["message"], str) and error["message"], body
        assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", code, param), (body, error)
    assert raw(server, "GET", "/v1/nothing-here")[0] == 404
    assert raw(server, "GET", "/v1/completions")[0] == 405
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        server.client.completions.create(model=NAME, prompt="x " * 600, max_tokens=2)
    assert raw(server, "GET", "/health")[0] == 200
    ok = server.client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=4, temperature=0)
    assert ok.choices[0].text == server.model.generate(PROMPTS[0], max_new_tokens=4)


def test_a_body_that_is_not_declared_json_is_refused(server):  # a web page can send these without a preflight
    body = json.dumps({"prompt": PROMPTS[0], "max_tokens": 3, "temperature": 0}).encode()
    for content_type in ("application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x"):
        status, payload = raw(server, "POST", "/v1/completions", body, headers={"Content-Type": content_type})
        assert status == 415 and payload["error"]["code"] == "unsupported_media_type", payload
    assert (
        raw(server, "POST", "/v1/completions", body, headers={"Content-Type": "application/json; charset=utf-8"})[0]
        == 200
    )


# --- load and disconnects ---------------------------------------------------------------------------------------------
def test_32_concurrent_requests_are_all_answered_correctly(server):
    model, client, engine = server.model, server.client, server.engine
    jobs = []
    for i in range(32):
        prompt, n = PROMPTS[i % len(PROMPTS)], 4 + i % 5
        jobs.append((i % 4, prompt, n, 11 + i if i % 8 == 7 else None))
    expected = {}
    for kind, prompt, n, seed in jobs:
        kw = dict(temperature=0.8, seed=seed) if seed is not None else {}
        key = (kind >= 2, prompt, n, seed)  # kinds: 0 completion, 1 streamed completion, 2 chat, 3 streamed chat
        if key not in expected:
            if kind >= 2:
                expected[key] = model.chat([{"role": "user", "content": prompt}], max_new_tokens=n, **kw)
            else:
                expected[key] = model.generate(prompt, max_new_tokens=n, **kw)
    engine.hold(32)  # nothing runs until all 32 wait: the first step takes max_batch_size of them, whatever the timing

    def ask(job):
        kind, prompt, n, seed = job
        kw = dict(model=NAME, max_tokens=n, temperature=0.8 if seed is not None else 0, seed=seed)
        if kind == 2:
            return (
                client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **kw)
                .choices[0]
                .message.content
            )
        if kind == 3:
            return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                messages=[{"role": "user", "content": prompt}], stream=True, **kw) if c.choices)  # fmt: skip
        if kind == 1:
            return "".join(c.choices[0].text for c in client.completions.create(prompt=prompt, stream=True, **kw))
        return client.completions.create(prompt=prompt, **kw).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, jobs, timeout=120))
    for (kind, prompt, n, seed), answer in zip(jobs, answers):
        assert answer == expected[(kind >= 2, prompt, n, seed)], (kind, prompt, n, seed)
    assert engine.largest_batch == engine.max_batch_size, "concurrent requests should share the decode steps"
    settle(engine)
    assert raw(server, "GET", "/health") == (200, {"status": "ok", "running": 0, "waiting": 0})


def _open_stream(server, body):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    return conn, resp


def test_a_client_that_leaves_mid_stream_frees_its_row(server):
    engine = server.engine
    settle(engine)
    cancelled, generated = engine.cancelled, engine.metrics.generation_tokens
    conn, resp = _open_stream(server, {"prompt": PROMPTS[0], "max_tokens": 480, "temperature": 0, "stream": True})
    assert resp.readline().startswith(b"data: ")  # generation has started
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    settle(engine)
    assert engine.cancelled == cancelled + 1
    # Counted, not timed: a loaded machine may run 480 tiny-model steps in a few seconds either way.
    assert engine.metrics.generation_tokens - generated < 240, "the row should be freed at once, not after 480 tokens"
    out = server.client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=5, temperature=0)
    assert out.choices[0].text == server.model.generate(PROMPTS[2], max_new_tokens=5)


def test_a_client_that_leaves_before_a_plain_answer_frees_its_row(server):
    engine = server.engine
    settle(engine)
    cancelled = engine.cancelled
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = json.dumps({"prompt": PROMPTS[1], "max_tokens": 480, "temperature": 0})
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    deadline = time.monotonic() + 10
    while not engine.running:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    settle(engine)
    assert engine.cancelled == cancelled + 1
    assert raw(server, "GET", "/health")[0] == 200


# --- the command ------------------------------------------------------------------------------------------------------
def test_serve_parser_and_served_name(tmp_path, capsys):
    flags = ["--port", "0", "--host", "0.0.0.0", "--max-batch-size", "4", "--model", "a/b", "--batching", "static",
             "--max-tokens", "64", "--api-key", "k"]  # fmt: skip
    args = build_parser().parse_args(["serve", *flags])
    assert (args.port, args.host, args.max_batch_size, args.model) == (0, "0.0.0.0", 4, "a/b")
    assert (args.batching, args.max_tokens, args.api_key) == ("static", 64, "k")
    defaults = build_parser().parse_args(["serve"])
    assert (defaults.host, defaults.port, defaults.max_batch_size, defaults.model) == ("127.0.0.1", 8000, 8, None)
    assert (defaults.batching, defaults.max_tokens, defaults.api_key, defaults.max_prompts) == (
        "continuous",
        None,
        None,
        16,
    )
    for bad, message in [
        (["--port", "70000"], "argument --port: must be <= 65535, got 70000"),
        (["--max-batch-size", "0"], "argument --max-batch-size: must be >= 1, got 0"),
        (["--batching", "dynamic"], "argument --batching: invalid choice: 'dynamic'"),
        (["--max-request-bytes", "-5"], "argument --max-request-bytes: must be >= 1, got -5"),
        (["--prefill-chunk", "x"], "argument --prefill-chunk: expected an int, got 'x'"),
    ]:
        with pytest.raises(SystemExit) as exit:
            build_parser().parse_args(["serve", *bad])
        assert exit.value.code == 2
        assert message in capsys.readouterr().err
    assert served_name(None) == NAME and served_name("owner/model") == "owner/model"
    assert served_name(str(tmp_path) + "/") == tmp_path.name


def test_serve_command_old_import_path_still_works():
    import importlib

    sys.modules.pop("phixtral.serve.command", None)
    with pytest.warns(DeprecationWarning, match="phixtral.commands.serve"):
        old = importlib.import_module("phixtral.serve.command")
    from phixtral.commands import serve

    assert (old.served_name, old.add_parser, old.run) == (serve.served_name, serve.add_parser, serve.run)


def test_serve_command_answers_logs_and_stops_on_sigterm():
    """A plain request, then SIGTERM while a stream is open: the stream ends with an error event and [DONE] after the
    grace period, and the process exits 0 with one log line per request."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "phixtral", "serve", "--port", "0", "--backend", "torch", "--graceful-shutdown", "0.2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        port = None
        deadline = time.monotonic() + 60
        while port is None:
            line = proc.stderr.readline()
            assert line and time.monotonic() < deadline, "".join(lines)
            lines.append(line)
            if m := re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line):
                port = int(m.group(1))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        body = json.dumps({"prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0})
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        assert conn.getresponse().status == 200
        conn.close()
        stream = SimpleNamespace(port=port)
        conn, resp = _open_stream(stream, {"prompt": PROMPTS[0], "max_tokens": 480, "temperature": 0, "stream": True})
        assert resp.readline().startswith(b"data: ")
        proc.send_signal(signal.SIGTERM)
        events = [line for line in resp.read().decode().split("\n\n") if line]
        conn.close()
        rest = proc.communicate(timeout=30)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = "".join(lines) + rest
    assert proc.returncode == 0, log
    assert events[-1] == "data: [DONE]" and "the server is shutting down" in events[-2], events[-3:]
    assert re.search(
        r"POST /v1/completions 200 .*prompt \d+ \+ completion 5 tokens in .* s \([\d.]+ tokens/s\)", log
    ), log
    assert re.search(r"POST /v1/completions 200 .*finish cancelled", log), log
    assert "Shutting down" in log and "Traceback" not in log
