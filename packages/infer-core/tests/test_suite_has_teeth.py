"""The conformance suite must fail on every deliberately broken backend (and pass on the fake)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HERE = Path(__file__).parent


def run_suite(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    env.pop("COV_CORE_SOURCE", None)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--pyargs",
            "infer_conformance",
            "-q",
            "-p",
            "no:cacheprovider",
            "--no-header",
            "--tb=native",  # plain tracebacks: the report stays readable however broken the backend
            "-p",
            "no:hypothesispytest",
            "-o",
            "addopts=",
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )


@pytest.mark.parametrize(
    ("variant", "backend", "must_fail"),
    [
        ("KV_NOT_APPENDED", "broken-kv", "test_prefill_then_decode_equals_prefill_of_the_whole_prompt"),
        ("SEED_IGNORED", "broken-seed", "test_the_same_seed_gives_the_same_tokens"),
        ("CANCELLATION_IGNORED", "broken-cancel", "test_ending_a_stream_stops_backend_work_within_one_step"),
        ("PERTURBED_LOGITS", "broken-logits", "test_prefill_then_decode_equals_prefill_of_the_whole_prompt"),
        ("WRONG_VOCAB", "broken-vocab", "test_prefill_returns_float32_logits_of_shape_rows_by_vocab"),
    ],
)
def test_the_suite_fails_on_a_broken_backend(variant, backend, must_fail):
    result = run_suite(f"--infer-plugin=broken_backends:{variant}", f"--infer-backend={backend}", "-m", "not slow")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "FAILED" in result.stdout
    assert must_fail in result.stdout, result.stdout[-3000:]
