"""``infer serve MODEL --replicas N [--ray-address ADDR]``: the same server, on Ray Serve.

Without ``--ray-address`` a local Ray instance starts for the command and stops with it;
with one, the application joins that cluster and only the application is deleted on exit
(the cluster's Serve instance and other applications stay). SIGTERM or Ctrl-C stops it;
replicas get ``--grace`` seconds to finish their requests.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from types import FrameType
from typing import Any

from infer.cli.common import load_options

__all__ = ["serve_on_ray"]


def ray_args(args: argparse.Namespace, app_options: dict[str, Any]) -> dict[str, Any]:
    """The application builder's arguments (:class:`infer.serve.ray.RayServeArgs`) from the command line."""
    from infer.serve.cli import engine_options

    config: dict[str, Any] = {
        "model": args.model,
        "name": args.name,
        "backend": args.backend,
        "device": args.device,
        "dtype": args.dtype,
        "options": load_options(args.option) | engine_options(args),
        "app": app_options,
        "prefix_routing": not args.no_prefix_routing,
        "grace": args.grace,
    }
    for name in ("replicas", "min_replicas", "max_replicas", "target_ongoing_requests", "num_cpus", "num_gpus"):
        if getattr(args, name) is not None:
            config[name] = getattr(args, name)
    return config


def serve_on_ray(args: argparse.Namespace, app_options: dict[str, Any]) -> int:
    """Deploy the application, serve until SIGTERM/SIGINT, then take it down; the exit status."""
    try:
        import ray
        from ray import serve

        from infer.serve.ray import APP_NAME, build_app
    except ImportError as exc:
        hint = "pip install 'infer-core[ray]'"
        print(f"infer: error: serving on Ray needs the ray extra: {hint} ({exc})", file=sys.stderr)
        return 2
    application = build_app(ray_args(args, app_options))  # a bad argument raises a typed error, before Ray starts
    local = args.ray_address is None
    if local:
        ray.init(include_dashboard=False)
    else:
        ray.init(address=args.ray_address)
    stop = threading.Event()

    def stopping(signum: int, frame: FrameType | None) -> None:
        stop.set()

    # Before deploying: a stop asked for while replicas start must still take the application down.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stopping)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(application, name=APP_NAME, route_prefix="/")
        where = f"http://{args.host}:{args.port}" if local else "the cluster's Serve proxy"
        print(f"infer: serving {args.model} on {where} through Ray Serve", file=sys.stderr)
        stop.wait()
    finally:
        if local:
            serve.shutdown()  # type: ignore[no-untyped-call]
        else:
            serve.delete(APP_NAME)
        ray.shutdown()
    return 0
