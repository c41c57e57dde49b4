"""Continuous batching (--batching continuous, the default): rows join and leave the running batch at every step.

The KV cache has max_batch_size rows of n_positions slots; each running request owns one row and its sequence fills
that row from slot 0 (model.forward with per-row input_pos [B, S]). The rows are kept packed: decoding rows first
(rows 0 .. n - 1, one view for the decode step), then the rows still prefilling. One engine step:
    1. waiting requests join while rows are free, in arrival order, as rows that prefill;
    2. rows whose client left (or the engine is stopping) end; the rows are packed again (model.move_cache_row);
    3. one decode step for the decoding rows: each feeds its last token at its own position and samples its next;
       rows that end (eos, stop string, max_tokens) leave;
    4. the rows still prefilling get up to prefill_chunk prompt tokens between them, a chunk per forward, in order; a
       row whose prompt is all in the cache samples its first token from the chunk's last logits (that is its time to
       first token) and decodes with the others from the next step on.
So a running stream waits at most one prefill chunk per step for newcomers, a short request never waits for a long
one to end, and finished rows cost nothing. Each row samples as `generate` does for one prompt (sampling.py).
The engine holds the model's generation lock while it has rows and frees it when idle, so that a generate() from
another thread of the process can run between requests.
"""

import logging
import time
from typing import Optional

import torch

from ..generate import NonFiniteLogitsError
from ..generation_lock import generation_lock
from .rows import Row
from .sampling import row_logprobs, sample_rows

log = logging.getLogger("phixtral.serve")


class _Slot(Row):
    """A row of the running batch: how much of its prompt is in the cache, and the token it feeds next."""

    def __init__(self, engine, request):
        super().__init__(engine, request)
        self.pos = 0  # slots of its cache row that hold its tokens
        self.next_token: Optional[int] = None  # sampled, not yet fed; set once the prompt is in the cache


def run_continuous(engine) -> None:
    """The engine thread's loop under continuous batching; returns once the engine is closed and its rows are done."""
    _Scheduler(engine).run()


class _Scheduler:
    def __init__(self, engine):
        self.engine, self.model = engine, engine.model  # an engine.Engine
        self.rows: list[_Slot] = []  # index = KV cache row: decoding rows, then prefilling ones
        self.lock = generation_lock(self.model)
        self.locked = False
        self.closed = False

    def run(self) -> None:
        engine = self.engine
        while True:
            if not self.rows:
                self._release()
                if self.closed:
                    return
            free = engine.max_batch_size - len(self.rows)
            new = [] if self.closed else engine.take(free, block=not self.rows)
            if new is None:
                self.closed = True
                continue
            try:
                if new:
                    self._admit(new)
                self._step()
            except BaseException as e:  # never let one step take the engine down: its rows fail, the others wait
                log.exception("a step of %d rows failed", len(self.rows))
                engine.fail(self.rows, e)
                self.rows = []
            engine.running = len(self.rows)

    def _admit(self, requests) -> None:
        if not self.locked:
            self.lock.acquire()  # a generate() from another thread waits until the engine is idle
            self.locked = True
            self.model.setup_caches(self.engine.max_batch_size, self.engine.n_positions)
        for r in requests:
            self.rows.append(_Slot(self.engine, r))
        self.engine.running = len(self.rows)

    def _release(self) -> None:
        if self.locked:
            self.locked = False
            self.lock.release()

    @torch.inference_mode()
    def _step(self) -> None:
        engine = self.engine
        for row in self.rows:
            if row.request.cancelled or engine.stopping:
                engine.finish(row, "cancelled")
        self._pack()
        decoding = [row for row in self.rows if row.next_token is not None]  # rows 0 .. n - 1
        if decoding:
            self._decode(decoding)
        self._prefill(len(decoding))
        self._pack()

    def _decode(self, rows: list[_Slot]) -> None:
        engine, device = self.engine, self.model.device
        n = len(rows)
        ids = torch.tensor([[row.next_token] for row in rows], device=device)  # [n, 1]
        pos = torch.tensor([[row.pos] for row in rows], device=device)  # [n, 1]
        hidden = self.model.hidden_states(ids, None, pos)  # [n, 1, D], cache rows 0 .. n - 1
        logits = self.model.lm_head(hidden[:, -1]).float()  # [n, V]
        engine.batches += 1
        engine.largest_batch = max(engine.largest_batch, n)
        for row in rows:
            row.pos += 1
            row.request.batch_size = max(row.request.batch_size, n)
        self._sample(rows, logits)

    def _prefill(self, first: int) -> None:
        """Up to prefill_chunk prompt tokens for the rows from index `first` on, in order."""
        budget, device = self.engine.prefill_chunk, self.model.device
        for i in range(first, len(self.rows)):
            row = self.rows[i]
            if row.done:
                continue
            prompt = row.request.prompt_ids
            if row.request.started is None:
                row.request.started = time.perf_counter()
            logits = None
            while budget and row.pos < len(prompt):
                c = min(budget, len(prompt) - row.pos)
                ids = torch.tensor([prompt[row.pos : row.pos + c]], device=device)  # [1, c]
                pos = torch.arange(row.pos, row.pos + c, device=device)[None]  # [1, c]
                hidden = self.model.hidden_states(ids, None, pos, cache_row=i)  # [1, c, D]
                row.pos += c
                budget -= c
                if row.pos == len(prompt):
                    logits = self.model.lm_head(hidden[:, -1]).float()  # [1, V]: only the last position is needed
            if logits is not None:
                row.request.batch_size = max(row.request.batch_size, 1)
                self._sample([row], logits)
            if not budget:
                return

    def _sample(self, rows: list[_Slot], logits: torch.Tensor) -> None:
        """Sample each row's next token from logits [n, V] fp32 and hand it to the engine (which may end the row)."""
        engine = self.engine
        samplers = [row.sampler for row in rows]
        tok = sample_rows(logits, samplers)
        finite = torch.isfinite(logits).all(-1)  # [n], read with the tokens: one host read
        host, ok = tok.tolist(), finite.tolist()
        lps = row_logprobs(logits, host, samplers, lambda t: engine.decode([t]))
        for row, t, good, lp in zip(rows, host, ok, lps):
            if not good:
                engine.fail([row], NonFiniteLogitsError(f"non-finite logits (NaN or inf) at position {row.pos}"))
                continue
            row.next_token = t
            engine.accept(row, t, lp)

    def _pack(self) -> None:
        """Drop the rows that are done and move the others so that the decoding rows fill rows 0 .. k - 1 and the
        prefilling ones follow in order. Every row moves to a lower index, in increasing order of destination, so no
        row is overwritten before it is copied."""
        live = [row for row in self.rows if not row.done]
        if len(live) == len(self.rows):
            return
        index = {id(row): i for i, row in enumerate(self.rows)}
        decoding = [row for row in live if row.next_token is not None]
        prefilling = [row for row in live if row.next_token is None]
        k = len(decoding)
        stay = {index[id(row)] for row in decoding if index[id(row)] < k}
        holes = [i for i in range(k) if i not in stay]
        movers = [row for row in decoding if index[id(row)] >= k]
        order: list[Optional[_Slot]] = [None] * len(live)
        for row in decoding:
            if index[id(row)] < k:
                order[index[id(row)]] = row
        for hole, row in zip(holes, movers):
            self.model.move_cache_row(index[id(row)], hole, row.pos)
            order[hole] = row
        for j, row in enumerate(prefilling):
            if index[id(row)] != k + j:
                self.model.move_cache_row(index[id(row)], k + j, row.pos)
            order[k + j] = row
        self.rows = order
