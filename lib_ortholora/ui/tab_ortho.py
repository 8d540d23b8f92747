"""Orthogonalize: the shared direction of K ≥ 2 LoRAs, further directions, each input minus its
shared part, and how aligned the LoRAs are (K×K cosine heatmaps, per block or the whole file)."""
from __future__ import annotations

import gradio as gr

from ..errors import OrthoLoraError
from . import compat, ops, views
from .config import DTYPES, UiConfig
from .folders import Folders
from .runner import Outcome, execute, error_status
from .widgets import Results, run_buttons

OP, TITLE = "ortho", "Orthogonalize"


def _count(value) -> int:
    try:
        n = float(value)
    except (TypeError, ValueError):
        raise OrthoLoraError(f"directions must be a whole number, got {value!r}") from None
    if n != int(n):
        raise OrthoLoraError(f"directions must be a whole number, got {value!r}")
    return int(n)


def run(cfg: UiConfig, loras, write=True, prefix="ortho", directions=2, residuals=True, global_lambda=False, rank="",
        dtype="fp16", overwrite=False, *, ui_progress=None, cancel=None) -> Outcome:
    folders = Folders(cfg)
    try:
        n = _count(directions)
    except OrthoLoraError as e:
        return Outcome(False, error_status(str(e)))
    return execute(cfg, "Orthogonalize",
                   lambda p: ops.ortho(cfg, loras=list(loras or []), write=bool(write), prefix=prefix, directions=n,
                                       residuals=bool(residuals), global_lambda=bool(global_lambda), rank=rank,
                                       dtype=dtype, overwrite=bool(overwrite), progress=p),
                   ui_progress=ui_progress, cancel=cancel, status_skip=("share_file",),
                   after=lambda report, o: views.ortho_views(folders, report, o))


def build(ctx) -> None:
    d = ctx.defaults
    gr.Markdown("Split two or more LoRAs into what they share and what is left. `PREFIX_shared` holds the "
                "principal shared direction, `PREFIX_directionP` the next ones, and `NAME_PREFIX_residual` each "
                "input minus its shared part; λ (how much of each direction each input holds) is in the files' "
                "metadata. The alignment plot shows the cosines between the inputs before and after.")
    loras = ctx.lora_picker(OP, "LoRAs (two or more, one architecture)", multiselect=True)
    with gr.Row():
        write = compat.component(gr.Checkbox, value=True, label="Write files (off: alignment report only)",
                                 elem_id="ortholora_ortho_write")
        prefix = compat.component(gr.Textbox, value="ortho", label="Output name prefix", max_lines=1,
                                  elem_id="ortholora_ortho_prefix")
        directions = compat.component(gr.Number, value=2, precision=0, label="Direction files",
                                      info="1 = shared only; K = enough to rebuild every input",
                                      elem_id="ortholora_ortho_directions")
    with gr.Row():
        residuals = compat.component(gr.Checkbox, value=True, label="Write residuals (input − λ·shared)",
                                     elem_id="ortholora_ortho_residuals")
        global_lambda = compat.component(gr.Checkbox, value=False, label="One λ per LoRA for all layers",
                                         elem_id="ortholora_ortho_global")
        rank = compat.component(gr.Textbox, value="", label="Rank policy of the outputs", max_lines=1,
                                info="empty: exact (full rank)", elem_id="ortholora_ortho_rank")
        dtype = compat.component(gr.Radio, choices=list(DTYPES), value=d.dtype, label="Output dtype",
                                 elem_id="ortholora_ortho_dtype")
    overwrite = compat.component(gr.Checkbox, value=False, label="Overwrite existing files",
                                 elem_id="ortholora_ortho_overwrite")
    run_btn, stop_btn = run_buttons(OP, "Orthogonalize")
    results = Results(ctx, OP, alignment=True)
    ctx.wire(OP, run_btn, stop_btn, run,
             [loras, write, prefix, directions, residuals, global_lambda, rank, dtype, overwrite], results)
