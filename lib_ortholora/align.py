"""How aligned K LoRAs are: Gram matrices of their deltas (exact, from the factors), cosines and
energy shares, per layer and summed over a block or the whole file, as plain data.

For one layer, G_ij = ⟨dW_i, dW_j⟩_F = s_i·s_j·tr((up_iᵀup_j)(down_j·down_iᵀ)), a LoRA that lacks
the layer counting as a zero delta. A scope (a layer, a block, the file) sums the Grams of its
layers, so every figure of a scope is that of the deltas flattened and concatenated over it:
  cosine  cos_ij = G_ij / √(G_ii·G_jj)   (null where a LoRA has no delta in the scope; the
          whole-file matrix therefore weighs each layer by its energy, large layers dominate);
  share   1 − R_kk / G_kk, the part of LoRA k's energy that the shared direction explains, where
          R is the Gram of the residuals dW_k − λ_k·v (in [0, 1] when λ is fitted per layer;
          with one global λ a single layer may go below 0, its scope sums cannot).
"""
from __future__ import annotations

from typing import Iterable

import torch


def block_sums(m: torch.Tensor, owner: torch.Tensor, k: int) -> torch.Tensor:
    """[K, K] sums of the R×R matrix `m` over the (owner_i, owner_j) blocks."""
    onehot = torch.zeros(k, len(owner), dtype=m.dtype)
    onehot[owner, torch.arange(len(owner))] = 1
    return onehot @ m @ onehot.T


def gram_of_grams(gu: torch.Tensor, gd: torch.Tensor, owner: torch.Tensor, k: int) -> torch.Tensor:
    """G_ij = ⟨dW_i, dW_j⟩_F (float64 [K, K]) from the Grams UᵀU and D·Dᵀ of the concatenated form
    U·D = Σ_k dW_k (`lowrank.concat`): the block sums of (UᵀU) ⊙ (D·Dᵀ); rows of absent parts are 0."""
    return block_sums(gu * gd, owner, k)


def cosines(g: torch.Tensor) -> list[list[float | None]]:
    """cos_ij = G_ij / √(G_ii·G_jj); None where either diagonal is 0."""
    d = g.diagonal().clamp_min(0).sqrt()
    return [[float(g[i, j] / (d[i] * d[j])) if d[i] > 0 and d[j] > 0 else None for j in range(len(d))]
            for i in range(len(d))]


def shares(g: torch.Tensor, residual: torch.Tensor) -> list[float | None]:
    """1 − R_kk / G_kk per LoRA; None where G_kk is 0."""
    return [float(1 - residual[k, k] / g[k, k]) if g[k, k] > 0 else None for k in range(len(g))]


def mean_offdiag(cos: list[list[float | None]]) -> float | None:
    """Mean of the defined off-diagonal cosines (the one cosine when K = 2)."""
    vals = [c for i, row in enumerate(cos) for j, c in enumerate(row) if i < j and c is not None]
    return sum(vals) / len(vals) if vals else None


def scope(g: torch.Tensor, residual: torch.Tensor) -> dict:
    """Plain data of one scope: cosines before (`before`) and after removing the shared direction
    (`after`, cosines of the residuals), energy `share`s, and each LoRA's Frobenius `norm`."""
    return {"before": cosines(g), "after": cosines(residual), "share": shares(g, residual),
            "norm": [float(v) for v in g.diagonal().clamp_min(0).sqrt()]}


def by_block(entries: Iterable[tuple[str, torch.Tensor, torch.Tensor]]) -> list[dict]:
    """`scope` of each block (Grams summed over its layers), blocks in order of first appearance."""
    sums: dict[str, list] = {}
    for block, g, r in entries:
        acc = sums.setdefault(block, [torch.zeros_like(g), torch.zeros_like(r), 0])
        acc[0] += g
        acc[1] += r
        acc[2] += 1
    return [{"block": b, "layers": n, **scope(g, r)} for b, (g, r, n) in sums.items()]
