"""The three key layouts of phi-2 / phixtral checkpoints, and where each checkpoint tensor goes in the model.

    phi-msft-moe    phixtral:   transformer.h.N.moe.gate.weight, transformer.h.N.moe.mlp.E.fc1.weight, ...
    phi-msft-dense  old phi-2:  transformer.h.N.mlp.fc1.weight, ...
    hf              phi (HF):   model.layers.N.self_attn.q_proj.weight, ..., model.final_layernorm.weight,
                                lm_head.weight
`checkpoint_map` turns one layout into {checkpoint name: Target}: experts land in one slice of the stacked [E, F, D]
weights, HF's q/k/v in a row block of Wqkv. The loader (weights.py), the writer (checkpoint_writer.py, the same map read
backwards), the quantization formats (phixtral/quant/) and the vLLM integration all start from it. Plain Python and
json: no torch, no model, so that every one of them can import it.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .config import PhixtralConfig

LAYOUTS = ("phi-msft-moe", "phi-msft-dense", "hf")
INDEX_FILE = "model.safetensors.index.json"
# Buffers some old phi-msft exports saved; recomputed by the model.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


# --- key layouts -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor goes: model parameter (or buffer) `param`, at `param[index]`, holding `shape`.

    kind: "float", or "int" for a quantization format's packed words and indices (phixtral/quant/). stage: for a packed
    tensor of a Linear that loads as a float weight, the checkpoint module whose tensors are collected and dequantized
    into `param`. optional: may be absent (GPTQ's g_idx without act-order).
    """

    param: str
    index: tuple
    shape: tuple
    kind: str = "float"
    stage: Optional[str] = None
    optional: bool = False


def checkpoint_map(config: PhixtralConfig, layout: str) -> dict[str, Target]:
    """{checkpoint tensor name: Target} for every tensor a checkpoint of this config and layout holds, in file order."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    V, D, F, E = config.vocab_size, config.n_embd, config.n_inner, config.num_local_experts
    H, H_kv, hd = config.n_head, config.n_head_kv, config.head_dim
    m = {}

    def add(src, dst, shape, index=()):
        m[src] = Target(dst, index, tuple(shape))

    def linear(src, dst, out_f, in_f, index=()):
        add(src + ".weight", dst + ".weight", (out_f, in_f), index)
        add(src + ".bias", dst + ".bias", (out_f,), index)

    def layernorm(src, dst):
        add(src + ".weight", dst + ".weight", (D,))
        add(src + ".bias", dst + ".bias", (D,))

    def expert(src, dst, e):
        linear(src + ".fc1", dst + ".moe.fc1", F, D, (e,))
        linear(src + ".fc2", dst + ".moe.fc2", D, F, (e,))

    if layout == "hf":
        add("model.embed_tokens.weight", "wte.weight", (V, D))
        q, k = H * hd, H_kv * hd
        for i in range(config.n_layer):
            src, dst = f"model.layers.{i}", f"h.{i}"
            layernorm(src + ".input_layernorm", dst + ".ln")
            for name, rows in (
                ("q_proj", slice(0, q)),
                ("k_proj", slice(q, q + k)),
                ("v_proj", slice(q + k, q + 2 * k)),
            ):
                linear(f"{src}.self_attn.{name}", dst + ".mixer.Wqkv", rows.stop - rows.start, D, (rows,))
            linear(src + ".self_attn.dense", dst + ".mixer.out_proj", D, H * hd)
            expert(src + ".mlp", dst, 0)
        layernorm("model.final_layernorm", "lm_head.ln")
        linear("lm_head", "lm_head.linear", V, D)
        return m
    add("transformer.embd.wte.weight", "wte.weight", (V, D))
    for i in range(config.n_layer):
        src, dst = f"transformer.h.{i}", f"h.{i}"
        layernorm(src + ".ln", dst + ".ln")
        linear(src + ".mixer.Wqkv", dst + ".mixer.Wqkv", (H + 2 * H_kv) * hd, D)
        linear(src + ".mixer.out_proj", dst + ".mixer.out_proj", D, H * hd)
        if layout == "phi-msft-moe":
            add(src + ".moe.gate.weight", dst + ".moe.gate.weight", (E, D))
            for e in range(E):
                expert(f"{src}.moe.mlp.{e}", dst, e)
        else:
            expert(src + ".mlp", dst, 0)
    layernorm("lm_head.ln", "lm_head.ln")
    linear("lm_head.linear", "lm_head.linear", V, D)
    return m


def detect_layout(names) -> str:
    """The key layout of a checkpoint from its tensor names."""
    names = list(names)
    if any(n.startswith("model.layers.") or n == "model.embed_tokens.weight" for n in names):
        return "hf"
    if any(n.startswith("transformer.h.") and ".moe." in n for n in names):
        return "phi-msft-moe"
    if any(n.startswith("transformer.") for n in names):
        return "phi-msft-dense"
    raise ValueError(
        f"unrecognized tensor names (e.g. {sorted(names)[:4]}): expected phi-msft names ('transformer.h.N. ...') "
        "or transformers' Phi names ('model.layers.N. ...')"
    )


# --- reading JSON, with errors that name the file --------------------------------------------------------------------
def read_json(path: Path) -> dict:
    """The JSON object in `path`, or a ValueError naming the file."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path} must hold a JSON object, got a {type(d).__name__}")
    return d
