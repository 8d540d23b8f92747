"""Stand-in for extensions-builtin/Lora/lora_patches.py: route Linear/Conv2d/MultiheadAttention through `networks`.

The patch is global (torch classes), as in the webui; `undo()` puts the originals back.
"""
import torch

import networks

_PATCHED = [
    ("Linear_forward", torch.nn.Linear, "forward", "network_Linear_forward"),
    ("Linear_load_state_dict", torch.nn.Linear, "_load_from_state_dict", "network_Linear_load_state_dict"),
    ("Conv2d_forward", torch.nn.Conv2d, "forward", "network_Conv2d_forward"),
    ("Conv2d_load_state_dict", torch.nn.Conv2d, "_load_from_state_dict", "network_Conv2d_load_state_dict"),
    ("MultiheadAttention_forward", torch.nn.MultiheadAttention, "forward", "network_MultiheadAttention_forward"),
    ("MultiheadAttention_load_state_dict", torch.nn.MultiheadAttention, "_load_from_state_dict",
     "network_MultiheadAttention_load_state_dict"),
]


class LoraPatches:
    def __init__(self):
        for attr, cls, field, replacement in _PATCHED:
            setattr(self, attr, getattr(cls, field))
            setattr(cls, field, getattr(networks, replacement))

    def undo(self):
        for attr, cls, field, _ in _PATCHED:
            setattr(cls, field, getattr(self, attr))
