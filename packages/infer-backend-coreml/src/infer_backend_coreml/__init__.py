"""infer-backend-coreml: a stateful prefill/decode Core ML package built from a model bundle.

The hooks live in :mod:`infer_backend_coreml.plugin`; the graph builder in
:mod:`infer_backend_coreml.builder`. Nothing here imports coremltools until a model is built or
loaded.
"""

from __future__ import annotations

from infer_backend_coreml.options import BuildConfig, LoadConfig, parse_options

__all__ = ["BuildConfig", "LoadConfig", "__version__", "parse_options"]

__version__ = "0.1.0"
