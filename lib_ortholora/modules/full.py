"""LyCORIS full deltas: `diff` is dW itself ([out, in(, k, k)]), `diff_b` the bias delta [out].

There is no low-rank form (`lowrank()` is None) and no scale (an `alpha` beside `diff` is ignored,
as the webui ignores it). A bias delta can only be merged into a
checkpoint's bias; every other operation reports it as dropped.
"""
from __future__ import annotations

import torch

from .base import NetworkModule, register


@register
class FullModule(NetworkModule):
    family = "full"
    suffixes = frozenset({"diff", "diff_b", "alpha"})

    def __init__(self, name: str, diff: torch.Tensor, diff_b: torch.Tensor | None):
        super().__init__(name, tuple(diff.shape))
        self.diff, self.diff_b = diff, diff_b

    @classmethod
    def from_tensors(cls, name, tensors, kernel):
        if "diff" not in tensors:
            return None  # a lone bias delta is not a module; the reader lists it as stray keys
        return cls(name, tensors["diff"], tensors.get("diff_b"))

    def delta(self) -> torch.Tensor:
        return self.diff.float()

    def bias_delta(self) -> torch.Tensor | None:
        return None if self.diff_b is None else self.diff_b.float()
