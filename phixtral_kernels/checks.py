"""What fused_moe accepts: the backends, the dtypes of the Triton path and the check of the layer's inputs.

Its own module so that moe.py (fused_moe) and reference.py (naive_moe) both check their inputs the same way without
importing each other.
"""

import torch

from .quant import is_quantized

BACKENDS = ("auto", "triton", "torch", "naive")
# The Triton path computes in fp32 at most (fp32 accumulators, fp32 routing weights): float64 goes to the torch backend.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_moe_inputs(x, gate_weight, w1, b1, w2, b2, top_k) -> None:
    """Raise a ValueError or TypeError that names the argument when the MoE inputs do not fit together.

    w1 and w2 may be QuantizedExperts (their scales in any float dtype); every float tensor shares x's dtype."""
    named = {"x": x, "gate_weight": gate_weight, "w1": w1, "b1": b1, "w2": w2, "b2": b2}
    for name, t in named.items():
        if name in ("w1", "w2") and is_quantized(t):
            continue
        if not isinstance(t, torch.Tensor):
            what = "a torch.Tensor or a QuantizedExperts" if name in ("w1", "w2") else "a torch.Tensor"
            raise TypeError(f"{name} must be {what}, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    for name, dims in {"x": 2, "gate_weight": 2, "w1": 3, "b1": 2, "w2": 3, "b2": 2}.items():
        if len(named[name].shape) != dims:
            raise ValueError(f"{name} must have {dims} dims, got shape {tuple(named[name].shape)}")
    T, D = x.shape
    E, F = w1.shape[0], w1.shape[1]
    expected = {"gate_weight": (E, D), "w1": (E, F, D), "b1": (E, F), "w2": (E, D, F), "b2": (E, D)}
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            packed = (
                f" (a QuantizedExperts with qweight {tuple(named[name].qweight.shape)})"
                if is_quantized(named[name])
                else ""
            )
            raise ValueError(
                f"{name} must have shape {shape} (E={E} experts from w1, D={D} from x, F={F} from w1), "
                f"got {tuple(named[name].shape)}{packed}"
            )
    for name, t in named.items():
        if is_quantized(t):
            if t.device != x.device:
                raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"{name} is {t.dtype} but x is {x.dtype}: all MoE tensors must share one dtype")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise ValueError(f"top_k must be an int in [1, E={E}], got {top_k!r}")
