"""`phixtral serve [--model DIR_OR_ID] [--host 127.0.0.1] [--port 8000] [--max-batch-size N] ...`: the OpenAI-compatible
server. SIGTERM and Ctrl-C stop it gracefully: it stops accepting connections, answers the requests still waiting for a
batch with a 503, gives the running batch --graceful-shutdown seconds to finish, ends the streams still open with an
error event (a plain request gets a 503), and exits (0 on SIGTERM, 130 on Ctrl-C; a second Ctrl-C exits at once)."""

import argparse
import logging
import signal
import sys
from pathlib import Path

from ..weights import default_model_path
from .args import add_model_args, float_in, int_at_least, load_model


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve",
        help="serve a model over HTTP with OpenAI's API",
        description="Serve a model over HTTP: OpenAI's /v1/completions and /v1/chat/completions (streamed or not), "
        "/v1/models and /health. Needs the serve extra: pip install 'phixtral-kernels[serve]'.",
    )
    p.add_argument(
        "--served-model-name", default=None, help="the name clients use (default: the folder's name or the hub id)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port (0: any free port)")
    p.add_argument("--max-batch-size", type=int_at_least(1), default=8, help="requests decoded together at most")
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
    engine = Engine(model, max_batch_size=args.max_batch_size)
    logging.getLogger("phixtral.serve").info(
        "serving %s as %r [%s, %s, backend %s, max batch %d, context %d tokens]", model_path, name, model.device,
        str(model.dtype).removeprefix("torch."), model.backend, args.max_batch_size, model.config.n_positions,
    )  # fmt: skip
    config = uvicorn.Config(
        create_app(engine, name), host=args.host, port=args.port, log_level="info", access_log=False,
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
