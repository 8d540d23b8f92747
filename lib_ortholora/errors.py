"""The one error type the toolbox raises for bad input: a single line naming the file and the problem."""
from __future__ import annotations

import os


class OrthoLoraError(Exception):
    """A user-facing failure. ``str(err)`` is one line: ``<file>: <problem>`` (or just the problem)."""

    def __init__(self, problem: str, path: str | os.PathLike | None = None):
        self.path = os.fspath(path) if path is not None else None
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{self.path}: {self.problem}" if self.path else self.problem)
