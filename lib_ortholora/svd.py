"""Truncated SVDs: exact, randomized (range finder + power iterations), and of a LowRank's factors.

`factor_svd` never forms up@down: Qu,Ru = qr(up); Qd,Rd = qr(downᵀ); Uc,S,Vcᴴ = svd(Ru·Rdᵀ);
U = Qu·Uc, Vᴴ = Vcᴴ·Qdᵀ — exact, O((out+in)·r²).
"""
from __future__ import annotations

import torch

from .lowrank import LowRank

SVD = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def exact_svd(a: torch.Tensor) -> SVD:
    """Thin SVD; retried on the CPU when a CUDA solver fails to converge."""
    try:
        return torch.linalg.svd(a, full_matrices=False)
    except RuntimeError:
        if a.device.type == "cpu":
            raise
        u, s, vh = torch.linalg.svd(a.cpu(), full_matrices=False)
        return u.to(a.device), s.to(a.device), vh.to(a.device)


def randomized_svd(a: torch.Tensor, k: int, oversample: int = 10, niter: int = 4, seed: int = 0) -> SVD:
    """Top-k SVD of `a` by a randomized range finder with q ≥ k + oversample and `niter`
    QR-stabilised power iterations (Halko, Martinsson & Tropp 2011, alg. 4.4). q is rounded up to
    a multiple of 8, the width of the float32 GEMM kernels: a [m, n]·[n, q] product with q = 42
    costs more than with q = 48, and the extra columns only make the range more accurate."""
    m, n = a.shape
    q = min(-(-(k + oversample) // 8) * 8, m, n)
    g = torch.Generator(device=a.device).manual_seed(seed)
    y = a @ torch.randn(n, q, generator=g, device=a.device, dtype=a.dtype)
    for _ in range(niter):
        y = a @ torch.linalg.qr(a.T @ torch.linalg.qr(y)[0])[0]
    basis = torch.linalg.qr(y)[0]
    ub, s, vh = exact_svd(basis.T @ a)
    return (basis @ ub)[:, :k], s[:k], vh[:k]


def truncated_svd(a: torch.Tensor, k: int, method: str = "auto", oversample: int = 10, niter: int = 4) -> SVD:
    """Top-k singular triplets. `auto` uses the randomized path when k + oversample is well below
    min(m, n) (where it is both faster and, with power iterations, within ~1e-3 of exact)."""
    small = min(a.shape)
    if method == "exact" or (method == "auto" and 2 * (k + oversample) > small):
        u, s, vh = exact_svd(a)
        return u[:, :k], s[:k], vh[:k]
    return randomized_svd(a, k, oversample, niter)


def factor_svd(lr: LowRank) -> SVD:
    """Exact SVD of scale·up@down from the factors; singular values include |scale|."""
    qu, ru = torch.linalg.qr(lr.up.float())
    qd, rd = torch.linalg.qr(lr.down.float().T)
    uc, s, vch = torch.linalg.svd(ru @ rd.T, full_matrices=False)
    u = qu @ uc
    return (u if lr.scale >= 0 else -u), s * abs(lr.scale), vch @ qd.T
