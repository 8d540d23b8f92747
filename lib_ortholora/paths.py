"""File names the toolbox knows: the suffixes of the files it reads, writes and lists, and its
cache folder. No I/O here."""
from __future__ import annotations

import os
from pathlib import Path

PathLike = str | bytes | os.PathLike
"""What the public API takes as a path (bytes as `os.fsdecode` reads them)."""

SAFETENSORS = ".safetensors"
"""The one format the toolbox writes."""
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
"""Plain torch weights files, read with `torch.load(weights_only=True)`."""
LORA_SUFFIXES = (SAFETENSORS, ".pt", ".ckpt")
"""Files listed as LoRAs (those the webui's LoRA list shows)."""
CHECKPOINT_SUFFIXES = (SAFETENSORS, ".ckpt")
"""Files listed as checkpoints."""


def cache_dir(*parts: str) -> Path:
    """`$XDG_CACHE_HOME/ortholora/…`, else `~/.cache/ortholora/…`."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root, "ortholora", *parts)
