"""`phixtral generate --prompt TEXT [--model DIR_OR_ID] [options]`: stream a completion to stdout, then the prompt and
decode speeds to stderr."""

import sys

from .args import add_compile_arg, add_model_args, flag_error, float_in, int_at_least, load_model, seed


def add_parser(subparsers):
    p = subparsers.add_parser(
        "generate",
        help="stream a completion of a prompt",
        description="Stream a completion of a prompt to stdout, then prompt and decode speeds to stderr.",
    )
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=float_in(0), default=0.0, help="0 = greedy")
    p.add_argument(
        "--top-k", type=int_at_least(0), default=None, help="sample among the k most likely tokens (default: off)"
    )
    p.add_argument("--top-p", type=float_in(0, 1, low_open=True), default=None, help="nucleus sampling (default: off)")
    p.add_argument("--repetition-penalty", type=float_in(0, low_open=True), default=1.0, help="1 = off")
    p.add_argument("--stop", action="append", default=None, help="stop string, repeatable (default: none)")
    p.add_argument("--seed", type=seed, default=None, help="seed of the sampler (default: random)")
    add_model_args(p)
    add_compile_arg(p)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    model = load_model(args, args.parser)
    check_room(args, model)
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
        f"{', CUDA graph' if s.cuda_graph else ''}{f', compiled in {s.compile_s:.1f} s' if s.compiled else ''}]",
        file=sys.stderr,
    )
    return 0


def check_room(args, model) -> None:
    """A prompt that fits the context but leaves less room than --max-new-tokens is an error under that flag, saying
    how many tokens fit (a prompt longer than the context is generate()'s own error)."""
    if model.tokenizer is None:
        return
    n, S = model.config.n_positions, len(model.tokenizer(args.prompt, verbose=False)["input_ids"])
    if 0 < S < n < S + args.max_new_tokens:
        flag_error(
            args.parser, "--max-new-tokens",
            f"the prompt's {S} tokens + {args.max_new_tokens} exceed the model's n_positions ({n}): "
            f"at most {n - S} fit",
        )  # fmt: skip
