"""Round-to-nearest quantization of a loaded float model's Linears, in place, into GPTQ's v1 layout, and the helpers
that every method shares: which Linears a quantized checkpoint packs, their float tensors, and the swap of a packed
module into the model. `save_pretrained` then writes the checkpoint (gptq_format.py)."""

from typing import Optional

import torch

from phixtral_kernels import QuantizedExperts, act_order_g_idx, quantize_rtn

from .gptq_format import RUNTIME_QUANTIZED, GPTQConfig
from .modules import quantized_module


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


def set_quantized(model, name: str, w: QuantizedExperts, bias: torch.Tensor) -> None:
    """Put a packed module holding `w` and `bias` [E, N] at model module `name`, on the model's device and dtype; it
    reads the model's runtime settings (`Phixtral.set_submodule`)."""
    E, N, K = w.shape
    module = quantized_module(name, E, N, K, w.bits, w.group_size).to(device=model.device, dtype=model.dtype)
    module.set_weight(w.to(model.device))
    module.bias.data = bias.to(device=model.device, dtype=model.dtype).clone()
    module.compact()
    model.set_submodule(name, module)


def quantize_model_rtn(model, gptq: GPTQConfig, *, orders: Optional[dict] = None) -> None:
    """Round-to-nearest quantization of every `quantizable` Linear of `model`, in place.

    orders: {module name: [E, K] column order}: groups follow that order (act-order g_idx, as GPTQ writes it); used by
    tests to build act-order checkpoints without calibration.
    """
    for name in quantizable(model):
        module = model.get_submodule(name)
        w = float_weight(module).float()
        g_idx = None
        if orders and name in orders:
            g_idx = act_order_g_idx(orders[name].to(w.device), gptq.group_size if gptq.group_size > 0 else w.shape[2])
        q = quantize_rtn(w, gptq.bits, gptq.group_size, sym=gptq.sym, g_idx=g_idx)
        set_quantized(model, name, q, float_bias(module))
    model.quantization = gptq
