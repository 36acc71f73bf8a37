"""ONNX Runtime backend for infer.

The hooks live in :mod:`infer_backend_onnx.plugin` (entry point ``infer.backends: onnx``).
This package imports neither onnx nor onnxruntime until a model is loaded.
"""

from __future__ import annotations

__all__: list[str] = []
