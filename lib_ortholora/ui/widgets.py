"""Widgets every sub-tab shares: file pickers with refresh buttons, the output-name row, run/stop
buttons wired to progress and cancellation, and the results panel (status, table, plots)."""
from __future__ import annotations

import html
import json
import time
from typing import Any, Callable, Sequence

import gradio as gr
import pandas as pd

from ..errors import OrthoLoraError
from . import compat, plots, views
from .config import UiConfig
from .folders import Folders
from .runner import CANCELLED, CancelRegistry, Outcome, error_status

REFRESH = "\u21bb"  # ↻ (in every common font; the emoji is not)
NONE = "(none)"


def table_frame(table: list[list[str]] | None) -> pd.DataFrame:
    if not table:
        return pd.DataFrame({"module": []})
    return pd.DataFrame(table[1:], columns=table[0])


def _keep(value, choices: list[str], multiselect: bool):
    """The current selection, minus what vanished from the list."""
    if multiselect:
        return [v for v in (value or []) if v in choices]
    return value if value in choices else None


class Picker:
    """A dropdown over one models folder (LoRAs or checkpoints) with a refresh button."""

    def __init__(self, ctx: "Context", kind: str, label: str, elem_id: str, multiselect: bool = False,
                 value=None, info: str | None = None, optional: bool = False):
        self.kind, self.multiselect, self.optional = kind, multiselect, optional
        if optional and value is None:
            value = NONE
        choices = self.choices(ctx)
        if value is None:
            value = [] if multiselect else None
        with gr.Row(elem_classes=["ortholora-picker"]):
            self.dropdown = compat.component(
                gr.Dropdown, choices=choices, value=_keep(value, choices, multiselect), multiselect=multiselect,
                label=label, info=info, elem_id=elem_id, allow_custom_value=False, scale=8, interactive=True)
            self.refresh = compat.component(gr.Button, value=REFRESH, elem_id=f"{elem_id}_refresh",
                                            elem_classes=["ortholora-refresh"], size="sm", scale=0, min_width=40)
        self.refresh.click(lambda current: self.update(ctx, current), inputs=[self.dropdown],
                           outputs=[self.dropdown], queue=False)
        ctx.pickers.append(self)

    def choices(self, ctx: "Context") -> list[str]:
        names = ctx.folders.lora_names() if self.kind == "lora" else ctx.folders.checkpoint_names()
        return [NONE, *names] if self.optional else names

    def update(self, ctx: "Context", current):
        choices = self.choices(ctx)
        return gr.update(choices=choices, value=_keep(current, choices, self.multiselect))


class Results:
    """Status line, report table and the plots an operation offers (each optional)."""

    def __init__(self, ctx: "Context", op: str, spectrum: bool = True, blocks: bool = True,
                 alignment: bool = False):
        self.ctx, self.op = ctx, op
        self.status = gr.Markdown("", elem_id=f"ortholora_{op}_status", elem_classes=["ortholora-status"])
        self.spectrum_on, self.blocks_on, self.alignment_on = spectrum, blocks, alignment
        self.source = gr.State(None)
        self.align_data = gr.State(None)
        self.written = gr.State([])
        if spectrum or blocks or alignment:
            with gr.Tabs(elem_id=f"ortholora_{op}_plots"):
                if alignment:
                    with gr.Tab("Alignment"):
                        self.scope = gr.Dropdown(choices=["whole file"], value="whole file", label="Scope",
                                                 elem_id=f"ortholora_{op}_scope", interactive=True)
                        self.align_plot = gr.Plot(label="alignment", elem_id=f"ortholora_{op}_alignment")
                if spectrum:
                    with gr.Tab("Spectrum"):
                        self.module = gr.Dropdown(choices=[], value=None, label="Module",
                                                  elem_id=f"ortholora_{op}_module", interactive=True)
                        self.spectrum_plot = gr.Plot(label="singular values", elem_id=f"ortholora_{op}_spectrum")
                if blocks:
                    with gr.Tab("Rank per block"):
                        self.ranks_plot = gr.Plot(label="rank per block", elem_id=f"ortholora_{op}_ranks")
                    with gr.Tab("Energy per block"):
                        self.energy_plot = gr.Plot(label="energy per block", elem_id=f"ortholora_{op}_energy")
        self.table = compat.component(gr.Dataframe, value=table_frame(None), label="Report", interactive=False,
                                      wrap=True, elem_id=f"ortholora_{op}_table", height=480)
        if spectrum:
            self.module.input(self.redraw_spectrum, inputs=[self.source, self.module], outputs=[self.spectrum_plot])
        if alignment:
            self.scope.input(plots.alignment_for, inputs=[self.align_data, self.scope], outputs=[self.align_plot])

    def redraw_spectrum(self, source, module):
        if not source or not module:
            return None
        try:
            return views.spectrum_view(self.ctx.folders.lora(source), module)
        except OrthoLoraError as e:
            raise gr.Error(str(e)) from None

    @property
    def outputs(self) -> list:
        out = [self.status, self.table, self.written]
        if self.alignment_on:
            out += [self.scope, self.align_plot, self.align_data]
        if self.spectrum_on:
            out += [self.module, self.spectrum_plot, self.source]
        if self.blocks_on:
            out += [self.ranks_plot, self.energy_plot]
        return out

    def values(self, o: Outcome) -> list:
        out: list[Any] = [o.status, table_frame(o.table), [str(p) for p in o.written]]
        if self.alignment_on:
            scopes = plots.alignment_scopes(o.alignment) if o.alignment else ["whole file"]
            out += [gr.update(choices=scopes, value="whole file"), o.figures.get("alignment"), o.alignment]
        if self.spectrum_on:
            out += [gr.update(choices=o.modules, value=o.module), o.figures.get("spectrum"), o.source]
        if self.blocks_on:
            out += [o.figures.get("ranks"), o.figures.get("energy")]
        return out


def output_row(op: str, default: str, what: str = "LoRA folder") -> tuple[gr.Textbox, gr.Checkbox]:
    """Output name (a plain name inside the folder) and the overwrite checkbox."""
    with gr.Row():
        name = compat.component(gr.Textbox, value=default, label="Output name", max_lines=1, scale=4,
                                info=f"a plain file name, written into the {what} (.safetensors is added)",
                                elem_id=f"ortholora_{op}_out")
        overwrite = compat.component(gr.Checkbox, value=False, label="Overwrite existing files", scale=1,
                                     elem_id=f"ortholora_{op}_overwrite")
    return name, overwrite


def run_buttons(op: str, label: str) -> tuple[gr.Button, gr.Button]:
    with gr.Row():
        run = compat.component(gr.Button, value=label, variant="primary", elem_id=f"ortholora_{op}_run", scale=4)
        stop = compat.component(gr.Button, value="Stop", variant="stop", elem_id=f"ortholora_{op}_stop", scale=1)
    return run, stop


def written_signal_html(paths: Sequence[str], folders: Folders | None = None) -> str:
    """The hidden element's content: javascript/ortholora.js watches it and refreshes the webui's
    extra-networks cards (LoRAs) or checkpoint list (merged checkpoints)."""
    kinds = sorted({"lora" if folders is None or folders.lora_label(p) is not None else "checkpoint" for p in paths})
    payload = json.dumps({"files": [str(p) for p in paths], "kinds": kinds})
    return (f'<div class="ortholora-written-data" data-stamp="{time.time_ns()}" '
            f'data-written="{html.escape(payload, quote=True)}"></div>')


class Context:
    """Shared by the sub-tabs while the tab is built: config, folders, cancel flags, pickers."""

    def __init__(self, cfg: UiConfig):
        self.cfg = cfg
        self.folders = Folders(cfg)
        self.defaults = cfg.current_defaults()
        self.cancels = CancelRegistry()
        self.pickers: list[Picker] = []
        self.runs: list[tuple[Any, Results]] = []
        self.signal = None

    def lora_picker(self, op: str, label: str = "LoRA", multiselect: bool = False, **kw) -> gr.Dropdown:
        suffix = "loras" if multiselect else "lora"
        return Picker(self, "lora", label, kw.pop("elem_id", f"ortholora_{op}_{suffix}"), multiselect, **kw).dropdown

    def ckpt_picker(self, op: str, label: str, key: str, **kw) -> gr.Dropdown:
        return Picker(self, "ckpt", label, f"ortholora_{op}_{key}", **kw).dropdown

    def wire(self, op: str, run_btn, stop_btn, handler: Callable[..., Outcome], inputs: list, results: Results,
             extra_outputs: Sequence = (), extra_values: Callable[[Outcome], list] | None = None) -> None:
        """run → handler(cfg, *values, ui_progress=, cancel=) in the queue with a progress bar;
        Stop → cancel flag (the worker stops at its next step) and gradio's own cancel."""
        cfg, cancels = self.cfg, self.cancels

        def on_run(request: gr.Request, progress=gr.Progress(), *values):
            session = getattr(request, "session_hash", None)
            flag = cancels.start(session, op)
            try:
                outcome = handler(cfg, *values, ui_progress=progress, cancel=flag)
            except Exception as e:  # noqa: BLE001 - handlers catch their own; this is the last net
                outcome = Outcome(False, error_status(f"unexpected {type(e).__name__}: {e}"))
            finally:
                cancels.finish(session, op, flag)
            return results.values(outcome) + (list(extra_values(outcome)) if extra_values else [])

        def on_stop(request: gr.Request):
            if cancels.cancel(getattr(request, "session_hash", None), op):
                return CANCELLED
            return gr.update()

        event = run_btn.click(on_run, inputs=list(inputs), outputs=results.outputs + list(extra_outputs),
                              show_progress="full", queue=True)
        stop_btn.click(on_stop, inputs=None, outputs=[results.status], cancels=[event], queue=False)
        self.runs.append((event, results))

    def finish(self) -> None:
        """After every sub-tab exists: each run refreshes every picker and, when it wrote files,
        the hidden signal element that javascript/ortholora.js watches."""
        self.signal = gr.HTML("", elem_id="ortholora_written", elem_classes=["ortholora-hidden"])
        dropdowns = [p.dropdown for p in self.pickers]

        def after_write(written, *current):
            updates = [p.update(self, c) for p, c in zip(self.pickers, current)]
            signal = written_signal_html(written, self.folders) if written else gr.update()
            return [signal] + updates

        for event, results in self.runs:
            event.then(after_write, inputs=[results.written] + dropdowns, outputs=[self.signal] + dropdowns,
                       queue=False)
