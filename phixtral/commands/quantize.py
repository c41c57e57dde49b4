"""`phixtral quantize`: weight-only quantization of a phixtral / phi-2 checkpoint into AutoGPTQ's v1 layout.

    python -m phixtral quantize --model DIR --bits {4,8} --group-size N [--method rtn|gptq] [--act-order] [--sym]
        [--calib stdlib|FILE] --out DIR

Quantized: every layer's Wqkv, out_proj and the experts' fc1 / fc2 (the Linears AutoGPTQ quantizes in phi models);
the router, embeddings, LayerNorms and lm_head stay in the checkpoint's float dtype. The output is a GPTQ checkpoint
(`<module>.qweight / qzeros / scales / g_idx / bias`, quantize_config.json, config.json's quantization_config) that
`phixtral.from_pretrained` and other GPTQ tools read. It is written atomically (phixtral.atomic), never over its source.

Methods (phixtral/quant/rtn.py and gptq_solver.py):
    rtn   round to nearest, per group of input rows (`phixtral_kernels.quantize_rtn`): no data, seconds.
    gptq  GPTQ (Frantar et al. 2022): each Linear's rows quantized one input column at a time, the rounding error
          pushed onto the columns not yet quantized through the inverse Hessian of its calibration inputs
          (H = 2/n X^T X). Layer by layer: a layer's inputs come from the already quantized layers before it; inside a
          layer Wqkv and fc1 first (both read ln(x)), then out_proj and fc2 on the outputs of the quantized Wqkv / fc1.
          An expert's Hessian only sees the calibration tokens routed to it. --act-order processes columns by
          decreasing Hessian diagonal (g_idx records each column's group).
Both stream (phixtral/quant/streaming.py): the float model is never loaded whole. RTN reads, quantizes and writes one
Linear at a time; GPTQ one layer at a time, with the calibration activations carried from layer to layer; shards are
written as they fill. The tensors are those of loading the model in float32 and quantizing it in place, bit for bit.
"""

import argparse
import sys
from pathlib import Path

import torch

from ..quant import GPTQConfig, gptq_quantize, quantize_model_gptq, read_quantization_config
from .args import add_model_args, apply_threads, check_out, flag_error, float_in, int_at_least, parse_number

METHODS = ("rtn", "gptq")
REPORT_FILE = "quantize_report.json"


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
    p.add_argument(
        "--act-order", action="store_true", help="gptq only: columns by decreasing Hessian diagonal (desc_act)"
    )
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True, help="symmetric grid (no zero points)")
    p.add_argument(
        "--calib", default="stdlib", help="gptq calibration text: 'stdlib' (the standard library slices) or a text file"
    )
    p.add_argument("--calib-samples", type=int_at_least(1), default=128, help="gptq: calibration windows")
    p.add_argument("--calib-seq-len", type=int_at_least(2), default=256, help="gptq: tokens per window")
    p.add_argument(
        "--damp",
        type=float_in(0, 1, low_open=True, high_open=True),
        default=0.01,
        help="gptq: damping, a fraction of the mean Hessian diagonal",
    )
    p.add_argument("--seed", type=int_at_least(0), default=0, help="gptq: seed of the calibration windows")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (a checkpoint folder)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    # The solvers compute in float32 on the torch MoE path, and the checkpoint keeps its own top-k: no --dtype,
    # --backend or --experts-per-tok.
    add_model_args(p, model="required", dtype=False, backend=False, experts=False, quantize=False)
    p.set_defaults(func=run)
    return p


def _group_size(text: str) -> int:
    value = parse_number(int, text)
    if value != -1 and value < 1:
        raise argparse.ArgumentTypeError(f"must be -1 (per channel) or >= 1, got {value}")
    return value


def run(args) -> int:
    from ..quant.on_load import linear_shapes
    from ..quant.streaming import quantize_checkpoint
    from ..weights import inspect_quantized, load_tokenizer, read_config, resolve_checkpoint, resolve_device

    if args.act_order and args.method != "gptq":
        raise ValueError("--act-order orders columns by the calibration Hessian: it needs --method gptq")
    gptq = GPTQConfig(
        bits=args.bits, group_size=args.group_size, desc_act=args.act_order, sym=args.sym, damp_percent=args.damp
    )
    apply_threads(args)
    try:
        device = resolve_device(args.device)
    except (ValueError, RuntimeError) as e:
        flag_error(args.parser, "--device", str(e))
    source = resolve_checkpoint(args.model)
    try:
        check_out(args.out, overwrite=args.overwrite, sources=[source])  # refuse before the work
    except ValueError as e:
        raise ValueError(f"--out: {e}") from e
    config = read_config(source)
    fmt = read_quantization_config(source)
    if fmt is not None and inspect_quantized(source, config)[4]:
        raise ValueError(f"{source} is already quantized ({getattr(fmt, 'bits', '?')} bits)")
    K_sizes = {K for _, _, K in linear_shapes(config).values()}
    if args.group_size > 0 and any(k % args.group_size for k in K_sizes):
        raise ValueError(
            f"--group-size {args.group_size} does not divide the in features of every Linear {sorted(K_sizes)}"
        )
    report = {"source": str(args.model), "method": args.method, **gptq.to_dict()}
    windows = None
    if args.method == "gptq":
        tokenizer = load_tokenizer(source)
        if tokenizer is None:
            raise ValueError(f"{source} has no tokenizer files: gptq needs them to encode the calibration text")
        seq_len = min(args.calib_seq_len, config.n_positions)
        windows = calibration_windows(
            tokenizer, args.calib, samples=args.calib_samples, seq_len=seq_len, seed=args.seed
        )
        report.update(calib=args.calib, calib_samples=args.calib_samples, calib_seq_len=seq_len, seed=args.seed)
    quantize_checkpoint(source, args.out, gptq, method=args.method, windows=windows, device=device,
                        overwrite=args.overwrite, report=report, report_file=REPORT_FILE,
                        progress=not args.no_progress)  # fmt: skip
    size = sum(f.stat().st_size for f in Path(args.out).glob("*.safetensors"))
    print(f"wrote {args.out}: {args.bits}-bit {args.method}, group size {args.group_size}, {size / 2**20:.1f} MiB "
          f"({report['seconds']:.1f} s)", file=sys.stderr)  # fmt: skip
    return 0


__all__ = ["calibration_windows", "gptq_quantize", "quantize_model_gptq"]
