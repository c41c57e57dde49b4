"""`phixtral serve`'s OpenAI features (logprobs equal to log_softmax of the model's logits, n > 1, seeds, usage in
streams), its limits and guards (API key, Host, Origin, body size, caps, each refusal in OpenAI's error format),
/metrics and /health under faults: a 10 MB prompt stalls neither /health nor a running stream, and clients that left
are not counted."""

import concurrent.futures
import http.client
import json
import socket
import threading
import time
from types import SimpleNamespace

import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
from serve_helpers import NAME, raw, settle, start_server, tiny_model  # noqa: E402

from phixtral.serve.engine import Engine  # noqa: E402
from phixtral.serve.limits import Limits  # noqa: E402

PROMPT = "def fib(n):"
MESSAGES = [{"role": "user", "content": "Write a function that adds two numbers."}]
KEY = "sk-test-key"


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _serve(model, limits):
    engine = Engine(model, max_batch_size=8)
    srv, thread, port = start_server(engine, limits)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=limits.api_key or "unused", max_retries=0,
                           timeout=60)  # fmt: skip
    return srv, thread, SimpleNamespace(port=port, model=model, engine=engine, client=client)


@pytest.fixture(scope="module")
def server(model):
    srv, thread, ns = _serve(model, Limits(max_tokens=500, max_prompts=8, max_request_bytes=16 * 2**20))
    yield ns
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def guarded(model):
    """A server with an API key, a 64 KiB body cap, max_tokens 8 and 2 completions per request."""
    srv, thread, ns = _serve(model, Limits(max_tokens=8, max_prompts=2, max_request_bytes=64 * 2**10, api_key=KEY))
    yield ns
    srv.should_exit = True
    thread.join(timeout=30)


def log_softmax_of(model, prompt_ids, new_ids):
    """log_softmax of the model's logits at each generated position: [len(new_ids), V]."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids + new_ids]))[0, len(prompt_ids) - 1 : -1]
    return torch.log_softmax(logits.float(), -1)


# --- OpenAI features --------------------------------------------------------------------------------------------------
def test_completion_logprobs_equal_log_softmax_of_the_logits(server):
    model, client = server.model, server.client
    prompt_ids = model.tokenizer(PROMPT)["input_ids"]
    new_ids = model.generate(torch.tensor([prompt_ids]), max_new_tokens=6)[0, len(prompt_ids) :].tolist()
    expected = log_softmax_of(model, prompt_ids, new_ids)
    out = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert lp.tokens == [model.tokenizer.decode([t]) for t in new_ids]
    torch.testing.assert_close(torch.tensor(lp.token_logprobs), expected[torch.arange(6), new_ids], atol=1e-4, rtol=0)
    top = expected.topk(3, -1)
    for k, alternatives in enumerate(lp.top_logprobs):
        assert len(alternatives) == 3
        torch.testing.assert_close(torch.tensor(sorted(alternatives.values(), reverse=True)), top.values[k], atol=1e-4,
                                   rtol=0)  # fmt: skip
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    chunks = list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                                            stream=True))  # fmt: skip
    streamed = [v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert streamed == lp.token_logprobs


def test_chat_logprobs_and_top_logprobs(server):
    model, client = server.model, server.client
    text = model.tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    prompt_ids = model.tokenizer(text)["input_ids"]
    new_ids = model.generate(torch.tensor([prompt_ids]), max_new_tokens=5)[0, len(prompt_ids) :].tolist()
    expected = log_softmax_of(model, prompt_ids, new_ids)
    out = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True,
                                         top_logprobs=2)  # fmt: skip
    content = out.choices[0].logprobs.content
    assert [c.token for c in content] == [model.tokenizer.decode([t]) for t in new_ids]
    torch.testing.assert_close(torch.tensor([c.logprob for c in content]), expected[torch.arange(5), new_ids],
                               atol=1e-4, rtol=0)  # fmt: skip
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)
    assert content[0].bytes == list(content[0].token.encode())
    plain = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None


def test_n_choices_sample_with_consecutive_seeds(server):
    model, client = server.model, server.client
    kw = dict(temperature=0.9, top_p=0.95)
    expected = [model.generate(PROMPT, max_new_tokens=8, seed=5 + j, **kw) for j in range(3)]
    out = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=8, n=3, seed=5, **kw)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.text for c in out.choices] == expected and len(set(expected)) > 1
    n_prompt = len(model.tokenizer(PROMPT)["input_ids"])
    assert out.usage.prompt_tokens == n_prompt and out.usage.completion_tokens == 24  # the prompt counted once
    two = client.completions.create(model=NAME, prompt=[PROMPT, "import os"], max_tokens=4, n=2, temperature=0)
    greedy = model.generate([PROMPT, "import os"], max_new_tokens=4)
    assert [c.text for c in sorted(two.choices, key=lambda c: c.index)] == [greedy[0]] * 2 + [greedy[1]] * 2
    chunks = list(client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=4, n=2, seed=1, stream=True,
                                                 stream_options={"include_usage": True}, **kw))  # fmt: skip
    texts = ["", ""]
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
    chat = [model.chat(MESSAGES, max_new_tokens=4, seed=1 + j, **kw) for j in range(2)]
    assert texts == chat and chunks[-1].usage.completion_tokens == 8


def test_completion_stream_reports_usage_when_asked(server):
    chunks = list(server.client.completions.create(model=NAME, prompt=PROMPT, max_tokens=5, temperature=0, stream=True,
                                                   stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])


# --- limits and guards ------------------------------------------------------------------------------------------------
def _status(server, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    status, payload = resp.status, resp.read()
    conn.close()
    return status, payload


def _error(payload: bytes) -> dict:
    error = json.loads(payload)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_api_key_is_required_on_v1_in_openais_error_format(guarded):
    body = json.dumps({"prompt": PROMPT, "max_tokens": 2}).encode()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        status, payload = _status(guarded, "POST", "/v1/completions", body, {"Content-Type": "application/json",
                                                                             **headers})  # fmt: skip
        assert status == 401 and _error(payload)["code"] == "invalid_api_key", payload
    assert _status(guarded, "GET", "/v1/models")[0] == 401
    wrong = openai.OpenAI(base_url=f"http://127.0.0.1:{guarded.port}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    out = guarded.client.completions.create(model=NAME, prompt=PROMPT, max_tokens=2, temperature=0)
    assert out.choices[0].text == guarded.model.generate(PROMPT, max_new_tokens=2)
    assert _status(guarded, "GET", "/health")[0] == 200 and _status(guarded, "GET", "/")[0] == 200


def test_foreign_host_and_origin_are_refused(server):
    port = server.port
    cases = [
        ({"Host": f"evil.example:{port}"}, 403, "host_not_allowed"),
        ({"Host": f"localhost:{port}", "Origin": "http://evil.example"}, 403, "origin_not_allowed"),
        ({"Host": f"127.0.0.1:{port}", "Origin": "null"}, 403, "origin_not_allowed"),
    ]
    for headers, status, code in cases:
        got, payload = _status(server, "GET", "/health", headers=headers)
        assert got == status and _error(payload)["code"] == code, (headers, payload)
    body = json.dumps({"prompt": PROMPT, "max_tokens": 2}).encode()
    simple = {"Host": "rebound.example", "Origin": "http://rebound.example", "Content-Type": "text/plain"}
    assert _status(server, "POST", "/v1/completions", body, simple)[0] == 403  # a rebinding page's simple POST
    same = {"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}", "Content-Type": "application/json"}
    assert _status(server, "POST", "/v1/completions", body, same)[0] == 200
    assert _status(server, "GET", "/health", headers={"Host": f"[::1]:{port}"})[0] == 200


def test_bodies_over_the_cap_get_413_before_they_are_read(guarded):
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    big = json.dumps({"prompt": "x" * 100_000, "max_tokens": 2}).encode()
    status, payload = _status(guarded, "POST", "/v1/completions", big, headers)
    assert status == 413 and _error(payload)["code"] == "request_too_large"
    conn = http.client.HTTPConnection("127.0.0.1", guarded.port, timeout=60)  # chunked: no Content-Length to check
    conn.request("POST", "/v1/completions", body=iter([big[:40_000], big[40_000:]]), headers=headers,
                 encode_chunked=True)  # fmt: skip
    resp = conn.getresponse()
    assert resp.status == 413 and _error(resp.read())["code"] == "request_too_large"
    conn.close()
    assert _status(guarded, "GET", "/health")[0] == 200


def test_the_faults_of_the_issue_get_4xx_and_the_server_keeps_answering(guarded):
    auth = {"Authorization": f"Bearer {KEY}"}
    cases = [
        ({"prompt": PROMPT, "stop": ["x" * 800] * 2000}, 413),  # 1.6 MB of stop strings: over the body cap
        ({"prompt": PROMPT, "stop": ["x" * 800] * 5}, 400),
        ({"prompt": ["ab"] * 200, "max_tokens": 2}, 400),  # 200 prompts in one request
        ({"prompt": PROMPT, "max_tokens": 9}, 400),  # over the server's max_tokens
        ({"prompt": PROMPT, "n": 3}, 400),
    ]
    for body, status in cases:
        got, payload = raw(guarded, "POST", "/v1/completions", body, headers=auth)
        assert got == status and payload["error"]["message"], (status, payload)
    chat = guarded.client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=0)  # no max_tokens
    assert chat.usage.completion_tokens <= 8
    assert raw(guarded, "GET", "/health")[0] == 200


def test_a_10mb_prompt_stalls_neither_health_nor_a_running_stream(server):
    """The prompt is refused (400) on the character count before tokenizing; /health and a stream keep their pace."""
    settle(server.engine)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    stream_body = {"prompt": PROMPT, "max_tokens": 120, "temperature": 0, "stream": True}
    conn.request("POST", "/v1/completions", body=json.dumps(stream_body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    arrivals, health, done = [], [], threading.Event()

    def read_stream():
        for line in resp:
            if line.startswith(b"data: "):
                arrivals.append(time.monotonic())

    def poll_health():
        while not done.is_set():
            t = time.monotonic()
            assert raw(server, "GET", "/health")[0] == 200
            health.append(time.monotonic() - t)
            time.sleep(0.02)

    reader, poller = threading.Thread(target=read_stream), threading.Thread(target=poll_health)
    reader.start()
    while len(arrivals) < 3:
        time.sleep(0.01)
    poller.start()
    big = {"prompt": "lorem ipsum " * 900_000, "max_tokens": 4}  # 10.8 MB
    sent = time.monotonic()
    status, payload = raw(server, "POST", "/v1/completions", big)
    window = (sent, time.monotonic())
    done.set()
    poller.join()
    reader.join()
    conn.close()
    assert status == 400 and payload["error"]["code"] == "context_length_exceeded"
    assert max(health) < 0.5, f"/health took {max(health):.2f} s while a 10 MB prompt arrived"
    during = [b - a for a, b in zip(arrivals, arrivals[1:]) if window[0] <= b <= window[1] + 0.5]
    assert not during or max(during) < 0.5, f"the stream stalled {max(during):.2f} s"


def test_health_does_not_count_requests_whose_clients_left(server):
    engine = server.engine
    settle(engine)
    engine.hold(100)  # requests wait in the queue
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": PROMPT, "max_tokens": 3}),
                     headers={"Content-Type": "application/json"})  # fmt: skip
        deadline = time.monotonic() + 30
        while raw(server, "GET", "/health")[1]["waiting"] != 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        while raw(server, "GET", "/health")[1]["waiting"] != 0:
            assert time.monotonic() < deadline, "a request whose client left is still counted"
            time.sleep(0.02)
    finally:
        engine.hold(0)
    settle(engine)


def test_metrics_in_prometheus_text_format(server):
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: server.client.completions.create(model=NAME, prompt=PROMPT, max_tokens=4), range(4)))
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/plain; version=0.0.4")
    text = resp.read().decode()
    conn.close()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values["phixtral_generation_tokens_total"] >= 16 and values["phixtral_prompt_tokens_total"] > 0
    assert values['phixtral_requests_total{finish_reason="length"}'] >= 4
    assert values['phixtral_http_requests_total{route="/v1/completions",status="200"}'] >= 4
    assert "phixtral_requests_waiting" in values and "phixtral_requests_running" in values
    for hist in ("phixtral_time_to_first_token_seconds", "phixtral_inter_token_latency_seconds"):
        buckets = [v for k, v in values.items() if k.startswith(hist + "_bucket")]
        assert buckets == sorted(buckets) and buckets[-1] == values[hist + "_count"] > 0
    assert "# TYPE phixtral_time_to_first_token_seconds histogram" in text


def test_the_chat_page_is_served_with_a_strict_policy(server):
    for path, kind in (("/", "text/html"), ("/chat.js", "text/javascript")):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read().decode()
        assert resp.status == 200 and resp.getheader("Content-Type").startswith(kind)
        assert "frame-ancestors 'none'" in resp.getheader("Content-Security-Policy")
        conn.close()
        assert "http://" not in body and "https://" not in body  # nothing from elsewhere
