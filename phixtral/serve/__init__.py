"""An OpenAI-compatible HTTP server for phixtral models: `phixtral serve` (needs the `serve` extra: fastapi, uvicorn).

engine.py   the batching engine: one thread owns the model and runs waiting requests as left-padded batches
protocol.py OpenAI's request bodies and error format
app.py      the FastAPI app: routes, server-sent events, one log line per request
The `serve` subcommand is phixtral/commands/serve.py; the HTTP stack loads only when the server starts.
"""
