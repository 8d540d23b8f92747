"""Rank policies: how many singular directions of a layer to keep.

Definitions, for singular values σ_1 ≥ σ_2 ≥ … of the delta, full = min(out, in·k²):
fixed r; fraction f → ⌈f·in·k²⌉; sv_ratio p → #{σ_i ≥ σ_1/p}; threshold t → #{σ_i > t};
fro p → least r with Σ_{i≤r} σ_i² ≥ p·‖D‖²_F; cumulative p → least r with Σ_{i≤r} σ_i ≥ p·Σσ.
The result is clamped to [min_rank, max_rank] and to full.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import OrthoLoraError, quote
from .shapes import full_rank, matrix_shape

KINDS = ("fixed", "fraction", "sv_ratio", "threshold", "fro", "cumulative")


@dataclass(frozen=True)
class RankPolicy:
    kind: str
    value: float
    min_rank: int = 1
    max_rank: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise OrthoLoraError(f"unknown rank policy {quote(str(self.kind))}; expected one of {', '.join(KINDS)}")
        number = isinstance(self.value, (int, float)) and not isinstance(self.value, bool)
        counts = all(isinstance(n, int) and not isinstance(n, bool) for n in (self.min_rank, self.max_rank or 0))
        if not (number and counts):
            raise OrthoLoraError(f"rank policy {self.kind}: value {self.value!r}, min {self.min_rank!r} and max "
                                 f"{self.max_rank!r} must be numbers (min and max whole)")
        bad = (self.value <= 0 or not math.isfinite(self.value)
               or (self.kind in ("fro", "cumulative", "fraction") and self.value > 1)
               or (self.kind == "sv_ratio" and self.value < 1)
               or (self.kind == "fixed" and self.value != int(self.value))
               or self.min_rank < 0 or (self.max_rank is not None and self.max_rank < max(self.min_rank, 1)))
        if bad:
            raise OrthoLoraError(f"rank policy {self.describe()} is out of range")

    def describe(self) -> str:
        text = f"{self.kind}={self.value:g}"
        if self.min_rank != 1:
            text += f",min={self.min_rank}"
        if self.max_rank is not None:
            text += f",max={self.max_rank}"
        return text

    def cap(self, shape: tuple[int, ...]) -> int:
        """An upper bound on the rank this policy can pick for a layer of this shape."""
        out, inner = matrix_shape(shape)
        full = min(out, inner)
        bound = (int(self.value) if self.kind == "fixed" else math.ceil(self.value * inner) if self.kind == "fraction"
                 else full)
        if self.max_rank is not None:
            bound = min(bound, self.max_rank)
        return max(min(bound, full), min(self.min_rank, full))

    def needs_spectrum(self, shape: tuple[int, ...]) -> bool:
        """True when the choice depends on singular values beyond the first `cap(shape)`."""
        if self.kind in ("fixed", "fraction"):
            return False
        return self.kind == "cumulative" or self.cap(shape) >= full_rank(shape)

    def choose(self, s: torch.Tensor, shape: tuple[int, ...], energy: float | None = None) -> int:
        """Rank for singular values `s` (descending; at least the top `cap(shape)` of them).
        `energy` is ‖D‖²_F when `s` is only the top of the spectrum (needed by `fro`)."""
        s = s.double()
        if self.kind in ("fixed", "fraction"):
            return self.cap(shape)
        if self.kind == "sv_ratio":
            r = int((s >= s[0] / self.value).sum()) if len(s) else 0
        elif self.kind == "threshold":
            r = int((s > self.value).sum())
        else:
            w = s.square() if self.kind == "fro" else s
            total = (energy if self.kind == "fro" and energy is not None else float(w.sum()))
            if total <= 0:
                return 0
            reached = (torch.cumsum(w, 0) >= self.value * total * (1 - 1e-12)).nonzero()
            r = int(reached[0]) + 1 if len(reached) else len(s)
        return max(min(r, self.cap(shape)), min(self.min_rank, self.cap(shape)))


def parse_policy(text: str) -> RankPolicy:
    """`32` (fixed), `fraction=0.08,min=8,max=96`, `sv_ratio=20`, `threshold=0.01`, `fro=0.9`,
    `cumulative=0.9` (each may add `min=` / `max=`)."""
    if not isinstance(text, str):
        raise OrthoLoraError(f"rank policy must be text, got {type(text).__name__}")
    text = text.strip()
    if text.isascii() and text.isdigit():  # str.isdigit() also takes '²', which float() refuses
        return RankPolicy("fixed", float(text), 1, None)
    fields: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, val = part.partition("=")
        if not sep:
            raise OrthoLoraError(f"rank policy {quote(text)}: expected key=value, got {quote(part)}")
        fields[key.strip()] = val.strip()
    try:
        lo = int(fields.pop("min", 1))
        hi = int(fields["max"]) if "max" in fields else None
        fields.pop("max", None)
        if len(fields) != 1:
            raise ValueError
        (kind, val), = fields.items()
        return RankPolicy(kind, float(val), lo, hi)
    except ValueError:
        raise OrthoLoraError(f"rank policy {quote(text)} is not of the form kind=value[,min=N][,max=N] "
                             f"with kind in {', '.join(KINDS)}") from None


def as_policy(value: "RankPolicy | str | float | int", min_rank: int = 1, max_rank: int | None = None) -> RankPolicy:
    """A policy from itself, a policy text, an int (fixed rank) or a float < 1 (fraction of full
    rank); `min_rank`/`max_rank` apply to the int and float forms."""
    if isinstance(value, RankPolicy):
        return value
    if isinstance(value, str):
        return parse_policy(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OrthoLoraError(f"rank policy must be a policy, text or number, got {type(value).__name__}")
    if isinstance(value, float) and value < 1:
        return RankPolicy("fraction", value, min_rank, max_rank)
    return RankPolicy("fixed", float(value), min_rank, max_rank)
