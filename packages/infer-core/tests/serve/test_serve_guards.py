"""Connection-level guards: Host names, and the damper that keeps repeated log lines from flooding."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("starlette", reason="the server needs the serve extra")
from infer.serve.guards import RepeatFilter, host_name

pytestmark = [pytest.mark.unit, pytest.mark.security]


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("localhost", "localhost"),
        ("LocalHost:8000", "localhost"),
        ("127.0.0.1:1", "127.0.0.1"),
        ("[::1]:8000", "::1"),
        ("[::1]", "::1"),
        ("::1", "::1"),
        ("evil.example:80", "evil.example"),
        ("", ""),
    ],
)
def test_host_name_drops_port_brackets_and_case(header: str, name: str) -> None:
    assert host_name(header) == name


def _record(msg: str) -> logging.LogRecord:
    return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None, None)


def test_repeated_log_lines_pass_once_per_interval_and_the_rest_are_counted() -> None:
    damper = RepeatFilter(interval=60.0)
    lines = [f"socket.accept() out of system resource\nsocket: <socket fd={n}>" for n in range(10_000)]
    passed = [damper.filter(_record(line)) for line in lines]
    assert passed.count(True) == 1
    assert damper.dropped == 9_999
    assert damper.filter(_record("a different problem"))  # other messages are not held back


def test_a_repeated_line_passes_again_after_the_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    from infer.serve import guards

    now = [1000.0]
    monkeypatch.setattr(guards.time, "monotonic", lambda: now[0])
    damper = RepeatFilter(interval=10.0)
    assert damper.filter(_record("x"))
    now[0] += 5
    assert not damper.filter(_record("x"))
    now[0] += 6
    assert damper.filter(_record("x"))


def test_brief_mode_turns_an_exception_into_one_line() -> None:
    try:
        raise OSError(24, "Too many open files")
    except OSError:
        import sys

        record = logging.LogRecord(
            "asyncio", logging.ERROR, __file__, 1, "accept failed\nsocket: x", None, sys.exc_info()
        )
    assert RepeatFilter(brief=True).filter(record)
    assert record.exc_info is None
    assert record.getMessage() == "accept failed (OSError: [Errno 24] Too many open files)"
