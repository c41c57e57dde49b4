"""Quantize on load: `from_pretrained(path, quantize="int4")` reads a float checkpoint straight into packed modules.

Each float weight of a Linear that a quantized checkpoint packs (`quantizable`: Wqkv, out_proj, the experts' fc1 / fc2)
is quantized with round-to-nearest (rtn.py, a block of rows at a time) on the model's device as it is read, written
into its packed module's buffers and freed, so the float model never exists whole: the peak is the packed model plus
one tensor and one block's temporaries. The packed tensors are the ones `phixtral quantize --method rtn` writes with the
same settings, bit for bit (the same blocks of the same quantize_rtn; a row's codes depend on that row alone).

Specs (`quantize_spec`):
    "int4", "int8"                  4 or 8 bits, group size 128, symmetric: `phixtral quantize`'s defaults
    "int4,group_size=64,sym=false"  options after commas (group_size -1: one group per output channel)
    {"bits": 4, "group_size": 64, "sym": False}, or a GPTQConfig
"""

from typing import Union

import torch

from .gptq_format import GPTQConfig
from .modules import QuantizedLinear
from .rtn import quantize_rows

SPECS = {"int4": 4, "int8": 8}
DEFAULT_GROUP_SIZE = 128
_OPTIONS = ("group_size", "sym")


def quantize_spec(value: Union[str, dict, GPTQConfig]) -> GPTQConfig:
    """from_pretrained's `quantize` (see the module docstring) as a GPTQConfig; a ValueError saying what is accepted."""
    if isinstance(value, GPTQConfig):
        if value.desc_act:
            raise ValueError(
                "quantize: act-order (desc_act) needs calibration data; quantize on load is round-to-nearest"
            )
        return value
    if isinstance(value, str):
        name, *options = [part.strip() for part in value.split(",")]
        if name not in SPECS:
            raise ValueError(f"quantize: {value!r} is not a spec: use {' or '.join(SPECS)}, optionally followed by "
                             f"',group_size=N' and ',sym=false' (e.g. 'int4,group_size=64')")  # fmt: skip
        d = {"bits": SPECS[name]}
        for option in options:
            key, eq, text = option.partition("=")
            key = key.strip()
            if not eq or key not in _OPTIONS or key in d:
                raise ValueError(
                    f"quantize: {option!r} in {value!r} is not an option: use group_size=N or sym=true|false"
                )
            d[key] = _option_value(key, text.strip(), value)
        value = d
    if not isinstance(value, dict):
        raise TypeError(
            f"quantize must be a string ('int4', 'int8', ...), a dict or a GPTQConfig, got {type(value).__name__}"
        )
    unknown = set(value) - {"bits", *_OPTIONS}
    if unknown or "bits" not in value:
        raise ValueError(f"quantize: a dict takes bits (4 or 8), group_size and sym, got {sorted(value)}")
    sym = value.get("sym", True)
    if not isinstance(sym, bool):
        raise ValueError(f"quantize: sym must be True or False, got {sym!r}")
    try:
        return GPTQConfig(bits=value["bits"], group_size=value.get("group_size", DEFAULT_GROUP_SIZE), sym=sym)
    except ValueError as e:
        raise ValueError(f"quantize: {str(e).removeprefix('quantization config: ')}") from None


def _option_value(key: str, text: str, spec: str):
    if key == "sym":
        if text.lower() not in ("true", "false"):
            raise ValueError(f"quantize: sym must be true or false in {spec!r}, got {text!r}")
        return text.lower() == "true"
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"quantize: group_size must be an int in {spec!r}, got {text!r}") from None


def linear_shapes(config) -> dict:
    """{module suffix: (E, N, K)} of the Linears a quantized checkpoint packs, from the config alone."""
    D, F, E = config.n_embd, config.n_inner, config.num_local_experts
    q, kv = config.n_head * config.head_dim, config.n_head_kv * config.head_dim
    return {
        ".mixer.Wqkv": (1, q + 2 * kv, D),
        ".mixer.out_proj": (1, D, q),
        ".moe.fc1": (E, F, D),
        ".moe.fc2": (E, D, F),
    }


def check_spec(config, gptq: GPTQConfig) -> None:
    """A ValueError when the spec cannot pack this model's Linears (group size or bits against their features)."""
    for suffix, (_, N, K) in linear_shapes(config).items():
        if gptq.group_size > 0 and K % gptq.group_size:
            raise ValueError(f"quantize: group_size {gptq.group_size} does not divide the {K} in features of "
                             f"{suffix.lstrip('.')}; pass a group_size that does (or -1, per channel)")  # fmt: skip
        for what, n in (("in", K), ("out", N)):
            if (n * gptq.bits) % 32:
                raise ValueError(f"quantize: the {n} {what} features of {suffix.lstrip('.')} do not pack into 32-bit "
                                 f"words at {gptq.bits} bits")  # fmt: skip


def packed_modules(config, gptq: GPTQConfig) -> dict:
    """{model module: (E, N, K)} of every Linear quantize on load packs (checked with `check_spec`)."""
    check_spec(config, gptq)
    shapes = linear_shapes(config)
    return {f"h.{i}{suffix}": shape for i in range(config.n_layer) for suffix, shape in shapes.items()}


def prepare_on_load(model, gptq: GPTQConfig, packed: dict) -> None:
    """Swap the packed modules in (the format's `prepare`, on the meta device, before allocation), without the tensors
    RTN leaves trivial: g_idx (groups are k // group_size) and, symmetric, qzeros."""
    gptq.prepare(model, packed)
    for name in packed:
        module = model.get_submodule(name)
        module.g_idx = None
        if gptq.sym:
            module.qzeros = None


class OnLoadQuantizer:
    """The loader's hook (phixtral/weights.py load_weights): takes the float tensors of the packed modules' weights and
    biases as they are read, quantizes each weight on the model's device, and writes it into its module's buffers.

    A Linear read in parts (an HF checkpoint's q_proj, k_proj and v_proj rows of Wqkv) is gathered into one float32
    weight first: its groups run along the input features, which every part holds whole, so any row split would do,
    but qzeros packs output rows in words."""

    def __init__(self, model, gptq: GPTQConfig, packed: dict):
        self.model, self.gptq, self.packed = model, gptq, packed
        self.pending = {}  # (module, expert) -> (float32 [N, K], rows filled): a weight read in parts
        self.done = set()  # (module, expert) quantized

    def add(self, target, tensor: torch.Tensor) -> bool:
        """Quantize (weight) or copy (bias) one tensor read for a packed module; False for any other target."""
        module_name, _, suffix = target.param.rpartition(".")
        if module_name not in self.packed or suffix not in ("weight", "bias"):
            return False
        module = self.model.get_submodule(module_name)
        index = target.index if not isinstance(module, QuantizedLinear) else (0, *target.index)  # [E, ...] stacks
        e, rows = index[0], index[1] if len(index) > 1 else slice(None)
        if suffix == "bias":
            module.bias.data[e, rows].copy_(tensor)
            return True
        _, N, K = self.packed[module_name]
        if rows == slice(None):
            self._quantize(module_name, module, e, tensor)
            return True
        weight, filled = self.pending.pop((module_name, e), None) or (
            torch.empty(N, K, device=tensor.device), 0)  # fmt: skip
        weight[rows].copy_(tensor)
        filled += weight[rows].shape[0]
        if filled < N:
            self.pending[(module_name, e)] = (weight, filled)
        else:
            self._quantize(module_name, module, e, weight)
        return True

    def _quantize(self, name: str, module, e: int, w: torch.Tensor) -> None:
        w = w.to(module.qweight.device)
        per = 32 // self.gptq.bits
        for rows, q in quantize_rows(w, self.gptq):
            module.qweight[e, :, rows].copy_(q.qweight[0])
            module.scales[e, :, rows].copy_(q.scales[0])  # fp16 scales; exact in fp32, kept fp16 beside bf16
            if q.qzeros is not None:
                module.qzeros[e, :, rows.start // per : rows.stop // per].copy_(q.qzeros[0])
        self.done.add((name, e))

    def finish(self) -> None:
        """A ValueError when a packed module's weight was not read whole (the loader's checks make this a bug)."""
        missing = [f"{n}[{e}]" for n, (E, _, _) in self.packed.items() for e in range(E) if (n, e) not in self.done]
        if missing or self.pending:
            raise ValueError(f"quantize on load: weights not read whole: {(missing + list(self.pending))[:10]}")
