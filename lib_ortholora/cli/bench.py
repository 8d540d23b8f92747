"""`bench`: benchmarks on full-size synthetic checkpoints: each operation as a CLI process (cold and
warm page cache) and in-process, beside the physical baseline of the same run (wall time, × baseline,
CPU user/system seconds, minor page faults, own peak RSS, load average), plus accuracy."""
from __future__ import annotations

import tempfile
from pathlib import Path

from .. import benchmarks
from ..arch import ARCHS
from ..errors import OrthoLoraError
from ..report import Report, Row
from . import common

COLUMNS = ("wall_s", "x_baseline", "user_s", "sys_s", "minor_faults", "peak_rss_mb", "load_before", "load_after")
RUNS = (("cli_cold", "CLI process, cold page cache"), ("cli_warm", "CLI process, warm page cache"))
BASELINE = (("read_cold_s", "read the inputs once, cold"), ("read_warm_s", "read the inputs once, warm"),
            ("write_s", "write the output's size once (+fsync)"))


def add(sub) -> None:
    p = sub.add_parser("bench", help="benchmark an operation on full-size synthetic data (not a test)")
    p.add_argument("name", choices=benchmarks.NAMES)
    p.add_argument("--arch", choices=ARCHS, default="sd15")
    p.add_argument("--small", action="store_true", help="tiny widths (a smoke run, not a benchmark)")
    p.add_argument("--workdir", help="keep inputs here (reused between runs): a new or empty folder, or one an "
                                     "earlier benchmark made (others need --overwrite); default: a temp folder")
    common(p)


def _row(label: str, figures: dict) -> Row:
    return Row(label, "error" if "error" in figures else "ok", note=figures.get("error", ""),
               extra={k: figures[k] for k in COLUMNS if k in figures})


def as_report(figures: dict, title: str) -> Report:
    """Rows: the baseline's parts, the CLI runs, the in-process run (and any other timed phase);
    totals: everything else (accuracy, sizes, the baselines read + write)."""
    figures = dict(figures)
    report = Report("bench")
    baseline = figures.pop("baseline", {})
    for key, label in BASELINE:
        if key in baseline:
            report.add(Row(label, extra={"wall_s": baseline.pop(key)}))
    for key, label in RUNS:
        if key in figures:
            report.add(_row(f"{title}: {label}", figures.pop(key)))
    inside = dict(figures.pop("in_process", {}))
    if "op" in inside:
        report.add(_row(f"{title}: in-process", {**inside.pop("op"), **({"error": inside["error"]} if "error" in inside else {})}))
        for k in COLUMNS:
            inside.pop(k, None)
    elif inside and not any(isinstance(v, dict) and "wall_s" in v for v in inside.values()):
        report.add(_row(f"{title}: in-process", inside))
        inside = {k: v for k, v in inside.items() if k not in COLUMNS}
    elif inside:  # its timed parts follow as rows; the wrapper's own figures are only its total wall time
        inside = {**{k: v for k, v in inside.items() if k not in COLUMNS}, "in_process_total_s": inside.get("wall_s")}
    for key, value in list(inside.items()):
        if isinstance(value, dict) and "wall_s" in value:
            report.add(_row(f"{title}: {key}", inside.pop(key)))
    report.totals = {**figures, **{f"baseline_{k}": v for k, v in baseline.items()}, **inside}
    return report


def run(args) -> Report:
    if args.workdir:
        figures = benchmarks.run(args.name, args.arch, Path(args.workdir), full=not args.small,
                                 overwrite=args.overwrite)
    else:
        with tempfile.TemporaryDirectory(prefix="ortholora-bench-") as tmp:
            figures = benchmarks.run(args.name, args.arch, Path(tmp), full=not args.small)
    failed = [f"{key}: {part['error']}" for key, part in figures.items() if isinstance(part, dict) and "error" in part]
    if failed:
        raise OrthoLoraError(f"benchmark {args.name} ({args.arch}) failed: {'; '.join(failed)}")
    return as_report(figures, f"{args.name} {args.arch}")
