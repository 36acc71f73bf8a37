"""The suite's own bookkeeping: bounds per dtype, certificate aggregation, and capability coverage."""

from __future__ import annotations

import importlib
import json
import pkgutil

import numpy as np
import pytest

import infer
import infer_conformance.suite
from infer_conformance.certificate import Certificate
from infer_conformance.tolerances import BOUNDS, bound_for, grade_logits, model_precision

pytestmark = pytest.mark.unit


def _certified_keys() -> set[str]:
    keys: set[str] = set()
    for module_info in pkgutil.iter_modules(infer_conformance.suite.__path__):
        module = importlib.import_module(f"infer_conformance.suite.{module_info.name}")
        marks = list(getattr(module, "pytestmark", []) if isinstance(getattr(module, "pytestmark", []), list) else [])
        for obj in vars(module).values():
            marks += getattr(obj, "pytestmark", [])
        keys |= {key for mark in marks if mark.name == "certifies" for key in mark.args}
    return keys


def test_every_capability_of_the_contract_has_suite_tests_that_certify_it():
    keys = _certified_keys()
    missing = [c.value for c in infer.Capability if f"capability:{c.value}" not in keys]
    assert not missing, f"capabilities with no suite test: {missing}"


def test_a_declared_tolerance_tightens_the_float_bounds_but_never_loosens_them():
    assert bound_for("fp32", 1.0).atol == BOUNDS["fp32"].atol
    assert bound_for("fp32", 1e-6).atol == 1e-6
    assert bound_for("fp16", 0.1).atol == BOUNDS["fp16"].atol
    assert bound_for("int4", 10.0).atol == BOUNDS["int4"].atol


def test_a_cache_in_a_looser_precision_grades_float_weights_on_the_cache_bound():
    # float32 weights with a float16 cache: every key and value rounds to fp16
    assert bound_for("fp32", 1.0, "fp16").atol == BOUNDS["fp16"].atol
    assert not bound_for("fp32", 1.0, "fp16").quantized
    # the declared tolerance still tightens it
    assert bound_for("fp32", 1e-2, "fp16").atol == 1e-2
    # a cache as precise as the weights, or more, changes nothing; quantized weights keep theirs
    assert bound_for("fp32", 1.0, "fp32") == bound_for("fp32", 1.0)
    assert bound_for("fp16", 1.0, "fp32") == bound_for("fp16", 1.0)
    assert bound_for("int4", 1.0, "fp16") == BOUNDS["int4"]
    with pytest.raises(KeyError, match="fp7"):
        bound_for("fp32", 1e-4, "fp7")


def test_a_precision_without_a_bound_is_refused_by_name():
    with pytest.raises(KeyError, match="fp7"):
        bound_for("fp7", 1e-4)


def test_a_native_model_is_graded_at_the_precision_it_reports_computing():
    assert model_precision("fp16", {"compute_dtype": "native"}) == "fp16"
    # A float bundle loaded native computes float32 and says so.
    assert model_precision("native", {"compute_dtype": "fp32"}) == "fp32"
    # A GGUF: the coarsest of its weight types decides, whatever else it holds.
    native = {"compute_dtype": "native"}
    assert model_precision("native", {**native, "weight_types": ("F32", "Q4_1")}) == "int4"
    assert model_precision("native", {**native, "weight_types": ("F32", "Q6_K", "Q8_0")}) == "int8"
    assert model_precision("native", {**native, "weight_types": ("Q4_K", "Q6_K")}) == "int4"
    assert model_precision("native", {**native, "weight_types": ("F16", "F32")}) == "fp16"
    assert model_precision("native", {**native, "weight_types": ("F32",)}) == "fp32"


def test_a_native_model_that_does_not_say_what_it_computes_or_holds_an_unbounded_type_is_refused():
    with pytest.raises(KeyError, match="neither a compute_dtype"):
        model_precision("native", {"compute_dtype": "native"})
    with pytest.raises(KeyError, match="weights of type Q2_K"):
        model_precision("native", {"weight_types": ("F32", "Q2_K")})


def test_grading_fails_logits_off_by_more_than_the_bound_and_names_the_logit():
    golden = np.zeros((2, 8), np.float32)
    got = golden.copy()
    got[1, 5] = 2e-4
    with pytest.raises(AssertionError, match="logit 5 of row 1"):
        grade_logits(got, golden, bound_for("fp32", 1.0), "test")
    got[1, 5] = 5e-5
    grade_logits(got, golden, bound_for("fp32", 1.0), "test")


def test_quantized_grading_requires_the_golden_favourite_in_the_top_k():
    golden = np.arange(16, dtype=np.float32)[None, :] * 0.1  # favourite: token 15
    shuffled = golden.copy()
    shuffled[0, 15] = 0.05  # within the int4 bound, but out of the top 5
    with pytest.raises(AssertionError, match="golden next token 15"):
        grade_logits(shuffled, golden, bound_for("int4", 1.0), "test")
    grade_logits(golden + 0.3, golden, bound_for("int4", 1.0), "test")


def test_a_key_fails_when_any_test_fails_and_is_skipped_only_when_all_skip(tmp_path):
    cert = Certificate(facts={"backend": "x"})
    cert.record("a", ["capability:batch"], "passed", None)
    cert.record("b", ["capability:batch"], "failed", None)
    cert.record("c", ["family:llama"], "skipped", "does not claim llama")
    cert.record("d", ["contract:load"], "passed", None)
    cert.record("d", ["contract:load"], "failed", None)  # a teardown error after the pass
    data = cert.as_dict()
    assert data["capabilities"]["batch"]["status"] == "failed"
    assert data["fixtures"]["llama"] == {
        "status": "skipped",
        "passed": 0,
        "failed": 0,
        "skipped": 1,
        "skip_reasons": ["does not claim llama"],
    }
    assert data["contracts"]["load"]["status"] == "failed" and data["contracts"]["load"]["passed"] == 0
    assert data["certified"] is False
    assert data["skipped"] == [{"test": "c", "reason": "does not claim llama"}]
    cert.write(tmp_path / "cert.json")
    assert json.loads((tmp_path / "cert.json").read_text())["backend"] == "x"
    assert any("NOT CERTIFIED" in line for line in cert.lines())
