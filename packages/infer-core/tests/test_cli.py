"""The ``infer`` command: fast help, one-line errors with exit 2, real output."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import time

import pytest

from infer.cli import main

pytestmark = pytest.mark.integration


def infer_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the CLI in-process (so coverage sees it); return what a subprocess run would."""
    out, err = io.StringIO(), io.StringIO()
    old_stdin, sys.stdin = sys.stdin, io.StringIO(stdin or "")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.stdin = old_stdin
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def test_a_bad_argument_in_a_real_process_prints_one_line_and_no_traceback():
    command = [sys.executable, "-m", "infer.cli", "run", "fake", "hi", "--backend", "fake", "--temperature", "-1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "temperature" in result.stderr and "Traceback" not in result.stderr


def test_help_is_instant_and_imports_no_numeric_library():
    started = time.monotonic()
    code = "import sys; from infer.cli import main; print([m for m in ('numpy', 'onnxruntime') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    result = subprocess.run([sys.executable, "-m", "infer.cli", "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0
    assert "backends" in result.stdout and "run" in result.stdout and "bench" in result.stdout
    assert time.monotonic() - started < 5


def test_run_streams_generated_text_to_stdout():
    result = infer_cli("run", "fake", "hello", "--backend", "fake", "--max-tokens", "8", "--raw", "--stats")
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n")
    assert "8 generated tokens" in result.stderr


def test_run_reads_the_prompt_from_stdin():
    result = infer_cli("run", "fake", "--backend", "fake", "--max-tokens", "3", stdin="hello there")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("run", "fake", "hi", "--backend", "fake", "--temperature", "-1"),
        ("run", "fake", "hi", "--backend", "fake", "--max-tokens", "abc"),
        ("run", "fake", "hi", "--backend", "fake", "--max-tokens", "0"),
        ("run", "fake", "hi", "--backend", "nope"),
        ("run", "/no/such/model/folder", "hi"),
        ("run", "fake", "hi", "--backend", "fake", "-o", "vocab_size=3"),
        ("frobnicate",),
        ("run",),
    ],
)
def test_bad_arguments_exit_2_with_one_line_and_no_traceback(args):
    result = infer_cli(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("infer") and "error" in lines[0]
    assert "Traceback" not in result.stderr


def test_backends_lists_installed_backends_with_their_contract():
    result = infer_cli("backends")
    assert result.returncode == 0
    assert "fake" in result.stdout and "contract" in result.stdout
    data = json.loads(infer_cli("backends", "--json").stdout)
    fake = next(b for b in data["backends"] if b["name"] == "fake")
    assert fake["available"] and "fault_injection" in fake["capabilities"]
    assert data["contract"].startswith("1.")


def test_bench_reports_throughput_ttft_and_memory_as_json():
    result = infer_cli(
        "bench", "fake", "--backend", "fake", "--json", "--new-tokens", "16", "--runs", "1", "--prefill-tokens", "64"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ("decode_tok_s", "ttft_ms", "prefill_tok_s", "peak_rss_mib", "engine_overhead_us_per_token"):
        assert report[key] > 0, key
    assert report["backend"] == "fake" and report["new_tokens"] == 16
    assert report["kv_bytes_per_token"] == 4.0  # the fake caches one int32 per token


def test_run_with_a_regex_prints_text_matching_it(tmp_path):
    result = infer_cli("run", "fake", "hi", "--backend", "fake", "--regex", "[ab]{3}-[0-9]", "--temperature", "1")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip()) == 5 and result.stdout[3] == "-"


def test_run_with_a_json_schema_file_prints_json_that_validates(tmp_path):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    result = infer_cli("run", "fake", "hi", "--backend", "fake", "--json-schema", str(path), "--temperature", "1")
    assert result.returncode == 0, result.stderr
    assert set(json.loads(result.stdout)) == {"ok"}


@pytest.mark.parametrize(
    ("content", "message"), [(None, "cannot read"), ("{not json", "not JSON"), ('{"type": "bogus"}', "bogus")]
)
def test_a_bad_schema_file_is_one_line_naming_the_problem_with_exit_2(tmp_path, content, message):
    path = tmp_path / "schema.json"
    if content is not None:
        path.write_text(content)
    result = infer_cli("run", "fake", "hi", "--backend", "fake", "--json-schema", str(path))
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
