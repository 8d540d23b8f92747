"""`demo`: build tiny synthetic SD1.5 models, extract a LoRA, check the round trip."""
from __future__ import annotations

import tempfile

from ..arch import ARCHS
from ..demo import run_demo
from . import common


def add(sub) -> None:
    p = sub.add_parser("demo", help="run the built-in demo on tiny synthetic models (no downloads)")
    p.add_argument("-o", "--out", help="folder for the demo files (default: a temporary folder)")
    p.add_argument("--arch", choices=ARCHS, default="sd15")
    common(p)


def run(args):
    if args.out:
        return run_demo(args.out, args.arch, args.overwrite, args.progress)
    with tempfile.TemporaryDirectory(prefix="ortholora-demo-") as tmp:
        report = run_demo(tmp, args.arch, progress=args.progress)
        report.outputs = [p + " (temporary; pass -o DIR to keep it)" for p in report.outputs]
        return report
