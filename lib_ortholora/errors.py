"""The one error type the toolbox raises for bad input: a single line naming the file and the problem."""
from __future__ import annotations

import os


def printable(text: str) -> str:
    """``text`` as valid UTF-8: bytes of a non-UTF-8 file name (surrogate escapes, as Python decodes
    them) shown as ``\\xff``, lone surrogates as ``\\udXXX``."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # surrogates that are not escaped bytes
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def quote(text: str, limit: int = 60) -> str:
    """``repr`` of user input for a one-line message: whitespace runs folded to one space, cut to
    ``limit`` characters ("..." marks the cut), so a long input never makes a long message."""
    folded = " ".join(text[: 4 * limit].split())
    if len(folded) > limit or len(text) > 4 * limit:
        folded = folded[: limit - 3] + "..."
    return repr(folded)


class OrthoLoraError(Exception):
    """A user-facing failure. ``str(err)`` is one line of valid UTF-8: ``<file>: <problem>`` (or just
    the problem). ``path`` is the file as given (``str``, bytes decoded as ``os.fsdecode`` does)."""

    def __init__(self, problem: str, path: str | bytes | os.PathLike | None = None):
        self.path = os.fsdecode(path) if path is not None else None
        self.problem = " ".join(str(problem).split())
        super().__init__(printable(f"{self.path}: {self.problem}" if self.path else self.problem))
