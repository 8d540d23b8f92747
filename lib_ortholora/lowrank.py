"""`LowRank`: the exact low-rank form every LoRA family reduces to.

dW = scale · reshape(up @ down, shape), up [out, r], down [r, in·k·k] (flattened), float32.
kohya storage: down → [r, in, k, k] and up → [out, r, 1, 1] when `shape` is 4-D.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import OrthoLoraError


@dataclass
class LowRank:
    up: torch.Tensor
    down: torch.Tensor
    scale: float
    shape: tuple[int, ...]

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        """The dense dW (float32, weight shape). Only for small layers, tests and references."""
        return (self.scale * (self.up.float() @ self.down.float())).reshape(self.shape)

    def scaled(self, c: float) -> "LowRank":
        return LowRank(self.up, self.down, self.scale * c, self.shape)

    def norm(self) -> float:
        """‖dW‖_F without forming dW: √tr((upᵀup)(down downᵀ))·|scale|."""
        g = (self.up.double().T @ self.up.double()) * (self.down.double() @ self.down.double().T)
        return abs(self.scale) * math.sqrt(max(float(g.sum()), 0.0))

    def to_kohya(self, name: str, dtype: torch.dtype, alpha: float | None = None) -> dict[str, torch.Tensor]:
        """kohya tensors for `alpha` (default: the rank), laid out as `kohya_layout` says. The file's
        scale is alpha/r, so the factors carry the rest: up·down = (r/alpha)·scale·up₀·down₀, split
        evenly (√ on each side, the sign on up)."""
        r = self.rank
        alpha = float(r) if alpha is None else float(alpha)
        root = math.sqrt(abs(self.scale) * r / alpha)
        layout = kohya_layout(name, self.shape, r, dtype, alpha)
        up = _wide(self.up) * (root if self.scale >= 0 else -root)
        down = _wide(self.down) * root
        return {f"{name}.lora_down.weight": down.reshape(layout[f"{name}.lora_down.weight"][1]).to(dtype).contiguous(),
                f"{name}.lora_up.weight": up.reshape(layout[f"{name}.lora_up.weight"][1]).to(dtype).contiguous(),
                f"{name}.alpha": _alpha_tensor(alpha, dtype)}


def _wide(t: torch.Tensor) -> torch.Tensor:
    """t itself when float32 or float64 (scaled, then rounded once to the file's dtype), else as float32."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def kohya_layout(name: str, shape: tuple[int, ...], rank: int, dtype: torch.dtype, alpha: float
                 ) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """key → (dtype, shape) of the kohya tensors `LowRank.to_kohya` writes for a layer of `shape`:
    down [r, in(, k, k)], up [out, r(, 1, 1)], alpha [] (float32 where `dtype` cannot hold it)."""
    conv = len(shape) == 4
    return {f"{name}.lora_down.weight": (dtype, (rank, *shape[1:]) if conv else (rank, math.prod(shape[1:]))),
            f"{name}.lora_up.weight": (dtype, (shape[0], rank, 1, 1) if conv else (shape[0], rank)),
            f"{name}.alpha": (_alpha_tensor(alpha, dtype).dtype, ())}


def _alpha_tensor(alpha: float, dtype: torch.dtype) -> torch.Tensor:
    """alpha in the file's dtype when that holds it exactly, else float32 (bf16 cannot hold 257:
    the scale alpha/r would silently change; every loader reads alpha with .item())."""
    stored = torch.tensor(alpha).to(dtype)
    return stored if float(stored) == alpha else torch.tensor(alpha, dtype=torch.float32)


def balanced(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, shape: tuple[int, ...]) -> LowRank:
    """LowRank from a truncated SVD with √S on both sides (no fp16 overflow), scale 1."""
    root = s.clamp_min(0).sqrt()
    return LowRank(u * root, root[:, None] * vh, 1.0, shape)


def concat(parts: Sequence[LowRank | None], weights: Sequence[float] | None = None,
           dtype: torch.dtype = torch.float32) -> tuple[LowRank, torch.Tensor]:
    """The exact sum Σ_k w_k·dW_k (w_k = 1 unless given; None adds nothing) as one LowRank of scale 1
    and rank Σ r_k, in `dtype`: with c_k = w_k·scale_k,
        up = [sign(c_1)·√|c_1|·up_1 | sign(c_2)·√|c_2|·up_2 | …],   down = [√|c_1|·down_1; √|c_2|·down_2; …]
    (never adding factors, which would create cross terms), each part inside its own columns/rows;
    and owner [Σ r_k], the index k of the part each rank column comes from. The present parts must
    agree on the layer (out rows, in·k·k columns)."""
    weights = [1.0] * len(parts) if weights is None else list(weights)
    present = [(k, p) for k, p in enumerate(parts) if p is not None]
    if not present:
        raise OrthoLoraError("no part to concatenate")
    shape = present[0][1].shape
    ups, downs = [], []
    for k, p in present:
        if math.prod(p.shape) != math.prod(shape) or p.shape[0] != shape[0]:
            raise OrthoLoraError(f"sources disagree on a layer's shape: {p.shape} vs {shape}")
        c = weights[k] * p.scale
        root = math.sqrt(abs(c))
        ups.append(p.up.to(dtype).reshape(shape[0], -1) * math.copysign(root, c))
        downs.append(p.down.to(dtype).reshape(p.rank, -1) * root)
    owner = torch.cat([torch.full((p.rank,), k, dtype=torch.long) for k, p in present])
    return LowRank(torch.cat(ups, dim=1), torch.cat(downs, dim=0), 1.0, shape), owner


def rel_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """‖approx − exact‖_F / ‖exact‖_F (0 when both are zero)."""
    n = float(exact.float().norm())
    e = float((approx.float() - exact.float()).norm())
    return e / n if n else e
