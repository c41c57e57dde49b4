"""`phixtral quantize`: weight-only quantization of a phixtral / phi-2 checkpoint into AutoGPTQ's v1 layout.

    python -m phixtral quantize --model DIR --bits {4,8} --group-size N [--method rtn|gptq] [--act-order] [--sym]
        [--calib stdlib|FILE] --out DIR

Quantized: every layer's Wqkv, out_proj and the experts' fc1 / fc2 (the Linears AutoGPTQ quantizes in phi models);
the router, embeddings, LayerNorms and lm_head stay in the checkpoint's float dtype. The output is a GPTQ checkpoint
(`<module>.qweight / qzeros / scales / g_idx / bias`, quantize_config.json, config.json's quantization_config) that
`phixtral.from_pretrained` and other GPTQ tools read. It is written atomically (phixtral.atomic), never over its source.

Methods:
    rtn   round to nearest, per group of input rows (`phixtral_kernels.quantize_rtn`): no data, seconds.
    gptq  GPTQ (Frantar et al. 2022): each Linear's rows quantized one input column at a time, the rounding error
          pushed onto the columns not yet quantized through the inverse Hessian of its calibration inputs
          (H = 2/n X^T X). Layer by layer: a layer's inputs come from the already quantized layers before it; inside a
          layer Wqkv and fc1 first (both read ln(x)), then out_proj and fc2 on the outputs of the quantized Wqkv / fc1.
          An expert's Hessian only sees the calibration tokens routed to it. --act-order processes columns by
          decreasing Hessian diagonal (g_idx records each column's group).
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from phixtral_kernels import (
    QuantizedExperts,
    act_order_g_idx,
    dequantize_experts,
    gelu_tanh,
    pack_cols,
    pack_rows,
    quant_grid,
    quantize_values,
    topk_softmax_torch,
)

from ..gptq import GPTQConfig, float_bias, float_weight, quantizable, quantize_model_rtn, set_quantized
from .args import add_model_args, check_out, float_in, int_at_least, load_model, parse_number

METHODS = ("rtn", "gptq")
REPORT_FILE = "quantize_report.json"


# --- GPTQ -------------------------------------------------------------------------------------------------------------
def gptq_quantize(w: torch.Tensor, H: torch.Tensor, gptq: GPTQConfig, *, block_size: int = 128):
    """GPTQ on one Linear: w [N, K] float, H [K, K] = 2/n sum x x^T of its inputs -> (q [K, N] codes, scale [G, N],
    zero [G, N], g_idx [K] or None, the Hessian-weighted error sum).

    Columns are quantized in order (by decreasing H diagonal with desc_act); each group's grid (`quant_grid`) is set
    when its first column comes up, from the columns as the earlier errors left them. Dead inputs (H_kk = 0) are
    quantized as zeros. Damping: damp_percent of the mean diagonal.
    """
    W = w.detach().float().clone()
    N, K = W.shape
    H = H.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    gs = gptq.group_size if gptq.group_size > 0 else K
    perm = None
    if gptq.desc_act:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    H += gptq.damp_percent * torch.mean(torch.diag(H)) * torch.eye(K, device=H.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros(K, N, device=W.device)
    scales = torch.zeros(K // gs, N, device=W.device)
    zeros = torch.zeros(K // gs, N, device=W.device)
    loss = 0.0
    if gptq.group_size > 0:
        block_size = max(block_size // gs, 1) * gs  # a multiple of the group size: groups never straddle blocks
    else:  # per channel: one grid for the whole row, from the weights as they are
        scales[0], zeros[0] = quant_grid(W.min(1).values, W.max(1).values, gptq.bits, gptq.sym)
    for b0 in range(0, K, block_size):
        b1 = min(b0 + block_size, K)
        W1, Err1, Hinv1 = W[:, b0:b1].clone(), torch.zeros(N, b1 - b0, device=W.device), Hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if gptq.group_size > 0 and col % gs == 0:
                group = W1[:, i : i + gs]  # the group's columns with the errors of every earlier column applied
                s, z = quant_grid(group.min(1).values, group.max(1).values, gptq.bits, gptq.sym)
                scales[col // gs], zeros[col // gs] = s, z
            s, z = scales[col // gs], zeros[col // gs]
            w_col = W1[:, i]
            q = quantize_values(w_col, s, z, gptq.bits)
            Q[col] = q
            err = (w_col - s * (q - z)) / Hinv1[i, i]
            loss += float((err**2).sum()) / 2
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, b1:] -= Err1 @ Hinv[b0:b1, b1:]
    g_idx = None
    if perm is not None:
        inv = torch.argsort(perm)
        Q = Q[inv]
        g_idx = act_order_g_idx(perm, gs)
    return Q, scales, zeros, g_idx, loss


def _pack(codes: list, scales: list, zeros: list, g_idx: list, gptq: GPTQConfig) -> QuantizedExperts:
    """Stack per-expert GPTQ results into a QuantizedExperts."""
    q = pack_rows(torch.stack(codes).to(torch.int32), gptq.bits)
    qzeros = None if gptq.sym else pack_cols((torch.stack(zeros) - 1).to(torch.int32), gptq.bits)
    g = torch.stack(g_idx).to(torch.int32) if g_idx[0] is not None else None
    return QuantizedExperts(q, qzeros, torch.stack(scales).half(), g, gptq.bits, gptq.group_size)


class _Hessians:
    """Running H = 2/n sum x x^T per expert of one Linear stack."""

    def __init__(self, E: int, K: int, device):
        self.H = torch.zeros(E, K, K, device=device)
        self.n = [0] * E

    def add(self, e: int, x: torch.Tensor) -> None:
        # x [rows, K]; running mean of 2 x x^T, as GPTQ's add_batch
        rows = x.shape[0]
        if rows == 0:
            return
        total = self.n[e] + rows
        x = x.float() * math.sqrt(2.0 / total)
        self.H[e] *= self.n[e] / total
        self.H[e] += x.t() @ x
        self.n[e] = total


def _quantize_stack(model, name: str, hessians: _Hessians, gptq: GPTQConfig) -> float:
    module = model.get_submodule(name)
    w = float_weight(module)
    # An expert no calibration token reached has H = 0: every input would count as dead and be zeroed. The identity
    # instead makes GPTQ plain rounding for it.
    eye = torch.eye(w.shape[2], device=w.device)
    results = [gptq_quantize(w[e], hessians.H[e] if hessians.n[e] else eye, gptq) for e in range(w.shape[0])]
    codes, scales, zeros, g_idx, losses = zip(*results)
    set_quantized(model, name, _pack(codes, scales, zeros, g_idx, gptq), float_bias(module))
    return sum(losses)


def _moe_inputs(moe, h: torch.Tensor):
    """Per expert, the rows of h [T, D] routed to it (top-k over the router logits, ties to the lowest index)."""
    _, experts = topk_softmax_torch(h @ moe.gate.weight.t(), moe.top_k)  # [T, top_k], ties to the lowest index
    return [h[(experts == e).any(-1)] for e in range(moe.gate.weight.shape[0])]


@torch.no_grad()
def quantize_model_gptq(model, gptq: GPTQConfig, windows: torch.Tensor, *, batch_size: int = 8, progress: bool = True) -> dict:
    """GPTQ of every `quantizable` Linear, in place, calibrated on token windows [n, S]. Returns {module: error}."""
    from tqdm.auto import tqdm

    x = torch.cat([model.wte(windows[i : i + batch_size].to(model.device)) for i in range(0, len(windows), batch_size)])
    B, S = windows.shape
    position_ids = torch.arange(S, device=model.device)[None].expand(batch_size, S)
    losses = {}
    bar = tqdm(total=4 * len(model.h), desc="gptq", unit="linear", disable=not progress)
    for i, block in enumerate(model.h):
        prefix = f"h.{i}"

        def ln_batches():
            for b in range(0, B, batch_size):
                yield x[b : b + batch_size], block.ln(x[b : b + batch_size])

        # 1. Wqkv and fc1 read ln(x)
        D = x.shape[-1]
        attn_in = _Hessians(1, D, model.device)
        E = block.moe.gate.weight.shape[0]
        fc1_in = _Hessians(E, D, model.device)
        for _, h in ln_batches():
            flat = h.reshape(-1, D)
            attn_in.add(0, flat)
            for e, rows in enumerate(_moe_inputs(block.moe, flat)):
                fc1_in.add(e, rows)
        for name, H in ((prefix + ".mixer.Wqkv", attn_in), (prefix + ".moe.fc1", fc1_in)):
            losses[name] = _quantize_stack(model, name, H, gptq)
            bar.update(1)
        # 2. out_proj reads the attention output, fc2 the hidden units, both from the quantized Wqkv / fc1
        out_proj_in = _Hessians(1, block.mixer.out_proj.in_features, model.device)
        F_ = block.moe.fc1.weight.shape[1]
        fc2_in = _Hessians(E, F_, model.device)
        hook = block.mixer.out_proj.register_forward_pre_hook(lambda mod, args: out_proj_in.add(0, args[0].reshape(-1, args[0].shape[-1])))
        try:
            for xb, h in ln_batches():
                cos, sin = model._rope(position_ids[: xb.shape[0]])
                block.mixer(h, cos, sin, None, None)
                flat = h.reshape(-1, D)
                fc1 = block.moe.fc1.weight  # quantized in step 1
                for e, rows in enumerate(_moe_inputs(block.moe, flat)):
                    if rows.shape[0]:
                        w1 = dequantize_experts(fc1.select(e), rows.dtype)[0]
                        fc2_in.add(e, gelu_tanh(F.linear(rows, w1, block.moe.fc1.bias[e])))
        finally:
            hook.remove()
        for name, H in ((prefix + ".mixer.out_proj", out_proj_in), (prefix + ".moe.fc2", fc2_in)):
            losses[name] = _quantize_stack(model, name, H, gptq)
            bar.update(1)
        # 3. the next layer's inputs: this layer, quantized
        for b in range(0, B, batch_size):
            xb = x[b : b + batch_size]
            cos, sin = model._rope(position_ids[: xb.shape[0]])
            x[b : b + batch_size] = block(xb, cos, sin, None, None)
    bar.close()
    model.quantization = gptq
    model.set_backend(model.backend)
    return losses


# --- calibration data -------------------------------------------------------------------------------------------------
def calibration_windows(tokenizer, calib: str, *, samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """[samples, seq_len] token windows drawn (seeded) from training text: 'stdlib' (the standard library slices'
    training pieces, the same number of windows from each) or a UTF-8 text file. Only as many documents are encoded
    as the windows need (twice their tokens), taken in a seeded random order."""
    import random

    from .evaluate import encode_documents
    from .stdlib_data import EXPERT_SLICES, slice_texts

    rng = random.Random(seed)
    if calib == "stdlib":
        sources = [slice_texts(s, "train") for s in EXPERT_SLICES]
    else:
        path = Path(calib)
        if not path.is_file():
            raise ValueError(f"--calib {calib}: no such file (pass 'stdlib' or a text file)")
        sources = [[path.read_bytes().decode("utf-8", errors="replace")]]
    need = 2 * seq_len * -(-samples // len(sources)) + 1
    streams = []
    for texts in sources:
        texts = list(texts)
        rng.shuffle(texts)
        parts, count = [], 0
        for text in texts:
            parts.append(encode_documents(tokenizer, [text]))
            count += parts[-1].numel()
            if count >= need:
                break
        stream = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
        if stream.numel() > seq_len:
            streams.append(stream)
    if not streams:
        raise ValueError(f"--calib {calib}: fewer than {seq_len + 1} tokens of text")
    out = []
    for i in range(samples):
        s = streams[i % len(streams)]
        start = rng.randrange(0, s.numel() - seq_len)
        out.append(s[start : start + seq_len])
    return torch.stack(out)


# --- the command ------------------------------------------------------------------------------------------------------
def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "quantize",
        help="quantize a checkpoint's weights (GPTQ layout)",
        description="Weight-only quantization of Wqkv, out_proj and the experts' fc1 / fc2 to 4 or 8 bits, written "
        "atomically to --out in AutoGPTQ's v1 layout (loads with phixtral.from_pretrained and other GPTQ tools).",
    )
    p.add_argument("--bits", type=int, choices=(4, 8), required=True, help="bits per weight")
    p.add_argument("--group-size", type=_group_size, default=128, help="input rows per group, -1 for per channel")
    p.add_argument("--method", choices=METHODS, default="rtn", help="rtn (no data) or gptq (calibrated)")
    p.add_argument("--act-order", action="store_true", help="gptq only: columns by decreasing Hessian diagonal (desc_act)")
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True, help="symmetric grid (no zero points)")
    p.add_argument("--calib", default="stdlib", help="gptq calibration text: 'stdlib' (the standard library slices) or a text file")
    p.add_argument("--calib-samples", type=int_at_least(1), default=128, help="gptq: calibration windows")
    p.add_argument("--calib-seq-len", type=int_at_least(2), default=256, help="gptq: tokens per window")
    p.add_argument("--damp", type=float_in(0, 1, low_open=True, high_open=True), default=0.01, help="gptq: damping, a fraction of the mean Hessian diagonal")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="gptq: seed of the calibration windows")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (a checkpoint folder)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    # The solvers compute in float32 on the torch MoE path, and the checkpoint keeps its own top-k: no --dtype,
    # --backend or --experts-per-tok.
    add_model_args(p, model="required", dtype=False, backend=False, experts=False)
    p.set_defaults(func=run)
    return p


def _group_size(text: str) -> int:
    value = parse_number(int, text)
    if value != -1 and value < 1:
        raise argparse.ArgumentTypeError(f"must be -1 (per channel) or >= 1, got {value}")
    return value


def run(args) -> int:
    from ..weights import resolve_checkpoint

    if args.act_order and args.method != "gptq":
        raise ValueError("--act-order orders columns by the calibration Hessian: it needs --method gptq")
    gptq = GPTQConfig(bits=args.bits, group_size=args.group_size, desc_act=args.act_order, sym=args.sym, damp_percent=args.damp)
    source = resolve_checkpoint(args.model)
    try:
        check_out(args.out, overwrite=args.overwrite, sources=[source])  # refuse before the work
    except ValueError as e:
        raise ValueError(f"--out: {e}") from e
    model = load_model(args, args.parser, source, dtype="float32", backend="torch")
    if model.quantization is not None:
        raise ValueError(f"{source} is already quantized ({model.quantization.bits} bits)")
    K_sizes = {model.get_submodule(n).weight.shape[-1] for n in quantizable(model)}
    if args.group_size > 0 and any(k % args.group_size for k in K_sizes):
        raise ValueError(f"--group-size {args.group_size} does not divide the in features of every Linear {sorted(K_sizes)}")
    start = time.perf_counter()
    report = {"source": str(args.model), "method": args.method, **gptq.to_dict()}
    if args.method == "rtn":
        quantize_model_rtn(model, gptq)
    else:
        if model.tokenizer is None:
            raise ValueError(f"{source} has no tokenizer files: gptq needs them to encode the calibration text")
        seq_len = min(args.calib_seq_len, model.config.n_positions)
        windows = calibration_windows(model.tokenizer, args.calib, samples=args.calib_samples, seq_len=seq_len, seed=args.seed)
        losses = quantize_model_gptq(model, gptq, windows, progress=not args.no_progress)
        report.update(calib=args.calib, calib_samples=args.calib_samples, calib_seq_len=seq_len, seed=args.seed, errors=losses)
    report["seconds"] = time.perf_counter() - start
    dtype = model.config.torch_dtype or "float16"
    model.save_pretrained(args.out, dtype=dtype, overwrite=args.overwrite, sources=[source],
                          extra_files={REPORT_FILE: json.dumps(report, indent=2) + "\n"})  # fmt: skip
    size = sum(f.stat().st_size for f in Path(args.out).glob("*.safetensors"))
    print(f"wrote {args.out}: {args.bits}-bit {args.method}, group size {args.group_size}, {size / 2**20:.1f} MiB "
          f"({report['seconds']:.1f} s)", file=sys.stderr)  # fmt: skip
    return 0


__all__ = ["calibration_windows", "gptq_quantize", "quantize_model_gptq"]
