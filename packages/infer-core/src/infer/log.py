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
from collections.abc import MutableMapping
from typing import Any

import structlog

__all__ = ["bind_process_fields", "configure_logging", "get_logger"]

_logger: Any = None
_lock = threading.Lock()
# Fields every event of this process carries (a Ray Serve replica's id, for one).
_process_fields: dict[str, Any] = {}


def bind_process_fields(**fields: Any) -> None:
    """Add ``fields`` to every event this process logs from now on (``replica="..."``).

    Process-wide on purpose: a server's events come from its event loop, worker threads and
    the scheduler's thread, which share no context variables.
    """
    _process_fields.update(fields)


def _add_process_fields(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in _process_fields.items():
        event.setdefault(key, value)
    return event


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
            _add_process_fields,
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
