"""Plugin objects the discovery tests register through synthetic entry points."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import infer


class Backend:
    """A minimal valid backend that never loads anything."""

    def __init__(self, name: str = "sample", contract: str | None = None) -> None:
        self.name = name
        self.contract = contract or infer.CONTRACT_VERSION
        self.prefill_calls = 0

    @infer.hookimpl
    def infer_backend_info(self) -> infer.BackendInfo:
        return infer.BackendInfo(name=self.name, version="1.2.3", contract_version=self.contract)

    @infer.hookimpl
    def infer_load(self, spec: infer.LoadSpec, options: Any) -> None:
        return None

    @infer.hookimpl
    def infer_prefill(self, model: Any, batch: Any) -> Any:
        self.prefill_calls += 1
        return None


class Typo:
    """Implements a hook that does not exist (a misspelt name)."""

    @infer.hookimpl
    def infer_backend_info(self) -> infer.BackendInfo:
        return infer.BackendInfo(name="typo", version="0.1", contract_version=infer.CONTRACT_VERSION)

    @infer.hookimpl
    def infer_prefil(self, model: Any, batch: Any) -> Any:
        return None


class BadInfo:
    """Returns something that is not a BackendInfo."""

    @infer.hookimpl
    def infer_backend_info(self) -> Any:
        return {"name": "bad"}


class Unavailable(Backend):
    @infer.hookimpl
    def infer_backend_info(self) -> infer.BackendInfo:
        info = super().infer_backend_info()
        return replace(info, unavailable_reason="needs a platform this machine is not")


GOOD = Backend("good")
OTHER = Backend("other")
FUTURE = Backend("future", contract="2.0")
TYPO = Typo()
BAD_INFO = BadInfo()
UNAVAILABLE = Unavailable("away")
