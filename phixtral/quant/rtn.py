"""Round-to-nearest quantization of a loaded float model's Linears, in place, into GPTQ's v1 layout, and the helpers
that every method shares: which Linears a quantized checkpoint packs, their float tensors, and the swap of a packed
module into the model. `save_pretrained` then writes the checkpoint (gptq_format.py).

RTN treats every output row on its own (each row's groups get their own grid), so a Linear is quantized a block of rows
at a time (`quantize_rows`): the same codes and scales as one call over the whole weight, with temporaries of one block.
The streaming paths (quantize on load, `phixtral quantize`) quantize one checkpoint tensor at a time the same way.
"""

from typing import Iterator, Optional

import torch

from phixtral_kernels import QuantizedExperts, act_order_g_idx, quantize_rtn

from .gptq_format import RUNTIME_QUANTIZED, GPTQConfig
from .modules import quantized_module

# Weights per quantize_rtn call: its temporaries (the weight in fp32, gathered scales and zeros, int64 words while
# packing) take about 30 bytes per weight, 800 MB for one of phixtral-4x2_8's experts' fc1 [10240, 2560] at once;
# 2^22 weights at a time keep them near 120 MB.
CHUNK_WEIGHTS = 2**22


def quantize_rows(w: torch.Tensor, gptq: GPTQConfig, *, g_idx: Optional[torch.Tensor] = None) -> Iterator[tuple]:
    """RTN of one Linear's weight w [N, K] (any float dtype, on the device it computes on), a block of output rows at a
    time: yields (rows, QuantizedExperts of those rows [1, n, K]) with rows a slice of N. Blocks are multiples of 32
    rows, so that each block's qzeros fill whole words. g_idx [K]: act-order groups (see quantize_model_rtn)."""
    N, K = w.shape
    step = max(32, CHUNK_WEIGHTS // max(K, 1) // 32 * 32)
    for n0 in range(0, N, step):
        rows = slice(n0, min(n0 + step, N))
        yield rows, quantize_rtn(w[rows].float(), gptq.bits, gptq.group_size, sym=gptq.sym, g_idx=g_idx)


def quantize_linear(w: torch.Tensor, gptq: GPTQConfig, *, g_idx: Optional[torch.Tensor] = None) -> QuantizedExperts:
    """RTN of one Linear's weight w [N, K] as one expert [1, N, K], computed block by block (`quantize_rows`)."""
    parts = [q for _, q in quantize_rows(w, gptq, g_idx=g_idx)]
    if len(parts) == 1:
        return parts[0]
    qzeros = None if gptq.sym else torch.cat([q.qzeros for q in parts], dim=-1)
    return QuantizedExperts(torch.cat([q.qweight for q in parts], dim=-1), qzeros,
                            torch.cat([q.scales for q in parts], dim=-1), parts[0].g_idx, gptq.bits, gptq.group_size,
                            check=False)  # fmt: skip


def stack_experts(parts: list) -> QuantizedExperts:
    """One QuantizedExperts [E, N, K] from E of shape [1, N, K] with the same settings."""
    if len(parts) == 1:
        return parts[0]
    cat = lambda name: None if getattr(parts[0], name) is None else torch.cat([getattr(q, name) for q in parts])  # noqa: E731
    return QuantizedExperts(cat("qweight"), cat("qzeros"), cat("scales"), cat("g_idx"), parts[0].bits,
                            parts[0].group_size, check=False)  # fmt: skip


def quantizable(model) -> list[str]:
    """The model modules a quantized checkpoint packs, in forward order: per layer Wqkv, out_proj, fc1, fc2."""
    names = []
    for i in range(len(model.h)):
        names += [f"h.{i}{suffix}" for suffix in RUNTIME_QUANTIZED]
    return names


def float_weight(module) -> torch.Tensor:
    """[E, N, K]: an ExpertLinear's stacked weight, or a torch Linear's as one expert."""
    w = module.weight
    return w.detach().unsqueeze(0) if w.dim() == 2 else w.detach()


def float_bias(module) -> torch.Tensor:
    """[E, N]: an ExpertLinear's stacked bias, or a torch Linear's as one expert."""
    b = module.bias.detach()
    return b.unsqueeze(0) if b.dim() == 1 else b


def packed_module(name: str, w: QuantizedExperts, bias: torch.Tensor, *, device, dtype: torch.dtype):
    """The packed module that stands at model module `name`, holding `w` and `bias` [E, N], on `device` in `dtype`,
    compacted (no trivial g_idx, no symmetric qzeros)."""
    E, N, K = w.shape
    module = quantized_module(name, E, N, K, w.bits, w.group_size).to(device=device, dtype=dtype)
    module.set_weight(w.to(device))
    module.bias.data = bias.to(device=device, dtype=dtype).clone()
    module.compact()
    return module


def set_quantized(model, name: str, w: QuantizedExperts, bias: torch.Tensor) -> None:
    """Put a packed module holding `w` and `bias` [E, N] at model module `name`, on the device and in the dtype of the
    module it replaces (the model's); it reads the model's runtime settings (`Phixtral.set_submodule`)."""
    old = model.get_submodule(name)  # its device and dtype, which are the model's (a layer alone may be materialized)
    model.set_submodule(name, packed_module(name, w, bias, device=old.bias.device, dtype=old.bias.dtype))


def quantize_model_rtn(model, gptq: GPTQConfig, *, orders: Optional[dict] = None) -> None:
    """Round-to-nearest quantization of every `quantizable` Linear of `model`, in place.

    orders: {module name: [E, K] column order}: groups follow that order (act-order g_idx, as GPTQ writes it); used by
    tests to build act-order checkpoints without calibration.
    """
    for name in quantizable(model):
        module = model.get_submodule(name)
        w = float_weight(module)
        g_idx = None
        if orders and name in orders:
            order = orders[name].to(w.device)
            g_idx = act_order_g_idx(order, gptq.group_size if gptq.group_size > 0 else w.shape[2])
            g_idx = g_idx.expand(w.shape[0], -1) if g_idx.dim() == 1 else g_idx
        # Expert by expert, a block of rows at a time: the codes one quantize_rtn call over the stack would give.
        parts = [quantize_linear(w[e], gptq, g_idx=None if g_idx is None else g_idx[e]) for e in range(len(w))]
        q = stack_experts(parts)
        set_quantized(model, name, q, float_bias(module))
    model.quantization = gptq
