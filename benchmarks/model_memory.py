"""Memory of phixtral-4x2_8 (or 2x2_8) at fp16 / int8 / int4, counted from its config on the meta device (nothing is
allocated).

    python benchmarks/model_memory.py [--model phixtral-4x2_8|phixtral-2x2_8] [--context 2048] [--batch 1] [--json]

The model is built as from_pretrained builds it (phixtral/weights.py): on the meta device, with GPTQ-packed modules
swapped in where a checkpoint such as TheBloke/phixtral-4x2_8-GPTQ has them (Wqkv, out_proj, every expert's fc1 and
fc2; the router, the embedding, the LayerNorms and lm_head stay fp16), then every parameter and buffer is counted.
Two sizes per quantized row:
    file       the AutoGPTQ v1 tensors as a checkpoint stores them: qweight, qzeros, fp16 scales, g_idx, fp16 bias
    in memory  what the model keeps on a GPU once loaded: symmetric zero points and a trivial g_idx are dropped
               (QuantizedExpertLinear.compact); with act-order (desc_act) g_idx stays, except fc2's, which becomes a
               permutation of the experts' hidden units (absorb_act_order)
The KV cache is fp16 keys and values for `batch` x `context` tokens over all layers; the total adds it to the weights.
Activations and the CUDA context (a few hundred MB) are not counted.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing the package

from phixtral import Phixtral, PhixtralConfig  # noqa: E402
from phixtral.quant import RUNTIME_QUANTIZED, GPTQConfig  # noqa: E402
from phixtral.weights import prepare_quantized  # noqa: E402

# phixtral-4x2_8's config.json (mlabonne/phixtral-4x2_8): 4 phi-2 experts, top 2.
PHIXTRAL_4X2_8 = dict(vocab_size=51200, n_embd=2560, n_layer=32, n_head=32, n_positions=2048, rotary_dim=32,
                      n_inner=10240, num_local_experts=4, num_experts_per_tok=2)  # fmt: skip
# phixtral-2x2_8: experts 0 and 1 of the above, both run for every token.
PHIXTRAL_2X2_8 = dict(PHIXTRAL_4X2_8, num_local_experts=2, num_experts_per_tok=2)
MODELS = {"phixtral-4x2_8": PHIXTRAL_4X2_8, "phixtral-2x2_8": PHIXTRAL_2X2_8}
SCHEMES = {  # name: (bits, group_size, act_order) or None for fp16
    "fp16": None,
    "int8 g128": (8, 128, False),
    "int4 g128": (4, 128, False),
    "int4 g128 act-order": (4, 128, True),
}
GB = 1e9


def quantized_modules(model: Phixtral) -> dict:
    """{model module: (E, N, K)} for every Linear a GPTQ checkpoint packs (the names prepare_quantized takes)."""
    out = {}
    for name, module in model.named_modules():
        if name.endswith(RUNTIME_QUANTIZED):
            w = module.weight
            out[name] = (w.shape[0], w.shape[1], w.shape[2]) if w.dim() == 3 else (1, w.shape[0], w.shape[1])
    return out


def build(config: PhixtralConfig, scheme) -> Phixtral:
    with torch.device("meta"):
        model = Phixtral(config)
        if scheme is not None:
            bits, group_size, act_order = scheme
            prepare_quantized(
                model, quantized_modules(model), GPTQConfig(bits=bits, group_size=group_size, desc_act=act_order)
            )
    return model.to(torch.float16)  # floats to fp16 (scales included); the int32 buffers stay


def count(model: Phixtral, scheme) -> dict:
    """Bytes by role: the checkpoint's tensors ("file") and what the loaded model keeps ("memory")."""
    file = memory = quant = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        size = t.numel() * t.element_size()
        file += size
        if name.endswith((".qweight", ".qzeros", ".scales", ".g_idx")):
            quant += size
        # Dropped at load: symmetric qzeros, a trivial g_idx (compact), and fc2's act-order g_idx, which becomes a
        # permutation of the experts' hidden units (absorb_act_order).
        trivial_g_idx = name.endswith(".g_idx") and (
            scheme is not None and (not scheme[2] or name.endswith(".moe.fc2.g_idx"))
        )
        memory += 0 if name.endswith(".qzeros") or trivial_g_idx else size
    return dict(file=file, memory=memory, packed=quant)


def kv_cache_bytes(config: PhixtralConfig, batch: int, context: int) -> int:
    return 2 * config.n_layer * batch * context * config.n_head_kv * config.head_dim * 2  # k and v, fp16


def run(context: int = 2048, batch: int = 1, model_name: str = "phixtral-4x2_8") -> dict:
    config = PhixtralConfig(**MODELS[model_name])
    kv = kv_cache_bytes(config, batch, context)
    rows = []
    for name, scheme in SCHEMES.items():
        model = build(config, scheme)
        params = sum(p.numel() for p in model.parameters())
        sizes = count(model, scheme)
        rows.append(dict(scheme=name, params_float=params, **sizes, kv_cache=kv, total=sizes["memory"] + kv))
    return dict(model=model_name, config=MODELS[model_name], context=context, batch=batch, rows=rows)


def table(result: dict) -> str:
    lines = [
        f"{result['model']}, KV cache for batch {result['batch']} x {result['context']} tokens in fp16",
        "",
        "| scheme | checkpoint file | weights in memory | of which packed | KV cache | total |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['scheme']} | {r['file'] / GB:.2f} GB | {r['memory'] / GB:.2f} GB | {r['packed'] / GB:.2f} GB | "
            f"{r['kv_cache'] / GB:.2f} GB | {r['total'] / GB:.2f} GB |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--context", type=int, default=2048, help="tokens in the KV cache (default: n_positions, 2048)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--model", choices=list(MODELS), default="phixtral-4x2_8")
    p.add_argument("--json", action="store_true", help="print the result as JSON after the table")
    args = p.parse_args(argv)
    result = run(args.context, args.batch, args.model)
    print(table(result))
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
