"""``infer serve``: an OpenAI-compatible HTTP server over one loaded model (the ``serve`` extra).

``create_app(model, model_name=...)`` builds the Starlette app; ``infer serve MODEL`` runs it
under uvicorn. Names load on first use, so importing this package (as the CLI does to
register the command) needs neither Starlette nor uvicorn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from infer._lazy import lazy_attributes

if TYPE_CHECKING:
    from infer.serve.app import create_app
    from infer.serve.cli import add_serve_command
    from infer.serve.errors import APIError

__all__ = ["APIError", "add_serve_command", "create_app"]

_LAZY = {
    "APIError": "infer.serve.errors",
    "add_serve_command": "infer.serve.cli",
    "create_app": "infer.serve.app",
}


__getattr__, __dir__ = lazy_attributes("infer.serve", globals(), _LAZY, __all__)
