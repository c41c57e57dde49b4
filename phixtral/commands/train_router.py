"""`phixtral train-router`: train only the routers of a merged phixtral; experts, attention and embeddings stay frozen.

A mergekit MoE's router is never trained: `hidden` gate rows are prompt centroids, `cheap_embed` rows token embeddings,
and phixtral-4x2_8's rows are identical in every layer. This command fits the gate rows [E, D] of every layer to the
next-token loss of the whole model, plus an optional load-balancing loss:

    loss = cross-entropy(next token) + aux_loss_coef * mean over layers of E * sum_e f_e * P_e     (Switch Transformer)

f_e is the share of the layer's top-k slots that expert e receives and P_e the mean softmax probability of e over all E
router logits. Gradients reach a gate row through the routing weights of the tokens that picked its expert (softmax over
the top-k logits), and through the loss-balancing term for all tokens. Data: windows of --seq-len tokens drawn at random
(seeded) from the training text, the same number from each dataset, so a small slice weighs as much as a large one.
Held-out loss: fixed windows from each dataset's held-out text, measured before training, every --eval-every steps and
after. The result is written atomically: the checkpoint plus `router_training.json` (settings, losses, the log).

--add-base-expert BASE appends BASE's MLP (a dense phi-2 of the same shapes, usually the merge's base model) as one more
expert, with a gate row of zeros, so that tokens no expert claims can keep the general MLP.
"""

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .args import (
    add_model_args,
    check_experts_per_tok,
    check_fits_context,
    check_out,
    float_in,
    int_at_least,
    load_model,
    seed,
)  # fmt: skip
from .router_targets import expert_token_losses, ridge_init, token_target_loss, token_targets
from .stdlib_data import SLICES, slice_texts

LOG_FILE = "router_training.json"
INITS = ("checkpoint", "ridge")


@dataclass
class RouterTrainingSettings:
    """Everything that decides the result of a run (written to LOG_FILE with it)."""

    steps: int = 300
    lr: float = 3e-3
    aux_loss_coef: float = 0.0
    experts_per_tok: Optional[int] = None  # None: the checkpoint's num_experts_per_tok
    seed: int = 0
    seq_len: int = 256
    batch_size: int = 8
    eval_every: int = 50
    eval_tokens: int = 16384  # held-out tokens per dataset
    add_base_expert: Optional[str] = None
    domain_loss_coef: float = 0.0  # weight of the cross-entropy of the router against each dataset's own expert
    expert_data: Optional[list] = None  # the dataset of expert 0, 1, ... (for the domain loss)
    token_loss_coef: float = 0.0  # weight of the cross-entropy of the router against the experts' per-token losses
    token_tau: float = 1.0  # temperature of those per-token targets, nats
    init: str = "checkpoint"  # "checkpoint": the gates as loaded; "ridge": solved in closed form first
    ridge_windows: int = 32  # training windows per dataset for the ridge gates
    ridge_lambda: float = 1e-3

    def validate(self) -> None:
        for name in ("steps", "seq_len", "batch_size", "eval_every", "eval_tokens", "ridge_windows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        for name in ("aux_loss_coef", "domain_loss_coef", "token_loss_coef"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("token_tau", "ridge_lambda"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")


@dataclass
class TokenData:
    """Per dataset: a training stream and a held-out stream of token ids, both [N] int64."""

    train: dict[str, torch.Tensor] = field(default_factory=dict)
    heldout: dict[str, torch.Tensor] = field(default_factory=dict)


# --- data ------------------------------------------------------------------------------------------------------------
def load_token_data(tokenizer, data: list[str], *, min_tokens: int) -> TokenData:
    """data: "stdlib" (the four expert slices and `general`, train / held-out splits) and / or text files (the last
    10% of each file's tokens held out). Every stream must hold at least min_tokens + 1 tokens."""
    from .evaluate import encode_documents

    out = TokenData()
    for item in data:
        if item == "stdlib":
            for name in SLICES:
                try:
                    out.train[name] = encode_documents(tokenizer, slice_texts(name, "train"))
                    out.heldout[name] = encode_documents(tokenizer, slice_texts(name, "heldout"))
                except FileNotFoundError as e:
                    raise ValueError(str(e)) from e
            continue
        path = Path(item)
        if not path.is_file():
            raise ValueError(f"--data {item}: no such file (pass 'stdlib' or text files)")
        stream = encode_documents(tokenizer, [path.read_bytes().decode("utf-8", errors="replace")])
        cut = int(stream.numel() * 0.9)
        out.train[path.name], out.heldout[path.name] = stream[:cut], stream[cut:]
    if not out.train:
        raise ValueError("no training data: pass --data stdlib and / or text files")
    for split, streams in (("training", out.train), ("held-out", out.heldout)):
        for name, s in streams.items():
            if s.numel() < min_tokens + 1:
                raise ValueError(
                    f"{name}: its {split} text has {s.numel()} tokens, fewer than one window of {min_tokens + 1}"
                )
    return out


def sample_batch(streams: dict[str, torch.Tensor], batch_size: int, seq_len: int, rng: random.Random):
    """([batch_size, seq_len + 1] windows, the dataset name of each row): the datasets in turn (round robin from a
    random start), each window at a random offset of its stream."""
    names = sorted(streams)
    first = rng.randrange(len(names))
    rows, sources = [], []
    for b in range(batch_size):
        name = names[(first + b) % len(names)]
        start = rng.randrange(streams[name].numel() - seq_len)
        rows.append(streams[name][start : start + seq_len + 1])
        sources.append(name)
    return torch.stack(rows), sources


def heldout_windows(streams: dict[str, torch.Tensor], seq_len: int, max_tokens: int) -> dict[str, torch.Tensor]:
    """{dataset: [n, seq_len + 1]}: consecutive windows from the start of each held-out stream, about max_tokens
    each."""
    out = {}
    for name, s in streams.items():
        n = max(1, min(max_tokens // seq_len, (s.numel() - 1) // seq_len))
        out[name] = torch.stack([s[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])
    return out


# --- losses ----------------------------------------------------------------------------------------------------------
def domain_loss(router_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of one layer's router logits [T, E] against each token's own expert, labels [T] (-1: none)."""
    if not (labels >= 0).any():
        return router_logits.new_zeros(())
    return F.cross_entropy(router_logits.float(), labels, ignore_index=-1)


def load_balancing_loss(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss for one layer: E * sum_e f_e * P_e; router_logits [T, E] -> scalar.

    1.0 when the slots and the probabilities are spread evenly; E when every token goes to one expert.
    """
    E = router_logits.shape[-1]
    probs = router_logits.float().softmax(-1)  # [T, E]
    picks = torch.topk(router_logits, top_k, dim=-1).indices  # [T, top_k]
    share = F.one_hot(picks, E).float().sum(1).mean(0) / top_k  # [E]: f_e, no gradient (a count)
    return E * (share * probs.mean(0)).sum()


class RouterLogits:
    """Collects each MoE layer's router logits [T, E] during a forward (a pre-hook on every MoE module)."""

    def __init__(self, model):
        self.logits: list[torch.Tensor] = []
        self._handles = [block.moe.register_forward_pre_hook(self._hook) for block in model.h]

    def _hook(self, moe, args):
        x = args[0]
        self.logits.append(x.reshape(-1, x.shape[-1]) @ moe.gate.weight.t())

    def take(self) -> list[torch.Tensor]:
        out, self.logits = self.logits, []
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def next_token_loss(model, windows: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of windows [B, S + 1]: predict tokens 1..S from 0..S-1."""
    windows = windows.to(model.device)
    logits = model(windows[:, :-1])  # [B, S, V] fp32
    return F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())


@torch.no_grad()
def heldout_loss(model, windows: dict[str, torch.Tensor], batch_size: int) -> dict[str, float]:
    """{dataset: mean next-token loss}, plus "mean" over the datasets."""
    out = {}
    for name, w in windows.items():
        chunks = w.split(batch_size)  # [<= batch_size, S + 1] each
        out[name] = sum(float(next_token_loss(model, c)) * len(c) for c in chunks) / len(w)
    out["mean"] = sum(out.values()) / len(windows)
    return out


# --- the model -------------------------------------------------------------------------------------------------------
def append_base_expert(model, base_path) -> None:
    """Append the MLP of a dense phi-2 checkpoint (same n_embd / n_inner / n_layer) as the last expert of every layer,
    with a zero gate row."""
    from ..weights import from_pretrained

    base = from_pretrained(base_path, device=model.device, dtype=model.dtype, backend="torch")
    c, b = model.config, base.config
    if b.is_moe:
        raise ValueError(
            f"--add-base-expert {base_path}: a dense phi-2 checkpoint is needed, got {b.num_local_experts} experts"
        )
    if (b.n_embd, b.n_inner, b.n_layer) != (c.n_embd, c.n_inner, c.n_layer):
        raise ValueError(
            f"--add-base-expert {base_path}: shapes differ (n_embd, n_inner, n_layer) "
            f"{(b.n_embd, b.n_inner, b.n_layer)} vs the model's {(c.n_embd, c.n_inner, c.n_layer)}"
        )
    with torch.no_grad():
        for mine, theirs in zip(model.h, base.h):
            moe, dense = mine.moe, theirs.moe
            for name in ("fc1", "fc2"):
                for p in ("weight", "bias"):
                    old = getattr(getattr(moe, name), p)
                    new = torch.cat([old, getattr(getattr(dense, name), p)[:1]])  # [E + 1, ...]
                    setattr(getattr(moe, name), p, torch.nn.Parameter(new, requires_grad=False))
            gate = torch.cat([moe.gate.weight, torch.zeros_like(moe.gate.weight[:1])])
            moe.gate = torch.nn.Linear(c.n_embd, gate.shape[0], bias=False, device=gate.device, dtype=gate.dtype)
            moe.gate.weight = torch.nn.Parameter(gate, requires_grad=False)
    c.num_local_experts += 1


def train_router(model, data: TokenData, settings: RouterTrainingSettings, *, progress: bool = True, log=print) -> dict:
    """Train the gate rows of `model` in place (everything else frozen); returns the record written to LOG_FILE."""
    from tqdm.auto import tqdm

    settings.validate()
    if not model.config.is_moe:
        raise ValueError("the model has one expert: there is no router to train")
    if settings.experts_per_tok is not None:
        if not 1 <= settings.experts_per_tok <= model.config.num_local_experts:
            raise ValueError(
                f"experts_per_tok must be in [1, {model.config.num_local_experts}], got {settings.experts_per_tok}"
            )
        model.config.num_experts_per_tok = settings.experts_per_tok
        for block in model.h:
            block.moe.top_k = settings.experts_per_tok
    top_k = model.config.num_experts_per_tok
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    model.requires_grad_(False)
    gates = [block.moe.gate.weight for block in model.h]
    for g in gates:
        g.requires_grad_(True)
    optimizer = torch.optim.Adam(gates, lr=settings.lr)
    windows = heldout_windows(data.heldout, settings.seq_len, settings.eval_tokens)
    own_expert = {name: e for e, name in enumerate(settings.expert_data or [])}  # dataset -> the expert it belongs to
    unknown = [name for name in own_expert if name not in data.train]
    if unknown:
        raise ValueError(f"expert_data names {unknown}, which are not among the datasets {sorted(data.train)}")
    if settings.expert_data and len(settings.expert_data) > model.config.num_local_experts:
        raise ValueError(
            f"expert_data names {len(settings.expert_data)} datasets for {model.config.num_local_experts} experts"
        )
    if settings.domain_loss_coef and not own_expert:
        raise ValueError("domain_loss_coef needs expert_data: the dataset of each expert, in expert order")
    record = {"settings": asdict(settings), "top_k": top_k, "num_experts": model.config.num_local_experts, "log": []}
    before = heldout_loss(model, windows, settings.batch_size)
    record["heldout_before"] = before
    log(
        f"held-out loss before: {before['mean']:.4f} ("
        + ", ".join(f"{k} {v:.3f}" for k, v in before.items() if k != "mean")
        + ")"
    )
    if settings.init == "ridge":
        clock = time.perf_counter()
        ridge_init(
            model, data.train, windows=settings.ridge_windows, seq_len=settings.seq_len, tau=settings.token_tau,
            lam=settings.ridge_lambda, batch_size=settings.batch_size,
        )  # fmt: skip
        record["init_seconds"] = time.perf_counter() - clock
        record["heldout_after_init"] = heldout_loss(model, windows, settings.batch_size)
        log(f"held-out loss after the ridge gates: {record['heldout_after_init']['mean']:.4f}")
    collector = RouterLogits(model)
    clock = time.perf_counter()
    try:
        for step in tqdm(range(1, settings.steps + 1), desc="train-router", unit="step", disable=not progress):
            batch, sources = sample_batch(data.train, settings.batch_size, settings.seq_len, rng)
            labels = torch.tensor([own_expert.get(name, -1) for name in sources]).repeat_interleave(settings.seq_len)
            if settings.token_loss_coef:
                targets = token_targets(expert_token_losses(model, batch), settings.token_tau)  # [B * S, E]
                collector.take()  # the experts' own forwards are not the routed one
            with torch.enable_grad():
                lm = next_token_loss(model, batch)
                logits = collector.take()
                aux = torch.stack([load_balancing_loss(lg, top_k) for lg in logits]).mean()
                loss = lm + settings.aux_loss_coef * aux if settings.aux_loss_coef else lm
                dom = torch.stack([domain_loss(lg, labels.to(lg.device)) for lg in logits]).mean()
                if settings.domain_loss_coef:
                    loss = loss + settings.domain_loss_coef * dom
                if settings.token_loss_coef:
                    tok = torch.stack([token_target_loss(lg, targets.to(lg.device)) for lg in logits]).mean()
                    loss = loss + settings.token_loss_coef * tok
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
            entry = {"step": step, "loss": lm.item(), "aux_loss": aux.item(), "domain_loss": dom.item()}
            if settings.token_loss_coef:
                entry["token_loss"] = tok.item()
            if step % settings.eval_every == 0 or step == settings.steps:
                collector.remove()
                entry["heldout"] = heldout_loss(model, windows, settings.batch_size)
                collector = RouterLogits(model)
                extra = f", token loss {entry['token_loss']:.3f}" if "token_loss" in entry else ""
                log(
                    f"step {step}: train loss {entry['loss']:.4f}, aux {entry['aux_loss']:.3f}, domain loss "
                    f"{entry['domain_loss']:.3f}{extra}, held-out {entry['heldout']['mean']:.4f}"
                )
            record["log"].append(entry)
    finally:
        collector.remove()
        for g in gates:
            g.requires_grad_(False)
            g.grad = None
    record["train_seconds"] = time.perf_counter() - clock
    record["heldout_after"] = record["log"][-1]["heldout"]
    return record


# --- the command -----------------------------------------------------------------------------------------------------
def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train-router",
        help="train only the router of a merged phixtral",
        description="Train the gate rows of every MoE layer (everything else frozen) on the next-token loss plus an "
        "optional load-balancing loss, and write the result (checkpoint + router_training.json) atomically to --out.",
    )
    p.add_argument("--data", nargs="+", default=["stdlib"],
                   help=f"'stdlib' (the slices {', '.join(SLICES)}) and / or UTF-8 text files")  # fmt: skip
    p.add_argument("--steps", type=int_at_least(1), default=300, help="optimizer steps")
    p.add_argument("--lr", type=float_in(0, low_open=True), default=3e-3, help="Adam learning rate")
    p.add_argument("--aux-loss-coef", type=float_in(0), default=0.0, help="weight of the load-balancing loss")
    p.add_argument(
        "--domain-loss-coef",
        type=float_in(0),
        default=0.0,
        help="weight of a cross-entropy pulling each --expert-data dataset's tokens to its own expert",
    )
    p.add_argument(
        "--expert-data",
        nargs="+",
        default=None,
        help="the dataset of expert 0, 1, ... (stdlib slice names or file names; default: none)",
    )
    p.add_argument(
        "--token-loss-coef",
        type=float_in(0),
        default=0.0,
        help="weight of a cross-entropy pulling every token toward the experts whose own models predict it best "
        "(soft targets softmax(-loss / --token-tau) from each expert's dense model; E extra forwards a step)",
    )
    p.add_argument("--token-tau", type=float_in(0, low_open=True), default=1.0,
                   help="temperature of the per-token targets, nats (1: each expert's posterior for the "
                   "token)")  # fmt: skip
    p.add_argument("--init", choices=INITS, default="checkpoint",
                   help="the gates training starts from: the checkpoint's, or ridge: solved in closed form from the "
                   "experts' per-token losses (then the result does not depend on the checkpoint's gates)")  # fmt: skip
    p.add_argument("--ridge-windows", type=int_at_least(1), default=32,
                   help="evenly spaced training windows per dataset for --init ridge")  # fmt: skip
    p.add_argument(
        "--ridge-lambda", type=float_in(0, low_open=True), default=1e-3, help="ridge penalty of --init ridge"
    )
    p.add_argument("--seed", type=seed, default=0, help="seed of the window sampling")
    p.add_argument("--seq-len", type=int_at_least(2), default=None,
                   help=f"tokens per training window (default: {RouterTrainingSettings.seq_len}, or the model's "
                   "n_positions if smaller)")  # fmt: skip
    p.add_argument("--batch-size", type=int_at_least(1), default=8, help="windows per step")
    p.add_argument("--eval-every", type=int_at_least(1), default=50, help="steps between held-out measurements")
    p.add_argument("--eval-tokens", type=int_at_least(1), default=16384, help="held-out tokens per dataset")
    p.add_argument(
        "--add-base-expert", default=None, help="a dense phi-2 folder whose MLP becomes one more expert (default: none)"
    )
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    # Training runs in float32, so no --dtype; --backend offers the paths training is tested on (not naive);
    # --experts-per-tok is the top-k trained and saved.
    add_model_args(p, model="required", dtype=False, backends=("auto", "triton", "torch"), quantize=False)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..weights import resolve_checkpoint

    settings = RouterTrainingSettings(
        steps=args.steps, lr=args.lr, aux_loss_coef=args.aux_loss_coef, experts_per_tok=args.experts_per_tok,
        seed=args.seed, seq_len=args.seq_len or RouterTrainingSettings.seq_len, batch_size=args.batch_size,
        eval_every=args.eval_every, eval_tokens=args.eval_tokens, add_base_expert=args.add_base_expert,
        domain_loss_coef=args.domain_loss_coef, expert_data=args.expert_data, token_loss_coef=args.token_loss_coef,
        token_tau=args.token_tau, init=args.init, ridge_windows=args.ridge_windows, ridge_lambda=args.ridge_lambda,
    )  # fmt: skip
    settings.validate()
    source = resolve_checkpoint(args.model)
    sources = [source] + ([resolve_checkpoint(args.add_base_expert)] if args.add_base_expert else [])
    try:
        check_out(args.out, overwrite=args.overwrite, sources=sources)  # refuse before training
    except ValueError as e:
        raise ValueError(f"--out: {e}") from e
    # The top-k is set by train_router, after --add-base-expert may have added an expert.
    model = load_model(args, args.parser, source, dtype="float32", num_experts_per_tok=None)
    if model.tokenizer is None:
        raise ValueError(f"{source} has no tokenizer files: train-router needs them to encode the text")
    if args.add_base_expert:
        append_base_expert(model, sources[1])
    if args.experts_per_tok is not None:
        check_experts_per_tok(args.parser, args.experts_per_tok, model.config.num_local_experts)
    settings.seq_len = fit_seq_len(args, model)
    data = load_token_data(model.tokenizer, args.data, min_tokens=settings.seq_len)
    say = lambda text: print(text, file=sys.stderr)  # noqa: E731
    record = train_router(model, data, settings, progress=not args.no_progress, log=say)
    record["source"] = str(args.model)
    model.save_pretrained(
        args.out,
        dtype=model.config.torch_dtype,
        overwrite=args.overwrite,
        sources=sources,
        extra_files={LOG_FILE: json.dumps(record, indent=2) + "\n"},
    )  # the checkpoint's own dtype, not the float32 it trained in
    b, a = record["heldout_before"]["mean"], record["heldout_after"]["mean"]
    print(f"wrote {args.out}: held-out loss {b:.4f} -> {a:.4f} ({record['train_seconds']:.0f} s of training)")
    return 0


def fit_seq_len(args, model) -> int:
    """--seq-len, which must fit the model's context; without it the default, cut to n_positions with a note."""
    n = model.config.n_positions
    if args.seq_len is not None:
        check_fits_context(args.parser, "--seq-len", args.seq_len, model)
        return args.seq_len
    if RouterTrainingSettings.seq_len > n:
        print(f"--seq-len: {n} tokens per window, the model's n_positions (the default "
              f"{RouterTrainingSettings.seq_len} does not fit)", file=sys.stderr)  # fmt: skip
        return n
    return RouterTrainingSettings.seq_len


__all__ = ["RouterTrainingSettings", "append_base_expert", "load_balancing_loss", "train_router"]
