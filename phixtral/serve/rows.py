"""A running request's state on the engine thread, shared by both schedulers: its sampler, its text so far, the
log-probabilities not yet sent. The engine (engine.py) feeds it tokens; this module imports no scheduler and no engine.
"""

from typing import Optional

from ..text import TextStream
from .sampling import RowSampler, TokenLogprob


class Row:
    """A running request: `engine` gives the device, the eos ids and the detokenizer; `request` an engine Request."""

    def __init__(self, engine, request):
        self.request = request
        self.sampler = RowSampler(request.params, engine.model.device)
        self.text = TextStream(engine.decode, engine.eos, request.params.stop)
        self.logprobs: Optional[list[TokenLogprob]] = [] if self.sampler.wants_logprobs else None
        self.done = False
