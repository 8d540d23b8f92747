"""Merge into checkpoint: one or several LoRAs (any family) added into a checkpoint, streamed."""
from __future__ import annotations

import gradio as gr

from . import compat, ops
from .config import DTYPES, UiConfig
from .runner import Outcome, execute
from .widgets import Results, output_row, run_buttons

OP, TITLE = "merge", "Merge into checkpoint"


def run(cfg: UiConfig, base, loras, multipliers="1", dtype="keep", out="", overwrite=False, *, ui_progress=None,
        cancel=None) -> Outcome:
    return execute(cfg, "Merge",
                   lambda p: ops.merge(cfg, base=base, loras=list(loras or []), multiplier=multipliers, out=out,
                                       dtype=dtype, overwrite=bool(overwrite), progress=p),
                   ui_progress=ui_progress, cancel=cancel)


def build(ctx) -> None:
    gr.Markdown("Add LoRAs (LoRA, LoCon, LoHa, LoKr, full diffs) into a checkpoint; the new checkpoint is "
                "written next to the others. Every tensor the LoRAs do not touch is copied unchanged.")
    base = ctx.ckpt_picker(OP, "Checkpoint", "base")
    loras = ctx.lora_picker(OP, "LoRAs", multiselect=True)
    with gr.Row():
        mult = compat.component(gr.Textbox, value="1", label="Multipliers", max_lines=1,
                                info="one for all LoRAs, or one per LoRA in the order chosen: 1, 0.6",
                                elem_id="ortholora_merge_multipliers")
        dtype = compat.component(gr.Radio, choices=["keep", *DTYPES], value="keep", label="Output dtype",
                                 info="keep: each tensor keeps its own", elem_id="ortholora_merge_dtype")
    out, overwrite = output_row(OP, "merged", "checkpoint folder")
    run_btn, stop_btn = run_buttons(OP, "Merge")
    results = Results(ctx, OP, spectrum=False, blocks=False)
    ctx.wire(OP, run_btn, stop_btn, run, [base, loras, mult, dtype, out, overwrite], results)
