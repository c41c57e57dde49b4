"""The serve engine without HTTP: per-row cache positions in the model, both schedulers' policies, and answers equal to
generate() while requests join and leave the running batch (row moves, chunked prefill, seeded rows)."""

import threading
import time

import pytest
import torch
from serve_helpers import tiny_model

from phixtral.serve.engine import Done, Engine, Failed, Piece, Request, SamplingParams

PROMPTS = ["def fib(n):", "import os\nclass Config", "for i in range(10):\n    ", "The asyncio event loop"]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


class Collector:
    """Submits requests to an engine and keeps each one's events; `wait` blocks until they are all over."""

    def __init__(self, engine: Engine):
        self.engine, self.events, self.requests = engine, [], []
        self.cond = threading.Condition()

    def submit(self, ids, **params) -> Request:
        k = len(self.events)
        self.events.append([])

        def emit(event):
            with self.cond:
                self.events[k].append(event)
                self.cond.notify_all()

        r = Request(ids, SamplingParams(**params), emit)
        self.requests.append(r)
        self.engine.submit(r)
        return r

    def wait_for(self, predicate, timeout=120):
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), "the engine did not answer in time"

    def wait(self, timeout=120):
        self.wait_for(lambda: all(ev and isinstance(ev[-1], (Done, Failed)) for ev in self.events), timeout)

    def text(self, k) -> str:
        return "".join(e.text for e in self.events[k] if isinstance(e, Piece))


def ids_of(model, prompt):
    return model.tokenizer(prompt)["input_ids"]


def test_per_row_cache_positions_equal_a_forward_without_cache(model):
    """Two sequences prefilled into rows 1 and 2 (one in two chunks), then decoded in one step at their positions."""
    a, b = ids_of(model, PROMPTS[0]), ids_of(model, PROMPTS[1])
    with torch.inference_mode():
        full_a, full_b = model(torch.tensor([a + [5]])), model(torch.tensor([b + [7]]))
        model.setup_caches(3, 64)
        la = model(torch.tensor([a]), input_pos=torch.arange(len(a))[None], cache_row=1)
        lb1 = model(torch.tensor([b[:3]]), input_pos=torch.arange(3)[None], cache_row=2)
        lb2 = model(torch.tensor([b[3:]]), input_pos=torch.arange(3, len(b))[None], cache_row=2)
        step = model(torch.tensor([[5], [7]]), input_pos=torch.tensor([[len(a)], [len(b)]]), cache_row=1)  # [2, 1, V]
        model.move_cache_row(2, 0, len(b) + 1)  # row 2's sequence, moved, decodes the same from row 0
        moved = model(torch.tensor([[9]]), input_pos=torch.tensor([[len(b) + 1]]), cache_row=0)
        full_moved = model(torch.tensor([b + [7, 9]]))
    torch.testing.assert_close(la, full_a[:, :-1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat([lb1, lb2], 1), full_b[:, :-1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(step[:, 0], torch.cat([full_a[:, -1], full_b[:, -1]]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(moved[:, 0], full_moved[:, -1], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="batch of 2 exceeds the KV cache's batch size 3 from cache row 2"):
        model(torch.tensor([[5], [7]]), input_pos=torch.tensor([[1], [1]]), cache_row=2)


def test_static_engine_batches_in_arrival_order_within_the_context(model):
    engine = Engine(model, max_batch_size=2, batching="static")
    c = Collector(engine)
    short = ids_of(model, PROMPTS[0])
    long_prompt = (short * 100)[:400]
    rs = [c.submit(short, max_tokens=3), c.submit(short, max_tokens=3), c.submit(long_prompt, max_tokens=5),
          c.submit(short, max_tokens=200), c.submit(short, max_tokens=2)]  # fmt: skip
    engine.start()  # everything waits already: batches are [0, 1], [2] (400 + 200 > 512), [3, 4]
    try:
        c.wait()
    finally:
        engine.stop()
    assert [r.batch_size for r in rs] == [2, 2, 1, 2, 2]
    assert rs[0].started == rs[1].started < rs[2].started < rs[3].started == rs[4].started
    assert c.text(4) == model.generate(PROMPTS[0], max_new_tokens=2) and rs[4].completion_tokens == 2
    assert [r.finish_reason for r in rs] == ["length"] * 5


def test_static_engine_never_compiles_mid_serving(model, monkeypatch):
    """A compile would stall every client for seconds, once per batch shape: the static batches decode eagerly even
    where "auto" would compile (here: from the first step)."""
    from phixtral import compiled_decode, decode_graph

    monkeypatch.setattr(compiled_decode, "COMPILE_MIN_STEPS", 1)
    model.setup_caches(2, 64)
    wanted = compiled_decode.compile_wanted(model, compile="auto", steps=4)
    assert wanted == (compiled_decode.compile_unavailable_reason(model) is None)  # where it can, "auto" would compile
    engine = Engine(model, max_batch_size=2, batching="static")
    c = Collector(engine)
    rs = [c.submit(ids_of(model, p), max_tokens=4) for p in PROMPTS[:2]]
    monkeypatch.setattr(decode_graph, "CompiledStep", None)  # a compiled step would fail the batch
    engine.start()
    try:
        c.wait()
    finally:
        engine.stop()
    assert [r.finish_reason for r in rs] == ["length", "length"]


def test_continuous_engine_lets_short_requests_join_and_leave_a_long_one(model):
    """A long request runs; short ones submitted once it has produced tokens join its decode steps and finish first."""
    expected_long = model.generate(PROMPTS[1], max_new_tokens=40)
    expected_short = [model.generate(p, max_new_tokens=4) for p in PROMPTS]
    engine = Engine(model, max_batch_size=4)
    c = Collector(engine)
    engine.start()
    try:
        long = c.submit(ids_of(model, PROMPTS[1]), max_tokens=40)
        c.wait_for(lambda: long.completion_tokens >= 3)
        shorts = [c.submit(ids_of(model, p), max_tokens=4) for p in PROMPTS]
        c.wait()
    finally:
        engine.stop()
    assert c.text(0) == expected_long and long.finish_reason == "length"
    assert [c.text(k) for k in range(1, 5)] == expected_short
    assert all(r.finished < long.finished for r in shorts), "short requests must not wait for the long one"
    assert long.batch_size > 1 and engine.largest_batch > 1


def test_continuous_rows_moved_and_prefilled_in_chunks_answer_as_generate(model):
    """Three rows, a prefill chunk of 5 tokens (prompts take several steps), requests of mixed lengths arriving together
    and later: rows leave in any order and the others move down; greedy and seeded rows equal generate()."""
    specs = [(PROMPTS[k % 4] * (1 + k % 3), 3 + 4 * (k % 3), 11 + k if k % 3 == 2 else None) for k in range(8)]
    expected = []
    for prompt, n, seed in specs:
        kw = dict(temperature=0.9, top_p=0.95, seed=seed) if seed is not None else {}
        expected.append(model.generate(prompt, max_new_tokens=n, **kw))
    engine = Engine(model, max_batch_size=3, prefill_chunk=5)
    c = Collector(engine)
    engine.hold(6)
    engine.start()
    try:
        for prompt, n, seed in specs[:6]:  # the hold makes them start together
            kw = dict(temperature=0.9, top_p=0.95, seed=seed) if seed is not None else {}
            c.submit(ids_of(model, prompt), max_tokens=n, **kw)
        c.wait_for(lambda: sum(r.finished is not None for r in c.requests) >= 2)
        for prompt, n, seed in specs[6:]:
            kw = dict(temperature=0.9, top_p=0.95, seed=seed) if seed is not None else {}
            c.submit(ids_of(model, prompt), max_tokens=n, **kw)
        c.wait()
    finally:
        engine.stop()
    assert [c.text(k) for k in range(len(specs))] == expected
    assert engine.largest_batch == 3


def test_hold_waits_for_a_count_of_requests_not_for_time(model):
    engine = Engine(model, max_batch_size=4)
    c = Collector(engine)
    engine.hold(3)
    engine.start()
    try:
        first = [c.submit(ids_of(model, PROMPTS[0]), max_tokens=2) for _ in range(2)]
        time.sleep(0.2)  # would be enough to start them were they not held
        assert all(r.started is None for r in first) and engine.waiting == 2
        c.submit(ids_of(model, PROMPTS[1]), max_tokens=2)
        c.wait()
    finally:
        engine.stop()
    assert engine.largest_batch == 3


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(model, monkeypatch, batching):
    engine = Engine(model, max_batch_size=4, batching=batching)
    real, calls = model.hidden_states, []

    def broken_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "hidden_states", broken_once)
    ids = ids_of(model, PROMPTS[0])
    c = Collector(engine)
    c.submit(ids, max_tokens=3)
    engine.start()
    try:
        c.wait()
        c.submit(ids, max_tokens=3)
        c.wait()
    finally:
        engine.stop()
    monkeypatch.undo()
    assert isinstance(c.events[0][0], Failed) and "device lost" in str(c.events[0][0].error)
    assert c.text(1) == model.generate(PROMPTS[0], max_new_tokens=3)


def test_engine_arguments_are_checked(model):
    with pytest.raises(ValueError, match="batching must be one of"):
        Engine(model, batching="dynamic")
    with pytest.raises(ValueError, match="prefill_chunk must be an int >= 1, got 0"):
        Engine(model, prefill_chunk=0)


def test_a_prompt_surely_too_long_is_told_by_its_length_in_characters(model):
    engine = Engine(model)
    longest = max(len(model.tokenizer.decode([i])) for i in range(model.config.vocab_size))
    assert engine.max_token_chars >= longest  # the bound holds for every token of the bundled vocabulary
    limit = (engine.n_positions - 16) * engine.max_token_chars
    assert engine.surely_too_long("x" * (limit + 1), 16) and not engine.surely_too_long("x" * limit, 16)
    engine.max_token_chars = None  # a tokenizer whose normalizer may drop characters: no shortcut
    assert not engine.surely_too_long("x" * 10**7, 16)
