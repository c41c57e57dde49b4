"""The server's counters for `/metrics`, in Prometheus' text format (version 0.0.4), without a client library.

The engine thread records tokens and latencies; the HTTP layer records responses; `render` reads them on the event
loop. Each update takes one short lock, so a scrape sees consistent histograms.
"""

import threading
from collections import defaultdict

# Bucket bounds in seconds: time to first token spans a prefill behind a queue (ms to minutes on a CPU); inter-token
# latency spans one decode step (sub-ms on a GPU, ~0.1 s for a batch on a loaded CPU).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    """Cumulative buckets, sum and count, as Prometheus reads them."""

    def __init__(self, bounds):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        i = next((k for k, b in enumerate(self.bounds) if value <= b), len(self.bounds))
        self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, n in zip([*map(_number, self.bounds), "+Inf"], self.counts):
            total += n
            out.append(f'{name}_bucket{{le="{bound}"}} {total}')
        return [*out, f"{name}_sum {_number(self.sum)}", f"{name}_count {self.count}"]


class Metrics:
    """What /metrics reports; every method is safe from any thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.requests = defaultdict(int)  # finish reason (or "error") -> engine requests ended so far
        self.http = defaultdict(int)  # (route, status) -> HTTP responses
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)

    def queued(self, prompt_tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens

    def tokens(self, n: int) -> None:
        with self._lock:
            self.generation_tokens += n

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        with self._lock:
            self.itl.observe(seconds)

    def finished(self, request) -> None:
        with self._lock:
            self.requests[request.finish_reason or "error"] += 1

    def response(self, route: str, status: int) -> None:
        with self._lock:
            self.http[(route, status)] += 1

    def render(self, *, running: int, waiting: int) -> str:
        """The text a Prometheus scrape reads."""
        with self._lock:
            lines = [
                "# HELP phixtral_requests_total Generations ended, by finish reason (error: failed).",
                "# TYPE phixtral_requests_total counter",
                *(f'phixtral_requests_total{{finish_reason="{k}"}} {v}' for k, v in sorted(self.requests.items())),
                "# HELP phixtral_http_requests_total HTTP responses, by route and status.",
                "# TYPE phixtral_http_requests_total counter",
                *(
                    f'phixtral_http_requests_total{{route="{r}",status="{s}"}} {v}'
                    for (r, s), v in sorted(self.http.items())
                ),
                "# HELP phixtral_prompt_tokens_total Prompt tokens of the generations queued.",
                "# TYPE phixtral_prompt_tokens_total counter",
                f"phixtral_prompt_tokens_total {self.prompt_tokens}",
                "# HELP phixtral_generation_tokens_total Tokens generated.",
                "# TYPE phixtral_generation_tokens_total counter",
                f"phixtral_generation_tokens_total {self.generation_tokens}",
                "# HELP phixtral_requests_running Generations running now.",
                "# TYPE phixtral_requests_running gauge",
                f"phixtral_requests_running {running}",
                "# HELP phixtral_requests_waiting Generations waiting for a row (the queue depth).",
                "# TYPE phixtral_requests_waiting gauge",
                f"phixtral_requests_waiting {waiting}",
                "# HELP phixtral_time_to_first_token_seconds From a generation's arrival to its first token.",
                "# TYPE phixtral_time_to_first_token_seconds histogram",
                *self.ttft.lines("phixtral_time_to_first_token_seconds"),
                "# HELP phixtral_inter_token_latency_seconds Between two tokens of one generation.",
                "# TYPE phixtral_inter_token_latency_seconds histogram",
                *self.itl.lines("phixtral_inter_token_latency_seconds"),
            ]
        return "\n".join(lines) + "\n"


def _number(x: float) -> str:
    return repr(float(x)) if x != int(x) else f"{x:.1f}"
