"""lib_ortholora: a LoRA toolbox for Stable Diffusion 1.x, 2.x and SDXL.

Pure torch + safetensors; nothing from the webui. The public API below is imported lazily, so
`import lib_ortholora` stays cheap for the webui's start-up.
"""
from __future__ import annotations

from importlib import import_module

__version__ = "0.1.0"

_API = {
    "extract_lora": "extract", "merge_lora": "merge", "join_loras": "join", "bake_diag": "join",
    "apply_diag": "join", "mix_loras": "mix", "resize_files": "resize", "ortho_lora": "ortho",
    "inspect_lora": "inspect", "read_lora": "lorafile", "write_lora": "lorafile", "parse_diag": "diag",
    "parse_policy": "rank", "RankPolicy": "rank", "LowRank": "lowrank", "Report": "report",
    "OrthoLoraError": "errors", "run_demo": "demo",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
