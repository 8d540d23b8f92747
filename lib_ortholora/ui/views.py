"""From a finished report to what the result panels draw (no gradio here, so tests call it)."""
from __future__ import annotations

import os
import threading
from pathlib import Path

from ..errors import OrthoLoraError
from ..inspect import inspect_lora, module_spectrum
from ..lorafile import LoraFile, read_lora
from ..report import Report
from . import plots
from .folders import Folders
from .runner import Outcome

_last: dict[tuple, LoraFile] = {}
_last_lock = threading.Lock()


def _read_cached(path: Path) -> LoraFile:
    """The last LoRA read (keyed by path, size and mtime): choosing another module is instant."""
    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _last_lock:
        if key in _last:
            return _last[key]
    lf = read_lora(path)
    with _last_lock:
        _last.clear()
        _last[key] = lf
    return lf


def _strongest(report: Report) -> str | None:
    """The module with the largest ‖ΔW‖ (an inspect report's `norm`), else the highest rank."""
    best, key = None, None
    for r in report.rows:
        k = (r.extra.get("norm") or 0.0, r.rank or 0)
        if r.status == "ok" and (key is None or k > key):
            best, key = r.module, k
    return best


def spectrum_view(path: Path, module: str | None):
    """The spectrum figure of one module of a LoRA file (None when no module is chosen)."""
    if not module:
        return None
    m = _read_cached(Path(path)).modules.get(module)
    if m is None:
        raise OrthoLoraError(f"no module {module!r} in this LoRA", path)
    about = f"{m.family}, rank {m.rank}, shape {'×'.join(map(str, m.shape))}"
    return plots.spectrum(module_spectrum(m), module, f"{Path(path).name}: {about}")


def lora_views(folders: Folders, outcome: Outcome, path: Path, report: Report | None = None) -> None:
    """Spectrum (strongest module), rank per block and energy per block of a LoRA file; `report` is
    its inspect report when the caller already has one."""
    info = report if report is not None else inspect_lora(path)
    outcome.source = folders.lora_label(path)
    outcome.modules = [r.module for r in info.rows if r.status == "ok"]
    outcome.module = _strongest(info)
    outcome.figures["spectrum"] = spectrum_view(path, outcome.module)
    outcome.figures["ranks"] = plots.ranks_per_block(info, f"rank per block: {Path(path).name}")
    energy = info.totals.get("block_energy") or {}
    outcome.figures["energy"] = plots.block_energy(energy, f"share of ‖ΔW‖² per block: {Path(path).name}")


def written_lora_views(folders: Folders, report: Report, outcome: Outcome) -> None:
    """`lora_views` of the first LoRA an operation wrote into the LoRA folder."""
    for p in report.outputs:
        path = Path(str(p))
        if folders.lora_label(path) is not None and path.is_file():
            lora_views(folders, outcome, path)
            return


def ortho_views(folders: Folders, report: Report, outcome: Outcome) -> None:
    """Alignment heatmaps (whole file; blocks on request) and the views of the shared output."""
    data = report.data or {}
    outcome.alignment = {k: data.get(k) for k in ("loras", "file", "blocks", "lambda_mode")}
    outcome.figures["alignment"] = plots.alignment_for(outcome.alignment, None)
    written_lora_views(folders, report, outcome)
