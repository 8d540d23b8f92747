"""lib_ortholora: a LoRA toolbox for Stable Diffusion 1.x, 2.x and SDXL.

Pure torch + safetensors; nothing from the webui. The public API below is imported lazily, so
`import lib_ortholora` stays cheap for the webui's start-up; the `TYPE_CHECKING` block shows the
same names to IDEs and type checkers.
"""
from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_API = {
    "extract_lora": "extract", "merge_lora": "merge", "join_loras": "join", "bake_diag": "diag",
    "apply_diag": "diag", "mix_loras": "mix", "resize_files": "resize", "ortho_lora": "ortho",
    "inspect_lora": "inspect", "read_lora": "lorafile", "write_lora": "lorafile", "parse_diag": "diag",
    "parse_policy": "rank", "RankPolicy": "rank", "parse_recipes": "scores", "Recipe": "scores",
    "LowRank": "lowrank", "Report": "report", "Row": "report", "Status": "report", "Progress": "progress",
    "OrthoLoraError": "errors", "OutputExists": "outputs", "run_demo": "demo",
}
__all__ = sorted(_API)

if TYPE_CHECKING:
    from .demo import run_demo
    from .diag import apply_diag, bake_diag, parse_diag
    from .errors import OrthoLoraError
    from .extract import extract_lora
    from .inspect import inspect_lora
    from .join import join_loras
    from .lorafile import read_lora, write_lora
    from .lowrank import LowRank
    from .merge import merge_lora
    from .mix import mix_loras
    from .ortho import ortho_lora
    from .outputs import OutputExists
    from .progress import Progress
    from .rank import RankPolicy, parse_policy
    from .report import Report, Row, Status
    from .resize import resize_files
    from .scores import Recipe, parse_recipes


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
