"""structlog events: human-readable by default, JSON with INFER_LOG_FORMAT=json."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

SCRIPT = (
    "import infer; m = infer.load('fake', backend='fake');"
    "m.generate([1, 2, 3], max_tokens=4, temperature=0, ignore_eos=True); m.close()"
)


def run(**env: str) -> str:
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=full, check=True).stderr


def test_json_events_describe_loading_and_each_request():
    lines = [json.loads(line) for line in run(INFER_LOG_FORMAT="json", INFER_LOG_LEVEL="info").splitlines()]
    events = {e["event"]: e for e in lines}
    assert events["model.loaded"]["backend"] == "fake"
    assert events["model.loaded"]["device"] == "cpu"
    assert "load_s" in events["model.loaded"]
    assert events["request.started"]["prompt_tokens"] == 3
    assert events["request.first_token"]["ttft_s"] > 0
    finished = events["request.finished"]
    assert finished["completion_tokens"] == 4
    assert finished["finish_reason"] == "length"
    assert finished["decode_tok_s"] > 0
    assert finished["request_id"] == events["request.started"]["request_id"]


def test_events_are_human_readable_by_default():
    out = run(INFER_LOG_LEVEL="info")
    assert "model.loaded" in out and "backend=fake" in out
    assert not out.lstrip().startswith("{")


def test_nothing_is_logged_at_the_default_level():
    env = {k: v for k, v in os.environ.items() if k != "INFER_LOG_LEVEL"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, check=True).stderr
    assert out == ""


def test_process_fields_ride_on_every_later_event():
    # What a Ray Serve replica does at start-up: its id then tags the engine's events too.
    script = "from infer.log import bind_process_fields; bind_process_fields(replica='r1'); " + SCRIPT
    full = {**os.environ, "INFER_LOG_FORMAT": "json", "INFER_LOG_LEVEL": "info"}
    err = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=full, check=True).stderr
    events = [json.loads(line) for line in err.splitlines()]
    assert {e["event"] for e in events} >= {"model.loaded", "request.finished"}
    assert all(e["replica"] == "r1" for e in events)
