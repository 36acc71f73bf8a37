"""``infer chat``: driven through stdin, as a user at a terminal would."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from infer.cli import main

pytestmark = pytest.mark.unit

CHAT = ["chat", "fake", "--backend", "fake", "--temperature", "0", "--max-tokens", "12", "--stats"]


def _chat(monkeypatch, capsys, lines):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    assert main(CHAT) == 0
    return capsys.readouterr()


def test_chat_keeps_the_history_and_later_turns_start_from_the_cached_prefix(monkeypatch, capsys, tmp_path):
    saved = tmp_path / "chat.json"
    out = _chat(monkeypatch, capsys, ["/system be brief", "hello", "and again", f"/save {saved}"])
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == "be brief"
    assert messages[3]["content"] == "and again"
    stats = re.findall(r"\[(\d+) prompt tokens \((\d+) cached\)", out.err)
    (first_prompt, first_cached), (_, second_cached) = [(int(p), int(c)) for p, c in stats]
    assert first_cached == 0
    assert second_cached >= first_prompt  # the whole first turn's prompt came from cache


def test_reset_and_system_start_a_new_conversation(monkeypatch, capsys, tmp_path):
    saved = tmp_path / "chat.json"
    _chat(monkeypatch, capsys, ["hello", "/reset", "hi", "/system terse", "yo", f"/save {saved}"])
    messages = json.loads(saved.read_text())["messages"]
    assert messages == [{"role": "system", "content": "terse"}, {"role": "user", "content": "yo"}, messages[2]]


def test_an_unknown_command_is_explained_and_the_chat_goes_on(monkeypatch, capsys):
    out = _chat(monkeypatch, capsys, ["/frobnicate", "hello"])
    assert "unknown command /frobnicate" in out.err
    assert "prompt tokens" in out.err  # the next line was still answered


_CHAT_WITH_CTRL_C = (
    "import signal, sys\n"
    "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
    "from infer.cli import main\n"
    "sys.exit(main(sys.argv[1:]))"
)


def test_ctrl_c_stops_the_answer_and_the_chat_goes_on():
    # Ctrl-C as from a terminal: a test run started as a background job of a non-interactive shell
    # has SIGINT ignored, and an ignored signal stays ignored across exec; the child restores it.
    args = [sys.executable, "-c", _CHAT_WITH_CTRL_C, *CHAT[:4], "--max-tokens", "400", "-o", "latency=0.1", "--stats"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        proc.stdin.write("tell me a long story\n")
        proc.stdin.flush()
        first = proc.stdout.read(1)  # the answer has started streaming
        assert first
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        proc.stdin.write("/exit\n")
        proc.stdin.flush()
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "[answer stopped]" in err
