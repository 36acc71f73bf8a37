"""HTTP errors of the server, in the OpenAI API's error body shape.

Every failure a client can see is an :class:`APIError`: an HTTP status plus the four fields
OpenAI clients read (``message``, ``type``, ``param``, ``code``). Errors raised by infer
itself become one through :func:`from_infer_error`, so a typed error from the core always
reaches the client as a 4xx or 5xx with a readable message, never as a traceback.
"""

from __future__ import annotations

import json
from typing import Any, final

from infer.errors import (
    BackendError,
    ChatTemplateError,
    ContextLengthError,
    DeadlineExceededError,
    EmptyPromptError,
    GrammarError,
    InferError,
    InvalidParameterError,
    InvalidTokenError,
    ModelClosedError,
    RequestCancelledError,
    RequestError,
)

__all__ = ["APIError", "from_infer_error", "shutdown_error"]

#: HTTP status -> the error ``type`` OpenAI's API reports for it.
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    421: "invalid_request_error",
    429: "rate_limit_error",
    499: "cancelled",
    500: "server_error",
    503: "server_error",
    504: "timeout_error",
}


@final
class APIError(Exception):
    """An error response: ``status`` and the fields of OpenAI's ``{"error": {...}}`` body.

    ``param`` names the request field at fault (``"messages[1].role"``, ``"max_tokens"``) when
    there is one; ``headers`` carries extra response headers (``Retry-After`` on a 429).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        """The error's ``type`` field."""
        return _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        """The JSON body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def encode(self) -> bytes:
        """The body as UTF-8 JSON bytes."""
        return json.dumps(self.body()).encode()


def shutdown_error() -> APIError:
    """The 503 of a request the server stops serving because it is shutting down."""
    return APIError(503, "the server is shutting down; retry on another instance", code="unavailable")


def from_infer_error(exc: InferError, *, params: dict[str, str] | None = None) -> APIError:
    """Map a typed error from infer onto its HTTP status and OpenAI error fields.

    ``params`` renames core parameter names to the request's field names (the core's
    ``top_logprobs`` is the completions API's ``logprobs``, for instance).
    """
    rename = params or {}
    if isinstance(exc, GrammarError):
        param = rename.get("response_format", "response_format")
        return APIError(400, str(exc).replace("response_format", param, 1), param=param, code="invalid_value")
    if isinstance(exc, InvalidParameterError):
        param = rename.get(exc.parameter, exc.parameter)
        message = f"invalid {param}={exc.value!r}: expected {exc.expected}"
        return APIError(400, message, param=param, code="invalid_value")
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), param=rename.get("prompt", "prompt"), code="context_length_exceeded")
    if isinstance(exc, (InvalidTokenError, EmptyPromptError)):
        return APIError(400, str(exc), param=rename.get("prompt", "prompt"), code="invalid_value")
    if isinstance(exc, ChatTemplateError):
        return APIError(400, str(exc), param="messages", code="invalid_value")
    if isinstance(exc, RequestError):
        return APIError(400, str(exc), code="invalid_value")
    if isinstance(exc, DeadlineExceededError):
        return APIError(504, str(exc), code="deadline_exceeded")
    if isinstance(exc, RequestCancelledError):
        return APIError(499, str(exc), code="cancelled")
    if isinstance(exc, ModelClosedError):
        return shutdown_error()
    if isinstance(exc, BackendError):
        # The message names the backend and the failure, not the stack: that stays in the server's log.
        return APIError(500, f"the model failed while generating: {exc}", code="backend_error")
    return APIError(500, f"{type(exc).__name__}: {exc}", code="internal_error")
