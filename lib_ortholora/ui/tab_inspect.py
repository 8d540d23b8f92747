"""Inspect: family, architecture, rank/alpha/norm per module, energy per block, metadata; for a
joined LoRA its slices, a prompt tag that toggles them, and baking a slice setting into a file."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from ..arch import ARCHS
from ..joinmeta import join_info_from_metadata
from ..errors import OrthoLoraError
from ..lorafile import read_lora
from . import compat, ops, views
from .config import UiConfig
from .folders import Folders
from .runner import Outcome, execute
from .widgets import Results, output_row, run_buttons

OP, TITLE = "inspect", "Inspect"
ARCH_CHOICES = ("auto", *ARCHS)


def joined_sources(path: Path) -> list[dict] | None:
    """[{name, file, ratio, rank}] of a joined LoRA (total rank over its modules), else None."""
    try:
        info = join_info_from_metadata(read_lora(path).metadata)
    except OrthoLoraError:
        return None
    if info is None:
        return None
    totals = [sum(r[i] for r in info.ranks.values()) for i in range(len(info.sources))]
    return [{"name": s.name, "file": s.file, "ratio": s.ratio, "rank": t} for s, t in zip(info.sources, totals)]


def prompt_tag(stem: str, sources: list[dict], values: dict[str, float] | None = None,
               multiplier: float = 1.0) -> str:
    """`<lora:STEM:1:v=a@1,b@1>`: '@' because an item with two '=' breaks the webui's prompt parser."""
    values = values or {}
    spec = ",".join(f"{s['name']}@{values.get(s['name'], 1):g}" for s in sources)
    return f"<lora:{stem}:{multiplier:g}:v={spec}>"


def run(cfg: UiConfig, lora, arch="auto", *, ui_progress=None, cancel=None) -> Outcome:
    folders = Folders(cfg)

    def after(report, o: Outcome) -> None:
        path = folders.lora(lora)
        views.lora_views(folders, o, path, report)
        sources = joined_sources(path)
        o.extra["metadata"] = report.totals.get("metadata") or {}
        if sources:
            o.extra["joined"] = sources
            o.extra["tag"] = prompt_tag(path.stem, sources)
            o.extra["spec"] = ",".join(f"{s['name']}=1" for s in sources)
            o.extra["stem"] = path.stem

    return execute(cfg, "Inspect", lambda p: ops.inspect(cfg, file=lora, arch=arch, full_metadata=False, progress=p),
                   ui_progress=ui_progress, cancel=cancel, after=after, status_skip=("metadata", "block_energy"))


def bake(cfg: UiConfig, lora, spec, out, overwrite=False, *, ui_progress=None, cancel=None) -> Outcome:
    """A joined LoRA with a slice setting baked in (slices at 0 leave the file)."""
    folders = Folders(cfg)
    return execute(cfg, "Bake", lambda p: ops.diag(cfg, lora=lora, spec=spec, out=out, overwrite=bool(overwrite),
                                                   progress=p),
                   ui_progress=ui_progress, cancel=cancel,
                   after=lambda report, o: views.written_lora_views(folders, report, o))


def _sources_markdown(sources: list[dict]) -> str:
    rows = "\n".join(f"| `{s['name']}` | {s['file']} | {s['ratio']:g} | {s['rank']} |" for s in sources)
    return ("This is a **joined LoRA**: each source is a slice of its rank axis.\n\n"
            "| slice | source file | ratio | rank (all modules) |\n|---|---|---|---|\n" + rows)


def _extra_values(o: Outcome) -> list:
    sources = o.extra.get("joined")
    if not sources:
        return [gr.update(visible=False), "", "", gr.update(), o.extra.get("metadata") or {}, None]
    return [gr.update(visible=True), _sources_markdown(sources), o.extra["tag"], o.extra["spec"],
            o.extra.get("metadata") or {}, o.source]


def build(ctx) -> None:
    gr.Markdown("Summarize any LoRA-like file (LoRA, LoCon, LoHa, LoKr, full diffs): rank, alpha and ‖ΔW‖ per "
                "module, where its energy sits, its metadata, and the singular values of any module.")
    with gr.Row():
        with gr.Column(scale=4):
            lora = ctx.lora_picker(OP, "LoRA")
        arch = compat.component(gr.Radio, choices=list(ARCH_CHOICES), value="auto", label="Architecture", scale=2,
                                elem_id="ortholora_inspect_arch")
    run_btn, stop_btn = run_buttons(OP, "Inspect")
    results = Results(ctx, OP)
    with gr.Accordion("Metadata", open=False):
        metadata = gr.JSON(value={}, label="metadata", elem_id="ortholora_inspect_metadata")
    with compat.component(gr.Group, visible=False, elem_id="ortholora_joined") as joined:
        sources_md = gr.Markdown("", elem_id="ortholora_joined_sources")
        with gr.Row():
            tag = compat.component(gr.Textbox, value="", label="Prompt tag (edit the values after '@')",
                                   max_lines=1, elem_id="ortholora_prompt_tag", scale=5)
            compat.component(gr.Button, value="Insert into txt2img prompt", elem_id="ortholora_insert_prompt",
                             scale=1)
        gr.Markdown("Bake a slice setting into a new LoRA (slices set to 0 leave the file; plain loaders "
                    "then see exactly that mix):")
        with gr.Row():
            spec = compat.component(gr.Textbox, value="", label="Slice values", max_lines=1, scale=3,
                                    info="per slice name=value (missing slices keep 1), or per rank 1*8,0*4",
                                    elem_id="ortholora_bake_spec")
        bake_out, bake_overwrite = output_row("bake", "baked_lora")
        bake_btn, bake_stop = run_buttons("bake", "Bake")
        bake_results = Results(ctx, "bake", spectrum=False, blocks=False)
        bake_source = gr.State(None)
    ctx.wire(OP, run_btn, stop_btn, run, [lora, arch], results,
             extra_outputs=[joined, sources_md, tag, spec, metadata, bake_source], extra_values=_extra_values)
    ctx.wire("bake", bake_btn, bake_stop, bake, [bake_source, spec, bake_out, bake_overwrite], bake_results)
