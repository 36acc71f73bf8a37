"""``infer chat MODEL``: an interactive multi-turn chat in the terminal.

Each turn sends the whole conversation, as chat clients do; the model is loaded with prefix
caching on where the backend can fork caches, so a later turn prefills only what is new (the
last answer's end and the new question). Answers stream as they are generated; Ctrl-C stops the
answer (what was shown stays in the history) and returns to the prompt; Ctrl-D or ``/exit``
leaves. Commands: ``/reset`` (forget the conversation, keep the system message), ``/system TEXT``
(set the system message and start over), ``/save FILE`` (write the conversation as JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from infer.cli.common import Subcommands, add_model_arguments, load_model

__all__ = ["add_chat_command"]

_HELP = "commands: /reset, /system TEXT, /save FILE, /exit (Ctrl-C stops an answer, Ctrl-D leaves)"


def add_chat_command(subparsers: Subcommands) -> None:
    """Add ``chat`` to the ``infer`` command's ``subparsers``."""
    p = subparsers.add_parser("chat", help="chat with a model in the terminal (multi-turn, streamed)")
    add_model_arguments(p)
    p.add_argument("--system", help="system message")
    p.add_argument("--max-tokens", type=int, default=512, help="most tokens an answer may have (default 512)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int)
    p.add_argument("--speculative", choices=("auto", "ngram", "off"), default="auto", help="n-gram speculation")
    p.add_argument("--stats", action="store_true", help="print token counts, cached tokens and TTFT after each answer")
    p.set_defaults(func=_cmd_chat)


def _cmd_chat(args: argparse.Namespace) -> int:
    model = load_model(args, prefix_cache="auto", speculative=args.speculative)
    try:
        if model.chat_template is None:
            from infer.errors import InvalidParameterError

            raise InvalidParameterError("model", args.model, "a model with a chat template")
        Chat(model, args, sys.stdin, sys.stdout, sys.stderr).loop()
    finally:
        model.close()
    return 0


class Chat:
    """The conversation and the read-answer loop, on any text streams (a test drives it through pipes)."""

    def __init__(self, model: Any, args: argparse.Namespace, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> None:
        self.model = model
        self.sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed}
        self.stats = args.stats
        self.system: str | None = args.system
        self.history: list[dict[str, str]] = []
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.interactive = stdin.isatty()

    def loop(self) -> None:
        """Read lines until end of input or ``/exit``."""
        if self.interactive:
            print(_HELP, file=self.stderr)
        while True:
            try:
                if self.interactive:
                    self.stdout.write(">>> ")
                    self.stdout.flush()
                line = self.stdin.readline()
            except KeyboardInterrupt:  # at the prompt: a fresh line, as shells do
                self.stdout.write("\n")
                continue
            if not line:
                return
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                if not self.command(text):
                    return
                continue
            self.answer(text)

    def command(self, text: str) -> bool:
        """Run a ``/command``; return whether to go on."""
        name, _, rest = text.partition(" ")
        rest = rest.strip()
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name == "/reset":
            self.history.clear()
            self.note("conversation cleared")
        elif name == "/system":
            self.system = rest or None
            self.history.clear()
            self.note("system message set; conversation cleared" if rest else "system message removed")
        elif name == "/save":
            if not rest:
                self.note("usage: /save FILE")
            else:
                try:
                    Path(rest).write_text(json.dumps({"messages": self.messages()}, indent=2) + "\n", encoding="utf-8")
                except OSError as exc:
                    self.note(f"cannot save to {rest}: {exc}")
                else:
                    self.note(f"saved {len(self.history)} messages to {rest}")
        else:
            self.note(f"unknown command {name}; {_HELP}")
        return True

    def messages(self) -> list[dict[str, str]]:
        """The conversation as chat messages, system message first."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    def answer(self, question: str) -> None:
        """Stream the model's answer to ``question``; Ctrl-C stops it and keeps what was shown."""
        self.history.append({"role": "user", "content": question})
        parts: list[str] = []
        stream = self.model.stream(messages=self.messages(), **self.sampling)
        try:
            with stream:
                for event in stream:
                    parts.append(event.text)
                    self.stdout.write(event.text)
                    self.stdout.flush()
        except KeyboardInterrupt:
            self.note("[answer stopped]")
        self.stdout.write("\n")
        self.stdout.flush()
        self.history.append({"role": "assistant", "content": "".join(parts)})
        done = stream.completion
        if self.stats and done is not None:
            u = done.usage
            self.note(
                f"[{u.prompt_tokens} prompt tokens ({u.cached_tokens} cached) + {u.completion_tokens} generated, "
                f"TTFT {done.timings.time_to_first_token * 1e3:.1f} ms, {done.timings.decode_tokens_per_s:.1f} tok/s]"
            )

    def note(self, text: str) -> None:
        """A line for the user, on stderr so that stdout holds only answers."""
        print(text, file=self.stderr, flush=True)
