"""The module-type base class and the registry list."""
from __future__ import annotations

from typing import ClassVar, Mapping

import torch

from ..errors import OrthoLoraError
from ..lowrank import LowRank

REGISTRY: list[type["NetworkModule"]] = []


def register(cls: type["NetworkModule"]) -> type["NetworkModule"]:
    """Class decorator: append a family to the registry (earlier families win)."""
    REGISTRY.append(cls)
    return cls


def suffix_of(key: str) -> tuple[str, str] | None:
    """Split a tensor key into (module name, suffix) using every registered family's suffixes."""
    best = None
    for family in REGISTRY:
        for suffix in family.suffixes:
            if key.endswith("." + suffix) and (best is None or len(suffix) > len(best)):
                best = suffix
    return (key[: -len(best) - 1], best) if best else None


def alpha_of(name: str, tensors: Mapping[str, torch.Tensor], rank: int) -> float:
    """alpha from a 0-dim or [1] tensor (any float dtype); missing alpha means alpha = rank."""
    a = tensors.get("alpha")
    if a is None:
        return float(rank)
    if a.numel() != 1:
        raise OrthoLoraError(f"module {name}: alpha has shape {list(a.shape)}; it must be one number")
    return float(a.float().reshape(-1)[0])


def one_spelling(name: str, tensors: Mapping[str, torch.Tensor], *spellings: tuple[str, ...]) -> None:
    """Refuse a module holding one factor under several spellings (two key styles for one layer:
    all but one would be dropped)."""
    present = [s for s in spellings if any(k in tensors for k in s)]
    if len(present) > 1:
        found = " and ".join(k for s in present for k in s if k in tensors)
        raise OrthoLoraError(f"module {name} has {found}: one factor under two key styles")


class NetworkModule:
    """One module of a LoRA-like file: exact delta, optional exact low-rank form."""

    family: ClassVar[str]
    suffixes: ClassVar[frozenset[str]]

    def __init__(self, name: str, shape: tuple[int, ...]):
        self.name, self.shape = name, tuple(shape)

    @classmethod
    def from_tensors(cls, name: str, tensors: dict[str, torch.Tensor], kernel: int | None) -> "NetworkModule | None":
        raise NotImplementedError

    def lowrank(self) -> LowRank | None:
        """Exact low-rank form, or None for families that have none (e.g. full diffs)."""
        return None

    def delta(self) -> torch.Tensor:
        lr = self.lowrank()
        if lr is None:
            raise NotImplementedError(f"{type(self).__name__} must implement delta()")
        return lr.delta()

    def bias_delta(self) -> torch.Tensor | None:
        """The bias delta (float32, [out]) for families that carry one (full diffs), else None."""
        return None

    @property
    def rank(self) -> int | None:
        lr = self.lowrank()
        return None if lr is None else lr.rank

    @property
    def alpha(self) -> float | None:
        return None
