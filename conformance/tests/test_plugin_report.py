"""The pytest plugin end to end: a run on the fake ends with a certificate, printed and written as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infer_conformance.runner import run_suite

pytestmark = pytest.mark.integration


def test_a_run_prints_the_certificate_and_writes_it_as_json(tmp_path):
    report = tmp_path / "certificate.json"
    result = run_suite(
        "--pyargs",
        "infer_conformance.suite.test_goldens",
        "infer_conformance.suite.test_capabilities",
        "infer_conformance.suite.test_load",
        "--infer-backend=fake",
        f"--infer-report={report}",
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "infer conformance certificate" in result.stdout
    assert "CERTIFIED" in result.stdout
    cert = json.loads(report.read_text())
    assert (cert["backend"], cert["device"], cert["dtype"]) == ("fake", "cpu", "fp32")
    assert cert["fixtures"]["llama"]["status"] == "skipped"
    assert "synthetic" in cert["fixtures"]["llama"]["skip_reasons"][0]
    assert cert["capabilities"]["deterministic"]["status"] == "passed"
    assert cert["capabilities"]["device_sampling"]["status"] == "skipped"
    assert cert["contracts"]["load"]["status"] == "passed"
    assert cert["tests"]["failed"] == 0 and cert["certified"] is True
    assert all(entry["reason"] for entry in cert["skipped"])


def test_a_correct_device_sampler_passes_every_device_sampling_and_token_mask_test():
    result = run_suite(
        "--pyargs",
        "infer_conformance.suite.test_capabilities",
        "--infer-plugin=controls:DEVICE_SAMPLING",
        "--infer-backend=control-device-sampling",
        "-k",
        "device_sampler",
        path=Path(__file__).parent,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "capability device_sampling: passed" in result.stdout
    assert "capability token_mask: passed" in result.stdout
    assert "12 passed" in result.stdout
