"""The ``infer`` command line (entry point :func:`main`); run it as ``infer`` or ``python -m infer.cli``."""

from __future__ import annotations

from infer.cli.main import main

__all__ = ["main"]
