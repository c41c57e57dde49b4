"""Decode steps compiled by torch.compile: one graph per step, with no Python between the ops.

An eager decode step walks the model's modules in Python and dispatches each of its ~150 torch ops per layer one at a
time. On a CPU that costs as much as the arithmetic of a small model (36 ms per token of which ~15 ms is dispatch on the
benchmarks' 109 M-parameter model). torch.compile (inductor) traces the step once, fuses the elementwise work around the
GEMVs (norms, rotary, GELU, residual adds, routing) into generated C++ loops, and calls the GEMVs and the packed int8 /
int4 kernels directly.

What is compiled: `decode_graph.eager_step`, the same forward as the eager path (one token per row over the static KV
cache, then lm_head on the last position), with fullgraph=True and static shapes. The MoE layers take the experts as
custom ops (phixtral_kernels.graph_ops) so that the routing needs no host read; the token, the cache slot and the
padding mask are inputs, so one graph serves every step and position of a (batch, cache length, padded or not) shape.
Sampling stays eager, as with CUDA graphs. The logits equal the eager ones to rounding (inductor fuses and reorders
float arithmetic), so greedy tokens match unless two logits tie within that rounding.

When: `compile` of generate() / generate_tokens(), else the model's setting (`model.runtime.compile`, default "auto"):
    "auto"  compiled when it can work and pays: a CPU model, every layer able to run in the graph (float experts, or
            packed ones in bfloat16), torch 2.4 or newer with a C++ compiler for inductor, and either at least
            COMPILE_MIN_STEPS decode steps ahead, or a model that has already decoded COMPILE_AFTER_STEPS steps eagerly
            in this process at the same batch size and cache length (an evaluation loop; each new shape is a new
            compile, so shapes seen rarely stay eager). A compile costs seconds even when inductor's cache on disk
            is warm (tracing the model, loading the compiled code), so a one-off generation of a few hundred tokens
            decodes eagerly; see benchmarks/RESULTS.md. PHIXTRAL_COMPILE=0 (or off, false, no) turns "auto" off.
    True    compiled, else an error that says why not.
    False   eager.
Compiled code is cached in the process per (model, batch, cache length, padded) and on disk by inductor (its FX graph
cache under TORCHINDUCTOR_CACHE_DIR), so a second process pays only the trace. A generation's stats report the seconds
its first compiled step took (compile_s). Compiles run one at a time in the process.
"""

import functools
import os
import shutil
import threading
import time
import weakref
from typing import Optional, Union

import torch

from phixtral_kernels.graph_ops import HAS_GRAPH_OPS

from .model import Phixtral
from .runtime import COMPILE_MODES as MODES  # noqa: F401 -- importable from here
from .runtime import check_compile as check_mode

ENV_VAR = "PHIXTRAL_COMPILE"
_ENV_OFF = ("0", "off", "false", "no")
# "auto" compiles for a generation with this many decode steps ahead, or once a model has decoded COMPILE_AFTER_STEPS
# steps eagerly in the process: a compile costs seconds even from inductor's warm cache on disk, a compiled step saves
# a few ms on the benchmarks' models (see benchmarks/RESULTS.md).
COMPILE_MIN_STEPS = 256
COMPILE_AFTER_STEPS = 1024
# model -> {(batch, cache length): decode steps it ran eagerly under "auto" in this process}
_eager_steps = weakref.WeakKeyDictionary()
_COMPILE_LOCK = threading.Lock()
# Compiled graphs kept behind the process's one compiled step function (models x batch sizes x cache lengths x padding).
RECOMPILE_LIMIT = 64


def resolve_mode(model: Phixtral, compile=None) -> Union[str, bool]:
    """compile (checked here), else model.compile; "auto" becomes False when PHIXTRAL_COMPILE says off."""
    if compile is not None:
        check_mode(compile)
    mode = model.runtime.compile if compile is None else compile
    if mode == "auto" and os.environ.get(ENV_VAR, "").strip().lower() in _ENV_OFF:
        return False
    return mode


@functools.lru_cache(maxsize=None)
def _toolchain_reason() -> Optional[str]:
    if not HAS_GRAPH_OPS:
        return f"torch {torch.__version__} has no torch.library.custom_op (torch 2.4 or newer compiles decode steps)"
    if not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++") or shutil.which("c++")):
        return "no C++ compiler found for torch.compile's CPU code (install g++ or set CXX)"
    return None


def compile_unavailable_reason(model: Phixtral) -> Optional[str]:
    """Why decode steps of `model` cannot be compiled here, or None when they can."""
    reason = _toolchain_reason()
    if reason is not None:
        return reason
    if model.device.type not in ("cpu", "cuda"):
        return f"the model is on {model.device}: compiled decode steps run on the CPU and on CUDA"
    probe = torch.empty(1, model.config.n_embd, dtype=model.dtype, device=model.device)
    for name, module in model.named_modules():  # expert stacks and packed Linears: can they run in the graph?
        check = getattr(module, "graph_unavailable_reason", None)
        if check is not None and (why := check(probe, model.runtime.backend)) is not None:
            return f"{name}: {why}"
    return None


def _step(model: Phixtral, valid: Optional[torch.Tensor], tok: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    # The eager step's forward (decode_graph.eager_step), traced: tok [B] at cache slot input_pos [1] -> logits [B, V].
    hidden = model.hidden_states(tok[:, None], valid, input_pos)
    return model.lm_head(hidden[:, -1]).float()


@functools.lru_cache(maxsize=1)
def compiled_step_function():
    """The process's one torch.compile'd step: dynamo keeps a compiled graph per model and shape behind it."""
    return torch.compile(_step, fullgraph=True, dynamic=False)


def compiled_call(model: Phixtral, valid, tok: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """One call of the compiled step that may compile: one compile at a time in the process, and room behind the one
    function for every model structure and shape (past dynamo's default of 8 it would run eagerly without a word)."""
    with _COMPILE_LOCK, torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
        return compiled_step_function()(model, valid, tok, input_pos)


class CompiledStep:
    """The decode step of one generation, compiled: (tok [B], input_pos [1]) -> logits [B, V], as eager_step."""

    def __init__(self, model: Phixtral, valid: Optional[torch.Tensor], stats: Optional[dict]):
        self.model, self.valid, self.stats = model, valid, stats
        self.first = True
        self.fn = compiled_step_function()

    def __call__(self, tok: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        if not self.first:
            return self.fn(self.model, self.valid, tok, input_pos)
        self.first = False
        start = time.perf_counter()
        logits = compiled_call(self.model, self.valid, tok, input_pos)  # compiles, or finds the compiled graph
        if self.stats is not None:
            self.stats["compiled"] = True
            self.stats["compile_s"] = time.perf_counter() - start
        return logits


def compile_wanted(model: Phixtral, *, compile=None, steps: int) -> bool:
    """Whether this generation's decode steps run compiled (see the module docstring): "auto" compiles on the CPU only
    (on a GPU, CUDA graphs already remove the host's time per op; compiled steps there are opt-in until measured).
    compile=True raises a RuntimeError naming the reason when the model cannot."""
    mode = resolve_mode(model, compile)
    if mode is False or steps < 1:
        return False
    if mode == "auto":
        if model.device.type != "cpu":
            return False
        # Counted per cache shape (batch, length): each new shape is a new compile, so a model that decodes many
        # shapes (batches of varying sizes, prompts of varying lengths) compiles only the ones it keeps coming back to.
        counts = _eager_steps.setdefault(model, {})
        shape = (model.cache_batch_size, model.cache_length)
        if steps < COMPILE_MIN_STEPS and counts.get(shape, 0) < COMPILE_AFTER_STEPS:
            counts[shape] = counts.get(shape, 0) + steps
            return False
    reason = compile_unavailable_reason(model)
    if reason is not None:
        if mode is True:
            raise RuntimeError(f"compile=True, but decode steps cannot be compiled: {reason}")
        return False
    return True
