"""Join / Mix: several LoRAs into one, either exactly (join: ranks add up, each source stays a
slice that `v=` toggles at generation time) or recompressed to a rank policy (mix)."""
from __future__ import annotations

import gradio as gr

from . import compat, ops, views
from .config import DTYPES, UiConfig
from .folders import Folders
from .runner import Outcome, execute
from .widgets import Results, output_row, run_buttons

OP, TITLE = "joinmix", "Join / Mix"
MODES = ("Join (exact)", "Mix (recompress)")


def run(cfg: UiConfig, loras, mode=MODES[0], ratios="", names="", rank="", dtype="fp16", out="", overwrite=False, *,
        ui_progress=None, cancel=None) -> Outcome:
    folders = Folders(cfg)
    loras = list(loras or [])
    if mode == MODES[1]:
        label = "Mix"

        def work(p):
            return ops.mix(cfg, loras=loras, out=out, rank=rank, ratio=ratios, dtype=dtype,
                           overwrite=bool(overwrite), progress=p)
    else:
        label = "Join"

        def work(p):
            return ops.join(cfg, loras=loras, out=out, ratio=ratios, names=names, dtype=dtype,
                            overwrite=bool(overwrite), progress=p)
    return execute(cfg, label, work, ui_progress=ui_progress, cancel=cancel,
                   after=lambda report, o: views.written_lora_views(folders, report, o))


def build(ctx) -> None:
    d = ctx.defaults
    gr.Markdown("**Join** concatenates ranks exactly: the result equals the weighted sum, and each source stays "
                "a slice you can turn up or down in a prompt (`<lora:NAME:1:v=src1@1,src2@0.5>`; see Inspect). "
                "**Mix** computes the same sum and recompresses it to a rank policy (smaller file, small error).")
    loras = ctx.lora_picker(OP, "LoRAs", multiselect=True)
    with gr.Row():
        mode = compat.component(gr.Radio, choices=list(MODES), value=MODES[0], label="Mode",
                                elem_id="ortholora_joinmix_mode")
        ratios = compat.component(gr.Textbox, value="", label="Ratios", max_lines=1,
                                  info="empty = 1 each; one for all or one per LoRA (may be negative)",
                                  elem_id="ortholora_joinmix_ratios")
    with gr.Row():
        names = compat.component(gr.Textbox, value="", label="Slice names (join)", max_lines=1,
                                 info="comma-separated; empty = the file names", elem_id="ortholora_joinmix_names")
        rank = compat.component(gr.Textbox, value=d.rank_policy, label="Rank policy (mix)", max_lines=1,
                                info="e.g. 32, fro=0.99,max=64", elem_id="ortholora_joinmix_rank")
        dtype = compat.component(gr.Radio, choices=list(DTYPES), value=d.dtype, label="Output dtype",
                                 elem_id="ortholora_joinmix_dtype")
    out, overwrite = output_row(OP, "joined_lora")
    run_btn, stop_btn = run_buttons(OP, "Join / Mix")
    results = Results(ctx, OP)
    ctx.wire(OP, run_btn, stop_btn, run, [loras, mode, ratios, names, rank, dtype, out, overwrite], results)
