"""``infer serve``: load a model and serve it over HTTP with uvicorn.

Registered by :func:`add_serve_command`; the server's modules (Starlette, uvicorn,
prometheus-client) are imported only when the command runs, so ``infer --help`` stays fast
and works without the ``serve`` extra installed.

SIGTERM (or Ctrl-C) stops accepting connections and lets in-flight requests finish for up
to ``--grace`` seconds; the process then closes the model and exits 0.

Defaults are the safe ones: loopback address and Host names only, a request deadline, header,
body and write timeouts, a bounded number of connections, and repeated log lines damped.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from types import FrameType
from typing import Any

from infer.cli.common import Subcommands, add_model_arguments, bounded, load_model, positive_int

__all__ = ["add_serve_command", "engine_options", "public_model_name"]

#: Default seconds in-flight requests get to finish after SIGTERM.
DEFAULT_GRACE = 30.0
#: ``--prefix-cache-mib`` default and ``--speculative`` choices: infer.prefix_cache.DEFAULT_BUDGET
#: and infer.speculative.MODES, restated because importing them imports numpy and ``--help``
#: must stay instant (a test holds them equal).
DEFAULT_PREFIX_CACHE_MIB = 512
SPECULATIVE_MODES = ("auto", "ngram", "off")
#: Connections beyond the slots and the queue that may be open at once (health checks, scrapes,
#: clients being told 429); past the total uvicorn answers 503 at once.
CONNECTION_HEADROOM = 64


def add_serve_command(subparsers: Subcommands) -> None:
    """Add ``serve`` to the ``infer`` command's ``subparsers``.

    The model arguments are those every model command shares (:func:`infer.cli.common.add_model_arguments`),
    so the model is loaded as ``infer run`` loads it.
    """
    from infer.serve.defaults import (
        DEFAULT_BODY_TIMEOUT,
        DEFAULT_HEADER_TIMEOUT,
        DEFAULT_REQUEST_TIMEOUT,
        DEFAULT_WRITE_TIMEOUT,
    )

    non_negative_int = bounded(int, minimum=0, inclusive=True, expected="an integer >= 0")
    seconds = bounded(float, minimum=0, inclusive=False, expected="a positive number of seconds")

    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--name", help="model name clients send (default: MODEL as given)")
    p.add_argument(
        "--alias", action="append", default=[], metavar="NAME", help="another name clients may send (repeatable)"
    )
    p.add_argument(
        "--any-model-name", action="store_true", help="accept any model name in requests (answers carry --name)"
    )
    p.add_argument(
        "--cors-origins",
        help="comma-separated origins whose browser pages may call the API ('*': any; default: none)",
    )
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes (must not be empty)")
    p.add_argument("--max-concurrency", type=positive_int, default=32, help="requests generating at once")
    p.add_argument("--max-queue", type=non_negative_int, default=256, help="requests waiting before 429")
    p.add_argument("--max-prompt-tokens", type=positive_int, help="longest prompt accepted, in tokens")
    p.add_argument(
        "--max-kv-mib",
        type=positive_int,
        help="KV cache the running requests may reserve together, in MiB (prompt + max_tokens each; "
        "a request that does not fit waits, one over the whole budget gets 400; default: no limit)",
    )
    p.add_argument("--max-body-bytes", type=positive_int, default=2 * 1024 * 1024, help="largest request body")
    timeouts = (
        ("--timeout", DEFAULT_REQUEST_TIMEOUT, "seconds a request may take, 504 past it"),
        ("--header-timeout", DEFAULT_HEADER_TIMEOUT, "seconds a connection has to send request headers"),
        ("--body-timeout", DEFAULT_BODY_TIMEOUT, "seconds a client has to send a request body, 408 past it"),
        ("--write-timeout", DEFAULT_WRITE_TIMEOUT, "seconds a client may stop reading before it is dropped"),
    )
    for flag, default, text in timeouts:
        p.add_argument(flag, type=seconds, default=default, help=f"{text} (default: {default:g})")
    p.add_argument(
        "--allowed-hosts",
        help="comma-separated Host names to answer ('*': any; default: the loopback names and --host)",
    )
    p.add_argument(
        "--strict-requests", action="store_true", help="refuse unknown request fields with 400 instead of ignoring them"
    )
    p.add_argument("--grace", type=seconds, default=DEFAULT_GRACE, help="seconds to drain on SIGTERM")
    reuse = p.add_argument_group("KV reuse")
    reuse.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="prefill every prompt in full (default: a request starts from the longest prompt prefix "
        "cached from earlier requests, where the backend can fork caches)",
    )
    reuse.add_argument(
        "--prefix-cache-mib",
        type=positive_int,
        help=f"KV of finished requests kept for reuse, in MiB (default: {DEFAULT_PREFIX_CACHE_MIB})",
    )
    reuse.add_argument(
        "--speculative",
        choices=SPECULATIVE_MODES,
        default="auto",
        help="n-gram speculative decoding: 'auto' (default) where the backend verifies drafts exactly, "
        "'ngram' always (refused where the backend cannot), 'off'; requests may set their own",
    )
    _add_scale_out_arguments(p)
    p.set_defaults(func=_cmd_serve)


def _add_scale_out_arguments(p: argparse.ArgumentParser) -> None:
    """The Ray Serve flags: any of them serves through Ray (the ``ray`` extra) instead of uvicorn."""
    amount = bounded(float, minimum=0, inclusive=True, expected="a number >= 0")
    ray = p.add_argument_group("serving on Ray (pip install 'infer-core[ray]')")
    ray.add_argument("--replicas", type=positive_int, help="model replicas on Ray Serve, each loading the model")
    ray.add_argument("--ray-address", help="Ray cluster to join (default: start a local Ray instance)")
    ray.add_argument(
        "--min-replicas",
        type=bounded(int, minimum=0, inclusive=True, expected="an integer >= 0"),
        help="autoscale: fewest replicas",
    )
    ray.add_argument("--max-replicas", type=positive_int, help="autoscale: most replicas")
    ray.add_argument(
        "--target-ongoing-requests",
        type=amount,
        help="autoscale: requests per replica to aim at (default: --max-concurrency)",
    )
    ray.add_argument("--num-cpus", type=amount, help="CPUs Ray reserves per replica (default: 1)")
    ray.add_argument("--num-gpus", type=amount, help="GPUs Ray reserves per replica (CUDA; default: 0)")
    ray.add_argument(
        "--no-prefix-routing", action="store_true", help="route least-loaded only, not by conversation prefix"
    )


def _on_ray(args: argparse.Namespace) -> bool:
    scale = ("replicas", "min_replicas", "max_replicas", "target_ongoing_requests", "num_cpus", "num_gpus")
    return any(getattr(args, name, None) is not None for name in (*scale, "ray_address"))


def _app_options(args: argparse.Namespace, hosts: list[str]) -> dict[str, Any]:
    """``create_app``'s keyword arguments from the command line (but the model and its name)."""
    return {
        "api_key": args.api_key,
        "max_concurrency": args.max_concurrency,
        "max_queue": args.max_queue,
        "max_body_bytes": args.max_body_bytes,
        "max_prompt_tokens": args.max_prompt_tokens,
        "request_timeout": args.timeout,
        "body_timeout": args.body_timeout,
        "write_timeout": args.write_timeout,
        "allowed_hosts": hosts,
        "strict_requests": args.strict_requests,
        "max_kv_bytes": None if args.max_kv_mib is None else args.max_kv_mib * 2**20,
        "aliases": args.alias,
        "any_model_name": args.any_model_name,
        "cors_origins": [o.strip() for o in (args.cors_origins or "").split(",") if o.strip()],
    }


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`infer.load`'s KV-reuse arguments from the command line: prefix caching on where the
    backend can fork caches (a budget given asks for it outright), speculation as chosen."""
    if args.no_prefix_cache:
        prefix: bool | int | str = False
    elif args.prefix_cache_mib is not None:
        prefix = args.prefix_cache_mib * 2**20
    else:
        prefix = "auto"
    return {"prefix_cache": prefix, "speculative": args.speculative}


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
    from infer.serve.guards import HeaderTimeoutH11, RepeatFilter

    if args.api_key is not None and not args.api_key.strip():
        print(
            "infer: error: --api-key is empty; give a key, or leave the option out to serve without one",
            file=sys.stderr,
        )
        return 2
    hosts = _allowed_hosts(args.allowed_hosts, args.host)
    if not hosts:
        print("infer: error: --allowed-hosts names no host; give names, or '*' for any", file=sys.stderr)
        return 2
    if _on_ray(args):
        from infer.serve.ray_cli import serve_on_ray

        return serve_on_ray(args, _app_options(args, hosts))
    model = load_model(args, **engine_options(args))
    try:
        app = create_app(model, model_name=args.name or public_model_name(args.model), **_app_options(args, hosts))
        protocol = type("Protocol", (HeaderTimeoutH11,), {"header_timeout": args.header_timeout})
        config = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            http=protocol,
            lifespan="off",
            access_log=bool(args.verbose),
            timeout_graceful_shutdown=args.grace,
            limit_concurrency=args.max_concurrency + args.max_queue + CONNECTION_HEADROOM,
        )
        logging.getLogger("asyncio").addFilter(RepeatFilter(brief=True))
        logging.getLogger("uvicorn.error").addFilter(RepeatFilter())
        server = uvicorn.Server(config)
        # uvicorn restores the previous SIGTERM handler after draining and raises the signal
        # again; the default handler would then kill the process with status -15.
        signal.signal(signal.SIGTERM, _drained)
        server.run()
    finally:
        model.close()
    return 0 if server.started else 1


def _allowed_hosts(given: str | None, listen: str) -> list[str]:
    """The Host names to answer: those given, else the loopback names plus a specific ``--host``."""
    from infer.serve.guards import DEFAULT_ALLOWED_HOSTS

    if given is not None:
        return [h.strip() for h in given.split(",") if h.strip()]
    wildcard = listen in ("0.0.0.0", "::", "")
    return [*DEFAULT_ALLOWED_HOSTS, *([] if wildcard else [listen])]


def public_model_name(ref: str) -> str:
    """The model name clients see for ``ref``: a path's last part, so no answer reveals the filesystem.

    Used by ``infer serve`` and by each Ray Serve replica, so both name a model alike.
    """
    from pathlib import Path

    path = Path(ref)
    return path.resolve().name if path.exists() else ref
