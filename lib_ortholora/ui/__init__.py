"""gradio UI of the toolbox: `build_tab(UiConfig)` gives the "LoRA Toolbox" tab (gradio 3.41 and 4.x),
`serve(...)` runs it standalone, `api.add_routes(app, cfg)` adds the HTTP API. Nothing here
imports the webui; `scripts/ortholora_tab.py` adapts it."""
from __future__ import annotations

from .config import Defaults, UiConfig

__all__ = ["Defaults", "UiConfig", "build_tab", "serve"]


def build_tab(cfg: UiConfig, standalone: bool = False):
    from .app import build_tab as _build

    return _build(cfg, standalone)


def serve(*args, **kwargs):
    from .standalone import serve as _serve

    return _serve(*args, **kwargs)
