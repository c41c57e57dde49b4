"""Generation under concurrent use, and clear errors where the arithmetic breaks (NaN weights, tiny temperatures)."""

import threading

import pytest
import torch
from helpers_models import msft_moe_checkpoint

import phixtral
from phixtral import NonFiniteLogitsError
from phixtral.generate import generation_lock

PROMPTS = ["def f7(x, y):\n", "import os\nclass A", "for i in range(10):", "while True:\n    x"]


@pytest.fixture(scope="module")
def model():
    return phixtral.from_pretrained(msft_moe_checkpoint(), backend="torch")


def test_threads_generating_on_one_model_get_their_own_results(model):
    expected = [model.generate(p, max_new_tokens=16) for p in PROMPTS]
    sampled = model.generate(PROMPTS[0], max_new_tokens=16, temperature=0.9, seed=5)
    results, errors = {}, []

    def work(i):
        try:
            if i == len(PROMPTS):
                results[i] = model.generate(PROMPTS[0], max_new_tokens=16, temperature=0.9, seed=5)
            elif i % 2:
                results[i] = "".join(model.generate(PROMPTS[i], max_new_tokens=16, stream=True))
            else:
                results[i] = model.generate(PROMPTS[i], max_new_tokens=16)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    for _ in range(3):
        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(PROMPTS) + 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors
        assert [results[i] for i in range(len(PROMPTS))] == expected
        assert results[len(PROMPTS)] == sampled


def test_second_generation_while_a_stream_is_open_is_an_error(model):
    expected = model.generate(PROMPTS[1], max_new_tokens=8)
    stream = model.generate(PROMPTS[0], max_new_tokens=8, stream=True)
    first = next(stream)
    with pytest.raises(RuntimeError, match="already generating in this thread"):
        model.generate(PROMPTS[1], max_new_tokens=8)
    with pytest.raises(RuntimeError, match="a stream still open"):
        model.generate(PROMPTS[1], max_new_tokens=8, stream=True)
    rest = "".join(stream)  # the open stream was not disturbed
    assert first + rest == model.generate(PROMPTS[0], max_new_tokens=8)
    assert model.generate(PROMPTS[1], max_new_tokens=8) == expected  # exhausted: the model is free again


def test_closed_or_dropped_streams_free_the_model(model):
    stream = model.generate(PROMPTS[0], max_new_tokens=8, stream=True)
    next(stream)
    stream.close()
    assert generation_lock(model).holder is None
    model.generate(PROMPTS[0], max_new_tokens=8, stream=True)  # never iterated, dropped at once
    assert generation_lock(model).holder is None
    assert isinstance(model.generate(PROMPTS[0], max_new_tokens=4), str)


class WatchedLock:
    """A stand-in for a GenerationLock's inner lock that reports a caller who has to wait, and how it waits."""

    def __init__(self, real, waiting: threading.Event):
        self.real, self.waiting, self.waits = real, waiting, []

    def acquire(self, blocking=True, timeout=-1):
        if self.real.acquire(blocking=False):
            return True
        self.waits.append((blocking, timeout))
        self.waiting.set()
        return self.real.acquire(blocking, timeout)

    def release(self):
        self.real.release()


def test_a_stream_waits_in_another_thread_until_the_first_is_closed(model, monkeypatch):
    """The other thread blocks on the model's lock, with no timeout, and runs no forward until the stream is closed:
    seen by the lock and a forward hook, not by a timer."""
    expected = model.generate(PROMPTS[2], max_new_tokens=8)
    stream = model.generate(PROMPTS[0], max_new_tokens=8, stream=True)
    next(stream)
    lock = generation_lock(model)
    assert lock.holder == threading.get_ident()
    first = threading.Event()  # set by whichever comes first: the worker waits on the lock, or it runs a forward
    watched = WatchedLock(lock._lock, first)
    monkeypatch.setattr(lock, "_lock", watched)
    worker_id, worker_forwards, out, stream_closed = [], [], [], [False]

    def hook(module, args, output):
        if threading.get_ident() in worker_id:
            worker_forwards.append(stream_closed[0])
            first.set()

    def work():
        worker_id.append(threading.get_ident())
        out.append(model.generate(PROMPTS[2], max_new_tokens=8))

    handle = model.lm_head.register_forward_hook(hook)
    try:
        worker = threading.Thread(target=work)
        worker.start()
        assert first.wait(60)
        assert watched.waits == [(True, -1)], "the other thread must wait for the model, with no timeout"
        assert not worker_forwards, "the other thread ran the model while the stream held it"
        stream_closed[0] = True
        stream.close()
        worker.join(timeout=60)
    finally:
        handle.remove()
    assert out == [expected] and worker_forwards and all(worker_forwards)


def test_close_from_another_thread_during_a_step_frees_the_model_only_after_it():
    """Thread A is inside a step of its stream (held in a forward hook) when this thread closes the stream and starts
    a generation of its own: the close takes effect after A's step, and the new generation waits for it instead of
    sharing A's KV cache."""
    m = phixtral.from_pretrained(msft_moe_checkpoint(), backend="torch")
    full_a, expected_b = m.generate(PROMPTS[0], max_new_tokens=30), m.generate(PROMPTS[1], max_new_tokens=30)
    m.last_generation_stats = None
    in_step, resume = threading.Event(), threading.Event()
    a_thread, streams, calls, stats_seen_by_b, pieces, errors = [None], [], [0], [], [], []

    def hook(module, args, out):
        if threading.get_ident() == a_thread[0]:
            calls[0] += 1
            if calls[0] == 4:  # the 4th token's forward: A is inside next(stream)
                in_step.set()
                assert resume.wait(60)
        elif not stats_seen_by_b:
            stats_seen_by_b.append(m.last_generation_stats)  # the first forward of this thread's generation

    def consume():
        a_thread[0] = threading.get_ident()
        streams.append(m.generate(PROMPTS[0], max_new_tokens=30, stream=True))
        try:
            pieces.extend(streams[0])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    handle = m.lm_head.register_forward_hook(hook)
    try:
        worker = threading.Thread(target=consume)
        worker.start()
        assert in_step.wait(60)
        stream = streams[0]
        stream.close()  # from this thread, while A's step runs: deferred
        resume.set()
        got_b = m.generate(PROMPTS[1], max_new_tokens=30)
        worker.join(timeout=60)
    finally:
        resume.set()
        handle.remove()
    assert not errors and not worker.is_alive()
    stats_a = stats_seen_by_b[0]
    assert stats_a is not None, "the second generation started before the first one's generator stopped"
    assert 4 <= stats_a.new_tokens < 30  # the step that ran during close() finished, and it was the last
    assert full_a.startswith("".join(pieces)) and got_b == expected_b
    assert list(stream) == [] and generation_lock(m).holder is None


def test_nan_weight_raises_naming_the_first_bad_module():
    model = phixtral.from_pretrained(msft_moe_checkpoint(), backend="torch")
    with torch.no_grad():
        model.h[1].mixer.out_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLogitsError, match=r"non-finite logits .* step 0 .*output of h\.1\.mixer\.out_proj"):
        model.generate(PROMPTS[0], max_new_tokens=4)
    with pytest.raises(NonFiniteLogitsError):
        "".join(model.generate(PROMPTS[0], max_new_tokens=4, stream=True))
    assert generation_lock(model).holder is None  # the error freed the model


@pytest.mark.parametrize("temperature", [1e-45, 1e-30, 5e-324])
def test_tiny_temperature_samples_the_argmax(model, temperature):
    greedy = model.generate(PROMPTS[0], max_new_tokens=12)
    assert greedy
    assert model.generate(PROMPTS[0], max_new_tokens=12, temperature=temperature, seed=0) == greedy


@pytest.mark.parametrize("seed", [2**64, 2**70, -1])
def test_seed_out_of_range_names_the_argument(model, seed):
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
        model.generate(PROMPTS[0], max_new_tokens=2, seed=seed)
    assert model.generate(PROMPTS[0], max_new_tokens=2, seed=2**64 - 1, temperature=1.0)


def test_generation_stats_print_their_rates(model):
    model.generate(PROMPTS[0], max_new_tokens=6)
    text = str(model.last_generation_stats)
    assert "prompt" in text and "decode 6 tokens" in text and text.count("tokens/s") == 2
