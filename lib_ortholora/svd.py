"""Truncated SVDs: exact, randomized (range finder + power iterations), and the factored SVD of a
low-rank product, the one every operation decomposes a LoRA layer with (docs/formats.md#factor-svd).

Factored SVD of ΔW = c·up·down (up [m, r], down [r, n]) without forming ΔW, from r×r float64 work:
    G_u = upᵀ·up,  G_d = down·downᵀ            (float64 Gram matrices, O((m + n)·r²))
    B [d, r] with BᵀB = G_d                     (Cholesky G_d = L·Lᵀ, B = Lᵀ; d = r. When G_d is
                                                 singular or r > n: eigh G_d = W·diag(μ)·Wᵀ,
                                                 B = diag(√μ)·Wᵀ over the d = min(r, n) largest μ)
Then downᵀ = Q·B for some Q [n, d] with orthonormal columns, so up·down = (up·Bᵀ)·Qᵀ, and the
eigenpairs (λ_i, y_i) of N = B·G_u·Bᵀ = (up·Bᵀ)ᵀ(up·Bᵀ) [d, d] are the squared singular values and
right vectors of up·Bᵀ. With a_i = Bᵀ·y_i and σ'_i = √λ_i:
    σ_i = |c|·σ'_i,   u_i = sign(c)·up·a_i/σ'_i,   v_i = (up·down)ᵀ·u_i/σ'_i = downᵀ·G_u·a_i/σ'_i²,
i.e. U = up·L [m, d] and Vᵀ = R·down [d, n] with the small L = sign(c)·A·diag(1/σ') [r, d] and
R = diag(1/σ'²)·AᵀG_u [d, r]: only the kept directions are ever formed, as products with the
factors. Directions with λ_i ≤ 1e-12·λ_1 (σ' ≤ 1e-6·σ'_1, below the float32 noise of the factors)
or below an absolute `floor` count as zero (σ = 0; their columns of L and rows of R are 0).

Accuracy, measured against a float64 SVD of the formed product of float32 factors: σ_i within
~1e-15·σ_1 for balanced factors and ~1e-10·σ_1 for factors scrambled by a mixing matrix of condition
1e4 (κ = ‖up‖·‖down‖/‖ΔW‖ ≫ 1); a float32 QR of the factors (the former derivation) gives σ_i only
to ~1e-7·σ_1 and ~3e-5·σ_1 there. L and R are applied to the factors in float32 (`Factored`; the
error of a formed direction is the float32 rounding of that product, ~1e-7·κ) or, by a caller that
needs more, in float64 (ortho). The Grams cost one float64 product per factor, about the time of
a float32 QR on CPU (measured: 1.7 vs 1.5 ms for up [1280, 128], 4.9 vs 5.5 ms for down [128, 5120]). The same core, with G_u scaled by a weight per rank column, decomposes any
weighted sum of concatenated LoRAs (`core_svd` over a batch of weights; ortho).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import OrthoLoraError
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


NULL_RTOL = 1e-12  # on σ'², i.e. σ' ≤ 1e-6·σ'_1 counts as zero


GRAM_CHUNK_BYTES = 1 << 19  # float64 rows converted at a time: small buffers the allocator reuses


def gram(x: torch.Tensor, rows: bool = False) -> torch.Tensor:
    """xᵀ·x for x [m, r], or with `rows` x·xᵀ for x [r, n], in float64 for x of any float dtype (a
    view is fine); below float64, accumulated over chunks of x's long side so that the float64 copy is never more
    than GRAM_CHUNK_BYTES. The chunk is copied so that the product reads it along its rows: for
    x = down [r, n] (`rows`) that is twice as fast as the Gram of the transposed view."""
    if x.dtype == torch.float64:
        return x @ x.T if rows else x.T @ x
    r, n = (x.shape[0], x.shape[1]) if rows else (x.shape[1], x.shape[0])
    step = max(1, GRAM_CHUNK_BYTES // (8 * max(r, 1)))
    out = torch.zeros(r, r, dtype=torch.float64, device=x.device)
    buf = torch.empty(min(step, n) * r, dtype=torch.float64, device=x.device)
    for i in range(0, n, step):
        w = min(step, n - i)
        if rows:
            chunk = buf[:w * r].view(r, w)
            chunk.copy_(x[:, i:i + w])
            out.addmm_(chunk, chunk.T)
        else:
            chunk = buf[:w * r].view(w, r)
            chunk.copy_(x[i:i + w])
            out.addmm_(chunk.T, chunk)
    return out


def gram_root(gd: torch.Tensor, n: int) -> torch.Tensor:
    """B [d, r] with BᵀB = G_d = down·downᵀ (r×r, float64) for down [r, n] (module docstring)."""
    r = len(gd)
    if r <= n:
        low, info = torch.linalg.cholesky_ex(gd)
        if not int(info):
            return low.T
    mu, w = torch.linalg.eigh(gd)
    d = min(r, n)
    mu, w = mu.flip(0)[:d], w.flip(1)[:, :d]
    return mu.clamp_min(0).sqrt()[:, None] * w.T


def core_svd(gu: torch.Tensor, b: torch.Tensor, floor: torch.Tensor | float = 0.0, rtol: float = NULL_RTOL,
             vectors: bool = True) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """(L [..., r, d], σ' [..., d] descending, R [..., d, r]) of up·down from (G_u, B), batched over
    leading dimensions of `gu` (and `floor`, an absolute floor on σ'² per batch entry): up·down =
    (up·L)·diag(σ')·(R·down), columns of up·L and rows of R·down orthonormal (module docstring).
    Without `vectors` only σ' (L and R None), from the eigenvalues alone: ~5× cheaper."""
    n = b @ gu @ b.T
    n = (n + n.transpose(-1, -2)) / 2
    if vectors:
        lam, y = torch.linalg.eigh(n)
        lam, y = lam.flip(-1), y.flip(-1)
    else:
        lam, y = torch.linalg.eigvalsh(n).flip(-1), None
    floor = torch.as_tensor(floor, dtype=lam.dtype)
    live = (lam > rtol * lam[..., :1].clamp_min(0)) & (lam > (floor[..., None] if floor.dim() else floor))
    sp = torch.where(live, lam.clamp_min(0).sqrt(), 0.0)
    if y is None:
        return None, sp, None
    inv = torch.where(live, 1 / torch.where(live, sp, 1.0), 0.0)
    a = b.T @ y
    return a * inv[..., None, :], sp, ((gu @ a) * inv.square()[..., None, :]).transpose(-1, -2)


@dataclass
class Factored:
    """ΔW = Σ_i s_i·u_i·v_iᵀ with U = up·left and Vᵀ = right·down (module docstring). A released
    decomposition (`released`) has no factors (`with_factors` gives them back), and possibly only
    its spectrum (left and right None)."""

    left: torch.Tensor | None   # [r, d] float32 (d = min(r, in·k·k) directions)
    s: torch.Tensor             # [d] float64, descending, 0 for null directions
    right: torch.Tensor | None  # [d, r] float32
    shape: tuple[int, ...]
    up: torch.Tensor | None = None    # [out, r] float32
    down: torch.Tensor | None = None  # [r, in·k·k] float32
    rank: int = 0  # the input's rank r (the number of directions is min(r, in·k·k))

    def released(self, keep_core: bool = True) -> Factored:
        """The same decomposition without the factors (what a first pass keeps): with `keep_core`
        its r×d matrices, else only its spectrum."""
        if keep_core:
            return Factored(self.left, self.s, self.right, self.shape, rank=self.rank)
        return Factored(None, self.s, None, self.shape, rank=self.rank)

    def with_factors(self, lr: LowRank) -> Factored:
        """This decomposition with the factors of `lr` (the same module, read again)."""
        up, down = _flat_factors(lr)
        return Factored(self.left, self.s, self.right, self.shape, up, down, self.rank)

    def u(self, idx: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        return self.up @ self.left[:, idx]

    def vh(self, idx: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        return self.right[idx] @ self.down

    def truncated(self, keep: torch.Tensor | slice) -> LowRank:
        """The kept directions (a mask, or a slice of the first ones) as balanced factors of scale 1:
        up = U·√S = up·(left·√S), down = √S·Vᵀ = (√S·right)·down (√S applied to the small matrices)."""
        idx = keep.nonzero().flatten() if isinstance(keep, torch.Tensor) and keep.dtype == torch.bool else keep
        root = self.s[idx].float().sqrt()
        return LowRank(self.up @ (self.left[:, idx] * root), (root[:, None] * self.right[idx]) @ self.down, 1.0,
                       self.shape)


def _flat_factors(lr: LowRank) -> tuple[torch.Tensor, torch.Tensor]:
    """up [out, r] and down [r, in·k·k] as float32, after checking they make a layer of lr.shape."""
    up, down = lr.up.float(), lr.down.float()
    if (up.dim() < 2 or down.dim() < 2 or up.flatten(1).shape != (lr.shape[0], down.shape[0])
            or down.flatten(1).shape[1] != math.prod(lr.shape[1:])):
        raise OrthoLoraError(f"factors {tuple(lr.up.shape)} and {tuple(lr.down.shape)} do not make "
                             f"a {tuple(lr.shape)} layer")
    return up.flatten(1), down.flatten(1)


def factor_svd(lr: LowRank) -> Factored:
    """Exact SVD of lr = scale·up@down in factored form (never forms up@down; module docstring)."""
    up, down = _flat_factors(lr)
    left, sp, right = core_svd(gram(up), gram_root(gram(down, rows=True), down.shape[1]))
    sign = -1.0 if lr.scale < 0 else 1.0
    return Factored((sign * left).float(), sp * abs(lr.scale), right.float(), lr.shape, up, down, up.shape[1])
