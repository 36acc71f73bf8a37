"""Finding the family modules and dispatching ``config.json`` to the one that reads it."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import Any, Final

from infer.arch.spec import ArchSpec
from infer.errors import UnsupportedModelError

__all__ = ["registry", "spec_from_config", "supported_architectures"]

#: Modules of the package that are not families.
_NOT_FAMILIES: Final = frozenset({"spec", "registry"})

Reader = Callable[..., ArchSpec]


@cache
def registry() -> Mapping[str, Reader]:
    """``model_type`` -> the family module's ``from_config``, for every family module here."""
    found: dict[str, Reader] = {}
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name.startswith("_") or info.name in _NOT_FAMILIES:
            continue
        module = importlib.import_module(f"infer.arch.{info.name}")
        for model_type in getattr(module, "MODEL_TYPES", ()):
            found[model_type] = module.from_config
    return found


def supported_architectures() -> frozenset[str]:
    """Every ``model_type`` the registry reads."""
    return frozenset(registry())


def spec_from_config(config: Mapping[str, Any], *, path: Path | None = None) -> ArchSpec:
    """Validate a parsed ``config.json`` into an :class:`ArchSpec` through its family module.

    Raises :class:`~infer.errors.UnsupportedModelError` for a family (or a feature of one)
    infer does not run and :class:`~infer.errors.ModelFormatError` for malformed values.
    """
    model_type = str(config.get("model_type", ""))
    reader = registry().get(model_type)
    if reader is None:
        raise UnsupportedModelError(
            f"config.json: model_type {model_type!r} is not supported; "
            f"supported: {', '.join(sorted(supported_architectures()))}",
            path=path,
        )
    return reader(config, path=path)
