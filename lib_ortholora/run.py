"""One operation's run: its report, its timer, named progress phases (the points where Stop takes
effect) and its outputs, claimed before any work and published together at the end (`outputs`).

    with Run("join", progress) as run:
        run.claim([save_path], inputs=paths, overwrite=overwrite)   # refusals come before any work
        read = run.phase("read", len(paths))
        for path in paths:
            ...
            read.step(path.name)
        write_lora(save_path, ...)                                   # into the claimed temp file
    return run.report                         # outputs published; totals["seconds"] and phase times set

Progress goes to `progress(done, total, "<phase> <item>")`, counted within each phase. A `progress`
may raise to cancel (the UI's Stop does): the run then ends like on any error, keeping no output.
A run that claimed outputs and wrote none of them fails ("nothing was written").
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable

from .errors import OrthoLoraError
from .outputs import Outputs
from .paths import SAFETENSORS, PathLike
from .progress import Progress
from .report import Report


class Phase:
    """The steps of one named phase. Call `step(what)` per step of a known `total`, or pass the
    phase as the `progress` of a core function that counts its own steps."""

    def __init__(self, name: str, total: int, progress: Progress | None):
        self.name, self.total, self.done, self._progress = name, total, 0, progress
        if progress and total:
            progress(0, total, name)

    def step(self, what: str = "") -> None:
        self.done += 1
        self(self.done, self.total, what)

    def __call__(self, done: int, total: int, what: str) -> None:
        if self._progress:
            self._progress(done, total, f"{self.name} {what}".rstrip())


class Run:
    """See the module docstring."""

    def __init__(self, operation: str, progress: Progress | None = None):
        self.report = Report(operation)
        self.outputs = Outputs()
        self._progress = progress
        self._start = self._phase_start = time.perf_counter()
        self._phase: str | None = None
        self._seconds: dict[str, float] = {}
        self._unwritten: dict[Path, str] = {}

    def __enter__(self) -> Run:
        self.outputs.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        claims = list(self.outputs.claims.values())
        if exc_type is None:
            for c in claims:
                if not c.written and c.target not in self._unwritten:
                    self.not_written(c.target, "no output was produced")
        if exc_type is None and claims and not any(c.written for c in claims):
            exc = self._nothing_written()
            self.outputs.__exit__(type(exc), exc, None)
            raise exc
        self.outputs.__exit__(exc_type, exc, tb)
        if exc_type is None:
            self._finish()

    def claim(self, targets: Iterable[PathLike], *, inputs: Iterable[PathLike | None] = (), overwrite: bool = False,
              make_folders: bool = False) -> list[Path]:
        """Claim the run's output files (`Outputs.claim`); say so when stale temp files were removed."""
        paths = self.outputs.claim(targets, inputs=inputs, overwrite=overwrite, suffix=SAFETENSORS,
                                   make_folders=make_folders)
        if self.outputs.removed:
            names = ", ".join(p.name for p in self.outputs.removed)
            self.report.warnings.append(f"removed {len(self.outputs.removed)} stale temp file(s) an interrupted "
                                        f"run left in {self.outputs.removed[0].parent}: {names}")
            self.outputs.removed = []
        return paths

    def not_written(self, target: Path, reason: str) -> None:
        """A claimed output that the run leaves out, and why (a warning; an error if it writes nothing)."""
        self._unwritten[target] = reason
        self.report.warnings.append(f"{target}: not written: {reason}")

    def phase(self, name: str, total: int = 0) -> Phase:
        """Start phase `name` (the previous one ends); its time adds to totals["phase_seconds"][name]."""
        self._end_phase()
        self._phase = name
        return Phase(name, total, self._progress)

    def use(self, report: Report) -> Report:
        """Make `report` (built by an operation's core) this run's report, keeping what was noted so far."""
        report.warnings[:0] = self.report.warnings
        report.totals = {**self.report.totals, **report.totals}
        self.report = report
        return report

    def _end_phase(self) -> None:
        now = time.perf_counter()
        if self._phase is not None:
            self._seconds[self._phase] = self._seconds.get(self._phase, 0.0) + now - self._phase_start
        self._phase, self._phase_start = None, now

    def _nothing_written(self) -> OrthoLoraError:
        target, reason = next(iter(self._unwritten.items()), (None, "no output was produced"))
        return OrthoLoraError(f"nothing was written: {reason}", target)

    def _finish(self) -> None:
        self._end_phase()
        self.report.outputs += [str(p) for p in self.outputs.published]
        if self.outputs.published:
            self.report.totals["output_mb"] = round(sum(p.stat().st_size for p in self.outputs.published) / 2**20, 2)
        if self._seconds:  # added to those of a run inside this one, whose report this run took on
            self.report.totals["phase_seconds"] = {**self.report.totals.get("phase_seconds", {}),
                                                   **{k: round(v, 3) for k, v in self._seconds.items()}}
        self.report.totals["seconds"] = round(time.perf_counter() - self._start, 3)
