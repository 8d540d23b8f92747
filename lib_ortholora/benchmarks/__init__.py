"""Benchmarks (not tests): wall time and peak RSS of each operation on full-size synthetic data.

Each module of this package is one benchmark with
  `prepare(workdir: Path, arch: str, full: bool) -> dict`   (build inputs; not measured), and
  `measure(workdir: Path, arch: str, prepared: dict) -> dict` (the measured work; returns figures).
`measure` runs in a fresh child process so that its peak RSS is its own.
"""
from __future__ import annotations

import multiprocessing as mp
import pkgutil
import resource
import time
from importlib import import_module
from pathlib import Path

NAMES = tuple(m.name for m in pkgutil.iter_modules(__path__))


def peak_rss_mb() -> float:
    """This process's own peak RSS: VmHWM (per address space, so not inherited through fork+exec
    as ru_maxrss is on Linux), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _phase(queue, fn, args: tuple) -> None:
    start = time.perf_counter()
    try:
        figures = fn(*args)
    except Exception as e:  # report, do not hang the parent
        queue.put({"error": f"{type(e).__name__}: {e}"})
        return
    usage = resource.getrusage(resource.RUSAGE_SELF)
    figures["wall_s"] = round(time.perf_counter() - start, 2)
    figures["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 2)
    figures["peak_rss_mb"] = peak_rss_mb()
    queue.put(figures)


def in_child(fn, *args) -> dict:
    """fn(*args) -> dict run in a fresh (spawned) process: its figures plus wall seconds, CPU seconds
    (user + system, all threads: what the work costs whatever else the machine runs) and its own
    peak RSS. `fn` must be a module-level function."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_phase, args=(queue, fn, args))
    proc.start()
    figures = queue.get()
    proc.join()
    return figures


def _measure(name: str, workdir: str, arch: str, prepared: dict) -> dict:
    return import_module(f"{__name__}.{name}").measure(Path(workdir), arch, prepared)


def run(name: str, arch: str, workdir: Path, full: bool = True) -> dict:
    """Prepare inputs in this process, then measure in a child process; returns the figures."""
    if name not in NAMES:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(NAMES)}")
    workdir.mkdir(parents=True, exist_ok=True)
    prepared = import_module(f"{__name__}.{name}").prepare(workdir, arch, full)
    return {"benchmark": name, "arch": arch, "full": full, **in_child(_measure, name, str(workdir), arch, prepared)}
