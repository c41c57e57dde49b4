"""`phixtral inspect --model DIR [--prompt TEXT]`: what a checkpoint holds and whether its router can route.

Without --prompt nothing but the file headers and the router weights is read, so it is quick even for phixtral-4x2_8:
    config        the checkpoint's config, as this package reads it
    parameters    total, and active per token (the shared weights plus top_k of the E experts in every layer)
    dtype         of the tensors in the files
    router        per layer: the largest cosine similarity between two experts' gate rows, the gate row norms, and
                  pairs flagged IDENTICAL (the same direction: their logits tie on every token; what that costs
                  depends on top_k, see `merge.tie_consequence`) or near-identical (cosine >= 0.99: they are
                  picked almost always together or not at all).
With --prompt (or --stdlib-slice, the first --max-tokens of a slice's held-out text) the model runs on that text and,
per layer, counts the tokens routed to each expert (top_k slots per token, ties to the lowest index as in
phixtral_kernels).
"""

import argparse
import json
from collections import Counter

import torch

from .args import add_model_args, int_at_least, load_model
from .merge import IDENTICAL_COSINE, gate_similarity, tie_consequence

NEAR_IDENTICAL_COSINE = 0.99


def checkpoint_summary(folder) -> dict:
    """Config, parameter counts and dtypes from the file headers, and the router weights (the only tensors read)."""
    from ..quant import read_quantization_config
    from ..weights import inspect_checkpoint, open_safetensors, read_config, resolve_checkpoint

    folder = resolve_checkpoint(folder)
    config = read_config(folder)
    files, layout, mapping = inspect_checkpoint(folder, config)
    gptq = read_quantization_config(folder)
    E, k, L = config.num_local_experts, config.num_experts_per_tok, config.n_layer
    total, expert, dtypes, gates = 0, 0, Counter(), {}
    for file in files:
        with open_safetensors(file) as f:
            for name in f.keys():
                target = mapping.get(name)
                if target is None or name.endswith((".qzeros", ".scales", ".g_idx")):  # GPTQ's per-group metadata
                    continue
                s = f.get_slice(name)
                n = 1
                for d in s.get_shape():
                    n *= d
                dtype = s.get_dtype()
                if name.endswith(".qweight"):  # 32 / bits weights per packed int32
                    n, dtype = n * 32 // gptq.bits, f"GPTQ-{gptq.bits}bit"
                total += n
                dtypes[dtype] += n
                if ".moe.fc" in target.param:
                    expert += n
                if name.endswith(".moe.gate.weight"):  # a float router (a GPTQ-packed one is not read here)
                    gates[int(target.param.split(".")[1])] = f.get_tensor(name).float()  # [E, D]
    per_expert = expert // E  # one expert's fc1 + fc2 over all layers
    return {
        "folder": folder,
        "layout": layout,
        "config": config,
        "params_total": total,
        "params_active": total - (E - k) * per_expert,
        "params_per_expert": per_expert,
        "dtypes": dict(dtypes),
        "gates": [gates[i] for i in range(L)] if len(gates) == L else [],
    }


def router_health(gates: list[torch.Tensor]) -> list[dict]:
    """Per layer: max pairwise cosine, row norms, identical and near-identical expert pairs."""
    rows = []
    for layer, g in enumerate(gates):
        sim = gate_similarity(g)
        E = sim.shape[0]
        pairs = [(i, j, float(sim[i, j])) for i in range(E) for j in range(i + 1, E)]
        rows.append(
            {
                "layer": layer,
                "max_cosine": max(c for _, _, c in pairs),
                "norms": [float(x) for x in g.norm(dim=-1)],
                "identical": [(i, j) for i, j, c in pairs if c >= IDENTICAL_COSINE],
                "near_identical": [(i, j) for i, j, c in pairs if NEAR_IDENTICAL_COSINE <= c < IDENTICAL_COSINE],
            }
        )
    return rows


@torch.no_grad()
def expert_token_counts(model, ids: torch.Tensor) -> tuple[list[list[int]], list[float]]:
    """Per layer, the number of tokens routed to each expert and the mean routing weight of the first pick.

    ids [B, S] -> ([L][E] counts, each token counting in its top_k experts; [L] mean weight of each token's first pick).
    """
    from phixtral_kernels import topk_softmax_torch

    inputs = []
    hooks = [block.ln.register_forward_hook(lambda mod, inp, out: inputs.append(out)) for block in model.h]
    try:
        model.hidden_states(ids.to(model.device))
    finally:
        for h in hooks:
            h.remove()
    E, k = model.config.num_local_experts, model.config.num_experts_per_tok
    counts, first = [], []
    for block, x in zip(model.h, inputs):
        logits = x.reshape(-1, x.shape[-1]) @ block.moe.gate.weight.T  # [T, E], as fused_moe computes them
        topk_weights, topk_ids = topk_softmax_torch(logits, k)  # [T, k], ties to the lowest index
        counts.append(torch.bincount(topk_ids.flatten().long(), minlength=E).tolist())
        first.append(float(topk_weights[:, 0].mean()))
    return counts, first


def routing_input(model, prompt=None, stdlib_slice=None, max_tokens: int = 4096) -> tuple[str, torch.Tensor]:
    """(description, ids [B, S]): the prompt's tokens, or the first max_tokens of a slice's held-out text in windows."""
    from .evaluate import encode_documents
    from .stdlib_data import slice_texts

    if model.tokenizer is None:
        raise ValueError("the checkpoint has no tokenizer files: routing counts need them")
    if prompt is not None:
        ids = model.tokenizer(prompt, add_special_tokens=False, return_tensors="pt", verbose=False)[
            "input_ids"
        ]  # [1, S]
        if ids.numel() == 0:
            raise ValueError("--prompt encodes to no tokens")
        return "the prompt", ids
    try:
        stream = encode_documents(model.tokenizer, slice_texts(stdlib_slice, "heldout"))[:max_tokens]
    except FileNotFoundError as e:
        raise ValueError(str(e)) from e
    S = min(model.config.n_positions, 512, stream.numel())
    n = stream.numel() // S * S
    return f"the held-out {stdlib_slice} slice", stream[:n].view(-1, S)  # [B, S], the tail that fills no window dropped


def _fmt_count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "inspect",
        help="config, parameter counts, dtype and router health of a checkpoint",
        description="Print a checkpoint's config, parameter counts (total and active per token), dtype and, per layer, "
        "the router's health (identical or near-identical gate rows flagged); with --prompt, how many tokens each "
        "expert receives in each layer (--dtype, --device, --backend, --quantize and --threads apply to that run).",
    )
    p.add_argument(
        "--prompt",
        default=None,
        help="count the tokens routed to each expert on this text (default: none, headers and router only)",
    )
    p.add_argument(
        "--stdlib-slice", default=None, help="... or on the held-out text of this stdlib slice (default: none)"
    )
    p.add_argument("--max-tokens", type=int_at_least(1), default=4096, help="tokens of --stdlib-slice to route")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    # The report gives the checkpoint's own top-k, so --experts-per-tok would contradict it; the rest applies to
    # --prompt.
    add_model_args(p, experts=False)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..weights import default_model_path

    path = args.model if args.model is not None else default_model_path()
    if path is None:
        raise ValueError("no --model given and no bundled model")
    s = checkpoint_summary(path)
    config, E, k = s["config"], s["config"].num_local_experts, s["config"].num_experts_per_tok
    health = router_health(s["gates"])
    counts = first_weight = None
    if args.prompt is not None and args.stdlib_slice is not None:
        raise ValueError("pass --prompt or --stdlib-slice, not both")
    if (args.prompt is not None or args.stdlib_slice is not None) and E > 1:
        model = load_model(args, args.parser, s["folder"])
        what, ids = routing_input(model, args.prompt, args.stdlib_slice, args.max_tokens)
        counts, first_weight = expert_token_counts(model, ids)
    if args.json:
        out = {
            "folder": str(s["folder"]), "layout": s["layout"], "config": config.to_msft_dict(),
            "params_total": s["params_total"], "params_active": s["params_active"],
            "params_per_expert": s["params_per_expert"],
            "dtypes": s["dtypes"], "router": health, "expert_tokens": counts, "first_pick_weight": first_weight,
        }  # fmt: skip
        print(json.dumps(out))
        return 0
    print(f"checkpoint  {s['folder']}  ({s['layout']} layout)")
    print("config      " + json.dumps(config.to_msft_dict()))
    print(f"parameters  {_fmt_count(s['params_total'])} total, {_fmt_count(s['params_active'])} active per token "
          f"({E} expert(s), top-{k}; one expert's fc1 + fc2 in all layers: "
          f"{_fmt_count(s['params_per_expert'])})")  # fmt: skip
    print("dtype       " + ", ".join(f"{d} ({_fmt_count(n)} parameters)" for d, n in s["dtypes"].items()))
    if E == 1:
        print("router      none: a dense model (one expert)")
        return 0
    print(f"router      per layer: largest cosine between two gate rows (IDENTICAL >= {IDENTICAL_COSINE}, "
          f"near-identical >= {NEAR_IDENTICAL_COSINE}), gate row norms")  # fmt: skip
    bad_layers = 0
    for row in health:
        flags = [f"IDENTICAL experts {i} and {j}" for i, j in row["identical"]]
        flags += [f"near-identical experts {i} and {j}" for i, j in row["near_identical"]]
        bad_layers += bool(row["identical"])
        norms = " ".join(f"{x:.3g}" for x in row["norms"])
        print(
            f"  layer {row['layer']:3d}  max cosine {row['max_cosine']:.4f}  norms [{norms}]"
            + ("  " + "; ".join(flags) if flags else "  ok")
        )
    if bad_layers:
        print(f"WARNING: {bad_layers} of {len(health)} layers have identical gate rows: {tie_consequence(E, k)}.")
    if counts is not None:
        slots = sum(counts[0])
        print(f"tokens per expert on {what} ({slots // k} tokens, top-{k}: {slots} slots per layer; "
              "share of the slots; mean routing weight of each token's first pick)")  # fmt: skip
        print("  layer  " + "  ".join(f"{'e' + str(e):>13s}" for e in range(E)) + "  first pick")
        for layer, c in enumerate(counts):
            print(
                f"  {layer:5d}  "
                + "  ".join(f"{x:>6d} ({100 * x / slots:3.0f}%)" for x in c)
                + f"  {first_weight[layer]:10.2f}"
            )
    return 0
