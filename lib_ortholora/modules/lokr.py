"""LyCORIS LoKr (Kronecker product), with full, factorized and Tucker factors.

dW = scale · kron(W1, W2) over the first two dims: W1 [a, c], W2 [b, d(, k, k)], dW [a·b, c·d(, k, k)];
flattened, dW = scale · kron(W1, W2.reshape(b, d·k·k)).
  W1 = lokr_w1, or lokr_w1_a [a, r] @ lokr_w1_b [r, c];
  W2 = lokr_w2, or lokr_w2_a [b, r] @ lokr_w2_b [r, d·k·k], or Tucker
       W2[p,q,h,w] = Σ_ij w2_a[i,p]·t2[i,j,h,w]·w2_b[j,q]  (w2_a [r, b], w2_b [r, d]);
scale = alpha/r with r = w1_b.shape[0] (else w2_b.shape[0]); scale = 1 when W1 and W2 are both full.
Exact low-rank form: with W1 = U1·V1 and W2 = U2·V2 (a full factor F [m, n] as I·F or F·I, whichever
is smaller), kron(W1, W2) = kron(U1, U2) · kron(V1, V2), rank p1·p2.
"""
from __future__ import annotations

import torch

from ..lowrank import LowRank
from ..shapes import as_matrix
from .base import NetworkModule, alpha_of, one_spelling, register
from .loha import Factors, tucker_factors


def _identity_split(f: torch.Tensor) -> Factors:
    """F = I·F or F·I, the one with the smaller inner dimension."""
    m, n = f.shape
    return (torch.eye(m), f) if m <= n else (f, torch.eye(n))


def _shape(w: dict[str, torch.Tensor], kernel: int | None) -> tuple[int, ...]:
    """The target weight's shape from the factor shapes; `kernel` resolves flattened conv factors."""
    a, c = w["lokr_w1"].shape if "lokr_w1" in w else (w["lokr_w1_a"].shape[0], w["lokr_w1_b"].shape[1])
    if "lokr_w2" in w:
        b, inner = w["lokr_w2"].shape[0], w["lokr_w2"][0].numel()
    elif "lokr_t2" in w:
        b, inner = w["lokr_w2_a"].shape[1], w["lokr_w2_b"].shape[1] * w["lokr_t2"][0, 0].numel()
    else:
        b, inner = w["lokr_w2_a"].shape[0], w["lokr_w2_b"][0].numel()
    four_d = [x for x in (w.get("lokr_w2"), w.get("lokr_t2"), w.get("lokr_w2_b")) if x is not None and x.dim() == 4]
    k = four_d[0].shape[-1] if four_d else (kernel or 1)
    if k > 1 and inner % (k * k) == 0:
        return a * b, c * inner // (k * k), k, k
    return (a * b, c * inner, 1, 1) if four_d else (a * b, c * inner)


@register
class LoKrModule(NetworkModule):
    family = "lokr"
    suffixes = frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
                          "alpha"})

    def __init__(self, name: str, w: dict[str, torch.Tensor], alpha: float, kernel: int | None):
        self.w, self._alpha = w, alpha
        low = w.get("lokr_w1_b", w.get("lokr_w2_b"))
        self._dim = None if low is None else low.shape[0]
        self._scale = 1.0 if self._dim is None else alpha / self._dim
        super().__init__(name, _shape(w, kernel))

    @classmethod
    def from_tensors(cls, name, tensors, kernel):
        one_spelling(name, tensors, ("lokr_w1",), ("lokr_w1_a", "lokr_w1_b"))
        one_spelling(name, tensors, ("lokr_w2",), ("lokr_w2_a", "lokr_w2_b", "lokr_t2"))
        has1 = "lokr_w1" in tensors or ("lokr_w1_a" in tensors and "lokr_w1_b" in tensors)
        has2 = "lokr_w2" in tensors or ("lokr_w2_a" in tensors and "lokr_w2_b" in tensors)
        if not (has1 and has2):
            return None
        w = {k: v for k, v in tensors.items() if k.startswith("lokr_")}
        low = w.get("lokr_w1_b", w.get("lokr_w2_b"))
        return cls(name, w, alpha_of(name, tensors, low.shape[0] if low is not None else 1), kernel)

    @property
    def alpha(self) -> float:
        return self._alpha

    @property
    def rank(self) -> int | None:
        """The trained dim r (None when both Kronecker factors are full)."""
        return self._dim

    def _w1_factors(self) -> Factors:
        if "lokr_w1" in self.w:
            return _identity_split(self.w["lokr_w1"].float())
        return self.w["lokr_w1_a"].float(), self.w["lokr_w1_b"].float()

    def _w2_factors(self) -> Factors:
        if "lokr_w2" in self.w:
            w2 = self.w["lokr_w2"].float()
            return _identity_split(as_matrix(w2))
        a, b = self.w["lokr_w2_a"], self.w["lokr_w2_b"]
        if "lokr_t2" in self.w:
            return tucker_factors(self.w["lokr_t2"], a, b)
        return a.float(), as_matrix(b.float())

    def lowrank(self) -> LowRank:
        (u1, v1), (u2, v2) = self._w1_factors(), self._w2_factors()
        return LowRank(torch.kron(u1, u2), torch.kron(v1, v2), self._scale, self.shape)

    def delta(self) -> torch.Tensor:
        """scale · kron(W1, W2), formed densely."""
        (u1, v1), (u2, v2) = self._w1_factors(), self._w2_factors()
        return (self._scale * torch.kron(u1 @ v1, u2 @ v2)).reshape(self.shape)
