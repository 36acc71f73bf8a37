"""Backend discovery and routing.

Backends are found through the entry-point group ``infer.backends``. Each one is imported,
registered and validated on its own: a plugin that fails to import, implements an unknown hook,
or declares an incompatible contract is recorded as a :class:`PluginFailure` and skipped, and
the others still load. ``INFER_PLUGINS`` (comma-separated allow-list) and
``INFER_DISABLE_PLUGINS`` (block-list) select which entry points are even imported.

Calls for a model are routed: prefill, decode and sample reach only the backend that loaded
the model, plus wrapper hookimpls and plugins that are not backends. Each backend also gets the
host sampling chain (no backend's sampler at all), for rows its device sampler must not draw.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from typing import Any, final

import pluggy

from infer import hookspecs
from infer.contract import CONTRACT_VERSION, BackendInfo, contract_compatible
from infer.errors import BackendNotFoundError, ContractVersionError, PluginError

__all__ = ["ENTRY_POINT_GROUP", "Backend", "PluginFailure", "Registry", "get_registry", "reset_registry"]

#: Entry-point group backends register under.
ENTRY_POINT_GROUP = "infer.backends"
_ROUTED_HOOKS = (
    "infer_load",
    "infer_prefill",
    "infer_decode",
    "infer_sample",
    "infer_truncate",
    "infer_fork",
    "infer_prefill_all",
    "infer_draft",
)


@final
@dataclass(frozen=True, slots=True)
class PluginFailure:
    """A plugin that was found but could not be used, and why."""

    name: str
    version: str | None
    error: str


@final
@dataclass(frozen=True, slots=True)
class Backend:
    """A registered backend: its declared info and the hooks routed to it alone."""

    name: str
    version: str | None
    info: BackendInfo
    plugin: object
    hooks: RoutedHooks


@final
@dataclass(frozen=True, slots=True)
class RoutedHooks:
    """Hook callers that reach one backend (plus wrappers and non-backend plugins)."""

    load: Any
    prefill: Any
    decode: Any
    sample: Any
    #: Contract 1.1 hooks, called only when the backend declares the matching capability.
    truncate: Any
    fork: Any
    prefill_all: Any
    #: Contract 1.3: approximate decode steps, called only when the backend declares ``DRAFT``.
    draft: Any
    #: ``infer_sample`` without any backend's own sampler: the core's default chain and the
    #: plugins wrapping it. Constrained rows go here when the backend does not declare
    #: :attr:`~infer.Capability.TOKEN_MASK` (contract 1.2).
    host_sample: Any
    pm: PluginManager

    def direct(self, caller: Any) -> Any:
        """A callable taking the hook's arguments positionally, equivalent to ``caller`` now.

        When a hook has exactly one implementation and no wrapper, that implementation is
        called straight away, skipping pluggy's per-call bookkeeping on the per-token path.
        The result is valid until ``pm.generation`` changes (a plugin was added or removed).
        """
        spec_args = tuple(caller.spec.argnames)
        impls = caller.get_hookimpls()
        if len(impls) != 1 or impls[0].hookwrapper or impls[0].wrapper:

            def through_pluggy(*args: Any) -> Any:
                return caller(**dict(zip(spec_args, args, strict=True)))

            return through_pluggy
        function, argnames = impls[0].function, tuple(impls[0].argnames)
        if argnames == spec_args:
            return function  # the common case: same arguments, same order
        picks = [spec_args.index(name) for name in argnames]

        def call(*args: Any) -> Any:
            return function(*[args[i] for i in picks])

        return call


class PluginManager(pluggy.PluginManager):
    """pluggy's manager, counting registrations so routed fast paths know when to refresh."""

    #: Bumped on every register/unregister.
    generation = 0

    def register(self, plugin: Any, name: str | None = None) -> str | None:
        try:
            return super().register(plugin, name)
        finally:
            self.generation += 1

    def unregister(self, plugin: Any | None = None, name: str | None = None) -> Any | None:
        try:
            return super().unregister(plugin, name)
        finally:
            self.generation += 1


class Registry:
    """The plugin manager and what discovery found. One per process, see :func:`get_registry`."""

    def __init__(self, *, entry_points: Iterable[metadata.EntryPoint] | None = None, env: dict[str, str] | None = None):
        from infer.sampling import DefaultSampler

        environ = os.environ if env is None else env
        self.pm = PluginManager("infer")
        self.pm.add_hookspecs(hookspecs)
        self.pm.register(DefaultSampler(), name="infer.sampling")
        self.failures: list[PluginFailure] = []
        self.disabled: list[str] = []
        self._backends: dict[str, Backend] = {}
        self._infos: dict[str, tuple[object, str | None, BackendInfo]] = {}
        allow = _name_list(environ.get("INFER_PLUGINS"))
        block = _name_list(environ.get("INFER_DISABLE_PLUGINS"))
        eps = metadata.entry_points(group=ENTRY_POINT_GROUP) if entry_points is None else entry_points
        for ep in sorted(eps, key=lambda e: e.name):
            if (allow is not None and ep.name not in allow) or (block is not None and ep.name in block):
                self.disabled.append(ep.name)
                continue
            version = ep.dist.version if ep.dist is not None else None
            try:
                plugin = ep.load()
            except Exception as exc:  # noqa: BLE001 - a broken plugin must never break discovery
                self._fail(ep.name, version, f"import failed: {type(exc).__name__}: {exc}")
                continue
            self.add(plugin, name=ep.name, version=version)
        self._route()

    def add(self, plugin: object, *, name: str, version: str | None = None) -> bool:
        """Register ``plugin`` under ``name``; record and skip it if it does not validate."""
        try:
            self.pm.register(plugin, name=name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            self._fail(name, version, f"hook validation failed: {exc}")
            return False
        unknown = [hc.name for hc in self.pm.get_hookcallers(plugin) or () if not hc.has_spec()]
        if unknown:
            self.pm.unregister(plugin)
            self._fail(
                name, version, f"implements unknown hooks {unknown}; check their spelling against infer.hookspecs"
            )
            return False
        impls = [i for i in self.pm.hook.infer_backend_info.get_hookimpls() if i.plugin is plugin]
        if not impls:
            return True  # an extension (wrappers, tracing), not a backend
        try:
            info = impls[0].function()
            if not isinstance(info, BackendInfo):
                raise TypeError(f"infer_backend_info returned {type(info).__name__}, not infer.BackendInfo")
            if not contract_compatible(info.contract_version):
                raise ContractVersionError(
                    plugin=name, version=version, plugin_contract=info.contract_version, core_contract=CONTRACT_VERSION
                )
            if info.name in self._infos:
                raise PluginError(f"backend name {info.name!r} is already taken", plugin=name, version=version)
        except Exception as exc:  # noqa: BLE001 - report and skip, whatever the plugin did
            self.pm.unregister(plugin)
            msg = str(exc) if isinstance(exc, ContractVersionError) else f"{type(exc).__name__}: {exc}"
            self._fail(name, version, msg)
            return False
        self._infos[info.name] = (plugin, version, info)
        return True

    def _fail(self, name: str, version: str | None, error: str) -> None:
        from infer.log import get_logger

        self.failures.append(PluginFailure(name, version, error))
        get_logger().warning("plugin.failed", plugin=name, version=version, error=error)

    def _route(self) -> None:
        self._backends.clear()
        plugins = {name: plugin for name, (plugin, _, _) in self._infos.items()}
        host_sample = self.pm.subset_hook_caller("infer_sample", list(plugins.values()))
        for name, (plugin, version, info) in self._infos.items():
            others = [p for n, p in plugins.items() if n != name]
            load, prefill, decode, sample, truncate, fork, prefill_all, draft = (
                self.pm.subset_hook_caller(h, others) for h in _ROUTED_HOOKS
            )
            hooks = RoutedHooks(
                load=load,
                prefill=prefill,
                decode=decode,
                sample=sample,
                truncate=truncate,
                fork=fork,
                prefill_all=prefill_all,
                draft=draft,
                pm=self.pm,
                host_sample=host_sample,
            )
            self._backends[name] = Backend(name, version, info, plugin, hooks)

    def register_backend(self, plugin: object, *, name: str, version: str | None = None) -> Backend:
        """Register a backend object at run time (tests, embedding apps); raise if it is refused."""
        before = len(self.failures)
        if not self.add(plugin, name=name, version=version):
            raise PluginError(self.failures[before].error if len(self.failures) > before else "refused", plugin=name)
        self._route()
        for backend in self._backends.values():
            if backend.plugin is plugin:
                return backend
        raise PluginError(f"plugin {name!r} does not implement infer_backend_info", plugin=name)

    def unregister(self, plugin: object) -> None:
        """Remove a plugin registered at run time."""
        self.pm.unregister(plugin)
        self._infos = {n: v for n, v in self._infos.items() if v[0] is not plugin}
        self._route()

    @property
    def backends(self) -> dict[str, Backend]:
        """Registered backends by name."""
        return dict(self._backends)

    def backend(self, name: str) -> Backend:
        """The backend called ``name``, or a typed error listing what is installed."""
        try:
            return self._backends[name]
        except KeyError:
            failed = next((f for f in self.failures if f.name == name), None)
            if failed is not None:
                raise BackendNotFoundError(
                    f"backend {name!r} is installed but failed to load: {failed.error}",
                    plugin=name,
                    version=failed.version,
                ) from None
            installed = ", ".join(sorted(self._backends)) or "none"
            hint = f"pip install 'infer-core[{name}]'" if name in ("onnx", "coreml", "fake") else "install its plugin"
            raise BackendNotFoundError(
                f"no backend named {name!r} (installed: {installed}); {hint}", plugin=name
            ) from None

    def ranked(self) -> list[Backend]:
        """Available backends, most preferred first."""
        usable = [b for b in self._backends.values() if b.info.available]
        return sorted(usable, key=lambda b: (-b.info.priority, b.name))


def _name_list(value: str | None) -> set[str] | None:
    if value is None:
        return None
    return {part.strip() for part in value.split(",") if part.strip()}


_registry: Registry | None = None
_lock = threading.Lock()


def get_registry() -> Registry:
    """The process-wide registry, discovering plugins on first use."""
    global _registry
    with _lock:
        if _registry is None:
            _registry = Registry()
        return _registry


def reset_registry(registry: Registry | None = None) -> None:
    """Replace (or forget) the process-wide registry; the next use rediscovers plugins."""
    global _registry
    with _lock:
        _registry = registry
