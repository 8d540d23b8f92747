"""`LowRank`: the exact low-rank form every LoRA family reduces to.

dW = scale · reshape(up @ down, shape), up [out, r], down [r, in·k·k] (flattened), float32.
kohya storage: down → [r, in, k, k] and up → [out, r, 1, 1] when `shape` is 4-D.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


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
        """kohya tensors for `alpha` (default: the rank). The file's scale is alpha/r, so the factors
        carry the rest: up·down = (r/alpha)·scale·up₀·down₀, split evenly (√ on each side, the sign on up)."""
        r = self.rank
        alpha = float(r) if alpha is None else float(alpha)
        root = math.sqrt(abs(self.scale) * r / alpha)
        up = self.up.float() * (root if self.scale >= 0 else -root)
        down = self.down.float() * root
        if len(self.shape) == 4:
            down = down.reshape(r, self.shape[1], self.shape[2], self.shape[3])
            up = up.reshape(self.shape[0], r, 1, 1)
        return {f"{name}.lora_down.weight": down.to(dtype).contiguous(),
                f"{name}.lora_up.weight": up.to(dtype).contiguous(),
                f"{name}.alpha": _alpha_tensor(alpha, dtype)}


def _alpha_tensor(alpha: float, dtype: torch.dtype) -> torch.Tensor:
    """alpha in the file's dtype when that holds it exactly, else float32 (bf16 cannot hold 257:
    the scale alpha/r would silently change; every loader reads alpha with .item())."""
    stored = torch.tensor(alpha).to(dtype)
    return stored if float(stored) == alpha else torch.tensor(alpha, dtype=torch.float32)


def balanced(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, shape: tuple[int, ...]) -> LowRank:
    """LowRank from a truncated SVD with √S on both sides (no fp16 overflow), scale 1."""
    root = s.clamp_min(0).sqrt()
    return LowRank(u * root, root[:, None] * vh, 1.0, shape)


def concat(parts: list[LowRank]) -> LowRank:
    """Exact sum Σ dW_i as one LowRank: up = [c_1·up_1 | …], down = [down_1; …], scale 1."""
    shape = parts[0].shape
    ups = [p.up.float() * p.scale for p in parts]
    return LowRank(torch.cat(ups, dim=1), torch.cat([p.down.float() for p in parts], dim=0), 1.0, shape)


def rel_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """‖approx − exact‖_F / ‖exact‖_F (0 when both are zero)."""
    n = float(exact.float().norm())
    e = float((approx.float() - exact.float()).norm())
    return e / n if n else e
