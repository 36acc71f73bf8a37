"""The real server under hostile load: runaway chat templates and oversized prompts (stress, security).

A model folder whose chat template loops for ever on one message is served; 45 such requests
at once must each get a 400 while /health answers quickly, and SIGTERM must still stop the
server. Oversized prompts must be refused before tokenizing, without stalling /health or
keeping the memory.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the server needs the serve extra")
from serve_support import REPO, ServerProcess, httpx

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.stress, pytest.mark.security]

TINY = REPO / "conformance" / "src" / "infer_conformance" / "data" / "tiny-llama"
TRAP = (
    "{% if messages[0].content == 'loop' %}"
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
)


@pytest.fixture
def trapped_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "trapped-model"
    shutil.copytree(TINY, folder)
    (folder / "chat_template.jinja").write_text(TRAP)
    return folder


def _health_times(url: str, stop: threading.Event, times: list[float]) -> None:
    while not stop.is_set():
        started = time.monotonic()
        assert httpx.get(url + "/health", timeout=30).status_code == 200
        times.append(time.monotonic() - started)
        time.sleep(0.05)


def test_45_runaway_template_requests_get_400s_health_stays_fast_and_sigterm_stops_the_server(trapped_folder):
    server = ServerProcess("--name", "m", model=str(trapped_folder))
    try:
        body = {"model": "m", "messages": [{"role": "user", "content": "loop"}], "max_tokens": 1}
        statuses: list[int] = []

        def attack() -> None:
            try:
                statuses.append(httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).status_code)
            except httpx.TransportError:  # the server went away (SIGTERM below) before answering
                statuses.append(0)

        stop, times = threading.Event(), []
        watcher = threading.Thread(target=_health_times, args=(server.url, stop, times))
        attackers = [threading.Thread(target=attack) for _ in range(45)]
        for t in attackers:
            t.start()
        watcher.start()
        for t in attackers:
            t.join(60)
        stop.set()
        watcher.join(30)
        assert statuses == [400] * 45
        assert max(times) < 2.0, times  # from a loaded 2-core machine; unbounded renders took minutes
        ok = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
        assert httpx.post(server.url + "/v1/chat/completions", json=ok, timeout=30).status_code == 200
        # Renders in flight do not keep SIGTERM from working.
        statuses.clear()
        attackers = [threading.Thread(target=attack) for _ in range(8)]
        for t in attackers:
            t.start()
        time.sleep(0.3)
        server.terminate()
        assert server.proc.wait(20) == 0
        for t in attackers:
            t.join(30)
        assert set(statuses) <= {0, 400, 503}, statuses
    finally:
        server.stop()
    assert "Traceback" not in server.log_path.read_text()


def test_oversized_prompts_are_refused_before_tokenizing_without_stalling_health_or_keeping_memory():
    server = ServerProcess("--max-body-bytes", str(4 * 1024 * 1024))
    try:
        baseline = server.rss()
        prompt = "word " * (1_900_000 // 5)  # 1.9 MB of text, far past what the context can hold
        statuses: list[int] = []

        def send() -> None:
            body = {"model": "fake", "prompt": prompt, "max_tokens": 1}
            statuses.append(httpx.post(server.url + "/v1/completions", json=body, timeout=60).status_code)

        stop, times = threading.Event(), []
        watcher = threading.Thread(target=_health_times, args=(server.url, stop, times))
        watcher.start()
        for _ in range(3):
            senders = [threading.Thread(target=send) for _ in range(8)]
            for t in senders:
                t.start()
            for t in senders:
                t.join(60)
        stop.set()
        watcher.join(30)
        assert statuses == [400] * 24
        assert max(times) < 2.0, times
        # The bodies themselves pass through memory; nothing is kept (tokenizing 1.9 MB took GiBs).
        assert server.rss() - baseline < 200 * 1024 * 1024
    finally:
        server.stop()


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux) to lower the descriptor limit")
def test_at_the_descriptor_limit_the_log_stays_small_and_the_server_recovers():
    import socket

    server = ServerProcess("--header-timeout", "1", prefix=("prlimit", "--nofile=120:120"))
    held = []
    try:
        for _ in range(300):  # far past the limit: accept() fails with EMFILE for a while
            try:
                held.append(socket.create_connection(("127.0.0.1", server.port), timeout=2))
            except OSError:
                break
        time.sleep(3)  # the header timeout closes the idle ones; the server keeps trying to accept
        for s in held:
            s.close()
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not recover from the descriptor limit"
            time.sleep(0.2)
    finally:
        server.stop()
    log = server.log_path.read_text()
    assert log.count("out of system resource") <= 3, log[-2000:]  # damped: one per 10 s, not per attempt
    assert len(log) < 50_000
    assert "Traceback" not in log  # asyncio's own errors come as one line each
