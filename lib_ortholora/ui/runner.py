"""Running one operation for the UI: progress bridged to gradio, cancellation, errors as one
clear message (never a traceback), the report as a table, and the host told about new files."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import OrthoLoraError
from ..outputs import OutputExists
from ..progress import Progress
from ..report import Report, format_value
from .config import UiConfig
from .folders import OVERWRITE_HINT

log = logging.getLogger("ortholora")
CANCELLED = "■ **Cancelled** — no partial output was kept."


class Cancelled(OrthoLoraError):
    """Raised inside the worker at the next progress step after Stop was pressed."""

    def __init__(self) -> None:
        super().__init__("cancelled; no partial output was kept")


@dataclass
class Outcome:
    """What one run shows: a status line (markdown), the report and its table, figures by name,
    and what the result panels need to draw more (module list for the spectrum, ortho data)."""

    ok: bool
    status: str
    report: Report | None = None
    table: list[list[str]] | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    source: str | None = None          # LoRA (label in the LoRA folder) whose spectrum can be drawn
    modules: list[str] = field(default_factory=list)
    module: str | None = None
    alignment: dict | None = None
    written: list[Path] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


class CancelRegistry:
    """One cancel flag per (browser session, operation). The lock guards only the dict."""

    def __init__(self) -> None:
        self._flags: dict[tuple[str, str], threading.Event] = {}
        self._lock = threading.Lock()

    def start(self, session: str | None, op: str) -> threading.Event:
        flag = threading.Event()
        with self._lock:
            self._flags[(session or "", op)] = flag
        return flag

    def cancel(self, session: str | None, op: str) -> bool:
        with self._lock:
            flag = self._flags.get((session or "", op))
        if flag is None:
            return False
        flag.set()
        return True

    def finish(self, session: str | None, op: str, flag: threading.Event) -> None:
        with self._lock:
            if self._flags.get((session or "", op)) is flag:
                del self._flags[(session or "", op)]


class ProgressBridge:
    """The core's `progress(done, total, what)` → a gradio Progress (at most ~10 updates a second);
    raises `Cancelled` once the flag is set, so the worker stops and no partial file is kept."""

    def __init__(self, ui_progress: Callable | None, cancel: threading.Event | None = None, label: str = "",
                 interval: float = 0.1):
        self.ui, self.cancel, self.label, self.interval = ui_progress, cancel, label, interval
        self._last = 0.0

    def __call__(self, done: int, total: int, what: str) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled()
        now = time.monotonic()
        if self.ui is None or (done < total and now - self._last < self.interval):
            return
        self._last = now
        try:
            self.ui((int(done), int(total) if total else None), desc=f"{self.label} {what}".strip()[-90:])
        except Exception:  # noqa: BLE001 - drawing progress must never fail the operation
            pass


def user_message(err: OrthoLoraError) -> str:
    """The one-line message, with UI wording for the core's overwrite refusal."""
    if isinstance(err, OutputExists):
        return f"{err.path}: exists; {OVERWRITE_HINT}"
    return str(err)


def _escape(text: str) -> str:
    for c in "\\`*_{}[]<>#|":
        text = text.replace(c, "\\" + c)
    return text


def error_status(message: str) -> str:
    return f"✗ **Error:** {_escape(message)}"


def report_status(report: Report, label: str, seconds: float, skip: tuple[str, ...] = ()) -> str:
    """Markdown: a done line, the totals (but `skip` and the times: the done line has the time),
    warnings and written files."""
    lines = [f"✓ **{label}** finished in {seconds:.1f} s"]
    skip = (*skip, "seconds", "phase_seconds")
    shown = {k: v for k, v in report.totals.items() if k not in skip and v not in (None, "", {}, [])}
    if shown:
        lines.append(" · ".join(f"**{_escape(str(k))}** {_escape(format_value(v))}" for k, v in shown.items()))
    lines += [f"⚠ {_escape(w)}" for w in report.warnings]
    lines += [f"→ wrote `{p}`" for p in report.outputs]
    return "\n\n".join(lines)


def notify_written(cfg: UiConfig, report: Report) -> list[Path]:
    """Tell the host (`cfg.on_written`) about every file the report says was written."""
    written = [Path(str(p)) for p in report.outputs]
    for path in written:
        if cfg.on_written is not None:
            try:
                cfg.on_written(path)
            except Exception:  # noqa: BLE001 - the file is written; a stale list is not an error
                log.exception("LoRA Toolbox: refreshing the host's lists after writing %s failed", path)
    return written


def execute(cfg: UiConfig, label: str, work: Callable[[Progress], Report], *, ui_progress: Callable | None = None,
            cancel: threading.Event | None = None, after: Callable[[Report, Outcome], None] | None = None,
            status_skip: tuple[str, ...] = ()) -> Outcome:
    """Run `work(progress)`; an `OrthoLoraError` (or Stop) becomes a status message, any other
    exception is logged with its traceback on the console and shown as one line. On success the
    host's `on_written` hears of every output, and `after(report, outcome)` may add figures (a
    failure there only adds a warning)."""
    bridge = ProgressBridge(ui_progress, cancel, label)
    start = time.monotonic()
    try:
        report = work(bridge)
    except Cancelled:
        return Outcome(False, CANCELLED)
    except OrthoLoraError as e:
        return Outcome(False, error_status(user_message(e)))
    except MemoryError:
        return Outcome(False, error_status("out of memory; try the CPU or a smaller rank"))
    except Exception as e:  # noqa: BLE001 - a bug must not reach the page as a traceback
        log.exception("LoRA Toolbox: %s failed", label)
        return Outcome(False, error_status(f"unexpected {type(e).__name__}: {e} (details in the console)"))
    outcome = Outcome(True, "", report=report, table=report.table(), written=notify_written(cfg, report))
    if after is not None:
        try:
            after(report, outcome)
        except Exception as e:  # noqa: BLE001 - plots are a bonus
            log.exception("LoRA Toolbox: drawing the results of %s failed", label)
            report.warnings.append(f"plots unavailable: {type(e).__name__}: {e}")
    outcome.status = report_status(report, label, time.monotonic() - start, status_skip)
    return outcome
