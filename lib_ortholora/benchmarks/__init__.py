"""Benchmarks (not tests): what each operation costs on full-size synthetic data, next to the
physical floor of the same run.

Each module of this package named in NAMES is one benchmark with
  `prepare(workdir: Path, arch: str, full: bool) -> dict`   (build inputs; not measured), and
  `measure(workdir: Path, arch: str, prepared: dict) -> dict` (the measured work; returns figures),
and, where the operation is one CLI command,
  `command(prepared) -> list[str]` (its arguments), `inputs(prepared)` and `output(prepared)` (paths;
  `output` may name several files, which the baseline writes as one of their total size).
`measure` runs in a fresh child process so that its peak RSS is its own. A benchmark with a command
is also run as that command in a fresh process, with the inputs' page cache cold and then warm, and
its wall times are given as multiples of the physical baseline measured in the same run: reading
the inputs once (cold / warm) plus writing a file of the output's size once. Benchmarks write into
a work folder that is new, empty or made by an earlier benchmark run (see `work_folder`).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import resource
import time
from importlib import import_module
from pathlib import Path

from ..errors import OrthoLoraError
from ._baseline import baseline, drop_cache, read_once
from ._process import load, run_command

MARKER = ".ortholora-bench"  # in every work folder a benchmark made: its files are ours to replace
NAMES = ("batch", "extract", "merge", "ortho", "resize", "toggle")


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


def timed(fn, *args, **kwargs) -> tuple[object, dict]:
    """fn(*args, **kwargs) and what it cost this process: wall seconds, CPU user and system seconds and minor
    page faults (all threads: what the work costs whatever else the machine runs), the process's
    peak RSS so far and the load average before and after."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    load_before, start = load(), time.perf_counter()
    result = fn(*args, **kwargs)
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return result, {"wall_s": round(wall, 2), "user_s": round(usage.ru_utime - before.ru_utime, 2),
                    "sys_s": round(usage.ru_stime - before.ru_stime, 2),
                    "minor_faults": usage.ru_minflt - before.ru_minflt, "peak_rss_mb": peak_rss_mb(),
                    "load_before": load_before, "load_after": load()}


def _phase(queue, fn, args: tuple) -> None:
    try:
        figures, cost = timed(fn, *args)
    except Exception as e:  # report, do not hang the parent
        queue.put({"error": f"{type(e).__name__}: {e}"})
        return
    queue.put({**cost, **figures})


def in_child(fn, *args) -> dict:
    """fn(*args) -> dict run in a fresh (spawned) process: what `timed` measures of the call (the
    process's own peak RSS), then fn's own figures, which win on a clash. `fn` must be a
    module-level function."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_phase, args=(queue, fn, args))
    proc.start()
    figures = queue.get()
    proc.join()
    return figures


def _measure(name: str, workdir: str, arch: str, prepared: dict) -> dict:
    return import_module(f"{__name__}.{name}").measure(Path(workdir), arch, prepared)


def _as_command(module, workdir: Path, prepared: dict) -> dict:
    """The command cold (inputs dropped from the page cache first, where possible) and warm (inputs
    read once first: a cold run's direct reads leave the page cache as it was), then the baseline,
    each wall time also as a multiple of its baseline."""
    inputs, args = module.inputs(prepared), module.command(prepared)
    runs = {}
    if drop_cache(inputs):
        runs["cold"] = run_command(args, workdir)
    read_once(inputs)
    runs["warm"] = run_command(args, workdir)
    outs = module.output(prepared)
    written = sum(Path(o).stat().st_size for o in ([outs] if isinstance(outs, str) else outs) if Path(o).exists())
    base = baseline(inputs, written, workdir)
    for cache, figures in runs.items():
        if f"{cache}_s" in base and base[f"{cache}_s"] > 0:
            figures["x_baseline"] = round(figures["wall_s"] / base[f"{cache}_s"], 2)
    return {"command": "python -m lib_ortholora " + " ".join(map(str, args)), **{f"cli_{k}": v for k, v in runs.items()},
            "baseline": base}


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
    """Prepare inputs in this process, then measure in a child process (and, for a benchmark with a
    command, as that command cold and warm, with the physical baseline); returns the figures."""
    if name not in NAMES:
        raise OrthoLoraError(f"unknown benchmark {name!r}; choose from {', '.join(NAMES)}")
    work_folder(workdir, overwrite)
    module = import_module(f"{__name__}.{name}")
    prepared = module.prepare(workdir, arch, full)
    figures = {"benchmark": name, "arch": arch, "full": full, "cpus": os.cpu_count()}
    if hasattr(module, "command"):
        figures |= _as_command(module, workdir, prepared)
    figures["in_process"] = inside = in_child(_measure, name, str(workdir), arch, prepared)
    if "op" in inside and figures.get("baseline", {}).get("warm_s"):
        inside["op"]["x_baseline"] = round(inside["op"]["wall_s"] / figures["baseline"]["warm_s"], 2)
    return figures
