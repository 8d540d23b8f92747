"""Extract: base + tuned checkpoint → LoRA (LoCon convs optional), with its spectrum and ranks."""
from __future__ import annotations

import gradio as gr

from ..extract import SVD_METHODS
from ..prediction import PREDICTIONS
from . import compat, ops, views
from .config import DEVICES, DTYPES, UiConfig
from .folders import Folders
from .runner import Outcome, execute
from .widgets import Results, output_row, run_buttons

OP, TITLE = "extract", "Extract"
POLICY_HELP = ("N (fixed), fraction=F[,min=N][,max=N], sv_ratio=P, threshold=T, fro=P or cumulative=P "
               "(each may add min=/max=)")


def run(cfg: UiConfig, base, tuned, out, rank="", conv_rank="", no_conv=False, skip=1e-6, svd="auto", device="auto",
        dtype="fp16", prediction="auto", overwrite=False, *, ui_progress=None, cancel=None) -> Outcome:
    folders = Folders(cfg)
    return execute(cfg, "Extract",
                   lambda p: ops.extract(cfg, base=base, tuned=tuned, out=out, rank=rank, conv_rank=conv_rank,
                                         conv=not no_conv, skip=float(skip if skip is not None else 1e-6),
                                         svd=svd, device=device, dtype=dtype, prediction=prediction,
                                         overwrite=bool(overwrite), progress=p),
                   ui_progress=ui_progress, cancel=cancel,
                   after=lambda report, o: views.written_lora_views(folders, report, o))


def build(ctx) -> None:
    d = ctx.defaults
    gr.Markdown("Extract the difference between a fine-tuned checkpoint and its base as a LoRA "
                "(convolution layers too, as LoCon, unless left out).")
    with gr.Row():
        with gr.Column():
            base = ctx.ckpt_picker(OP, "Base checkpoint", "base")
        with gr.Column():
            tuned = ctx.ckpt_picker(OP, "Fine-tuned checkpoint", "tuned")
    with gr.Row():
        rank = compat.component(gr.Textbox, value=d.rank_policy, label="Rank policy", info=POLICY_HELP, max_lines=1,
                                elem_id="ortholora_extract_dim")
        conv_rank = compat.component(gr.Textbox, value="", label="Rank policy for 3×3 convs",
                                     info="empty: the same as above", max_lines=1, elem_id="ortholora_extract_conv_dim")
        no_conv = compat.component(gr.Checkbox, value=False, label="Leave convolutions out (no LoCon)",
                                   elem_id="ortholora_extract_no_conv")
    with gr.Accordion("Advanced", open=False):
        with gr.Row():
            skip = compat.component(gr.Number, value=1e-6, label="Skip layers with max|ΔW| ≤",
                                    elem_id="ortholora_extract_skip")
            svd = compat.component(gr.Radio, choices=list(SVD_METHODS), value="auto", label="SVD",
                                   elem_id="ortholora_extract_svd")
            device = compat.component(gr.Radio, choices=list(DEVICES), value=d.device, label="Device",
                                      elem_id="ortholora_extract_device")
            dtype = compat.component(gr.Radio, choices=list(DTYPES), value=d.dtype, label="Output dtype",
                                     elem_id="ortholora_extract_dtype")
            prediction = compat.component(gr.Radio, choices=["auto", *PREDICTIONS], value="auto",
                                          label="Prediction type (recorded in the metadata)",
                                          info="auto: from the tuned model's metadata, keys or name; SD2 768-v is v",
                                          elem_id="ortholora_extract_prediction")
    out, overwrite = output_row(OP, "extracted_lora")
    run_btn, stop_btn = run_buttons(OP, "Extract LoRA")
    results = Results(ctx, OP)
    ctx.wire(OP, run_btn, stop_btn, run,
             [base, tuned, out, rank, conv_rank, no_conv, skip, svd, device, dtype, prediction, overwrite], results)

