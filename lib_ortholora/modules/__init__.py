"""Registry of LoRA module types: one small class per family, tried in order.

A family class claims a group of tensors (the suffixes after a module name) with
`from_tensors(name, tensors, kernel)`, returning an instance or None. Every instance gives its
exact delta (`delta()`, float32, weight shape, scale included) and, where the math allows, an
exact `LowRank` form without forming the delta (`lowrank()`).
"""
from __future__ import annotations

from .base import NetworkModule, REGISTRY, register, suffix_of
from . import unsupported, lora, loha, lokr, full  # noqa: F401  (registration order: refusals first)

__all__ = ["NetworkModule", "REGISTRY", "register", "suffix_of", "build_module"]


def build_module(name: str, tensors: dict, kernel: int | None) -> NetworkModule | None:
    """The first registered family that claims this group of tensors, or None."""
    for family in REGISTRY:
        module = family.from_tensors(name, tensors, kernel)
        if module is not None:
            return module
    return None
