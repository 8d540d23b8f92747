"""Families that are not a plain additive low-rank delta: refused with a clear message.

DoRA rescales the merged weight's column norms (nonlinear in W), OFT/BOFT rotate it, IA3 scales
activations, GLoRA mixes weight and input terms; none can be joined, resized or merged exactly.
"""
from __future__ import annotations

from ..errors import OrthoLoraError
from .base import NetworkModule, register

_MARKERS = {"dora_scale": "DoRA", "oft_blocks": "OFT", "oft_diag": "OFT", "oft_R.weight": "BOFT",
            "on_input": "IA3", "a1.weight": "GLoRA", "a2.weight": "GLoRA", "b1.weight": "GLoRA",
            "b2.weight": "GLoRA"}


@register
class UnsupportedModule(NetworkModule):
    family = "unsupported"
    suffixes = frozenset(_MARKERS)

    @classmethod
    def from_tensors(cls, name, tensors, kernel):
        for marker, family in _MARKERS.items():
            if marker in tensors:
                raise OrthoLoraError(f"{family} module {name} is not a plain low-rank delta; "
                                     f"{family} files cannot be read by this toolbox")
        return None
