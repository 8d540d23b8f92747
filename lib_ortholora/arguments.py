"""Checks of the public API's arguments, made before any work: a bad one raises `OrthoLoraError`
naming the argument, never another exception type (rank policies check themselves, `rank.py`)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import torch

from .dtypes import OUTPUT_DTYPES
from .errors import OrthoLoraError

MAX_RATIO = 1e6  # |ratio| and |multiplier| bound: far beyond any useful weight, far below float32 overflow


def choice(value: object, allowed: Sequence[str], what: str) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise OrthoLoraError(f"{what} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def number(value: object, what: str, low: float = -math.inf, high: float = math.inf) -> float:
    """A finite real number in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise OrthoLoraError(f"{what} must be a finite number in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def whole(value: object, what: str, low: int = 0, high: int | None = None) -> int:
    """A whole number in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"≥ {low}"
        raise OrthoLoraError(f"{what} must be a whole number {bounds}, got {value!r}")
    return value


def flag(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise OrthoLoraError(f"{what} must be True or False, got {value!r}")
    return value


def output_dtype(value: object, what: str = "dtype") -> torch.dtype:
    """One of the floating dtypes outputs are written in (a torch dtype or its short name)."""
    if isinstance(value, str) and value in OUTPUT_DTYPES:
        return OUTPUT_DTYPES[value]
    if value not in OUTPUT_DTYPES.values():
        raise OrthoLoraError(f"{what} must be one of {', '.join(OUTPUT_DTYPES)} (or the torch dtypes), got {value!r}")
    return value  # type: ignore[return-value]


def _is_path(value: object) -> bool:
    return isinstance(value, (str, bytes, os.PathLike))


def path(value: object, what: str = "path") -> Path:
    """A path given as str, bytes (decoded as `os.fsdecode` does) or os.PathLike."""
    if not _is_path(value):
        raise OrthoLoraError(f"{what} must be a path, got {type(value).__name__}")
    return Path(os.fsdecode(value))  # type: ignore[arg-type]


def optional_path(value: object, what: str = "path") -> Path | None:
    """None, or a path as `path` takes it."""
    return None if value is None else path(value, what)


def path_list(value: object, what: str = "LoRA file") -> list[Path]:
    """One path or a sequence of paths (each as `path` takes it), as a list of paths."""
    if _is_path(value):
        return [path(value)]
    if isinstance(value, (list, tuple)) and all(map(_is_path, value)):
        return [path(p) for p in value]
    raise OrthoLoraError(f"{what}s must be a path or a list of paths, got {type(value).__name__}")


def as_ratios(ratios: float | Sequence[float] | None, n: int, what: str = "ratio") -> list[float]:
    """One finite value per LoRA file (|value| ≤ MAX_RATIO): None → all 1, a number → repeated,
    else checked for length."""
    if ratios is None:
        return [1.0] * n
    values = [ratios] * n if isinstance(ratios, (int, float)) else ratios
    if not isinstance(values, (list, tuple)):
        raise OrthoLoraError(f"{what}s must be a number or a list of numbers, got {type(ratios).__name__}")
    if len(values) != n:
        raise OrthoLoraError(f"{len(values)} {what}(s) given for {n} LoRA file(s)")
    return [number(r, what, -MAX_RATIO, MAX_RATIO) for r in values]


def device(value: object) -> torch.device:
    """`auto` → cuda when available, else cpu; any other device must work in this torch."""
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(value)  # type: ignore[arg-type]
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError, TypeError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise OrthoLoraError(f"device {value!r} is not usable here ({reason}); use cpu, cuda or auto") from None
    return dev
