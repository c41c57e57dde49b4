"""The `phixtral` command: `phixtral generate --model PATH_OR_ID --prompt TEXT [options]`.

Subcommands register themselves in COMMANDS: each entry adds its parser and sets `func` (args -> exit code), so a new
subcommand (merge, eval, inspect, ...) is one function plus one line.
"""

import argparse
import sys

from phixtral_kernels import BACKENDS

from .commands import evaluate, inspect_model, merge, quantize, train_router
from .commands.args import float_in, int_at_least, seed
from .serve import command as serve_command
from .weights import default_model_path


def _add_generate(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="stream a completion of a prompt",
        description="Stream a completion of a prompt to stdout, then prompt and decode speeds to stderr.",
    )
    p.add_argument("--model", default=None, help="checkpoint folder or hub id owner/name (default: the bundled tiny phixtral)")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=float_in(0), default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int_at_least(0), default=None, help="sample among the k most likely tokens (default: off)")
    p.add_argument("--top-p", type=float_in(0, 1, low_open=True), default=None, help="nucleus sampling (default: off)")
    p.add_argument("--repetition-penalty", type=float_in(0, low_open=True), default=1.0, help="1 = off")
    p.add_argument("--stop", action="append", default=None, help="stop string, repeatable (default: none)")
    p.add_argument("--seed", type=seed, default=None, help="seed of the sampler (default: random)")
    p.add_argument("--dtype", default=None, help="float16, bfloat16 or float32 (default: float32 on CPU, else the checkpoint's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="MoE implementation")
    p.add_argument("--experts-per-tok", type=int_at_least(1), default=None, help="override num_experts_per_tok (default: the config's)")
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
        f"[{model.device}, {str(model.dtype).removeprefix('torch.')}, backend {model.backend}"
        f"{', CUDA graph' if s.cuda_graph else ''}]",
        file=sys.stderr,
    )
    return 0


# Each adds one subcommand to the subparsers and sets its `func`.
COMMANDS = [
    _add_generate, merge.add_parser, evaluate.add_parser, inspect_model.add_parser, train_router.add_parser,
    quantize.add_parser, serve_command.add_parser,
]  # fmt: skip


class HelpWithDefaults(argparse.HelpFormatter):
    """--help shows every option's default: its value, or for a None default the words its help gives."""

    def _get_help_string(self, action):
        text = action.help or ""
        value = action.default
        if action.option_strings and "default" not in text and not (value is None or value is False or value == argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phixtral", description="phi-2 / phixtral decoder with fused MoE kernels")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    for sub in subparsers.choices.values():
        sub.formatter_class = HelpWithDefaults
    return parser


def main(argv=None) -> int:
    """Run one subcommand. Errors print one line and exit 1; Ctrl-C exits 130 and a closed pipe 141, both quietly."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, RuntimeError, OSError) as e:
        if isinstance(e, BrokenPipeError):
            return _closed_pipe()
        print(f"phixtral {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def _closed_pipe() -> int:
    # The reader went away (`phixtral generate ... | head -c5`): point stdout at devnull so that the flush at exit
    # raises no second BrokenPipeError, and exit as a process killed by SIGPIPE would.
    import os

    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141
