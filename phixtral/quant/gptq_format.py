"""GPTQ checkpoints in AutoGPTQ's v1 layout ("gptq" format, as TheBloke/phixtral-4x2_8-GPTQ): settings, tensor names
and shapes, and which of the model's Linears run quantized.

Per quantized Linear `<module>` (N out features, K in features, G = K / group_size groups, 1 for group_size -1):
    <module>.qweight  int32 [K * bits / 32, N]   packed along K, low bits first
    <module>.qzeros   int32 [G, N * bits / 32]   zero point - 1, packed along N
    <module>.scales   fp16  [G, N]
    <module>.g_idx    int32 [K]                  group of each input row (act-order); optional, k // group_size
    <module>.bias     [N]                        in the checkpoint's float dtype (AutoGPTQ writes fp16)
Settings: quantize_config.json (AutoGPTQ) and / or config.json's `quantization_config` (transformers): bits,
group_size, desc_act, sym, quant_method "gptq", checkpoint_format "gptq" (v1; "gptq_v2" stores zeros without the - 1
and is refused).

Whether a Linear is quantized is read per module from the tensors present (`<module>.qweight` or `<module>.weight`).
Wqkv, out_proj and the experts' fc1 / fc2 stay packed and run through `phixtral_kernels` (QuantizedLinear /
QuantizedExpertLinear in modules.py); anything else that comes quantized (the router, lm_head, an MoE layer whose
experts are only partly quantized, HF-layout q/k/v rows) is dequantized once at load into its float weight.

The methods that write this layout from a float model: rtn.py (round to nearest) and gptq_solver.py (GPTQ proper).
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from phixtral_kernels import QuantizedExperts, absorb_act_order, dequantize_experts, pack_cols

from ..layouts import Target
from .format import QuantFormat
from .modules import QuantizedExpertLinear, quantized_module

QUANTIZE_CONFIG_FILE = "quantize_config.json"
# Model modules that run quantized (the rest of a quantized checkpoint is dequantized at load).
RUNTIME_QUANTIZED = (".mixer.Wqkv", ".mixer.out_proj", ".moe.fc1", ".moe.fc2")
QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


@dataclass(frozen=True)
class GPTQConfig(QuantFormat):
    """The settings every quantized module of a checkpoint shares."""

    method = "gptq"
    label = "GPTQ"
    settings_file = QUANTIZE_CONFIG_FILE

    bits: int
    group_size: int  # -1: one group per output channel
    desc_act: bool = False  # act-order: g_idx assigns input rows to groups in the order GPTQ processed them
    sym: bool = True
    damp_percent: float = 0.01
    true_sequential: bool = True

    def __post_init__(self):
        if isinstance(self.bits, bool) or self.bits not in (4, 8):
            raise ValueError(f"quantization config: bits={self.bits!r} is not supported; the kernels take 4 or 8")
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or not (g == -1 or g > 0):
            raise ValueError(f"quantization config: group_size must be -1 (per channel) or a positive int, got {g!r}")

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "GPTQConfig":
        method = d.get("quant_method", "gptq")
        if method != "gptq":
            raise ValueError(f"{where}: quant_method {method!r} is not supported (only 'gptq')")
        fmt = d.get("checkpoint_format", "gptq")
        if fmt != "gptq":
            raise ValueError(f"{where}: checkpoint_format {fmt!r} is not supported (only AutoGPTQ's v1 'gptq')")
        if "bits" not in d:
            raise ValueError(f"{where}: no 'bits'")
        kwargs = dict(bits=d["bits"], group_size=d.get("group_size", -1))
        for key in ("desc_act", "sym", "true_sequential"):
            if key in d:
                if not isinstance(d[key], bool):
                    raise ValueError(f"{where}: {key} must be true or false, got {d[key]!r}")
                kwargs[key] = d[key]
        if isinstance(d.get("damp_percent"), (int, float)) and not isinstance(d.get("damp_percent"), bool):
            kwargs["damp_percent"] = float(d["damp_percent"])
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e

    def to_dict(self) -> dict:
        """quantize_config.json as AutoGPTQ writes it (also config.json's quantization_config)."""
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "damp_percent": self.damp_percent,
            "desc_act": self.desc_act,
            "static_groups": False,
            "sym": self.sym,
            "true_sequential": self.true_sequential,
            "model_name_or_path": None,
            "model_file_base_name": "model",
            "quant_method": "gptq",
            "checkpoint_format": "gptq",
        }

    def agrees(self, other) -> bool:
        """The settings that decide the tensors are equal (damping and the solver's order do not)."""
        keys = ("bits", "group_size", "desc_act", "sym")
        return isinstance(other, GPTQConfig) and all(getattr(self, k) == getattr(other, k) for k in keys)

    def num_groups(self, in_features: int) -> int:
        return in_features // self.group_size if self.group_size > 0 else 1

    # --- the format's hooks (phixtral/quant/format.py) ---------------------------------------------------------------
    @classmethod
    def missing_settings_error(cls, mapping: dict, present: set) -> Optional[str]:
        quantized = sorted(m for m in linear_modules(mapping) if m + ".qweight" in present)
        if not quantized:
            return None
        return (f"tensor {quantized[0]}.qweight is GPTQ-packed but the checkpoint has neither {QUANTIZE_CONFIG_FILE} "
                "nor a quantization_config in config.json (bits, group_size)")  # fmt: skip

    def checkpoint_map(self, mapping: dict, present: set) -> tuple[dict, dict]:
        return quantized_map(mapping, present, self)

    def int_dtypes(self, name: str) -> tuple:
        return ("I32", "I64") if name.endswith(".g_idx") else ("I32",)

    def prepare(self, model, packed: dict) -> None:
        """Swap in a GPTQ-packed module at each model module of `packed` ({name: (E, N, K)}) on the model's device, in
        its dtype; a bfloat16 model keeps fp16 scales (bf16 would drop 3 of their bits)."""
        for name, (E, N, K) in packed.items():
            with torch.device(model.device):
                module = quantized_module(name, E, N, K, self.bits, self.group_size).to(model.dtype)
            if model.dtype == torch.bfloat16:
                module.scales = module.scales.to(torch.float16)
            model.set_submodule(name, module)
        model.quantization = self if packed else None

    def before_load(self, model) -> None:
        for module in model.modules():
            if isinstance(module, QuantizedExpertLinear) and module.g_idx is not None:
                module.g_idx.copy_(module.default_g_idx())  # what a checkpoint without g_idx means

    def check_tensor(self, name: str, tensor: torch.Tensor, mapping: dict) -> None:
        if name.endswith(".g_idx"):
            check_g_idx(name, tensor, mapping[name[: -len("g_idx")] + "scales"].shape[0])
        elif name.endswith(".scales"):
            check_scales(name, tensor)

    def dequantize(self, module: str, tensors: dict, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_staged(module, tensors, self, dtype)

    def finish(self, model) -> None:
        finish_quantized(model)

    def save_map(self, mapping: dict, state: dict) -> dict:
        packed = {
            n.replace(".weight", ".qweight")
            for n, t in mapping.items()
            if t.param.replace(".weight", ".qweight") in state
        }
        out, _ = quantized_map(mapping, packed, self)
        # A compacted module has no qzeros (symmetric) or g_idx (contiguous groups): checkpoint_tensor derives them.
        derived = (".qzeros", ".g_idx")
        return {
            n: Target(t.param, t.index, t.shape, t.kind, t.stage, t.param.endswith(derived)) for n, t in out.items()
        }

    def checkpoint_tensor(self, state: dict, name: str, target: Target) -> torch.Tensor:
        return checkpoint_tensor(state, name, target, self)

    def file_dtype(self, name: str, dtype: torch.dtype) -> torch.dtype:
        # Scales are fp16 in the format whatever the model's dtype: the quantizers round them to fp16 (quant_grid), so
        # fp16 holds them exactly, where bf16 would drop 3 of their bits.
        return torch.float16 if name.endswith(".scales") else dtype

    def write_settings(self, folder: Path, config_dict: dict) -> None:
        write_quantize_config(folder, self, config_dict)


def linear_modules(mapping: dict) -> dict:
    """{checkpoint module: (model module, index, (N, K), has bias)} for every Linear of a float checkpoint map."""
    out = {}
    for name, t in mapping.items():
        if name.endswith(".weight") and len(t.shape) == 2 and t.param != "wte.weight":
            module = name[: -len(".weight")]
            out[module] = (t.param[: -len(".weight")], t.index, t.shape, module + ".bias" in mapping)
    return out


def quantized_map(mapping: dict, present: set, gptq: Optional[GPTQConfig]):
    """The checkpoint map of a (possibly) quantized checkpoint, and the model modules that run quantized.

    mapping: the float map (`checkpoint_map`); present: the tensor names in the files. A Linear whose
    `<module>.qweight` is present is quantized: its `.weight` entry gives way to qweight / qzeros / scales / g_idx
    entries (kind "int" or "float"; g_idx optional unless desc_act). Its tensors load straight into a quantized model
    module when every Linear stacked into that module is quantized and the module is one of RUNTIME_QUANTIZED; else
    they are staged (`stage` = the checkpoint module) and dequantized into the float weight.
    Returns (map, {model module: (E, N, K)}).
    """
    modules = linear_modules(mapping)
    quantized = {m for m in modules if m + ".qweight" in present}
    if not quantized:
        return mapping, {}
    if gptq is None:
        raise ValueError(GPTQConfig.missing_settings_error(mapping, present))
    by_target = {}
    for m, (dst, index, _, _) in modules.items():
        by_target.setdefault(dst, []).append((m, index))
    runtime = {}
    for dst, parts in by_target.items():
        whole = all(m in quantized for m, _ in parts) and all(isinstance(i, int) for _, idx in parts for i in idx)
        if whole and dst.endswith(RUNTIME_QUANTIZED):
            N, K = modules[parts[0][0]][2]
            runtime[dst] = (1 + max((idx[0] for _, idx in parts if idx), default=0), N, K)
    out = {}
    for name, t in mapping.items():
        module, _, suffix = name.rpartition(".")
        if module not in quantized:
            out[name] = t
            continue
        dst, index, (N, K), _ = modules[module]
        if dst in runtime and not index:
            index = (0,)  # a dense Linear is a stack of one in its packed module
        if suffix == "bias":
            out[name] = Target(t.param, index, t.shape)
            continue
        b = gptq.bits
        if (K * b) % 32:
            raise ValueError(f"{module}.qweight: its K={K} in features do not pack into 32-bit words at {b} bits")
        if (N * b) % 32:
            raise ValueError(f"{module}.qzeros: its N={N} out features do not pack into 32-bit words at {b} bits")
        if gptq.group_size > 0 and K % gptq.group_size:
            raise ValueError(f"{module}.qweight: group_size {gptq.group_size} does not divide its K={K} in features")
        G = gptq.num_groups(K)
        shapes = {"qweight": (K * b // 32, N), "qzeros": (G, N * b // 32), "scales": (G, N), "g_idx": (K,)}
        stage = None if dst in runtime else module
        for suffix, shape in shapes.items():
            param = f"{dst}.{suffix}" if stage is None else f"{dst}.weight"
            kind = "float" if suffix == "scales" else "int"
            out[f"{module}.{suffix}"] = Target(param, index, shape, kind=kind, stage=stage,
                                               optional=suffix == "g_idx" and not gptq.desc_act)  # fmt: skip
    return out, runtime


def check_g_idx(name: str, g_idx: torch.Tensor, num_groups: int) -> None:
    """A ValueError naming the tensor when a g_idx holds a group outside [0, G)."""
    if g_idx.numel():
        lo, hi = (int(v) for v in g_idx.aminmax())
        if lo < 0 or hi >= num_groups:
            raise ValueError(f"{name}: holds groups in [{lo}, {hi}], outside [0, G={num_groups})")


def check_scales(name: str, scales: torch.Tensor) -> None:
    """A ValueError naming the tensor when scales hold NaN or Inf (every output they touch would be NaN)."""
    bad = ~torch.isfinite(scales)
    if bool(bad.any()):
        raise ValueError(f"{name}: {int(bad.sum())} of {scales.numel()} scales are NaN or Inf")


def dequantize_staged(module: str, tensors: dict, gptq: GPTQConfig, dtype: torch.dtype) -> torch.Tensor:
    """The float weight [N, K] of one quantized Linear from its staged checkpoint tensors."""
    g_idx = tensors.get("g_idx")
    G = tensors["scales"].shape[0]
    check_scales(f"{module}.scales", tensors["scales"])
    if g_idx is not None:
        check_g_idx(f"{module}.g_idx", g_idx, G)
        g_idx = g_idx.to(torch.int32)[None]
    w = QuantizedExperts(tensors["qweight"][None], tensors["qzeros"][None], tensors["scales"][None], g_idx,
                         gptq.bits, gptq.group_size, check=False)  # fmt: skip
    return dequantize_experts(w, torch.float32)[0].to(dtype)


def checkpoint_tensor(state: dict, name: str, target, gptq: GPTQConfig) -> torch.Tensor:
    """The tensor to write under checkpoint `name`: state[param][index], or for a dropped qzeros (symmetric) / g_idx
    (contiguous groups) the tensor a GPTQ checkpoint stores for it."""
    if target.param in state:
        return state[target.param][target.index]
    module = target.param.rsplit(".", 1)[0]
    N, K = state[module + ".scales"].shape[-1], state[module + ".qweight"].shape[-2] * (32 // gptq.bits)
    device = state[module + ".scales"].device
    if target.param.endswith(".qzeros"):
        zeros = torch.full((gptq.num_groups(K), N), 2 ** (gptq.bits - 1) - 1, dtype=torch.int32, device=device)
        return pack_cols(zeros, gptq.bits)
    if target.param.endswith(".g_idx"):
        k = torch.arange(K, dtype=torch.int32, device=device)
        return k // gptq.group_size if gptq.group_size > 0 else torch.zeros_like(k)
    raise KeyError(target.param)


def write_quantize_config(folder: Path, gptq: GPTQConfig, config_dict: dict) -> None:
    """quantize_config.json, and quantization_config inside the config.json dict (written by the caller)."""
    (Path(folder) / QUANTIZE_CONFIG_FILE).write_text(json.dumps(gptq.to_dict(), indent=2) + "\n")
    config_dict["quantization_config"] = gptq.to_dict()


def finish_quantized(model) -> None:
    """After loading: every packed module drops what its kernel path does not need (trivial g_idx, symmetric qzeros),
    then each MoE layer whose fc2 keeps an act-order g_idx has it absorbed into a permutation of its experts' hidden
    units (fc1's output rows and b1, fc2's input rows: `phixtral_kernels.absorb_act_order`), so GEMM 2 reads one scale
    row per K tile. fc1's and the dense Linears' act-order stay, as per-element group lookups in the kernel."""
    for module in model.modules():
        if isinstance(module, QuantizedExpertLinear):
            module.compact()
    for block in model.h:
        fc1, fc2 = block.moe.fc1, block.moe.fc2
        if not isinstance(fc2, QuantizedExpertLinear) or fc2.g_idx is None:
            continue
        w1, b1, w2 = absorb_act_order(fc1.weight, fc1.bias.data, fc2.weight)
        fc2.set_weight(w2)
        fc1.bias.data = b1
        if isinstance(fc1, QuantizedExpertLinear):
            fc1.set_weight(w1)
        else:
            fc1.weight.data = w1
