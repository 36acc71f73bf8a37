"""The pytest plugin behind ``pytest --pyargs infer_conformance --infer-backend NAME``.

Options:

``--infer-backend NAME``     the backend under test (required to run the suite)
``--infer-model REF``        the model to load (default: the tiny Llama bundle shipped here)
``--infer-device DEVICE``    device to load on (default: the backend's)
``--infer-dtype DTYPE``      precision (default: the backend's)
``--infer-option KEY=VALUE`` backend load option, JSON value (repeatable)
``--infer-plugin MOD[:ATTR]`` register a backend object that is not installed as an entry point
``--infer-report FILE``      write the run's certificate as JSON
``--infer-max-context N``    fill at most N positions in the long-context and resource tests (default: the
                             model's whole context; for quick runs on models with long contexts)

Capabilities declared in ``infer_backend_info`` decide which tests apply (:func:`require`); a
test that does not apply is skipped with the reason, never passed silently. The run ends with a
certificate (:mod:`infer_conformance.certificate`) of what was checked and with what outcome.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from infer_conformance.certificate import Certificate

if TYPE_CHECKING:  # the plugin imports infer only when a fixture runs: pytest loads it for every run
    import infer
    from infer.plugins import Registry

__all__ = ["SuiteConfig", "require"]

_CERTIFICATE = pytest.StashKey[Certificate]()
_KEYS = pytest.StashKey[dict[str, list[str]]]()


@dataclass(frozen=True)
class SuiteConfig:
    """What the suite runs against."""

    backend: str
    model: str
    device: str | None = None
    dtype: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    #: Most positions the long-context and resource tests fill (``None``: the whole context).
    max_context: int | None = None

    def context(self, model: infer.Model) -> int:
        """Positions the long-context and resource tests fill on ``model``."""
        return min(model.context_length, self.max_context or model.context_length)

    def load(self, **overrides: Any) -> infer.Model:
        """Load a fresh model with the configured settings (plus ``overrides``)."""
        import infer

        options = {**self.options, **overrides}
        return infer.load(self.model, backend=self.backend, device=self.device, dtype=self.dtype, **options)

    def load_ref(self, ref: str | Path, **overrides: Any) -> infer.Model:
        """Load another model (a family fixture, say) with the configured backend, device, dtype and options."""
        import infer

        options = {**self.options, **overrides}
        return infer.load(ref, backend=self.backend, device=self.device, dtype=self.dtype, **options)

    def info(self) -> infer.BackendInfo:
        """The backend's declared :class:`infer.BackendInfo`, without loading a model."""
        from infer.plugins import get_registry

        return get_registry().backend(self.backend).info


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("infer-conformance", "infer backend conformance suite")
    group.addoption("--infer-backend", help="backend under test")
    group.addoption("--infer-model", help="model reference (default: the tiny Llama fixture)")
    group.addoption("--infer-device", help="device to load on")
    group.addoption("--infer-dtype", help="precision to load")
    group.addoption("--infer-option", action="append", default=[], metavar="KEY=VALUE", help="backend load option")
    group.addoption("--infer-plugin", action="append", default=[], metavar="MOD[:ATTR]", help="register a backend")
    group.addoption("--infer-report", metavar="FILE", help="write the certificate of the run as JSON to FILE")
    group.addoption(
        "--infer-max-context", type=int, metavar="N", help="fill at most N positions in the long-context tests"
    )


def pytest_configure(config: pytest.Config) -> None:
    for marker in (
        "conformance: the shared backend suite",
        "slow: takes more than a few seconds",
        "stress: many threads or requests",
        "certifies(key): what a suite test certifies (family:NAME, capability:NAME, contract:NAME)",
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
    config.stash[_CERTIFICATE] = Certificate()
    config.stash[_KEYS] = {}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keys = config.stash[_KEYS]
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and module.__name__.startswith("infer_conformance.suite"):
            keys[item.nodeid] = [key for mark in item.iter_markers("certifies") for key in mark.args]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    keys = item.config.stash[_KEYS].get(item.nodeid)
    if keys is not None:
        _record(item.config.stash[_CERTIFICATE], report, keys)
    return report


def _record(certificate: Certificate, report: pytest.TestReport, keys: list[str]) -> None:
    previous = certificate.outcomes.get(report.nodeid)
    if report.failed:
        outcome, reason = "failed", None
    elif report.skipped:
        outcome, reason = "skipped", _skip_reason(report)
    elif report.when == "call":
        outcome, reason = "passed", None
    else:
        return
    if previous is not None and not (previous == "passed" and outcome == "failed"):
        return  # setup decided it (skipped or failed), or the call did and teardown passed
    certificate.record(report.nodeid, keys, outcome, reason)


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    certificate = config.stash.get(_CERTIFICATE, None)
    if certificate is None or not certificate.outcomes or not config.getoption("--infer-backend"):
        return
    terminalreporter.section("infer conformance certificate")
    for line in certificate.lines():
        terminalreporter.write_line(line)


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    report = config.getoption("--infer-report", default=None)
    certificate = config.stash.get(_CERTIFICATE, None)
    if report and certificate is not None:
        certificate.write(Path(report))


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
        max_context=pytestconfig.getoption("--infer-max-context"),
        options=options,
    )


@pytest.fixture(scope="session")
def suite(pytestconfig: pytest.Config) -> SuiteConfig:
    """The backend, model and options under test."""
    import infer

    config = _config(pytestconfig)
    info = config.info()
    certificate = pytestconfig.stash.get(_CERTIFICATE, None)
    if certificate is not None:
        # What was asked; the shared model fills in what the backend actually loaded.
        certificate.facts.update(
            backend=info.name,
            version=info.version,
            contract_version=info.contract_version,
            core_contract_version=infer.CONTRACT_VERSION,
            device=config.device or info.devices[0],
            dtype=config.dtype or info.dtypes[0],
            model=config.model,
            declared_capabilities=sorted(c.value for c in info.capabilities),
        )
    return config


@pytest.fixture(scope="session")
def model(suite: SuiteConfig, pytestconfig: pytest.Config) -> Iterator[infer.Model]:
    """One model shared by the tests that leave it as they found it."""
    loaded = suite.load()
    certificate = pytestconfig.stash.get(_CERTIFICATE, None)
    if certificate is not None:
        certificate.facts.update(device=loaded.device, dtype=loaded.dtype, logits_atol=loaded.logits_atol)
    yield loaded
    loaded.close()


@pytest.fixture
def fresh_model(suite: SuiteConfig) -> Iterator[infer.Model]:
    """A model of its own, for tests that inject faults or watch backend calls."""
    loaded = suite.load()
    yield loaded
    loaded.close()


@pytest.fixture
def info(model: infer.Model) -> infer.BackendInfo:
    """The backend's declared :class:`infer.BackendInfo`."""
    return model.info


@pytest.fixture
def registry() -> Registry:
    """The process-wide plugin registry (to add wrapper plugins)."""
    from infer.plugins import get_registry

    return get_registry()


def require(info: infer.BackendInfo, capability: infer.Capability) -> None:
    """Skip the calling test, saying why, unless the backend declares ``capability``."""
    if capability not in info.capabilities:
        pytest.skip(f"backend {info.name!r} does not declare the {capability.value!r} capability")
