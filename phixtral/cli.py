"""The `phixtral` command: `phixtral COMMAND [options]`, one file per command in phixtral/commands/.

Each entry of COMMANDS adds its subparser and sets `func` (args -> exit code), so a new subcommand is one file plus
one line. Errors: a bad flag value exits 2 under the flag's name (argparse, or commands.args for what needs the model);
any other error prints one line and exits 1.
"""

import argparse
import sys

from .commands import evaluate, generate, inspect_model, merge, quantize, serve, train_router

# Each adds one subcommand to the subparsers and sets its `func`.
COMMANDS = [
    generate.add_parser, merge.add_parser, evaluate.add_parser, inspect_model.add_parser, train_router.add_parser,
    quantize.add_parser, serve.add_parser,
]  # fmt: skip
# The generate command's run, under the name it had here.
cmd_generate = generate.run


class HelpWithDefaults(argparse.HelpFormatter):
    """--help shows every option's default: its value, or for a None default the words its help gives."""

    def _get_help_string(self, action):
        text = action.help or ""
        value = action.default
        if (
            action.option_strings
            and "default" not in text
            and not (value is None or value is False or value == argparse.SUPPRESS)
        ):
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    """The `phixtral` parser with every subcommand of COMMANDS."""
    parser = argparse.ArgumentParser(prog="phixtral", description="phi-2 / phixtral decoder with fused MoE kernels")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    for sub in subparsers.choices.values():
        sub.formatter_class = HelpWithDefaults
    return parser


def main(argv=None) -> int:
    """Run one subcommand. Errors print one line and exit 1 (2 for a bad flag value); Ctrl-C exits 130 and a closed
    pipe 141, both quietly."""
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
