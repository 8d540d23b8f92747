"""`inspect`: family, architecture, per-module rank/alpha/scale/norm, per-block energy, metadata."""
from __future__ import annotations

from ..arch import ARCHS
from ..inspect import inspect_lora
from . import common


def add(sub) -> None:
    p = sub.add_parser("inspect", help="summarize a LoRA / LyCORIS file (per module and per block)")
    p.add_argument("file", help="LoRA-like file (.safetensors, or a torch weights file)")
    p.add_argument("--arch", choices=ARCHS, help="architecture to resolve names for (default: detected)")
    common(p, output=False)


def run(args):
    return inspect_lora(args.file, args.arch, full_metadata=args.json, progress=args.progress)
