"""The "LoRA Toolbox" tab: sub-tabs over the core's operations, for the webui and the standalone server."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from . import compat, tab_extract, tab_inspect, tab_joinmix, tab_merge, tab_ortho, tab_resize
from .config import UiConfig
from .widgets import Context

SUBTABS = (tab_extract, tab_merge, tab_joinmix, tab_resize, tab_ortho, tab_inspect)
EXTENSION_ROOT = Path(__file__).resolve().parents[2]
"""The extension's folder (a clone of the repository): style.css and javascript/ are its own."""
PACKAGED_ASSETS = Path(__file__).resolve().parent / "assets"
"""Where an installed wheel has them (copied there at build time by setup.py; absent in a clone)."""


def _asset(*parts: str) -> str:
    """A file of the tab's assets (`style.css`, `javascript/…`), from the wheel's copy when installed,
    else from the extension's folder; "" when neither has it."""
    for root in (PACKAGED_ASSETS, EXTENSION_ROOT):
        try:
            return root.joinpath(*parts).read_text(encoding="utf-8")
        except OSError:
            continue
    return ""


def build_tab(cfg: UiConfig, standalone: bool = False) -> gr.Blocks:
    """The tab as a `gr.Blocks`. The webui renders it inside its own page (and injects style.css and
    javascript/*.js itself); `standalone=True` adds both to this Blocks for `serve`."""
    kwargs = {"analytics_enabled": False}
    if standalone:
        kwargs.update(css=_asset("style.css"), title=cfg.title)
    ctx = Context(cfg)
    with gr.Blocks(**kwargs) as blocks:
        with gr.Column(elem_id="ortholora_root"):
            if standalone:
                gr.Markdown(f"## {cfg.title}\nLoRA folder: `{cfg.lora_dir}` · checkpoints: "
                            + ", ".join(f"`{p}`" for p in cfg.ckpt_dirs))
            with gr.Tabs(elem_id="ortholora_tabs"):
                for sub in SUBTABS:
                    with gr.Tab(sub.TITLE, id=sub.OP, elem_id=f"ortholora_tab_{sub.OP}"):
                        sub.build(ctx)
            ctx.finish()
        if standalone:
            script = _asset("javascript", "ortholora.js")
            if script:
                compat.on_load_js(blocks, "() => {\n" + script + "\n}")
    blocks.ortholora_context = ctx  # for tests and hosts
    return blocks
