"""Static batching (--batching static): the engine runs the waiting requests a left-padded batch at a time.

Policy (first come first served):
    - When the model is free, the engine takes the longest run of waiting requests, in arrival order, that fits one
      batch: at most max_batch_size rows, and longest prompt + largest max_tokens <= n_positions (the batch shares one
      KV cache of that length). The others wait for the next batch; none overtakes an older one.
    - The batch is prefilled together and decoded one token per step for all rows (generate_tokens, CUDA graphs
      included). Each row stops on its own (eos, stop string, max_tokens, or its client went away) and gets no more
      tokens; the batch ends when every row has stopped. A request that arrives meanwhile waits for the end of the
      running batch.
    - Limits: a short request that lands behind a long one waits up to the long one's whole decode; rows that stopped
      early still ride along in the batch's forward passes until the batch ends. continuous.py removes both.
"""

import logging
import time

import torch

from ..generate import generate_tokens
from ..generation_lock import generation_lock
from ..text import left_pad, pad_id
from .rows import Row
from .sampling import row_logprobs, sample_rows

log = logging.getLogger("phixtral.serve")


def run_static(engine) -> None:
    """The engine thread's loop under static batching; returns once the engine is closed."""
    while True:
        batch = engine.take(engine.max_batch_size, block=True, fits=_fits(engine))
        if batch is None:
            return
        if not batch:
            continue
        rows = [Row(engine, r) for r in batch]
        try:
            _run(engine, rows)
        except BaseException as e:  # never let one batch take the engine down
            log.exception("batch of %d failed", len(rows))
            engine.fail(rows, e)
        finally:
            engine.running = 0


def _fits(engine):
    def fits(batch, r) -> bool:  # the batch shares one cache: its longest prompt + its largest max_tokens must fit
        longest = max(len(x.prompt_ids) for x in [*batch, r])
        most = max(x.params.max_tokens for x in [*batch, r])
        return longest + most <= engine.n_positions

    return fits


class _Sampler:
    """generate_tokens' sampler: each live row with its own settings; the log-probabilities of the step are kept for
    the engine loop, which reads them with the step's tokens."""

    def __init__(self, engine, rows: list[Row]):
        self.engine, self.rows = engine, rows
        self.logprobs = [None] * len(rows)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        # logits [B, V] fp32 -> token ids [B]
        samplers = [None if row.done else row.sampler for row in self.rows]
        tok = sample_rows(logits, samplers)
        if any(s is not None and s.wants_logprobs for s in samplers):
            self.logprobs = row_logprobs(logits, tok.tolist(), samplers, lambda i: self.engine.decode([i]))
        return tok


@torch.inference_mode()
def _run(engine, rows: list[Row]) -> None:
    model = engine.model
    batch = [row.request for row in rows]
    B = len(batch)
    ids, mask = left_pad([r.prompt_ids for r in batch], pad_id(model), model.device)  # as generate() pads
    sampler = _Sampler(engine, rows)
    engine.batches += 1
    engine.largest_batch = max(engine.largest_batch, B)
    engine.running = B
    started = time.perf_counter()
    for r in batch:
        r.started, r.batch_size = started, B
    lock = generation_lock(model)  # a generate() from another thread of this process waits for the batch
    lock.acquire()
    steps = None
    try:
        steps = generate_tokens(
            model,
            ids,
            mask,
            max_new_tokens=max(r.params.max_tokens for r in batch),
            sampler=sampler,
            compile=False,  # a compile mid-serving would stall every client for seconds, once per batch shape
        )
        for host in steps:
            for b, row in enumerate(rows):
                if row.done:
                    continue
                if row.request.cancelled or engine.stopping:
                    engine.finish(row, "cancelled")
                    continue
                engine.accept(row, host[b], sampler.logprobs[b])
            engine.running = sum(not row.done for row in rows)
            if not engine.running:
                break
    finally:
        if steps is not None:
            steps.close()
        lock.release()
