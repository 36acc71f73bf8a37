"""A minimal progress bar for long model operations (download, verify, extract, convert)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TextIO

__all__ = ["ProgressBar"]


class ProgressBar:
    """One progress line per stage on ``stream``; ``None`` makes every call a no-op."""

    WIDTH = 30

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream

    def note(self, text: str) -> None:
        """Print a line of text."""
        if self.stream is not None:
            print(text, file=self.stream, flush=True)

    def stage(self, label: str) -> Callable[[int, int], None]:
        """A ``progress(done, total)`` callback drawing the bar of stage ``label``; it ends the line at 100%."""
        last = -1
        # On a terminal the bar redraws every percent; in a log file, a line per quarter is plenty.
        isatty = getattr(self.stream, "isatty", None)
        step = 1 if isatty is not None and isatty() else 25

        def update(done: int, total: int) -> None:
            nonlocal last
            if self.stream is None or total <= 0:
                return
            percent = min(100, done * 100 // total)
            if percent != 100:
                percent -= percent % step
            if percent == last:
                return
            last = percent
            filled = self.WIDTH * percent // 100
            end = "\n" if percent == 100 or step > 1 else ""
            self.stream.write(f"\r{label:<11} [{'#' * filled}{'.' * (self.WIDTH - filled)}] {percent:3d}%{end}")
            self.stream.flush()

        return update
