"""The model-level runtime settings: which MoE implementation runs, how fp16 attention avoids phi-2's overflow, whether
decode steps replay from CUDA graphs.

One RuntimeSettings per model (`Phixtral.runtime`), checked where it is set and read by the layers when they run: every
layer that needs a setting (MoE, Attention, a GPTQ-packed Linear) holds a reference to its model's object, never a copy,
so a change reaches them all at once and a module swapped in with `Phixtral.set_submodule` reads the same object.
copy.deepcopy of a model copies the object once, so the copy's layers share the copy's settings; state_dict never
holds it (no tensor).
"""

from typing import Union

import torch

from phixtral_kernels import BACKENDS, TRITON_DTYPES, triton_unavailable_reason

# How an fp16 model's attention avoids phi-2's overflow of q.k^T (see model.Attention.forward): "fp32" upcasts q, k
# and v (the original code's way; it copies the whole cache to fp32 every step), "scores" keeps them in fp16 and
# pre-scales q.
ATTENTION_UPCAST = ("fp32", "scores")
CUDA_GRAPH_MODES = ("auto", True, False)
COMPILE_MODES = ("auto", True, False)


def check_cuda_graph(value, name: str = "cuda_graph") -> None:
    """ValueError unless value is "auto", True or False (1, "on", None, ... are refused: they mean something else)."""
    if not (value is True or value is False or (isinstance(value, str) and value == "auto")):
        raise ValueError(f"{name} must be 'auto', True or False, got {value!r}")


def check_compile(value, name: str = "compile") -> None:
    """ValueError unless value is "auto", True or False."""
    if not (value is True or value is False or (isinstance(value, str) and value == "auto")):
        raise ValueError(f"{name} must be 'auto', True or False, got {value!r}")


def check_backend_device(backend: str, device: torch.device) -> None:
    """RuntimeError when backend is "triton" and the kernels cannot run on `device` (a meta device is never refused)."""
    if backend == "triton" and device.type != "meta" and (reason := triton_unavailable_reason(device)):
        raise RuntimeError(f"backend='triton' cannot run on {device}: {reason}")


def _constant_at_trace(fn):
    # torch.compile evaluates such a function while tracing and keeps its result as a constant (guarded by its
    # arguments), instead of tracing into torch.cuda's queries.
    mark = getattr(torch.compiler, "assume_constant_result", None)
    return mark(fn) if mark is not None else fn


@_constant_at_trace
def resolved_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """What fused_moe / quantized_linear run for `backend` on tensors of this device and dtype, at inference: "auto"
    becomes "triton" where the kernels can run (and take the dtype), else "torch"."""
    if backend != "auto":
        return backend
    return "triton" if triton_unavailable_reason(device) is None and dtype in TRITON_DTYPES else "torch"


class RuntimeSettings:
    """backend: the MoE (and GPTQ-packed Linear) implementation, "auto", "triton", "torch" or "naive" (see
    phixtral_kernels.fused_moe). attention_upcast: one of ATTENTION_UPCAST (fp16 models only). cuda_graph: "auto", True
    or False (phixtral/decode_graph.py). compile: "auto", True or False, decode steps compiled by torch.compile
    (phixtral/compiled_decode.py). Each value is checked by its setter; a refused value leaves the old one."""

    __slots__ = ("_backend", "_attention_upcast", "_cuda_graph", "_compile")

    def __init__(
        self,
        backend: str = "auto",
        attention_upcast: str = "fp32",
        cuda_graph: Union[str, bool] = "auto",
        compile: Union[str, bool] = "auto",
    ):
        self.backend = backend
        self.attention_upcast = attention_upcast
        self.cuda_graph = cuda_graph
        self.compile = compile

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {value!r}")
        self._backend = value

    @property
    def attention_upcast(self) -> str:
        return self._attention_upcast

    @attention_upcast.setter
    def attention_upcast(self, value: str) -> None:
        if value not in ATTENTION_UPCAST:
            raise ValueError(f"attention_upcast must be one of {ATTENTION_UPCAST}, got {value!r}")
        self._attention_upcast = value

    @property
    def cuda_graph(self) -> Union[str, bool]:
        return self._cuda_graph

    @cuda_graph.setter
    def cuda_graph(self, value: Union[str, bool]) -> None:
        check_cuda_graph(value, "model.cuda_graph")
        self._cuda_graph = value

    @property
    def compile(self) -> Union[str, bool]:
        return self._compile

    @compile.setter
    def compile(self, value: Union[str, bool]) -> None:
        check_compile(value, "model.runtime.compile")
        self._compile = value

    def __repr__(self) -> str:
        return (f"RuntimeSettings(backend={self.backend!r}, attention_upcast={self.attention_upcast!r}, "
                f"cuda_graph={self.cuda_graph!r}, compile={self.compile!r})")  # fmt: skip
