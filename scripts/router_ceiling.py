"""How far a gate can route a merged phixtral whose experts share everything but fc1 / fc2.

    python scripts/router_ceiling.py          # the bundled tiny phixtral: about 8 minutes on 2 CPU cores

EVAL.md's "What a linear gate can reach" comes from this script. It measures, on the stdlib slices:

1. Slice probes. Per MoE layer, a multinomial logistic regression from the layer's input to the expert slice a token
   comes from (asyncio, web, docs, tests), fitted on training windows and scored on held-out windows: once on each
   token's own MoE input (all that a phixtral gate sees) and once on the mean of its window's MoE inputs up to and
   including it (what a gate that sees the context would see).
2. Context routing. Every layer sends each token, top-1 with weight 1, to the expert of the slice its context probe
   predicts; scored like `phixtral eval` on the held-out slices. A correct probe everywhere gives the diagonal.
3. Gates fitted on the evaluated text. train-router's recipe (--init ridge, then --steps of the next-token loss) run on
   the held-out text itself and scored on it: an optimistic estimate of what a linear gate on one token's hidden state
   reaches on this model, since the gates are fitted to the very predictions they are scored on.
"""

import argparse
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import phixtral  # noqa: E402
from phixtral.commands.evaluate import evaluate  # noqa: E402
from phixtral.commands.router_targets import expert_forward, moe_inputs, spaced_windows  # noqa: E402
from phixtral.commands.stdlib_data import EXPERT_SLICES, SLICES, slice_texts  # noqa: E402
from phixtral.commands.train_router import RouterTrainingSettings, TokenData, load_token_data, train_router  # noqa: E402


def causal_mean(x: torch.Tensor) -> torch.Tensor:
    """x [B, S, D] -> [B, S, D]: at each position, the mean of its window's rows up to and including it."""
    count = torch.arange(1, x.shape[1] + 1, dtype=x.dtype, device=x.device).view(1, -1, 1)
    return x.cumsum(1) / count


class Probe:
    """Multinomial logistic regression on standardized features [N, D] -> classes, fitted by L-BFGS (float64)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, classes: int, *, l2: float = 1e-4, iters: int = 200):
        self.mean, self.std = x.mean(0), x.std(0) + 1e-6
        z = self._standardize(x)
        w = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(z @ w + b, y) + l2 * (w * w).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        self.w, self.b = w.detach(), b.detach()

    def _standardize(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / self.std).double()

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return (self._standardize(x) @ self.w + self.b).argmax(-1)

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float((self.predict(x) == y).double().mean())


def layer_features(model, windows: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per MoE layer, (token features, context features), each [B * S, D]: the layer's inputs on windows [B, S + 1]
    and their causal means within each window."""
    B, S = windows.shape[0], windows.shape[1] - 1
    out = []
    for x in moe_inputs(model, windows, batch_size):  # [B * S, D] per layer
        out.append((x, causal_mean(x.view(B, S, -1)).flatten(0, 1)))
    return out


def slice_windows(streams: dict, n: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(windows [4n, seq_len + 1] from each expert slice's stream, the slice index of each of their predictions)."""
    windows = torch.cat([spaced_windows(streams[s], n, seq_len) for s in EXPERT_SLICES])
    labels = torch.arange(len(EXPERT_SLICES)).repeat_interleave(n * seq_len)
    return windows, labels


@contextmanager
def context_routing(model, probes: list[Probe]):
    """Within the block, every MoE layer sends each token (top-1, weight 1) to the expert its layer's context probe
    predicts from the causal mean of the window's MoE inputs."""
    moes = [block.moe for block in model.h]

    def forward(x, moe, probe):  # x [B, S, D]
        pick = probe.predict(causal_mean(x.float()).flatten(0, 1)).view(x.shape[:-1])  # [B, S]
        y = torch.zeros_like(x)
        for e in range(moe.fc1.weight.shape[0]):
            chosen = pick == e
            if chosen.any():
                y[chosen] = expert_forward(moe, e, x)[chosen]
        return y

    for moe, probe in zip(moes, probes):
        moe.forward = lambda x, moe=moe, probe=probe: forward(x, moe, probe)  # shadows MoE.forward
    try:
        yield model
    finally:
        for moe in moes:
            del moe.forward


def heldout_perplexities(model, name: str, max_tokens=None) -> dict:
    """{slice: perplexity} like `phixtral eval --stdlib-slice all --stdlib-slice general` (windows of n_positions),
    plus "mean" over the four expert slices."""
    out = {
        s: evaluate(
            model, slice_texts(s, "heldout"), name=name, data=s, max_tokens=max_tokens, progress=False
        ).perplexity
        for s in SLICES
    }
    out["mean"] = sum(out[s] for s in EXPERT_SLICES) / len(EXPERT_SLICES)
    print(f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in out.items()), file=sys.stderr)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a merged phixtral whose expert e was trained on slice e of "
                   f"{', '.join(EXPERT_SLICES)} (default: the bundled tiny phixtral)")  # fmt: skip
    p.add_argument("--probe-windows", type=int, default=16, help="training windows per slice for the probes")
    p.add_argument(
        "--steps", type=int, default=300, help="train-router steps for the gates fitted on the held-out text"
    )
    p.add_argument("--eval-tokens", type=int, default=None, help="score only the first N held-out tokens of each "
                   "slice (default: all, as EVAL.md's tables)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = args.model or phixtral.default_model_path()
    model = phixtral.from_pretrained(path, device="cpu", dtype=torch.float32, backend="torch")
    if model.config.num_local_experts < len(EXPERT_SLICES):
        raise SystemExit(
            f"{path}: {model.config.num_local_experts} experts, fewer than the {len(EXPERT_SLICES)} slices"
        )
    seq_len, batch = model.config.n_positions, 4
    data = load_token_data(model.tokenizer, ["stdlib"], min_tokens=seq_len)
    results = {"model": str(path), "seq_len": seq_len, "probe_windows": args.probe_windows, "steps": args.steps}
    clock = time.perf_counter()

    # 1. slice probes, fitted per layer on training windows, scored on held-out ones
    train_w, train_y = slice_windows(data.train, args.probe_windows, seq_len)
    held_w, held_y = slice_windows(data.heldout, max(1, args.probe_windows // 2), seq_len)
    probes, results["probe_accuracy"] = [], []
    for layer, ((tok, ctx), (tok_h, ctx_h)) in enumerate(
        zip(layer_features(model, train_w, batch), layer_features(model, held_w, batch))
    ):
        token_probe = Probe(tok, train_y, len(EXPERT_SLICES))
        context_probe = Probe(ctx, train_y, len(EXPERT_SLICES))
        probes.append(context_probe)
        row = {
            "layer": layer,
            "token": token_probe.accuracy(tok_h, held_y),
            "context": context_probe.accuracy(ctx_h, held_y),
        }
        results["probe_accuracy"].append(row)
        print(f"layer {layer}: slice probe accuracy {row['token']:.3f} on the token, {row['context']:.3f} on its "
              "context", file=sys.stderr)  # fmt: skip

    # 2. every layer routing by its context probe
    results["as_loaded"] = heldout_perplexities(model, "as loaded", args.eval_tokens)
    with context_routing(model, probes):
        results["context_routed"] = heldout_perplexities(model, "context probes, top-1", args.eval_tokens)

    # 3. train-router's recipe fitted on the held-out text itself
    settings = RouterTrainingSettings(steps=args.steps, init="ridge", seed=0, eval_every=args.steps)
    record = train_router(model, TokenData(train=data.heldout, heldout=data.heldout), settings, progress=False,
                          log=lambda text: print(text, file=sys.stderr))  # fmt: skip
    results["fitted_on_heldout"] = heldout_perplexities(
        model, f"ridge + {args.steps} steps on the held-out text", args.eval_tokens
    )
    results["fit_seconds"] = record["train_seconds"] + record.get("init_seconds", 0.0)
    results["seconds"] = time.perf_counter() - clock

    print("| layer | slice probe on the token | slice probe on its context |\n|---:|---:|---:|")
    for row in results["probe_accuracy"]:
        print(f"| {row['layer']} | {row['token']:.1%} | {row['context']:.1%} |")
    print()
    print("| router | " + " | ".join(EXPERT_SLICES) + " | mean | general |\n|---|" + "---:|" * 6)
    for key in ("as_loaded", "context_routed", "fitted_on_heldout"):
        r = results[key]
        print(f"| {key} | " + " | ".join(f"{r[s]:.2f}" for s in EXPERT_SLICES + ("mean", "general")) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
