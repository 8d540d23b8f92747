"""A layer's weight shape and its matrix form: every LoRA delta is computed on W flattened to
[out, in·k·k] (docs/formats.md#lowrank), whatever its own shape (2-D linear,
4-D conv [out, in, k, k])."""
from __future__ import annotations

import math

import torch

Shape = tuple[int, ...]


def matrix_shape(shape: Shape) -> tuple[int, int]:
    """(out, in·k·k): the shape of the weight flattened to a matrix."""
    return shape[0], math.prod(shape[1:])


def full_rank(shape: Shape) -> int:
    """min(out, in·k·k): the largest rank a delta of this shape can have."""
    return min(matrix_shape(shape))


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """``t`` flattened to [t.shape[0], rest] (a view where the strides allow)."""
    return t.reshape(t.shape[0], -1)
