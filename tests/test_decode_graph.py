"""CUDA-graph decode without a GPU: when graphs are used and when not, and the logic around them under
an emulated graph.

The emulation stands in for phixtral.decode_graph._capture: the capture runs the step once (as the warm-up does) and
each replay runs it again on the static inputs and writes the static output in place, as a replayed graph does. So the
plumbing is real (static inputs per step, the padding mask per generation, one graph per key, the model-state check that
drops stale graphs, the fallback when a capture fails, the lookahead) and only the recording itself is not.
tests/test_decode_graph_gpu.py runs real graphs.
"""

import importlib
import logging
import sys
import threading
from pathlib import Path

import pytest
import torch
from helpers_models import eager_and_graph_step_logits, msft_moe_checkpoint

import phixtral
from phixtral import decode_graph
from phixtral.generate import generate_tokens
from phixtral.runtime import RuntimeSettings
from phixtral.serve.engine import Request, SamplingParams, _RowSampler

PROMPTS = ["def f7(x, y):\n", "import os\nclass A", "for i in range(10):"]
SAMPLING = dict(temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.3, seed=11)
STEPS = decode_graph.CAPTURE_MIN_STEPS + 4  # enough for "auto" to capture


@pytest.fixture(scope="module")
def model():
    return phixtral.from_pretrained(msft_moe_checkpoint(), backend="torch")


class Emulation:
    """A stand-in for decode_graph._capture that counts captures and replays; `fail` makes the next captures raise."""

    def __init__(self):
        self.captures = self.replays = self.attempts = 0
        self.fail = None

    def __call__(self, step, graphs, device):
        self.attempts += 1
        if self.fail is not None:
            raise self.fail
        self.captures += 1
        out = step()  # the warm-up; a real capture records the same ops, and the replay right after runs them

        def replay():
            self.replays += 1
            out.copy_(step())

        return object(), replay, out


@pytest.fixture
def graphs(model, monkeypatch):
    """Graphs allowed on the CPU model (backend torch, decode steps emulated); the model's graphs dropped afterwards."""
    emulation = Emulation()
    monkeypatch.setattr(decode_graph, "graph_unavailable_reason", lambda m: None)
    monkeypatch.setattr(decode_graph, "_capture", emulation)
    monkeypatch.delenv(decode_graph.ENV_VAR, raising=False)
    model.clear_caches()
    yield emulation
    model.clear_caches()
    model.cuda_graph = "auto"


def both(model, prompt, **kw):
    """(eager result, graph result) of model.generate; checks that each took the path it was asked for."""
    eager = model.generate(prompt, cuda_graph=False, **kw)
    assert not model.last_generation_stats.cuda_graph
    graph = model.generate(prompt, cuda_graph=True, **kw)
    assert model.last_generation_stats.cuda_graph
    return eager, graph


# --- when graphs are used --------------------------------------------------------------------------------------------
def test_cpu_decodes_eagerly(model):
    model.clear_caches()
    out = model.generate(PROMPTS[0], max_new_tokens=STEPS)
    assert not model.last_generation_stats.cuda_graph and model.decode_graphs is None
    assert model.generate(PROMPTS[0], max_new_tokens=STEPS, cuda_graph=False) == out
    assert decode_graph.graph_unavailable_reason(model) == "the model is on cpu: CUDA graphs need a CUDA device"
    with pytest.raises(RuntimeError, match="cuda_graph=True, but .* CUDA graphs need a CUDA device"):
        model.generate(PROMPTS[0], max_new_tokens=4, cuda_graph=True)
    assert model.generate(PROMPTS[0], max_new_tokens=STEPS) == out  # the failed call left the model usable


@pytest.mark.parametrize("value", ["on", 1, 0, None, "True"])
def test_bad_cuda_graph_values_are_refused(model, value):
    """A generation's argument is checked when generate runs; the model's setting when it is set."""
    if value is not None:
        with pytest.raises(ValueError, match="cuda_graph must be 'auto', True or False"):
            model.generate(PROMPTS[0], max_new_tokens=2, cuda_graph=value)
    with pytest.raises(ValueError, match="model.cuda_graph must be 'auto', True or False"):
        model.cuda_graph = value
    assert model.cuda_graph == "auto", "a refused value leaves the setting as it was"


def test_environment_variable_turns_auto_off(model, monkeypatch):
    monkeypatch.delenv(decode_graph.ENV_VAR, raising=False)
    assert decode_graph.resolve_mode(model) == "auto"
    for off in ("0", "off", "False", " no "):
        monkeypatch.setenv(decode_graph.ENV_VAR, off)
        assert decode_graph.resolve_mode(model) is False
        assert decode_graph.resolve_mode(model, True) is True  # an explicit request is not overridden
    monkeypatch.setenv(decode_graph.ENV_VAR, "1")
    assert decode_graph.resolve_mode(model) == "auto"
    assert decode_graph.resolve_mode(model, False) is False


def test_only_the_triton_backend_is_captured(model):
    """The torch and naive backends read routing results on the host, which a capture forbids (TRITON_INTERPRET=1 here,
    so "auto" means triton on this CPU, as on a GPU from sm_80 on)."""
    try:
        for backend in ("torch", "naive"):
            model.set_backend(backend)
            assert f"runs the '{backend}' backend" in decode_graph.host_sync_reason(model)
        model.set_backend("triton")
        assert decode_graph.host_sync_reason(model) is None
        model.set_backend("auto")
        assert decode_graph.host_sync_reason(model) is None
        model.h[1].moe.runtime = RuntimeSettings(
            backend="torch"
        )  # one layer reading other settings is enough to forbid it
        assert decode_graph.host_sync_reason(model).startswith("h.1.moe runs the 'torch' backend")
    finally:
        model.h[1].moe.runtime = model.runtime
        model.set_backend("torch")
    cpu = torch.device("cpu")
    assert decode_graph._resolved_backend("auto", cpu, torch.float64) == "torch"  # the kernels take fp16 / bf16 / fp32
    assert decode_graph._resolved_backend("auto", torch.device("meta"), torch.float16) == "torch"


# --- graph decode gives the eager tokens -----------------------------------------------------------------------------
@pytest.mark.parametrize("lookahead", [False, True], ids=["read-then-queue", "queue-then-read"])
def test_graph_tokens_equal_eager_tokens(model, graphs, monkeypatch, lookahead):
    if lookahead:  # as on CUDA: step n + 1 is queued before token n is read
        monkeypatch.setattr(importlib.import_module("phixtral.generate"), "LOOKAHEAD_DEVICE_TYPES", ("cpu",))
    eager, graph = both(model, PROMPTS[0], max_new_tokens=STEPS)  # batch 1, greedy
    assert graph == eager and graphs.captures == 1 and graphs.replays == STEPS - 1
    eager, graph = both(model, PROMPTS, max_new_tokens=STEPS)  # batch 3, left-padded, greedy
    assert graph == eager
    eager, graph = both(model, PROMPTS, max_new_tokens=STEPS, **SAMPLING)  # batch 3, seeded sampling + penalty
    assert graph == eager
    ids = model.tokenizer(PROMPTS[1], return_tensors="pt")["input_ids"].expand(3, -1)
    eager, graph = both(model, ids, max_new_tokens=STEPS, **SAMPLING)  # batch 3 without padding
    assert torch.equal(graph, eager)
    assert graphs.captures == 3, "batch 1; batch 3 padded (sampling reuses it); batch 3 unpadded"


def test_graph_logits_equal_eager_logits_step_by_step(model, graphs):
    """Both runs fed the eager run's greedy tokens, batch 3 left-padded: every decode step's logits are the eager
    step's bits, not only their argmax (a replay runs the eager step's ops on the same inputs)."""
    rows = [model.tokenizer(p)["input_ids"] for p in PROMPTS]
    S = max(map(len, rows))
    ids = torch.tensor([[0] * (S - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (S - len(r)) + [1] * len(r) for r in rows])
    eager, graph = eager_and_graph_step_logits(model, ids, mask, max_new_tokens=8)
    assert graphs.replays == 7 and len(graph) == len(eager) == 8
    assert torch.equal(graph, eager)


def test_a_graph_serves_generations_with_other_padding(model, graphs):
    """Two batches of the same shape and cache length but other pad positions share one graph: each generation's mask
    goes into the graph's static copy."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    results = []
    for mask in ([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]], [[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]]):
        mask = torch.tensor(mask)
        results.append(both(model, ids, attention_mask=mask, max_new_tokens=STEPS))
    for eager, graph in results:
        assert torch.equal(graph, eager)
    assert not torch.equal(results[0][0], results[1][0])
    assert graphs.captures == 1


def test_graphs_follow_the_kv_cache_and_the_model(model, graphs):
    """Kept while the cache is: dropped when a generation crosses into another cache-length bucket or batch size (the
    cache is reallocated), by clear_caches, set_backend, attention_upcast, and when a parameter gets a new tensor."""
    short = dict(max_new_tokens=STEPS)  # prompt + 20 tokens: a cache of 64 slots
    long = dict(max_new_tokens=64 + STEPS)  # 128 slots
    eager, graph = both(model, PROMPTS[0], **short)
    assert graph == eager and model.cache_length == 64 and graphs.captures == 1
    first = model.decode_graphs
    assert model.generate(PROMPTS[0], **short) == eager  # "auto": the same graph
    assert model.decode_graphs is first and graphs.captures == 1 and model.last_generation_stats.cuda_graph
    eager_long, graph_long = both(model, PROMPTS[0], **long)
    assert graph_long == eager_long and model.cache_length == 128
    assert model.decode_graphs is not first and graphs.captures == 2
    assert (
        both(model, PROMPTS[0], **short) == (eager, eager) and graphs.captures == 3
    )  # back to 64 slots: captured again
    eager2, graph2 = both(model, PROMPTS[:2], **short)  # batch 2
    assert graph2 == eager2 and eager2[0] == eager and graphs.captures == 4
    for drop in (
        model.clear_caches,
        lambda: model.set_backend("torch"),
        lambda: setattr(model, "attention_upcast", "fp32"),
    ):
        model.generate(PROMPTS[0], **short)
        assert model.decode_graphs is not None
        drop()
        assert model.decode_graphs is None
    model.generate(PROMPTS[0], **short)
    held = model.decode_graphs
    with torch.no_grad():
        model.h[0].ln.weight.data = model.h[
            0
        ].ln.weight.data.clone()  # same values, new tensor: the graph would miss it
    assert model.generate(PROMPTS[0], **short) == eager
    assert model.decode_graphs is not held and model.decode_graphs.captures == 1
    held = model.decode_graphs
    with torch.no_grad():
        model.h[0].ln.weight.copy_(model.h[0].ln.weight)  # written in place: the graph reads it
    assert model.generate(PROMPTS[0], **short) == eager and model.decode_graphs is held


def test_auto_captures_only_ahead_of_enough_steps(model, graphs):
    ids = model.tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    few = decode_graph.CAPTURE_MIN_STEPS  # prefill + CAPTURE_MIN_STEPS - 1 decode steps
    out = model.generate(ids, max_new_tokens=few)
    assert not model.last_generation_stats.cuda_graph and graphs.attempts == 0
    assert torch.equal(model.generate(ids, max_new_tokens=few, cuda_graph=True), out)  # True captures anyway
    assert model.last_generation_stats.cuda_graph and graphs.captures == 1
    assert torch.equal(model.generate(ids, max_new_tokens=3), out[:, : ids.shape[1] + 3])
    assert model.last_generation_stats.cuda_graph, "a graph that exists serves short generations too"
    assert graphs.captures == 1
    model.generate(ids, max_new_tokens=1)  # no decode step at all
    assert not model.last_generation_stats.cuda_graph


def test_a_failed_capture_decodes_eagerly_or_raises_when_required(model, graphs, caplog):
    expected = model.generate(PROMPTS, max_new_tokens=STEPS, cuda_graph=False)
    graphs.fail = RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")
    with caplog.at_level(logging.WARNING, logger="phixtral.decode_graph"):
        assert model.generate(PROMPTS, max_new_tokens=STEPS) == expected
    assert not model.last_generation_stats.cuda_graph
    assert (
        "capture of the decode step (batch 3, cache 64) failed, decoding eagerly: RuntimeError: CUDA error"
        in caplog.text
    )
    assert model.generate(PROMPTS, max_new_tokens=STEPS) == expected
    assert graphs.attempts == 1, "a key whose capture failed is not tried again"
    with pytest.raises(RuntimeError, match="could not be captured: RuntimeError: CUDA error: operation not permitted"):
        model.generate(PROMPTS, max_new_tokens=STEPS, cuda_graph=True)
    graphs.fail = None
    model.clear_caches()  # a new model state tries again
    assert model.generate(PROMPTS, max_new_tokens=STEPS) == expected and model.last_generation_stats.cuda_graph


def test_serve_row_sampler_tokens_equal(model, graphs):
    """The serve engine's path: generate_tokens with a per-row sampler (one greedy row, two seeded rows)."""
    tok = model.tokenizer
    rows = [tok(p)["input_ids"] for p in PROMPTS]
    S = max(map(len, rows))
    ids = torch.tensor([[0] * (S - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (S - len(r)) + [1] * len(r) for r in rows])
    params = [SamplingParams(STEPS), SamplingParams(STEPS, temperature=0.8, top_p=0.9, seed=1),
              SamplingParams(STEPS, temperature=1.2, top_k=20, seed=2)]  # fmt: skip
    out = {}
    for graph in (False, True):
        sampler = _RowSampler([Request(r, p, lambda e: None) for r, p in zip(rows, params)], model.device)
        stats = {"prefill_s": 0.0, "decode_s": 0.0}
        out[graph] = list(generate_tokens(model, ids, mask, max_new_tokens=STEPS, sampler=sampler, stats=stats,
                                          cuda_graph=graph))  # fmt: skip
        assert stats.get("cuda_graph", False) is graph
    assert out[True] == out[False]


def test_threads_share_the_graphs_one_generation_at_a_time(model, graphs):
    expected = {p: model.generate(p, max_new_tokens=STEPS, cuda_graph=False) for p in PROMPTS}
    results, errors = [], []

    def work(p):
        try:
            results.append((p, model.generate(p, max_new_tokens=STEPS)))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(p,)) for p in PROMPTS * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 9
    assert all(text == expected[p] for p, text in results)


def test_stale_graphs_are_not_copied_or_pickled(model, graphs):
    import copy
    import io

    model.generate(PROMPTS[0], max_new_tokens=STEPS)
    assert model.decode_graphs is not None
    assert copy.deepcopy(model).decode_graphs is None
    buf = io.BytesIO()
    torch.save(model.decode_graphs, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=False) is None


# --- the benchmark's graph provider -----------------------------------------------------------------------------------
def test_benchmark_graph_provider_runs_the_library_path(monkeypatch):
    """bench_generate's fused_graph row (run_graph: the check against eager steps, then generate(cuda_graph=True)) on
    the quick model under the emulation, with the Triton interpreter as its backend."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    bench = importlib.import_module("bench_generate")
    emulation = Emulation()
    monkeypatch.setattr(decode_graph, "graph_unavailable_reason", lambda m: None)
    monkeypatch.setattr(decode_graph, "_capture", emulation)
    cpu = torch.device("cpu")
    model = bench.build_model(phixtral.PhixtralConfig(**bench.QUICK_MODEL), torch.float32, cpu)
    ids = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    row = bench.run_graph(model, ids, 4, 1, cpu, bench.TOLERANCE["quick"][torch.float32])
    assert row["check"].ok and row["check"].rel_err == 0.0 and row["new_tokens"] == 4
    assert emulation.captures == 1 and emulation.replays == 3 + 3  # the check's 3 decode steps, then one timed run
    assert "bench_generate" in sys.modules


def test_a_compiled_step_is_what_the_graph_captures(model, graphs):
    """compile=True with graphs: the capture's warm-up compiles the step (torch.compile), the graph holds the compiled
    step, and the tokens are the eager path's; graphs of compiled and eager steps are kept apart."""
    from phixtral import compiled_decode

    if compiled_decode.compile_unavailable_reason(model) is not None:
        pytest.skip(compiled_decode.compile_unavailable_reason(model))
    calls = []
    real = compiled_decode.compiled_call
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(decode_graph, "compiled_call", lambda *a: calls.append(1) or real(*a))
    try:
        eager = model.generate(PROMPTS[0], max_new_tokens=8, cuda_graph=False, compile=False)
        compiled = model.generate(PROMPTS[0], max_new_tokens=8, cuda_graph=True, compile=True)
        stats = model.last_generation_stats
        assert compiled == eager and stats.cuda_graph and stats.compiled and stats.compile_s > 0
        assert graphs.captures == 1 and len(calls) == 1 + graphs.replays  # the warm-up, then every replay
        model.generate(PROMPTS[0], max_new_tokens=8, cuda_graph=True, compile=False)
        assert graphs.captures == 2 and not model.last_generation_stats.compiled
        assert {key[-1] for key in model.decode_graphs.graphs} == {True, False}
    finally:
        monkeypatch.undo()
