"""Progress reporting: core operations call `progress(done, total, what)` (see `run.Phase`);
adapters draw it. A `Progress` may raise to cancel the operation (the UI's Stop button does)."""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

Progress = Callable[[int, int, str], None]


class TextBar:
    """A dependency-free progress bar for terminals: one line, redrawn at most 10 times a second."""

    def __init__(self, label: str, stream: TextIO = sys.stderr, width: int = 30):
        self.label, self.stream, self.width = label, stream, width
        self.start = self._last = time.monotonic()
        self._open = False  # a bar line is drawn and not yet ended

    def __call__(self, done: int, total: int, what: str) -> None:
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        frac = done / total if total else 1.0
        fill = int(frac * self.width)
        line = (f"\r{self.label} [{'#' * fill}{'.' * (self.width - fill)}] {done}/{total} "
                f"{now - self.start:5.1f}s {what[-40:]:<40}")
        self.stream.write(line)
        self._open = True
        if done >= total:
            self.end()
        self.stream.flush()

    def end(self) -> None:
        """End a bar line left open, so that what is printed next starts on a line of its own."""
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False
