"""An OpenAI-compatible HTTP server for phixtral models: `phixtral serve` (needs the `serve` extra: fastapi, uvicorn).

engine.py   the batching engine: one thread owns the model and runs waiting requests as left-padded batches
protocol.py OpenAI's request bodies and error format
app.py      the FastAPI app: routes, server-sent events, one log line per request
command.py  the `serve` subcommand
Only command.py's parser is imported by `phixtral`'s command line; the HTTP stack loads when the server starts.
"""
