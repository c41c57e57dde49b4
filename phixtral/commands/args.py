"""What the `phixtral` subcommands share: argparse value types, the model flags and the loading behind them.

A bad value is reported under the flag the user typed (`argument --batch-size: must be >= 1, got 0`) with exit 2:
by argparse before anything runs, or by load_model / the check_* helpers for what needs the machine or the model
(`argument --experts-per-tok: 9 exceeds the model's 4 experts`). Every command that loads a model declares its model
flags with add_model_args and loads with load_model, so the flags, their help and their checks are the same everywhere.
"""

import argparse


def parse_number(kind, text: str):
    """int(text) or float(text), or the argparse error that names what was expected."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an int' if kind is int else 'a number'}, got {text!r}") from None


def int_at_least(low: int):
    """An int >= low."""

    def parse(text: str) -> int:
        value = parse_number(int, text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


def float_in(low: float, high: float = float("inf"), *, low_open: bool = False, high_open: bool = False):
    """A finite float in [low, high]; low_open / high_open exclude an end."""

    def parse(text: str) -> float:
        value = parse_number(float, text)
        below = value <= low if low_open else value < low
        above = value >= high if high_open else value > high
        if value != value or abs(value) == float("inf") or below or above:
            left = "(" if low_open else "["
            right = ")" if high_open or high == float("inf") else "]"
            raise argparse.ArgumentTypeError(f"must be in {left}{low:g}, {high:g}{right}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def seed(text: str) -> int:
    """A torch generator seed: an int in [0, 2**64)."""
    value = parse_number(int, text)
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**64), got {value}")
    return value


# --- the model flags -------------------------------------------------------------------------------------------------
# Every dtype name phixtral.from_pretrained accepts (phixtral.weights' table; a test keeps the two the same).
DTYPES = ("float16", "bfloat16", "float32", "fp16", "bf16", "fp32", "half", "float")
MODEL_HELP = "checkpoint folder or hub id owner/name"
BUNDLED = "the bundled tiny phixtral"
HELP = {
    "--dtype": "float16, bfloat16 or float32; fp16, bf16, fp32, half and float are aliases "
    "(default: float32 on the CPU, bfloat16 there for a GPTQ checkpoint or --quantize, else the checkpoint's)",
    "--device": "cpu, cuda, cuda:1, ... (default: cuda when available)",
    "--backend": "MoE implementation",
    "--experts-per-tok": "experts run per token, 1 to the model's experts (default: the config's num_experts_per_tok)",
    "--threads": "torch CPU threads (default: torch's choice)",
    "--compile": "run the CPU decode steps as one torch.compile'd graph: auto (when a generation is long enough to "
    "repay the compile; PHIXTRAL_COMPILE=0 turns it off), on, off (default: auto)",
    "--quantize": "quantize a float checkpoint as it loads, round-to-nearest: int4 or int8 (groups of 128, "
    "symmetric), options after commas: int4,group_size=64,sym=false (default: none)",
}


def quantize_flag(text: str):
    """--quantize SPEC: phixtral.quant.quantize_spec's string form, as a GPTQConfig."""
    from ..quant.on_load import quantize_spec

    try:
        return quantize_spec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("quantize: ")) from None


quantize_flag.__name__ = "quantize spec"


def add_model_args(parser: argparse.ArgumentParser, *, model: str = "optional", dtype: bool = True, device: bool = True,
                   backend: bool = True, backends=None, experts: bool = True,
                   quantize: bool = True) -> None:  # fmt: skip
    """Declare the flags of a command that loads a model, with one help text each: --model, --dtype, --device,
    --backend, --experts-per-tok, --quantize and --threads (always). A command leaves out the ones it fixes itself.

    model: "optional" (default: the bundled model), "required" or "repeatable" (--model given once per model).
    backends: the --backend choices (default: all of phixtral_kernels.BACKENDS).
    The parser becomes args.parser, so that load_model can report a value under its flag.
    """
    from phixtral_kernels import BACKENDS

    group = parser.add_argument_group("model options")
    if model == "required":
        group.add_argument("--model", required=True, help=MODEL_HELP)
    elif model == "repeatable":
        group.add_argument(
            "--model", action="append", default=None, help=f"{MODEL_HELP} (repeatable; default: {BUNDLED})"
        )
    elif model == "optional":
        group.add_argument("--model", default=None, help=f"{MODEL_HELP} (default: {BUNDLED})")
    else:
        raise ValueError(f"model must be 'optional', 'required' or 'repeatable', got {model!r}")
    if dtype:
        group.add_argument("--dtype", default=None, choices=DTYPES, metavar="DTYPE", help=HELP["--dtype"])
    if device:
        group.add_argument("--device", default=None, help=HELP["--device"])
    if backend:
        group.add_argument("--backend", default="auto", choices=backends or BACKENDS, help=HELP["--backend"])
    if experts:
        group.add_argument("--experts-per-tok", type=int_at_least(1), default=None, help=HELP["--experts-per-tok"])
    if quantize:
        group.add_argument("--quantize", type=quantize_flag, default=None, metavar="SPEC", help=HELP["--quantize"])
    add_threads_arg(group)
    parser.set_defaults(parser=parser)


def add_threads_arg(parser) -> None:
    """--threads N on a parser or an argument group: torch's CPU threads while the command computes (apply_threads
    sets them)."""
    parser.add_argument("--threads", type=int_at_least(1), default=None, help=HELP["--threads"])


COMPILE_CHOICES = {"auto": "auto", "on": True, "off": False}


def add_compile_arg(parser) -> None:
    """--compile auto|on|off on a command that decodes: the model's compile_decode (load_model sets it)."""
    parser.add_argument("--compile", default="auto", choices=COMPILE_CHOICES, help=HELP["--compile"])


def apply_threads(args) -> None:
    """torch.set_num_threads(args.threads) when --threads was given."""
    import torch

    if getattr(args, "threads", None) is not None:
        torch.set_num_threads(args.threads)


def flag_error(parser: argparse.ArgumentParser, flag: str, message: str):
    """Exit 2 with argparse's usage and "argument FLAG: message", as a bad value caught while parsing would."""
    parser.error(f"argument {flag}: {message}")


def load_model(args, parser: argparse.ArgumentParser, path=None, **fixed):
    """Load `path` (default: args.model, else the bundled model) as the model flags in args say, after --threads.

    A value that this machine or this checkpoint cannot take exits 2 under its flag (flag_error): a --device that does
    not exist here, --backend triton where Triton cannot run, a --dtype the device lacks, --experts-per-tok above
    the model's experts, a --quantize group size that does not divide the model's features. Other load errors (a
    missing folder, a broken file) are raised as from_pretrained raises them.
    fixed: from_pretrained arguments the command sets itself (dtype="float32", backend="torch", ...); a flag the
    command does not declare is None (or "auto" for the backend).
    """
    from phixtral_kernels import triton_unavailable_reason

    from ..weights import (
        default_model_path,
        from_pretrained,
        read_config,
        resolve_checkpoint,
        resolve_device,
        resolve_dtype,
    )  # fmt: skip

    apply_threads(args)
    if path is None:
        path = args.model if args.model is not None else default_model_path()
    flags = {
        "device": getattr(args, "device", None), "dtype": getattr(args, "dtype", None),
        "backend": getattr(args, "backend", "auto"), "num_experts_per_tok": getattr(args, "experts_per_tok", None),
        "quantize": getattr(args, "quantize", None),
    }  # fmt: skip
    flags = {k: v for k, v in flags.items() if k not in fixed}  # only what the user chose is checked as a flag
    kwargs = {**flags, **fixed}
    try:
        device = resolve_device(kwargs.get("device"))
    except (ValueError, RuntimeError) as e:
        flag_error(parser, "--device", str(e))
    if flags.get("backend") == "triton" and (reason := triton_unavailable_reason(device)) is not None:
        flag_error(parser, "--backend", f"triton cannot run on {device}: {reason}")
    folder = resolve_checkpoint(path)
    config = read_config(folder)
    if flags.get("dtype") is not None:
        try:
            resolve_dtype(flags["dtype"], device, config)
        except (ValueError, RuntimeError) as e:
            flag_error(parser, "--dtype", str(e))
    if flags.get("num_experts_per_tok") is not None:
        check_experts_per_tok(parser, flags["num_experts_per_tok"], config.num_local_experts)
    if flags.get("quantize") is not None:
        from ..quant import read_quantization_config
        from ..quant.on_load import check_spec

        try:
            check_spec(config, flags["quantize"])
        except ValueError as e:
            flag_error(parser, "--quantize", str(e).removeprefix("quantize: "))
        if read_quantization_config(folder) is not None:
            flag_error(parser, "--quantize", f"{folder} is already quantized: load it without --quantize")
    model = from_pretrained(folder, **kwargs)
    if getattr(args, "compile", None) is not None:
        model.compile_decode = COMPILE_CHOICES[args.compile]
    return model


def check_experts_per_tok(parser: argparse.ArgumentParser, k: int, num_experts: int) -> None:
    """--experts-per-tok k must not exceed the model's experts (exit 2 naming the flag)."""
    if k > num_experts:
        experts = f"{num_experts} expert{'s' * (num_experts != 1)}"
        flag_error(parser, "--experts-per-tok", f"{k} exceeds the model's {experts}")


def check_fits_context(parser: argparse.ArgumentParser, flag: str, value: int, model) -> None:
    """A window length given by `flag` must fit the model's context (exit 2 naming the flag)."""
    n = model.config.n_positions
    if value > n:
        flag_error(parser, flag, f"{value} exceeds the model's n_positions ({n})")


def check_out(out, *, overwrite: bool, sources=()) -> None:
    """--out may receive a checkpoint: not a file, not a source (nor inside or around one), empty or, with
    --overwrite, a checkpoint folder. Else one ValueError that names --overwrite where it would help."""
    from pathlib import Path

    from ..atomic import check_destination
    from ..checkpoint_writer import check_checkpoint_destination

    out = Path(out)
    check_destination(out, overwrite=True, sources=sources)  # a file or a source: refused even with --overwrite
    if not overwrite and out.is_dir() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; pass --overwrite to replace it")
    check_checkpoint_destination(out, overwrite=overwrite)
