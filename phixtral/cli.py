"""The `phixtral` command: `phixtral generate --model PATH_OR_ID --prompt TEXT [options]`.

Subcommands register themselves in COMMANDS: each entry adds its parser and sets `func` (args -> exit code), so a new
subcommand (merge, eval, inspect, ...) is one function plus one line.
"""

import argparse
import sys

from phixtral_kernels import BACKENDS

from . import evaluate, inspect_model, merge
from .weights import default_model_path


def _add_generate(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="stream a completion of a prompt",
        description="Stream a completion of a prompt to stdout, then prompt and decode speeds to stderr.",
    )
    p.add_argument("--model", default=None, help="checkpoint folder or hub id (owner/name)")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default=None, help="float16, bfloat16 or float32 (default: float32 on CPU, else the checkpoint's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="MoE implementation")
    p.add_argument("--experts-per-tok", type=int, default=None, help="override num_experts_per_tok")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from .weights import from_pretrained

    model_path = args.model if args.model is not None else default_model_path()
    model = from_pretrained(
        model_path, device=args.device, dtype=args.dtype, backend=args.backend, num_experts_per_tok=args.experts_per_tok
    )
    pieces = model.generate(
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        stop=args.stop,
        seed=args.seed,
        stream=True,
    )
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    s = model.last_generation_stats
    print(
        f"prompt: {s.prompt_tokens} tokens in {s.prefill_s:.3f} s ({s.prompt_tokens_per_s:.1f} tokens/s); "
        f"decode: {s.new_tokens} tokens in {s.decode_s:.3f} s ({s.decode_tokens_per_s:.1f} tokens/s) "
        f"[{model.device}, {str(model.dtype).removeprefix('torch.')}, backend {model.backend}]",
        file=sys.stderr,
    )
    return 0


# Each adds one subcommand to the subparsers and sets its `func`.
COMMANDS = [_add_generate, merge.add_parser, evaluate.add_parser, inspect_model.add_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phixtral", description="phi-2 / phixtral decoder with fused MoE kernels")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, RuntimeError) as e:
        print(f"phixtral {args.command}: error: {e}", file=sys.stderr)
        return 1
