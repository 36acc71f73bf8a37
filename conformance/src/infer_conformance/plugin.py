"""The pytest plugin behind ``pytest --pyargs infer_conformance --infer-backend NAME``.

Options:

``--infer-backend NAME``     the backend under test (required to run the suite)
``--infer-model REF``        the model to load (default: the tiny Llama bundle shipped here)
``--infer-device DEVICE``    device to load on (default: the backend's)
``--infer-dtype DTYPE``      precision (default: the backend's)
``--infer-option KEY=VALUE`` backend load option, JSON value (repeatable)
``--infer-plugin MOD[:ATTR]`` register a backend object that is not installed as an entry point

Capabilities declared in ``infer_backend_info`` decide which tests apply; a test that does not
apply is skipped with the reason, never passed silently.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

__all__ = ["SuiteConfig"]


@dataclass(frozen=True)
class SuiteConfig:
    """What the suite runs against."""

    backend: str
    model: str
    device: str | None = None
    dtype: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def load(self, **overrides: Any) -> Any:
        """Load a fresh model with the configured settings (plus ``overrides``)."""
        import infer

        options = {**self.options, **overrides}
        return infer.load(self.model, backend=self.backend, device=self.device, dtype=self.dtype, **options)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("infer-conformance", "infer backend conformance suite")
    group.addoption("--infer-backend", help="backend under test")
    group.addoption("--infer-model", help="model reference (default: the tiny Llama fixture)")
    group.addoption("--infer-device", help="device to load on")
    group.addoption("--infer-dtype", help="precision to load")
    group.addoption("--infer-option", action="append", default=[], metavar="KEY=VALUE", help="backend load option")
    group.addoption("--infer-plugin", action="append", default=[], metavar="MOD[:ATTR]", help="register a backend")


def pytest_configure(config: pytest.Config) -> None:
    for marker in (
        "conformance: the shared backend suite",
        "slow: takes more than a few seconds",
        "stress: many threads or requests",
    ):
        config.addinivalue_line("markers", marker)
    plugins = config.getoption("--infer-plugin", default=[])
    if plugins:
        from infer.plugins import get_registry

        registry = get_registry()
        for ref in plugins:
            module_name, _, attr = ref.partition(":")
            obj = importlib.import_module(module_name)
            if attr:
                obj = getattr(obj, attr)
            registry.register_backend(obj, name=ref)


def _config(pytestconfig: pytest.Config) -> SuiteConfig:
    backend = pytestconfig.getoption("--infer-backend")
    if not backend:
        pytest.skip("no backend under test: run with --infer-backend NAME")
    options: dict[str, Any] = {}
    for pair in pytestconfig.getoption("--infer-option"):
        key, _, value = pair.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    model = pytestconfig.getoption("--infer-model")
    if model is None:
        from infer_conformance.fixtures import TINY_LLAMA

        model = str(TINY_LLAMA)
    return SuiteConfig(
        backend=backend,
        model=model,
        device=pytestconfig.getoption("--infer-device"),
        dtype=pytestconfig.getoption("--infer-dtype"),
        options=options,
    )


@pytest.fixture(scope="session")
def suite(pytestconfig: pytest.Config) -> SuiteConfig:
    """The backend, model and options under test."""
    return _config(pytestconfig)


@pytest.fixture(scope="session")
def model(suite: SuiteConfig) -> Iterator[Any]:
    """One model shared by the tests that leave it as they found it."""
    loaded = suite.load()
    yield loaded
    loaded.close()


@pytest.fixture
def fresh_model(suite: SuiteConfig) -> Iterator[Any]:
    """A model of its own, for tests that inject faults or watch backend calls."""
    loaded = suite.load()
    yield loaded
    loaded.close()


@pytest.fixture
def info(model: Any) -> Any:
    """The backend's declared :class:`infer.BackendInfo`."""
    return model.info


@pytest.fixture
def registry() -> Any:
    """The process-wide plugin registry (to add wrapper plugins)."""
    from infer.plugins import get_registry

    return get_registry()


def require(info: Any, capability: Any) -> None:
    """Skip the calling test, saying why, unless the backend declares ``capability``."""
    if capability not in info.capabilities:
        pytest.skip(f"backend {info.name!r} does not declare the {capability.value!r} capability")
