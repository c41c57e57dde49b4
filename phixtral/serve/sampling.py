"""Per-row sampling for the engine: each request draws with its own settings and its own generator, and reports the
log-probabilities OpenAI's `logprobs` / `top_logprobs` ask for.

A row samples exactly as `generate(prompt, seed=...)` does for one prompt: `sample` on its own [1, V] logits with its
own generator, one draw per step; greedy rows share one argmax. Log-probabilities are log_softmax of the model's raw
logits (before temperature and filtering), as vLLM and OpenAI report them.
"""

from dataclasses import dataclass
from typing import Optional

import torch

from ..generate import sample


@dataclass
class TokenLogprob:
    """One generated token with its log-probability and the `top` most likely alternatives (token, logprob), best
    first. token: the token's own text (a byte-level token inside a multi-byte character shows as U+FFFD)."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[str, float]]


class RowSampler:
    """One request's sampling state: its settings and, when it samples, its generator.

    temperature 0 = greedy; seed None draws a fresh seed; logprobs: report the chosen token's log-probability;
    top_logprobs: that many alternatives per token as well (0 = none).
    """

    def __init__(self, params, device: torch.device):
        self.params = params
        self.generator: Optional[torch.Generator] = None
        if params.temperature > 0:
            self.generator = torch.Generator(device=device)
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)

    @property
    def greedy(self) -> bool:
        return self.generator is None

    @property
    def wants_logprobs(self) -> bool:
        return self.params.logprobs or self.params.top_logprobs > 0


def sample_rows(logits: torch.Tensor, rows: list[RowSampler]) -> torch.Tensor:
    """logits [B, V] fp32 -> token ids [B] int64: one argmax for the greedy rows, then each sampled row on its own."""
    tok = logits.argmax(-1)
    for b, r in enumerate(rows):
        if r is not None and not r.greedy:
            p = r.params
            tok[b] = sample(logits[b : b + 1], p.temperature, p.top_k, p.top_p, r.generator)[0]
    return tok


def row_logprobs(logits: torch.Tensor, tokens: list[int], rows: list[RowSampler], decode_one) -> list:
    """For each row that asked for them: TokenLogprob of its chosen token (else None). logits [B, V] fp32, tokens [B]
    host ints, decode_one: token id -> its text. One host read for all the rows that asked."""
    wanted = [b for b, r in enumerate(rows) if r is not None and r.wants_logprobs]
    out: list[Optional[TokenLogprob]] = [None] * len(rows)
    if not wanted:
        return out
    lp = torch.log_softmax(logits[wanted], dim=-1)  # [W, V]
    chosen = lp.gather(1, torch.tensor([[tokens[b]] for b in wanted], device=lp.device))[:, 0].tolist()
    k = max(rows[b].params.top_logprobs for b in wanted)
    top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    top_v, top_i = top_v.tolist(), top_i.tolist()
    for w, b in enumerate(wanted):
        n = rows[b].params.top_logprobs
        top = [(decode_one(i), v) for i, v in zip(top_i[w][:n], top_v[w][:n])]
        out[b] = TokenLogprob(tokens[b], decode_one(tokens[b]), chosen[w], top)
    return out


class BatchSampler:
    """generate_tokens' `sampler` for a batch of requests, each row with its own settings and generator: logits [B, V]
    fp32 -> token ids [B]. `live[b] = False` stops row b's draws (it then takes the argmax, which nobody reads)."""

    def __init__(self, batch, device: torch.device):
        self.rows = [RowSampler(r.params, device) for r in batch]
        self.live = [True] * len(batch)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return sample_rows(logits, [s if live else None for s, live in zip(self.rows, self.live)])
