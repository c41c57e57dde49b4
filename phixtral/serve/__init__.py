"""An OpenAI-compatible HTTP server for phixtral models: `phixtral serve` (needs the `serve` extra: fastapi, uvicorn).

engine.py      the engine: one thread owns the model; requests, events, the queue, what a row does with a token
continuous.py  continuous batching (the default): rows join and leave the running batch at every decode step
static.py      static batching: left-padded batches, each run to its end (for comparison)
rows.py        a running request's state, shared by the schedulers
sampling.py    per-row sampling and log-probabilities
protocol.py    OpenAI's request bodies and error format
guard.py       what a request must pass first: Host, Origin, API key, JSON content type, body size
limits.py      the limits and keys that the command sets
responses.py   engine events as OpenAI's answers: JSON bodies, server-sent events, logprobs
metrics.py     the counters of /metrics (Prometheus' text format)
app.py         the FastAPI app: routes, the chat page (static/), one log line per request
The `serve` subcommand is phixtral/commands/serve.py; the HTTP stack loads only when the server starts.
"""
