"""structlog events.

infer logs structured events (``model.loaded``, ``request.started``, ``request.first_token``,
``request.finished``, ``plugin.failed``) to stderr. Human-readable by default; one JSON object
per line with ``INFER_LOG_FORMAT=json``. ``INFER_LOG_LEVEL`` sets the threshold (default
``warning``, so a library user sees nothing unless something is wrong).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any

import structlog

__all__ = ["configure_logging", "get_logger"]

_logger: Any = None
_lock = threading.Lock()


def configure_logging(level: str | None = None, fmt: str | None = None) -> None:
    """(Re)build infer's logger; arguments override ``INFER_LOG_LEVEL`` / ``INFER_LOG_FORMAT``.

    The logger is infer's own (``structlog.wrap_logger``): the application's global structlog
    configuration is left alone.
    """
    global _logger
    level_name = (level or os.environ.get("INFER_LOG_LEVEL") or "warning").upper()
    numeric = logging.getLevelName(level_name)
    if not isinstance(numeric, int):
        numeric = logging.WARNING
    json_format = (fmt or os.environ.get("INFER_LOG_FORMAT", "")).lower() == "json"
    renderer: Any = structlog.processors.JSONRenderer() if json_format else structlog.dev.ConsoleRenderer(colors=False)
    _logger = structlog.wrap_logger(
        structlog.PrintLogger(file=sys.stderr),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_name="infer",
    )


def get_logger() -> Any:
    """infer's structlog logger, configured from the environment on first use."""
    if _logger is None:
        with _lock:
            if _logger is None:
                configure_logging()
    return _logger
