"""``infer serve``: load a model and serve it over HTTP with uvicorn.

Registered by :func:`add_serve_command`; the server's modules (Starlette, uvicorn,
prometheus-client) are imported only when the command runs, so ``infer --help`` stays fast
and works without the ``serve`` extra installed.

SIGTERM (or Ctrl-C) stops accepting connections and lets in-flight requests finish for up
to ``--grace`` seconds; the process then closes the model and exits 0.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

__all__ = ["add_serve_command"]

#: Default seconds in-flight requests get to finish after SIGTERM.
DEFAULT_GRACE = 30.0


def add_serve_command(subparsers: Any, model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``serve`` to the ``infer`` command's ``subparsers``.

    ``model_args`` adds the arguments every model command shares (model, ``--backend``,
    ``--device``, ``--dtype``, ``-o KEY=VALUE``), so the model is loaded as ``infer run`` loads it.
    """
    from infer.cli import _positive_int, bounded

    non_negative_int = bounded(int, minimum=0, inclusive=True, expected="an integer >= 0")
    seconds = bounded(float, minimum=0, inclusive=False, expected="a positive number of seconds")

    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--name", help="model name clients send (default: MODEL as given)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--max-concurrency", type=_positive_int, default=32, help="requests generating at once")
    p.add_argument("--max-queue", type=non_negative_int, default=256, help="requests waiting before 429")
    p.add_argument("--max-prompt-tokens", type=_positive_int, help="longest prompt accepted, in tokens")
    p.add_argument("--max-body-bytes", type=_positive_int, default=2 * 1024 * 1024, help="largest request body")
    p.add_argument("--timeout", type=seconds, help="seconds a request may take (504 past it)")
    p.add_argument("--grace", type=seconds, default=DEFAULT_GRACE, help="seconds to drain on SIGTERM")
    p.set_defaults(func=_cmd_serve)


def _drained(signum: int, frame: FrameType | None) -> None:
    """SIGTERM after uvicorn's graceful shutdown: the work is done, so return and exit 0."""


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from infer.serve.app import create_app
    except ImportError as exc:
        print(
            f"infer: error: 'infer serve' needs the serve extra: pip install 'infer-core[serve]' ({exc})",
            file=sys.stderr,
        )
        return 2
    from infer.cli import _load

    model = _load(args)
    try:
        app = create_app(
            model,
            model_name=args.name or args.model,
            api_key=args.api_key,
            max_concurrency=args.max_concurrency,
            max_queue=args.max_queue,
            max_body_bytes=args.max_body_bytes,
            max_prompt_tokens=args.max_prompt_tokens,
            request_timeout=args.timeout,
        )
        config = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            lifespan="off",
            access_log=bool(args.verbose),
            timeout_graceful_shutdown=args.grace,
        )
        server = uvicorn.Server(config)
        # uvicorn restores the previous SIGTERM handler after draining and raises the signal
        # again; the default handler would then kill the process with status -15.
        signal.signal(signal.SIGTERM, _drained)
        server.run()
    finally:
        model.close()
    return 0 if server.started else 1
