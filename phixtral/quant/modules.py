"""GPTQ-packed modules: the model's Linears (QuantizedLinear) and expert stacks (QuantizedExpertLinear) as the kernels
take them, with the packed CPU form cached per module.

On a GPU they run through phixtral_kernels' grouped GEMM, which dequantizes inside its K loop; on a CPU, in bfloat16,
through torch's packed int8 / int4 kernels (phixtral_kernels.cpu_packed), repacked from the buffers the first time and
whenever one of them changes. Other dtypes and devices dequantize and run the float ops.
"""

from typing import Optional

import torch
import torch.nn as nn

from phixtral_kernels import QuantizedExperts, quantized_linear
from phixtral_kernels.cpu_packed import cpu_packing_unsupported, pack_for_cpu

from ..runtime import RuntimeSettings


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
        self._cache = {}  # packed (bool) -> (buffers, their versions, QuantizedExperts): see _container
        self.register_load_state_dict_post_hook(_validate_after_load)

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
        b = self._buffers
        buffers = (b["qweight"], b["qzeros"], b["scales"], b["g_idx"])
        versions = tuple(
            None if t is None or t.is_inference() else t._version for t in buffers
        )  # inference tensors have none
        cached = self._cache.get(packed)
        if cached is not None and cached[1] == versions and all(x is y for x, y in zip(cached[0], buffers)):
            return cached[2]
        w = self.validate()  # new or changed buffers: checked once before any kernel indexes with them
        if packed and not cpu_packing_unsupported(w):
            w = QuantizedExperts(
                *buffers, self.bits, self.group_size, check=False, cpu_packed=pack_for_cpu(w, torch.bfloat16)
            )
        self._cache[packed] = (buffers, versions, w)
        return w

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
        y = quantized_linear(x.reshape(-1, x.shape[-1]), self.weight_for(x), self.bias[0], backend=self.runtime.backend)
        return y.view(*x.shape[:-1], y.shape[-1])


def quantized_module(
    path: str, num_experts: int, out_features: int, in_features: int, bits: int, group_size: int
) -> nn.Module:
    """The packed module that stands at `path` (a model module name such as "h.0.mixer.Wqkv" or "h.0.moe.fc1").

    A QuantizedLinear reads the backend of the model it is put into with `Phixtral.set_submodule`."""
    if path.endswith((".moe.fc1", ".moe.fc2")):
        return QuantizedExpertLinear(num_experts, out_features, in_features, bits, group_size)
    return QuantizedLinear(out_features, in_features, bits, group_size)
