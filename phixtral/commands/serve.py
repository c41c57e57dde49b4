"""`phixtral serve [--model DIR_OR_ID] [--host 127.0.0.1] [--port 8000] [--max-batch-size N] ...`: the OpenAI-compatible
server, with a chat page at /. SIGTERM and Ctrl-C stop it gracefully: it stops accepting connections, answers the
requests still waiting for a row with a 503, gives the running ones --graceful-shutdown seconds to finish, ends the
streams still open with an error event (a plain request gets a 503), and exits (0 on SIGTERM, 130 on Ctrl-C; a second
Ctrl-C exits at once). The API key comes from --api-key or the environment variable PHIXTRAL_API_KEY (which keeps it
out of the process list)."""

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from ..serve.engine import BATCHING
from ..serve.limits import Limits, is_loopback
from ..weights import default_model_path
from .args import add_model_args, float_in, int_at_least, load_model


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve",
        help="serve a model over HTTP with OpenAI's API",
        description="Serve a model over HTTP: OpenAI's /v1/completions and /v1/chat/completions (streamed or not), "
        "/v1/models, /health, /metrics (Prometheus) and a chat page at /. Needs the serve extra: "
        "pip install 'phixtral-kernels[serve]'.",
    )
    p.add_argument(
        "--served-model-name", default=None, help="the name clients use (default: the folder's name or the hub id)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port (0: any free port)")
    p.add_argument("--max-batch-size", type=int_at_least(1), default=8, help="requests decoded together at most")
    p.add_argument("--batching", choices=BATCHING, default="continuous",
                   help="continuous: requests join and leave the running batch at every step (default); static: "
                   "left-padded batches, each run to its end (for comparison)")  # fmt: skip
    p.add_argument("--prefill-chunk", type=int_at_least(1), default=256, metavar="TOKENS",
                   help="prompt tokens prefilled between two decode steps at most (continuous batching)")  # fmt: skip
    p.add_argument("--max-tokens", type=int_at_least(1), default=None, metavar="N",
                   help="the most tokens one choice may generate (default: up to the context)")  # fmt: skip
    p.add_argument("--max-prompts", type=int_at_least(1), default=Limits.max_prompts, metavar="N",
                   help="the most completions one request may ask for, prompts x n (default %(default)s)")  # fmt: skip
    p.add_argument("--max-request-bytes", type=int_at_least(1), default=Limits.max_request_bytes, metavar="BYTES",
                   help="the largest request body (413 above; default %(default)s)")  # fmt: skip
    p.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on /v1/ (default: $PHIXTRAL_API_KEY, else "
                   "none)")  # fmt: skip
    p.add_argument("--graceful-shutdown", type=float_in(0), default=5.0, metavar="SECONDS",
                   help="on SIGTERM / Ctrl-C, how long the running batch may go on")  # fmt: skip
    add_model_args(p)
    p.set_defaults(func=run)
    return p


def _port(text: str) -> int:
    value = int_at_least(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be <= 65535, got {value}")
    return value


def served_name(model_arg) -> str:
    """The model's name in the API: the hub id as given, or a local folder's name."""
    if model_arg is None:
        return default_model_path().name
    path = Path(model_arg).expanduser()
    return path.resolve().name if path.is_dir() else str(model_arg)


class _Terminated(Exception):
    """SIGTERM, after uvicorn's graceful shutdown (uvicorn raises the signal again once it is done)."""


def run(args) -> int:
    try:
        import uvicorn

        from ..serve.app import Server, create_app
    except ImportError as e:
        raise RuntimeError(f"the server needs the serve extra ({e}): pip install 'phixtral-kernels[serve]'") from e
    from ..serve.engine import Engine

    model_path = args.model if args.model is not None else default_model_path()
    model = load_model(args, args.parser, model_path)
    _setup_logging()  # after the checks of the flags, so that a command that exits at once leaves no handler behind
    name = args.served_model_name or served_name(args.model)
    engine = Engine(model, max_batch_size=args.max_batch_size, batching=args.batching, prefill_chunk=args.prefill_chunk)
    api_key = args.api_key if args.api_key is not None else os.environ.get("PHIXTRAL_API_KEY") or None
    limits = Limits(max_request_bytes=args.max_request_bytes, max_tokens=args.max_tokens, max_prompts=args.max_prompts,
                    api_key=api_key, loopback_only=is_loopback(args.host))  # fmt: skip
    logging.getLogger("phixtral.serve").info(
        "serving %s as %r [%s, %s, backend %s, %s batching, max batch %d, context %d tokens%s]", model_path, name,
        model.device, str(model.dtype).removeprefix("torch."), model.backend, args.batching, args.max_batch_size,
        model.config.n_positions, ", API key required" if api_key else "",
    )  # fmt: skip
    config = uvicorn.Config(
        create_app(engine, name, limits), host=args.host, port=args.port, log_level="info", access_log=False,
        timeout_graceful_shutdown=args.graceful_shutdown + 5,  # a backstop: the engine ends its streams before that
    )  # fmt: skip
    server = Server(config, engine, grace=args.graceful_shutdown)

    def terminated(signum, frame):
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        server.run()
    except _Terminated:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        engine.stop()
    return 0 if server.started else 1


def _setup_logging() -> None:
    log = logging.getLogger("phixtral.serve")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
