"""Resize: LoRAs recompressed from the exact SVD of their own factors, by recipes (kohya's methods,
or base-aware scores with a threshold or a size target)."""
from __future__ import annotations

import gradio as gr

from ..arch import ARCHS
from . import compat, ops, views
from .config import DTYPES, UiConfig
from .folders import Folders
from .runner import Outcome, execute
from .widgets import NONE, Results, run_buttons

OP, TITLE = "resize", "Resize"
DEFAULT_RECIPES = "sv_fro=0.99"
RECIPES_HELP = ("one or more separated by ':' — sv_ratio=P, sv_fro=P, sv_cumulative=P (add ,rank=N to cap), "
                "rank=N, or scores with thr=/size=: spn_lora=1,size=32, spn_ckpt=1,thr=-1.2 (needs the base)")


def run(cfg: UiConfig, loras, recipes=DEFAULT_RECIPES, ckpt=NONE, arch="auto", dtype="fp16", overwrite=False, *,
        ui_progress=None, cancel=None) -> Outcome:
    folders = Folders(cfg)
    return execute(cfg, "Resize",
                   lambda p: ops.resize(cfg, loras=list(loras or []) if not isinstance(loras, str) else [loras],
                                        recipes=recipes, ckpt=None if ckpt in (None, "", NONE) else ckpt, arch=arch,
                                        dtype=dtype, overwrite=bool(overwrite), progress=p),
                   ui_progress=ui_progress, cancel=cancel,
                   after=lambda report, o: views.written_lora_views(folders, report, o))


def build(ctx) -> None:
    d = ctx.defaults
    gr.Markdown("Shrink LoRAs: every layer's exact singular values come from its factors, and a recipe decides "
                "what to keep. Each LoRA × recipe is written as `NAME_<recipe>` into the LoRA folder.")
    loras = ctx.lora_picker(OP, "LoRAs", multiselect=True)
    with gr.Row():
        recipes = compat.component(gr.Textbox, value=DEFAULT_RECIPES, label="Recipes", info=RECIPES_HELP,
                                   max_lines=1, scale=3, elem_id="ortholora_resize_recipes")
        with gr.Column(scale=2):
            ckpt = ctx.ckpt_picker(OP, "Base checkpoint (for *_ckpt and subspace scores)", "ckpt", optional=True)
    with gr.Row():
        arch = compat.component(gr.Radio, choices=["auto", *ARCHS], value="auto", label="Architecture",
                                info="for LoRAs that do not say", elem_id="ortholora_resize_arch")
        dtype = compat.component(gr.Radio, choices=list(DTYPES), value=d.dtype, label="Output dtype",
                                 elem_id="ortholora_resize_dtype")
        overwrite = compat.component(gr.Checkbox, value=False, label="Overwrite existing files",
                                     elem_id="ortholora_resize_overwrite")
    run_btn, stop_btn = run_buttons(OP, "Resize")
    results = Results(ctx, OP)
    ctx.wire(OP, run_btn, stop_btn, run, [loras, recipes, ckpt, arch, dtype, overwrite], results)
