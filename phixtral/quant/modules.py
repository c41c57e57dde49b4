"""GPTQ-packed modules: the model's Linears (QuantizedLinear) and expert stacks (QuantizedExpertLinear) as the kernels
take them, with the packed CPU form cached per module.

On a GPU they run through phixtral_kernels' grouped GEMM, which dequantizes inside its K loop; on a CPU, in bfloat16,
through torch's packed int8 / int4 kernels (phixtral_kernels.cpu_packed), repacked from the buffers the first time and
whenever one of them changes. Other dtypes and devices dequantize and run the float ops.
"""

from typing import Optional

import torch
import torch.nn as nn

from phixtral_kernels import QuantizedExperts, pack_rows, quantized_linear
from phixtral_kernels.cpu_packed import (
    CPUPackedExperts,
    cpu_packing_unsupported,
    int4_layout_known,
    pack_for_cpu,
    packed_linear,
    unpack_codes,
    with_qweight,
)
from phixtral_kernels.graph_ops import is_compiling, packed_expert_linear, quantized_linear_triton

from ..runtime import RuntimeSettings, resolved_backend


class QuantizedExpertLinear(nn.Module):
    """E GPTQ-packed Linears stacked for the kernels; `weight` is their `phixtral_kernels.QuantizedExperts`
    [E, out, in].

    Buffers: qweight [E, in * bits / 32, out] int32, qzeros [E, G, out * bits / 32] int32 (None once found symmetric),
    scales [E, G, out] (the model's dtype), g_idx [E, in] int32 (None once found to be k // group_size); bias [E, out].
    """

    def __init__(self, num_experts: int, out_features: int, in_features: int, bits: int, group_size: int):
        super().__init__()
        self.bits, self.group_size = bits, group_size
        groups = in_features // group_size if group_size > 0 else 1
        E, i32 = num_experts, dict(dtype=torch.int32)
        self.register_buffer("qweight", torch.zeros(E, in_features * bits // 32, out_features, **i32))
        self.register_buffer("qzeros", torch.zeros(E, groups, out_features * bits // 32, **i32))
        self.register_buffer("scales", torch.zeros(E, groups, out_features))
        self.register_buffer("g_idx", torch.zeros(E, in_features, **i32))
        self.bias = nn.Parameter(torch.zeros(E, out_features))
        self._cache = {}  # packed (bool) -> ((buffers, their versions), QuantizedExperts): see _container
        self.register_load_state_dict_post_hook(_validate_after_load)
        # torch's packed CPU form (phixtral_kernels.cpu_packed) of the last repack, as buffers that a compiled decode
        # step reads (see graph_linear); None until a bfloat16 CPU forward (or Phixtral.pack_for_cpu) repacks.
        for name in ("cpu_weights", "cpu_scales", "cpu_offsets", "cpu_perm"):
            self.register_buffer(name, None, persistent=False)
        self.cpu_mode, self.cpu_group_size = None, 0
        self._release = False  # after each repack, qweight gives way to the packed form (see release_qweight)

    @property
    def weight(self) -> QuantizedExperts:
        """The packed weights as the kernels take them (shapes checked, no device read)."""
        return self._container(packed=False)

    def weight_for(self, x: torch.Tensor) -> QuantizedExperts:
        """`weight`, carrying torch's packed CPU form when x is a bfloat16 CPU tensor: repacked from these buffers the
        first time, and again whenever one of them is replaced or written to (see phixtral_kernels.cpu_packed)."""
        return self._container(packed=x.device.type == "cpu" and x.dtype == torch.bfloat16)

    def _container(self, packed: bool) -> QuantizedExperts:
        # Cached per (buffer objects, their in-place versions): a decode step asks for it 2-4 times per layer, and
        # building and checking a container costs more than the int4 GEMV of a small layer. The cache holds the
        # buffers it was built from, so an id can never be reused while it lives. Tensors made under
        # torch.inference_mode() keep no version: an in-place write into one is not seen (replace it, or set_weight).
        cached = self._cache.get(packed)
        if cached is not None and _same_state(cached[0], self._buffer_state()):
            return cached[1]
        self.materialize_qweight(keep_releasing=packed)  # a released qweight is read back before anything changes
        w = self.validate()  # new or changed buffers: checked once before any kernel indexes with them
        if packed and not cpu_packing_unsupported(w):
            cpu = pack_for_cpu(w, torch.bfloat16)
            self.cpu_weights, self.cpu_scales, self.cpu_offsets, self.cpu_perm = (
                cpu.weights,
                cpu.scales,
                cpu.offsets,
                cpu.perm,
            )
            self.cpu_mode, self.cpu_group_size = cpu.mode, cpu.group_size
            if self._release and (cpu.mode == "int8" or int4_layout_known()):
                self._cache.pop(False, None)  # it holds the qweight being released
                self.qweight = torch.empty(self.qweight.shape, dtype=self.qweight.dtype, device="meta")
            b = self._buffers
            w = QuantizedExperts(b["qweight"], b["qzeros"], b["scales"], b["g_idx"], self.bits, self.group_size,
                                 check=False, cpu_packed=cpu)  # fmt: skip
        self._cache[packed] = (self._buffer_state(), w)
        return w

    def _buffer_state(self) -> tuple:
        # The buffers and their in-place versions (a cache key). Holding the buffers keeps their ids from being reused.
        buffers = tuple(self._buffers[name] for name in ("qweight", "qzeros", "scales", "g_idx"))
        return buffers, tuple(None if t is None or t.is_inference() else t._version for t in buffers)

    def release_qweight(self) -> None:
        """Keep one copy of the weights in a bfloat16 model on the CPU: from the next repack on (now, if the packed form
        is current), qweight becomes a meta placeholder and the packed CPU form holds the codes, which state_dict,
        other backends, devices or dtypes, and prefills past the packed kernels' rows read back exactly (the GPTQ
        qweight costs as many bytes as the packed form). Where this torch's int4 layout is not known, both stay."""
        self._release = True
        cached = self._cache.get(True)
        if cached is not None and _same_state(cached[0], self._buffer_state()) and self.qweight.device.type != "meta":
            self._cache.pop(True)
            self._container(packed=True)

    def materialize_qweight(self, keep_releasing: bool = False) -> None:
        """Make qweight a real tensor again when it was released (read back from the packed CPU form); releasing stops
        unless keep_releasing (a repack that will release it again)."""
        if self.qweight.device.type == "meta" and self.cpu_weights is not None:
            cpu = CPUPackedExperts(self.cpu_mode, self.cpu_weights, self.cpu_scales, self.cpu_offsets, self.cpu_perm,
                                   self.cpu_group_size, self.bias.shape[1], self.cpu_weights_in_features(),
                                   self.cpu_scales.dtype)  # fmt: skip
            codes = unpack_codes(cpu)  # [E, N, K]
            self.qweight = pack_rows(codes.transpose(1, 2), self.bits)
        self._release = self._release and keep_releasing

    def cpu_weights_in_features(self) -> int:
        """K, the input features (from qweight's shape, which a released placeholder keeps)."""
        return self.qweight.shape[1] * 32 // self.bits

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.qweight.device.type == "meta" and self.cpu_weights is not None:  # the codes, read back
            destination[prefix + "qweight"] = with_qweight(self._container(packed=True)).qweight

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.qweight.device.type == "meta" and self.cpu_weights is not None:
            self.qweight = torch.empty(self.qweight.shape, dtype=self.qweight.dtype, device=self.cpu_weights.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        self.materialize_qweight()  # moving or casting: the GPTQ form goes along; the packed one is made again
        self._cache.clear()  # its containers hold the buffers being replaced (to_empty: a finished layer's memory)
        return super()._apply(fn, recurse)

    def graph_unavailable_reason(self, x: torch.Tensor, backend: str) -> Optional[str]:
        """Why this stack cannot run in a compiled step on inputs like x under `backend`, or None. On the CPU it brings
        the packed form up to date (eagerly, before the compiled step, which reads it without checking)."""
        if resolved_backend(backend, x.device, x.dtype) == "triton":
            return None  # the Triton ops (fused_moe_triton, quantized_linear_triton) take the GPTQ tensors as they are
        if x.device.type != "cpu" or x.dtype != torch.bfloat16:
            return (
                f"packed Linears run in compiled steps through the Triton kernels (GPU) or torch's packed CPU kernels "
                f"(bfloat16 on the CPU), not {str(x.dtype).replace('torch.', '')} on {x.device}"
            )
        self.weight_for(x)
        if self.cpu_mode is None:
            return cpu_packing_unsupported(self.weight)
        return None

    def graph_weights(self) -> tuple:
        """The stack as fused_moe_triton's plain arguments: (qweight, qzeros, scales, g_idx, bits, group_size)."""
        return self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.group_size

    def graph_linear(self, x: torch.Tensor, ids: Optional[torch.Tensor]) -> torch.Tensor:
        """x [T, in] -> [T, out] with row t through expert ids[t], by torch's packed CPU kernels: the compiled decode
        step's way, no host read in the graph. With ids, one custom op picks the experts (phixtral_kernels.graph_ops);
        ids None (expert 0: a dense layer) calls the kernels in the graph itself, where the compiler sees them. Needs
        the packed form made by `graph_unavailable_reason` (or weight_for) since the buffers last changed."""
        args = (self.cpu_weights, self.cpu_scales, self.cpu_offsets, self.cpu_perm, self.bias)
        meta = (self.cpu_mode, self.cpu_group_size, self.bias.shape[1])
        if ids is None:
            return packed_linear(x, *(None if t is None else t[0] for t in args), *meta)
        return packed_expert_linear(x, ids, *args, *meta)

    def set_weight(self, w: QuantizedExperts) -> None:
        """Replace the packed tensors (qzeros and g_idx may be None); a ValueError, with the module unchanged, when they
        do not fit it (see `validate`)."""
        old = self.qweight, self.qzeros, self.scales, self.g_idx
        self.qweight, self.qzeros, self.scales, self.g_idx = (
            w.qweight,
            w.qzeros,
            w.scales.to(self.scales.dtype),
            w.g_idx,
        )
        try:
            self.validate()
        except ValueError:
            self.qweight, self.qzeros, self.scales, self.g_idx = old
            raise

    def validate(self) -> QuantizedExperts:
        """The buffers as a checked QuantizedExperts: shapes and dtypes, g_idx inside [0, G), scales finite; a
        ValueError naming the tensor otherwise. Reads g_idx and scales once (a host sync): run when buffers are set,
        never per step, so that no kernel ever indexes scales with an out-of-range group."""
        b = self._buffers
        try:
            w = QuantizedExperts(b["qweight"], b["qzeros"], b["scales"], b["g_idx"], self.bits, self.group_size)
            if w.scales.device.type != "meta" and not bool(torch.isfinite(w.scales).all()):
                raise ValueError("scales hold NaN or Inf")
        except ValueError as e:
            raise ValueError(f"{type(self).__name__} ({self.bits}-bit, group {self.group_size}): {e}") from None
        return w

    def default_g_idx(self) -> torch.Tensor:
        """[E, in] int32: k // group_size, what a checkpoint without g_idx means."""
        E, K = self.qweight.shape[0], self.qweight.shape[1] * 32 // self.bits
        k = torch.arange(K, dtype=torch.int32, device=self.qweight.device)
        return (k // self.group_size if self.group_size > 0 else torch.zeros_like(k)).expand(E, K).contiguous()

    def compact(self) -> None:
        """Drop g_idx when every expert's groups are contiguous (k // group_size) and qzeros when every zero point is
        2^(bits-1) (symmetric): the kernels then take their faster paths. Reads the tensors once (a host sync)."""
        if self.g_idx is not None and torch.equal(self.g_idx, self.default_g_idx()):
            self.g_idx = None
        if self.qzeros is not None and bool((self.weight.zero_points() == 2 ** (self.bits - 1)).all()):
            self.qzeros = None


def _same_state(a: tuple, b: tuple) -> bool:
    # (buffers, versions) pairs: the same buffer objects at the same versions (never tensor ==).
    return a[1] == b[1] and all(x is y for x, y in zip(a[0], b[0]))


def _validate_after_load(module: QuantizedExpertLinear, incompatible_keys) -> None:
    module.validate()  # a module-level function, not a lambda: the module stays picklable


class QuantizedLinear(QuantizedExpertLinear):
    """One GPTQ-packed torch Linear (an expert stack of one): y = x @ W^T + b through
    `phixtral_kernels.quantized_linear`, the MoE's grouped GEMM at one expert on the triton backend, dequantize +
    F.linear on the torch backend."""

    def __init__(self, out_features: int, in_features: int, bits: int, group_size: int,
                 runtime: Optional[RuntimeSettings] = None):  # fmt: skip
        super().__init__(1, out_features, in_features, bits, group_size)
        self.runtime = runtime if runtime is not None else RuntimeSettings()  # the model's (see phixtral.runtime)

    @property
    def backend(self) -> str:
        """The backend this Linear runs: its model's setting ("naive" runs as "torch" does)."""
        return self.runtime.backend

    def forward(self, x):
        # x [..., in] -> [..., out]
        if is_compiling() and resolved_backend(self.runtime.backend, x.device, x.dtype) == "triton":
            qweight, qzeros, scales, g_idx, bits, group_size = self.graph_weights()
            x2 = x.reshape(-1, x.shape[-1])
            y = quantized_linear_triton(x2, qweight, qzeros, scales, g_idx, self.bias[0], bits, group_size)
        elif is_compiling():
            y = self.graph_linear(x.reshape(-1, x.shape[-1]), None)
        else:
            w = self.weight_for(x)
            y = quantized_linear(x.reshape(-1, x.shape[-1]), w, self.bias[0], backend=self.runtime.backend)
        return y.view(*x.shape[:-1], y.shape[-1])


def quantized_module(
    path: str, num_experts: int, out_features: int, in_features: int, bits: int, group_size: int
) -> nn.Module:
    """The packed module that stands at `path` (a model module name such as "h.0.mixer.Wqkv" or "h.0.moe.fc1").

    A QuantizedLinear reads the backend of the model it is put into with `Phixtral.set_submodule`."""
    if path.endswith((".moe.fc1", ".moe.fc2")):
        return QuantizedExpertLinear(num_experts, out_features, in_features, bits, group_size)
    return QuantizedLinear(out_features, in_features, bits, group_size)
