"""`phixtral eval --model DIR --data FILE | --stdlib-slice NAME`: perplexity of one or more models on held-out text.

Each document is encoded without special tokens and preceded by the eos token (`<|endoftext|>`, the document separator
the bundled model was trained with); the documents are concatenated into one token stream, cut into non-overlapping
windows of --seq-len tokens, and every token after the first is predicted once, with the context its window gives it.
Perplexity = exp(mean negative log-likelihood over those predictions). Models with different tokenizers are not
comparable per token; the JSON line also reports bits per byte, which are.
"""

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .args import add_model_args, check_fits_context, int_at_least, load_model
from .stdlib_data import EXPERT_SLICES, SLICES, slice_texts


@dataclass
class EvalResult:
    model: str
    data: str
    tokens: int  # predictions scored
    bytes: int  # UTF-8 bytes of the documents
    nll: float  # mean negative log-likelihood per token, nats

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    @property
    def bits_per_byte(self) -> float:
        return self.nll * self.tokens / math.log(2) / self.bytes


def encode_documents(tokenizer, texts: list[str]) -> torch.Tensor:
    """One stream [N] int64: eos, doc 0, eos, doc 1, ... (the eos id comes from the tokenizer)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token to separate documents")
    ids = []
    for t in texts:
        ids.append(eos)
        ids.extend(tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"])  # documents exceed n_positions
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def stream_nll(model, stream: torch.Tensor, *, seq_len: int, batch_size: int = 4, progress: bool = True,
               desc: str = "eval") -> tuple[float, int]:  # fmt: skip
    """(sum of negative log-likelihoods, number of predictions) of a token stream [N], in windows of seq_len tokens."""
    from tqdm.auto import tqdm

    if seq_len < 2 or seq_len > model.config.n_positions:
        raise ValueError(f"seq_len must be in [2, n_positions={model.config.n_positions}], got {seq_len}")
    N = stream.numel()
    starts = list(range(0, N - 1, seq_len))
    total, count = 0.0, 0
    with tqdm(total=N - 1, unit="tok", desc=desc, disable=not progress, leave=False) as bar:
        for b in range(0, len(starts), batch_size):
            group = starts[b : b + batch_size]
            # The last window of the stream may be shorter: it goes alone so that no padding is needed.
            lengths = [min(seq_len, N - 1 - s) for s in group]
            for batch in (
                [g for g, n in zip(group, lengths) if n == seq_len],
                [g for g, n in zip(group, lengths) if n < seq_len],
            ):
                if not batch:
                    continue
                n = min(seq_len, N - 1 - batch[0])
                x = torch.stack([stream[s : s + n] for s in batch]).to(model.device)  # [B, n]
                y = torch.stack([stream[s + 1 : s + n + 1] for s in batch]).to(model.device)  # [B, n]
                logits = model(x)  # [B, n, V] fp32
                total += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
                count += y.numel()
                bar.update(y.numel())
    return total, count


def evaluate(model, texts: list[str], *, name: str = "model", data: str = "data", seq_len: Optional[int] = None,
             batch_size: int = 4, max_tokens: Optional[int] = None, progress: bool = True) -> EvalResult:  # fmt: skip
    """Perplexity of a loaded Phixtral (with its tokenizer) on a list of documents."""
    if model.tokenizer is None:
        raise ValueError(f"{name} has no tokenizer files: eval needs them to encode the text")
    stream = encode_documents(model.tokenizer, texts)
    if max_tokens is not None:
        stream = stream[: max_tokens + 1]
    if stream.numel() < 2:
        raise ValueError(f"{data}: no text to evaluate")
    seq_len = seq_len or min(model.config.n_positions, 1024)
    total, count = stream_nll(
        model, stream, seq_len=seq_len, batch_size=batch_size, progress=progress, desc=f"{name} | {data}"
    )
    # Bytes of the text actually scored: decode what was kept (exact when max_tokens did not cut).
    nbytes = len(model.tokenizer.decode(stream[1:].tolist()).encode("utf-8"))
    return EvalResult(name, data, count, nbytes, total / count)


def load_datasets(data_files, slices, split: str = "heldout") -> dict[str, list[str]]:
    """{name: documents}: each --data file is one document; each stdlib slice gives its held-out pieces."""
    datasets = {}
    for name in slices or []:
        for s in EXPERT_SLICES if name == "all" else [name]:
            if s not in SLICES:
                raise ValueError(f"unknown stdlib slice {s!r}; choose from {SLICES} or 'all'")
            try:
                datasets[s] = slice_texts(s, split)
            except FileNotFoundError as e:
                raise ValueError(str(e)) from e
    for f in data_files or []:
        path = Path(f)
        if not path.is_file():
            raise ValueError(f"--data {path}: no such file")
        datasets[path.name] = [path.read_bytes().decode("utf-8", errors="replace")]
    if not datasets:
        raise ValueError("nothing to evaluate: pass --data FILE or --stdlib-slice NAME (or 'all')")
    return datasets


def _names(models: list[str]) -> list[str]:
    short = [Path(m).name or str(m) for m in models]
    return short if len(set(short)) == len(short) else [str(m) for m in models]


def format_table(results: list[EvalResult], markdown: bool = True) -> str:
    """Rows: models; columns: datasets then their mean (when more than one); cells: perplexity."""
    models = list(dict.fromkeys(r.model for r in results))
    data = list(dict.fromkeys(r.data for r in results))
    cell = {(r.model, r.data): r.perplexity for r in results}
    header = ["model"] + data + (["mean"] if len(data) > 1 else [])
    rows = []
    for m in models:
        values = [cell[(m, d)] for d in data]
        row = [m] + [f"{v:.2f}" for v in values]
        if len(data) > 1:
            row.append(f"{sum(values) / len(values):.2f}")
        rows.append(row)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(header)] + [fmt(r) for r in rows])


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval",
        help="perplexity on a text file or a held-out slice of the Python standard library",
        description="Perplexity of one or more models on text files (--data) or on the held-out part of stdlib slices "
        f"(--stdlib-slice, one of {', '.join(SLICES)} or 'all' = {', '.join(EXPERT_SLICES)}). "
        "Prints a table (perplexity; a 'mean' column over the datasets) and one JSON line with every number.",
    )
    p.add_argument("--data", action="append", default=None, help="a UTF-8 text file, one document (repeatable)")
    p.add_argument("--stdlib-slice", action="append", default=None, help="a stdlib slice name or 'all' (repeatable)")
    p.add_argument("--split", default="heldout", choices=("heldout", "train"), help="which part of the stdlib slices")
    p.add_argument(
        "--seq-len", type=int_at_least(2), default=None, help="window length (default: n_positions, at most 1024)"
    )
    p.add_argument("--batch-size", type=int_at_least(1), default=4, help="windows per forward")
    p.add_argument(
        "--max-tokens",
        type=int_at_least(1),
        default=None,
        help="score at most this many tokens per dataset (default: all)",
    )
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_args(p, model="repeatable")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..weights import default_model_path

    models = args.model or [default_model_path()]
    if models[0] is None:
        raise ValueError("no --model given and no bundled model")
    datasets = load_datasets(args.data, args.stdlib_slice, args.split)
    results = []
    for path, name in zip(models, _names([str(m) for m in models])):
        model = load_model(args, args.parser, path)
        if args.seq_len is not None:
            check_fits_context(args.parser, "--seq-len", args.seq_len, model)
        if args.experts_per_tok is not None and model.config.is_moe:
            name = f"{name} (top-{args.experts_per_tok})"
        for data, texts in datasets.items():
            r = evaluate(
                model, texts, name=name, data=data, seq_len=args.seq_len, batch_size=args.batch_size,
                max_tokens=args.max_tokens, progress=not args.no_progress,
            )  # fmt: skip
            results.append(r)
            print(
                f"{name} | {data}: perplexity {r.perplexity:.3f} over {r.tokens} tokens "
                f"({r.bits_per_byte:.3f} bits/byte)",
                file=sys.stderr,
            )
        del model
    print(format_table(results, markdown=args.markdown))
    print(
        json.dumps(
            {"results": [{**asdict(r), "perplexity": r.perplexity, "bits_per_byte": r.bits_per_byte} for r in results]}
        )
    )
    return 0
