"""LyCORIS LoHa (Hadamard product of two low-rank matrices), plain and Tucker.

dW = (alpha/r) · W1 ⊙ W2 with, flattened to [out, in·k·k]:
  plain:  W = w_a @ w_b,  w_a [out, r], w_b [r, in·k·k];
  Tucker: W[o,i,h,w] = Σ_ab w_a[a,o] · t[a,b,h,w] · w_b[b,i],  w_a [r, out], w_b [r, in], t [r, r, k, k];
r = w1_b.shape[0]. Exact low-rank form of rank r1·r2 without forming dW (face-splitting product):
  (A1 B1) ⊙ (A2 B2) = (A1 ⊙row A2) · (B1 ⊙col B2),
  up[o, (p,q)] = A1[o,p]·A2[o,q],  down[(p,q), n] = B1[p,n]·B2[q,n].
"""
from __future__ import annotations

import torch

from ..lowrank import LowRank
from ..shapes import as_matrix, matrix_shape
from .base import NetworkModule, alpha_of, register

Factors = tuple[torch.Tensor, torch.Tensor]


def tucker_factors(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> Factors:
    """(up [out, r], down [r, in·k·k]) of W[o,i,h,w] = Σ_pq a[p,o]·t[p,q,h,w]·b[q,i] (LyCORIS Tucker)."""
    down = torch.einsum("pqhw,qi->pihw", t.float(), as_matrix(b.float()))
    return as_matrix(a.float()).T.contiguous(), as_matrix(down)


def hadamard_factors(f1: Factors, f2: Factors) -> Factors:
    """Exact factors of (up1@down1) ⊙ (up2@down2): row-wise / column-wise Kronecker products."""
    (u1, d1), (u2, d2) = f1, f2
    up = as_matrix(u1[:, :, None] * u2[:, None, :])
    down = (d1[:, None, :] * d2[None, :, :]).reshape(-1, d1.shape[1])
    return up, down


@register
class LoHaModule(NetworkModule):
    family = "loha"
    suffixes = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"})

    def __init__(self, name: str, w: dict[str, torch.Tensor], alpha: float, kernel: int | None):
        self.w, self._alpha = w, alpha
        self._dim = w["hada_w1_b"].shape[0]
        if "hada_t1" in w:
            t = w["hada_t1"]
            shape: tuple[int, ...] = (w["hada_w1_a"].shape[1], w["hada_w1_b"].shape[1], *t.shape[2:])
        else:
            out, inner = w["hada_w1_a"].shape[0], matrix_shape(w["hada_w1_b"].shape)[1]
            k = kernel or 1
            shape = (out, inner // (k * k), k, k) if k > 1 and inner % (k * k) == 0 else (out, inner)
        super().__init__(name, shape)

    @classmethod
    def from_tensors(cls, name, tensors, kernel):
        need = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        if not all(k in tensors for k in need):
            return None
        w = {k: v for k, v in tensors.items() if k.startswith("hada_")}
        return cls(name, w, alpha_of(name, tensors, tensors["hada_w1_b"].shape[0]), kernel)

    @property
    def alpha(self) -> float:
        return self._alpha

    @property
    def rank(self) -> int:
        """The trained dim r (the exact low-rank form has rank r1·r2)."""
        return self._dim

    def _factors(self, i: int) -> Factors:
        a, b = self.w[f"hada_w{i}_a"], self.w[f"hada_w{i}_b"]
        t = self.w.get(f"hada_t{i}")
        if t is not None:
            return tucker_factors(t, a, b)
        return as_matrix(a.float()), as_matrix(b.float())

    def lowrank(self) -> LowRank:
        up, down = hadamard_factors(self._factors(1), self._factors(2))
        return LowRank(up, down, self._alpha / self._dim, self.shape)

    def delta(self) -> torch.Tensor:
        """(alpha/r) · W1 ⊙ W2, formed densely (cheaper than the rank r² form)."""
        (u1, d1), (u2, d2) = self._factors(1), self._factors(2)
        return ((self._alpha / self._dim) * (u1 @ d1) * (u2 @ d2)).reshape(self.shape)
