"""kohya LoRA / LoCon (incl. Tucker `lora_mid`) and PEFT `lora_A`/`lora_B` modules.

dW = (alpha/r) · reshape(up @ down, shape), r = down.shape[0]; Tucker LoCon:
dW[o,i,h,w] = (alpha/r) · Σ_ab up[o,a]·mid[a,b,h,w]·down[b,i], whose exact low-rank form has
down'[a,(i,h,w)] = Σ_b mid[a,b,h,w]·down[b,i].
"""
from __future__ import annotations

import torch

from ..lowrank import LowRank
from ..shapes import as_matrix
from .base import NetworkModule, alpha_of, one_spelling, register

_DOWN = ("lora_down.weight", "lora_A.weight", "lora.down.weight")
_UP = ("lora_up.weight", "lora_B.weight", "lora.up.weight")


@register
class LoRAModule(NetworkModule):
    family = "lora"
    suffixes = frozenset(_DOWN + _UP + ("lora_mid.weight", "alpha"))

    def __init__(self, name: str, up: torch.Tensor, down: torch.Tensor, mid: torch.Tensor | None, alpha: float):
        out, r = up.shape[0], down.shape[0]
        if mid is not None:
            shape = (out, down.shape[1], *mid.shape[2:])
        else:
            shape = (out, *down.shape[1:])
        super().__init__(name, shape)
        self.up, self.down, self.mid, self._alpha = up, down, mid, alpha
        self._rank = r

    @classmethod
    def from_tensors(cls, name, tensors, kernel):
        for spellings in (_DOWN, _UP):
            one_spelling(name, tensors, *((k,) for k in spellings))
        down = next((tensors[k] for k in _DOWN if k in tensors), None)
        up = next((tensors[k] for k in _UP if k in tensors), None)
        if down is None or up is None:
            return None
        return cls(name, up, down, tensors.get("lora_mid.weight"), alpha_of(name, tensors, down.shape[0]))

    @property
    def alpha(self) -> float:
        return self._alpha

    def lowrank(self) -> LowRank:
        r = self._rank
        up = as_matrix(self.up.float())
        if self.mid is None:
            down = as_matrix(self.down.float())
        else:
            down = as_matrix(torch.einsum("abhw,bi->aihw", self.mid.float(), as_matrix(self.down.float())))
        return LowRank(up, down, self._alpha / r, self.shape)
