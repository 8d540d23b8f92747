"""Benchmarks (not tests): wall time and peak RSS of each operation on full-size synthetic data.

Each module of this package named in NAMES is one benchmark with
  `prepare(workdir: Path, arch: str, full: bool) -> dict`   (build inputs; not measured), and
  `measure(workdir: Path, arch: str, prepared: dict) -> dict` (the measured work; returns figures).
`measure` runs in a fresh child process so that its peak RSS is its own. Both write into a work
folder that is new, empty or made by an earlier benchmark run (see `work_folder`).
"""
from __future__ import annotations

import multiprocessing as mp
import resource
import time
from importlib import import_module
from pathlib import Path

from ..errors import OrthoLoraError

MARKER = ".ortholora-bench"  # in every work folder a benchmark made: its files are ours to replace
NAMES = ("extract", "merge", "ortho", "resize", "toggle")


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


def work_folder(path: Path, overwrite: bool = False) -> Path:
    """`path` made ready for benchmarks, which reuse their inputs there and replace their outputs:
    a new or empty folder, or one an earlier run made (it holds MARKER); any other only with
    `overwrite`, since files of the benchmarks' names would be replaced."""
    if path.exists() and not path.is_dir():
        raise OrthoLoraError("is not a folder", path)
    if path.is_dir() and not (path / MARKER).exists() and any(path.iterdir()) and not overwrite:
        raise OrthoLoraError("holds files and was not made by a benchmark, which could replace some of them; "
                             "choose a new or empty folder, or pass --overwrite", path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / MARKER).touch()
    except OSError as err:
        raise OrthoLoraError(f"cannot use as the work folder: {err.strerror or err}", path) from err
    return path


def run(name: str, arch: str, workdir: Path, full: bool = True, overwrite: bool = False) -> dict:
    """Prepare inputs in this process, then measure in a child process; returns the figures."""
    if name not in NAMES:
        raise OrthoLoraError(f"unknown benchmark {name!r}; choose from {', '.join(NAMES)}")
    work_folder(workdir, overwrite)
    prepared = import_module(f"{__name__}.{name}").prepare(workdir, arch, full)
    return {"benchmark": name, "arch": arch, "full": full, **in_child(_measure, name, str(workdir), arch, prepared)}
