"""Discovery: broken plugins are reported and skipped, versions are checked, calls are routed."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import plugin_samples
import pytest

import infer
from infer.plugins import Registry

pytestmark = pytest.mark.integration


def ep(name: str, value: str) -> metadata.EntryPoint:
    return metadata.EntryPoint(name=name, value=value, group="infer.backends")


def registry(*eps: metadata.EntryPoint, **env: str) -> Registry:
    return Registry(entry_points=list(eps), env=env)


def test_a_plugin_that_fails_to_import_is_reported_and_the_others_still_load():
    reg = registry(ep("broken", "broken_import_plugin"), ep("good", "plugin_samples:GOOD"))
    assert list(reg.backends) == ["good"]
    [failure] = reg.failures
    assert failure.name == "broken"
    assert "a_module_that_is_not_installed" in failure.error


def test_a_plugin_implementing_an_unknown_hook_is_reported_and_skipped():
    reg = registry(ep("typo", "plugin_samples:TYPO"), ep("good", "plugin_samples:GOOD"))
    assert list(reg.backends) == ["good"]
    assert "infer_prefil" in reg.failures[0].error


def test_a_backend_built_for_another_contract_major_is_refused_naming_both_versions():
    reg = registry(ep("future", "plugin_samples:FUTURE"))
    assert reg.backends == {}
    error = reg.failures[0].error
    assert "'future'" in error and "2.0" in error and infer.CONTRACT_VERSION in error


def test_backend_info_of_the_wrong_type_is_reported():
    reg = registry(ep("bad", "plugin_samples:BAD_INFO"))
    assert reg.backends == {}
    assert "BackendInfo" in reg.failures[0].error


def test_the_allow_list_imports_only_the_named_plugins():
    reg = registry(ep("good", "plugin_samples:GOOD"), ep("broken", "broken_import_plugin"), INFER_PLUGINS="good")
    assert list(reg.backends) == ["good"]
    assert reg.failures == []
    assert reg.disabled == ["broken"]


def test_the_block_list_skips_the_named_plugins():
    reg = registry(ep("good", "plugin_samples:GOOD"), ep("other", "plugin_samples:OTHER"), INFER_DISABLE_PLUGINS="good")
    assert list(reg.backends) == ["other"]
    assert reg.disabled == ["good"]


def test_a_missing_backend_is_a_typed_error_listing_what_is_installed():
    reg = registry(ep("good", "plugin_samples:GOOD"))
    with pytest.raises(infer.BackendNotFoundError, match="installed: good") as raised:
        reg.backend("onnx")
    assert isinstance(raised.value, LookupError)
    assert "infer-core[onnx]" in str(raised.value)


def test_a_failed_backend_asked_for_by_name_says_why_it_failed():
    reg = registry(ep("broken", "broken_import_plugin"))
    with pytest.raises(infer.BackendNotFoundError, match="failed to load"):
        reg.backend("broken")


def test_calls_are_routed_only_to_the_backend_that_owns_the_model():
    plugin_samples.GOOD.prefill_calls = plugin_samples.OTHER.prefill_calls = 0
    reg = registry(ep("good", "plugin_samples:GOOD"), ep("other", "plugin_samples:OTHER"))
    reg.backend("good").hooks.prefill(model=object(), batch=object())
    assert plugin_samples.GOOD.prefill_calls == 1
    assert plugin_samples.OTHER.prefill_calls == 0


def test_wrappers_see_the_calls_of_every_backend():
    seen = []

    class Tracer:
        @infer.hookimpl(wrapper=True)
        def infer_prefill(self, model, batch):
            seen.append(model)
            return (yield)

    reg = registry(ep("good", "plugin_samples:GOOD"), ep("other", "plugin_samples:OTHER"))
    reg.pm.register(Tracer())
    reg.backend("good").hooks.prefill(model="a", batch=None)
    reg.backend("other").hooks.prefill(model="b", batch=None)
    assert seen == ["a", "b"]


def test_unavailable_backends_are_listed_but_never_chosen_by_default():
    reg = registry(ep("away", "plugin_samples:UNAVAILABLE"), ep("good", "plugin_samples:GOOD"))
    assert set(reg.backends) == {"away", "good"}
    assert [b.name for b in reg.ranked()] == ["good"]


def test_loading_on_an_unavailable_backend_says_why(monkeypatch):
    reg = registry(ep("away", "plugin_samples:UNAVAILABLE"))
    with pytest.raises(infer.BackendUnavailableError, match="needs a platform"):
        infer.load("anything", backend="away", registry=reg)


def test_registering_a_backend_at_run_time_refuses_a_name_already_taken():
    reg = registry(ep("good", "plugin_samples:GOOD"))
    with pytest.raises(infer.PluginError, match="already taken"):
        reg.register_backend(plugin_samples.Backend("good"), name="again")


def test_discovery_imports_no_backend_runtime():
    code = (
        "import sys; from infer.plugins import get_registry; r = get_registry();"
        "print(sorted(r.backends), [m for m in ('onnxruntime', 'onnx', 'coremltools') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("[]"), out
    assert "'fake'" in out
