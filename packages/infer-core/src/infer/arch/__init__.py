"""The architecture registry: ``config.json`` -> :class:`ArchSpec`, one module per family.

A family module in this package defines ``MODEL_TYPES`` (the ``model_type`` values it reads)
and ``from_config(config, *, path=None) -> ArchSpec``; the registry (:mod:`infer.arch.registry`)
finds every such module, so adding a family is adding a file. Backends and the reference
forward build from the spec's fields, never from ``model_type``.
"""

from __future__ import annotations

from infer.arch.registry import registry, spec_from_config, supported_architectures
from infer.arch.spec import ACTIVATIONS, FEATURES, ArchSpec

__all__ = ["ACTIVATIONS", "FEATURES", "ArchSpec", "registry", "spec_from_config", "supported_architectures"]
