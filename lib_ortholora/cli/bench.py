"""`bench`: benchmarks on full-size synthetic checkpoints (wall time, peak RSS, accuracy)."""
from __future__ import annotations

import tempfile
from pathlib import Path

from .. import benchmarks
from ..arch import ARCHS
from ..errors import OrthoLoraError
from ..report import Report, Row
from . import common


def add(sub) -> None:
    p = sub.add_parser("bench", help="benchmark an operation on full-size synthetic data (not a test)")
    p.add_argument("name", choices=benchmarks.NAMES)
    p.add_argument("--arch", choices=ARCHS, default="sd15")
    p.add_argument("--small", action="store_true", help="tiny widths (a smoke run, not a benchmark)")
    p.add_argument("--workdir", help="keep inputs here (reused between runs): a new or empty folder, or one an "
                                     "earlier benchmark made (others need --overwrite); default: a temp folder")
    common(p)


def run(args) -> Report:
    if args.workdir:
        figures = benchmarks.run(args.name, args.arch, Path(args.workdir), full=not args.small,
                                 overwrite=args.overwrite)
    else:
        with tempfile.TemporaryDirectory(prefix="ortholora-bench-") as tmp:
            figures = benchmarks.run(args.name, args.arch, Path(tmp), full=not args.small)
    if "error" in figures:
        raise OrthoLoraError(f"benchmark {args.name} ({args.arch}) failed: {figures['error']}")
    report = Report("bench", totals=figures)
    report.add(Row(f"{args.name} {args.arch}"))
    return report
