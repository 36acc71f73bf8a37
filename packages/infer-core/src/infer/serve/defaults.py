"""The server's default time limits, in a module light enough for ``infer --help`` to import."""

from __future__ import annotations

__all__ = ["DEFAULT_BODY_TIMEOUT", "DEFAULT_HEADER_TIMEOUT", "DEFAULT_REQUEST_TIMEOUT", "DEFAULT_WRITE_TIMEOUT"]

#: Seconds a request may take from arrival to its last token (504 past it).
DEFAULT_REQUEST_TIMEOUT = 600.0
#: Seconds a client has to send a request body once its headers arrived (408 past it).
DEFAULT_BODY_TIMEOUT = 30.0
#: Seconds one write may wait on a client that stopped reading before the request is dropped.
DEFAULT_WRITE_TIMEOUT = 30.0
#: Seconds a connection has to send a request's headers (slowloris).
DEFAULT_HEADER_TIMEOUT = 10.0
