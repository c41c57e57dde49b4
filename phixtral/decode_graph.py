"""Decode steps replayed from CUDA graphs.

An eager decode step of phixtral-4x2_8 launches about a thousand kernels (some thirty per layer: the LayerNorm, the
qkv and output GEMMs, the rotary's elementwise ops, the cache writes, the casts, SDPA, the five MoE launches). The host
needs longer to launch them than an H200 needs to run them, so eager decode runs at the speed of Python, whatever the
kernels do. A CUDA graph launches the whole step at once.

What is captured: `model.hidden_states` at one new token per row over the static KV cache, then `lm_head` on the last
position, as the eager path computes them: the same ops on the same shapes, so the same kernels and the same logits.
Static inputs: the token ids [B, 1], the cache slot input_pos [1] and, for a left-padded batch, the valid key slots
[B, L]; static output: the logits [B, V] fp32. Sampling (greedy, temperature / top-k / top-p, repetition penalty, a
server's per-row sampler) stays outside the graph and runs eagerly on those logits, so every token and every draw of the
generator is the eager path's.

When: `cuda_graph` of generate() / generate_tokens(), else the model's setting `cuda_graph` (default "auto", checked
when set; phixtral/runtime.py):
    "auto"  graphs when they can work: a CUDA model whose every MoE layer (and GPTQ Linear) runs the Triton kernels,
            which never read device memory on the host. The torch and naive backends read expert counts on the host, a
            sync that capture forbids, so they decode eagerly; so does every CPU model. The first capture for a shape
            needs at least CAPTURE_MIN_STEPS decode steps ahead (a capture costs a few eager steps, by estimate). A
            capture that fails is logged once; that shape then decodes eagerly until the model's state changes. The
            environment variable PHIXTRAL_CUDA_GRAPH=0 (or off, false, no) turns "auto" off.
    True    graphs, else an error that says why not (benchmarks and tests use it to be sure).
    False   eager.
Cache: graphs live on the model (`model.decode_graphs`), one per (batch, cache length, padded or not) of the current KV
cache, all in one memory pool. The model holds one KV cache, so a generation at another batch size or cache-length
bucket (generate rounds the length up to 64 slots) reallocates it and drops the graphs; so do clear_caches(),
set_backend() and a change of attention_upcast. Before each generation the graphs are also checked against the
addresses, shapes and dtypes of every parameter and buffer and the MoE backends and top-k of every layer: a model moved,
cast or given new weight tensors captures again. Weights written in place (load_state_dict, copy_) need nothing.
Threads: generations on one model run one at a time (generate.generation_lock; the serve engine holds it too); captures
run one at a time in the process, each in thread-local mode, so other threads may keep using CUDA meanwhile.
"""

import functools
import logging
import os
import threading
import time
from typing import Callable, Optional

import torch

from .compiled_decode import CompiledStep, compile_wanted, compiled_call
from .model import MoE, Phixtral
from .quant.modules import QuantizedLinear
from .runtime import CUDA_GRAPH_MODES as MODES  # noqa: F401  (importable from here, as before)
from .runtime import check_cuda_graph as check_mode
from .runtime import resolved_backend
from .runtime import resolved_backend as _resolved_backend  # noqa: F401 -- its former name here

log = logging.getLogger("phixtral.decode_graph")

ENV_VAR = "PHIXTRAL_CUDA_GRAPH"
_ENV_OFF = ("0", "off", "false", "no")
# "auto" captures a new graph only when at least this many decode steps lie ahead: a capture costs a few eager steps
# (a synchronize and empty_cache, a warm-up step, the capture, instantiation; an estimate, not measured yet), and a step
# replayed from a graph saves roughly half of one at batch 1 (see benchmarks/RESULTS.md).
CAPTURE_MIN_STEPS = 16
# One capture at a time in the process (torch's rule for CUDA graphs), whichever models the threads generate on.
_CAPTURE_LOCK = threading.Lock()


def resolve_mode(model: Phixtral, cuda_graph=None):
    """The mode of one generation: cuda_graph (checked here), else model.cuda_graph (checked when set); "auto" becomes
    False when PHIXTRAL_CUDA_GRAPH says off. -> "auto", True or False."""
    if cuda_graph is not None:
        check_mode(cuda_graph)
    mode = model.cuda_graph if cuda_graph is None else cuda_graph
    if mode == "auto" and os.environ.get(ENV_VAR, "").strip().lower() in _ENV_OFF:
        return False
    return mode


def host_sync_reason(model: Phixtral) -> Optional[str]:
    """Why a decode step of `model` would read device memory on the host (which capture forbids), or None."""
    device, dtype = model.device, model.dtype
    for name, module in model.named_modules():
        if isinstance(module, (MoE, QuantizedLinear)):
            backend = resolved_backend(module.backend, device, dtype)
            if backend != "triton":
                why = (
                    f" (backend 'auto' on {device}, {str(dtype).replace('torch.', '')})"
                    if module.backend == "auto"
                    else ""
                )
                return f"{name} runs the {backend!r} backend{why}, which reads routing results on the host"
    return None


def graph_unavailable_reason(model: Phixtral) -> Optional[str]:
    """Why decode steps of `model` cannot be replayed from CUDA graphs here, or None when they can."""
    device = model.device
    if device.type != "cuda":
        return f"the model is on {device}: CUDA graphs need a CUDA device"
    if torch.cuda.is_current_stream_capturing():
        return "the current stream is already capturing a CUDA graph"
    return host_sync_reason(model)


def eager_step(
    model: Phixtral, valid: Optional[torch.Tensor], tok: torch.Tensor, input_pos: torch.Tensor
) -> torch.Tensor:
    """One decode step: tok [B] at cache slot input_pos [1] -> logits [B, V] fp32 of the new position."""
    hidden = model.hidden_states(tok[:, None], valid, input_pos)  # [B, 1, D]
    return model.lm_head(hidden[:, -1]).float()


def model_state(model: Phixtral) -> tuple:
    """What a captured step depends on besides its static inputs: the address, shape, strides and dtype of every
    parameter and buffer (the KV cache's included) and of the rotary frequencies, and each layer's MoE backend, top-k
    and attention mode. Python work only (no device read)."""
    tensors = [*model.parameters(), *model.buffers(), *model._inv_freq.values()]
    layout = tuple((t.data_ptr(), t.dtype, tuple(t.shape), t.stride(), t.device) for t in tensors)
    modules = tuple(
        (getattr(m, "backend", None), getattr(m, "top_k", None), getattr(m, "upcast", None))
        for m in model.modules()
        if isinstance(m, (MoE, QuantizedLinear)) or hasattr(m, "upcast")
    )
    return layout, modules


class _Graph:
    """One captured step: static inputs, the static logits, and the graph that links them."""

    def __init__(self, graph, replay: Callable[[], None], ids, input_pos, valid, logits):
        self.graph, self._replay = graph, replay
        self.ids, self.input_pos, self.valid, self.logits = ids, input_pos, valid, logits

    def __call__(self, tok: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(tok[:, None])
        self.input_pos.copy_(input_pos)
        self._replay()
        return self.logits


def _capture_cuda(step: Callable[[], torch.Tensor], graphs: "DecodeGraphs", device: torch.device):
    """Capture step() in a CUDA graph into graphs' pool. -> (graph, replay, output). Raises what the capture raises.

    The warm-up run (on the capture stream: Triton compiles and loads its kernels, cuBLAS makes its workspace) writes
    the keys and values of the current step into the cache, as the replay after it will again: the same values.
    """
    with _CAPTURE_LOCK, torch.cuda.device(device):
        if graphs.stream is None:
            graphs.stream = torch.cuda.Stream(device)
        if graphs.pool is None:
            graphs.pool = torch.cuda.graph_pool_handle()
        current = torch.cuda.current_stream(device)
        stream = graphs.stream
        try:
            stream.wait_stream(current)
            with torch.cuda.stream(stream):
                step()
            current.wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=graphs.pool, stream=stream, capture_error_mode="thread_local"):
                out = step()
        finally:
            # torch.cuda.graph leaves its stream current when ending a failed capture raises; put the caller's back.
            torch.cuda.set_stream(current)
    return graph, graph.replay, out


# The capture function; the CPU tests put an emulation of a graph here (the logic around it is the same on every
# device).
_capture = _capture_cuda


class CaptureFailed:
    """A key whose capture raised: it decodes eagerly until the model's state changes."""

    def __init__(self, reason: str):
        self.reason = reason


class DecodeGraphs:
    """The captured decode steps of one model state (see model_state): {(B, L, padded, compiled): _Graph or
    CaptureFailed}.

    Every graph draws on one memory pool (each step's intermediates; generations replay one graph at a time, so they
    can share it). Dropping this object frees the graphs; their memory returns at the next torch.cuda.empty_cache().
    """

    def __init__(self, state: tuple):
        self.state = state
        self.graphs: dict = {}
        self.pool = None  # a torch.cuda.graph_pool_handle(), made at the first capture
        self.stream = None  # the side stream of warm-ups and captures
        self.captures = 0  # graphs captured so far (the tests count them)

    def __deepcopy__(self, memo):
        return None  # a copied model captures its own graphs

    def __reduce__(self):
        return (type(None), ())  # never pickled along with a model

    @classmethod
    def of(cls, model: Phixtral) -> "DecodeGraphs":
        """The model's graphs, dropped first when its state no longer matches them."""
        state = model_state(model)
        graphs = model.decode_graphs
        if not isinstance(graphs, cls) or graphs.state != state:
            model.decode_graphs = None  # free the old graphs before capturing new ones
            graphs = model.decode_graphs = cls(state)
        return graphs

    def capture(self, model: Phixtral, key: tuple, tok, input_pos, valid, *, compiled: bool = False):
        """Capture the decode step for key at the current step's inputs (compiled: the step torch.compile made of it,
        compiled in the warm-up run). -> _Graph, or CaptureFailed (logged)."""
        ids = tok[:, None].clone()
        static_pos = input_pos.clone()
        static_valid = None if valid is None else valid.clone()
        step = functools.partial(_static_step, model, ids, static_pos, static_valid)
        if compiled:
            step = functools.partial(compiled_call, model, static_valid, ids[:, 0], static_pos)
        try:
            graph, replay, logits = _capture(step, self, model.device)
        except Exception as exc:  # noqa: BLE001 -- any failure means this step cannot be replayed; decode eagerly
            if model.device.type == "cuda":
                torch.cuda.synchronize(model.device)  # an error that broke the context surfaces here, not later
            self.pool = (
                None  # the pool's state after a failed capture is not worth trusting: the next capture gets a new one
            )
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            log.warning("CUDA graph capture of the decode step (batch %d, cache %d) failed, decoding eagerly: %s",
                        key[0], key[1], reason)  # fmt: skip
            entry = self.graphs[key] = CaptureFailed(reason)
            return entry
        self.captures += 1
        entry = self.graphs[key] = _Graph(graph, replay, ids, static_pos, static_valid, logits)
        return entry


def _static_step(model, ids, input_pos, valid) -> torch.Tensor:
    hidden = model.hidden_states(ids, valid, input_pos)  # [B, 1, D]: eager_step's ops on the static inputs
    return model.lm_head(hidden[:, -1]).float()


class GraphStep:
    """The decode step of one generation: replays the graph of its key (capturing it at the first step when needed),
    or runs eagerly when the graph cannot be had. Call as eager_step: (tok [B], input_pos [1]) -> logits [B, V]."""

    def __init__(
        self, model: Phixtral, valid: Optional[torch.Tensor], mode, steps: int, stats: Optional[dict], compiled=False
    ):
        self.model, self.valid, self.mode, self.steps, self.stats = model, valid, mode, steps, stats
        self.compiled = compiled  # capture the step compiled by torch.compile (phixtral/compiled_decode.py)
        self.fallback = CompiledStep(model, valid, stats) if compiled else functools.partial(eager_step, model, valid)
        self.graph: Optional[_Graph] = None
        self.eager = False

    def __call__(self, tok: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        if self.graph is None and not self.eager:
            self._bind(tok, input_pos)
        if self.eager:
            return self.fallback(tok, input_pos)
        return self.graph(tok, input_pos)

    def _bind(self, tok, input_pos) -> None:
        model = self.model
        graphs = DecodeGraphs.of(model)
        key = (tok.shape[0], model.cache_length, self.valid is not None, self.compiled)
        entry = graphs.graphs.get(key)
        if entry is None:
            if self.mode == "auto" and self.steps < CAPTURE_MIN_STEPS:
                self.eager = True
                return
            start = time.perf_counter()
            entry = graphs.capture(model, key, tok, input_pos, self.valid, compiled=self.compiled)
            if self.compiled and self.stats is not None:  # the warm-up run before the capture compiled the step
                self.stats["compile_s"] = time.perf_counter() - start
        if isinstance(entry, CaptureFailed):
            if self.mode is True:
                raise RuntimeError(f"cuda_graph=True, but the decode step could not be captured: {entry.reason}")
            self.eager = True
            return
        if self.valid is not None:
            entry.valid.copy_(self.valid)  # this generation's padding (a captured graph may serve several)
        self.graph = entry
        if self.stats is not None:
            self.stats["cuda_graph"] = True
            self.stats["compiled"] = self.compiled


def decode_step(
    model: Phixtral,
    valid: Optional[torch.Tensor],
    *,
    cuda_graph=None,
    compile=None,
    steps: int,
    stats: Optional[dict] = None,
):
    """The decode step function for one generation: (tok [B], input_pos [1]) -> logits [B, V] fp32.

    valid [B, L] or None: the key slots holding real tokens (generate_tokens'). steps: decode steps ahead (after the
    prefill's token). Compiled when `compile` (see phixtral.compiled_decode) says so and the model allows it; else
    eager unless the mode (see resolve_mode) and the model allow CUDA graphs; cuda_graph=True / compile=True raise a
    RuntimeError naming the reason when they cannot be used.
    """
    compiled = compile_wanted(model, compile=compile, steps=steps)
    mode = resolve_mode(model, cuda_graph)
    eager = CompiledStep(model, valid, stats) if compiled else functools.partial(eager_step, model, valid)
    if mode is False:
        return eager
    reason = graph_unavailable_reason(model)
    if reason is not None:
        if mode is True:
            raise RuntimeError(f"cuda_graph=True, but decode steps cannot be replayed from CUDA graphs: {reason}")
        model.decode_graphs = None  # captured for another backend or device: free them
        return eager
    return GraphStep(model, valid, mode, steps, stats, compiled) if steps >= 1 else eager
