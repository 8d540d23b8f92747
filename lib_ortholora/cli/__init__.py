"""Command line: `python -m lib_ortholora <command> …`. Every module of this package is one command,
with `add(subparsers)` registering its parser and `run(args) -> Report | None`."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import torch

from ..errors import OrthoLoraError
from ..progress import TextBar
from ..report import Report

ORDER = ("demo", "extract", "inspect", "merge", "join", "mix", "diag", "resize", "ortho", "synth", "bench", "ui")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def common(p: argparse.ArgumentParser, output: bool = True) -> None:
    """Options every file-writing command shares."""
    if output:
        p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")


def dtype_arg(p: argparse.ArgumentParser, default: str = "fp16") -> None:
    p.add_argument("--dtype", choices=sorted(DTYPES), default=default, help="output dtype")


def bar(args: argparse.Namespace, label: str) -> TextBar | None:
    return None if getattr(args, "quiet", False) else TextBar(label)


def show(report: Report, args: argparse.Namespace) -> None:
    print(report.to_json() if getattr(args, "json", False) else report.render(max_rows=60))


def parser() -> tuple[argparse.ArgumentParser, dict]:
    p = argparse.ArgumentParser(prog="python -m lib_ortholora", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    runners = {}
    found = {m.name for m in pkgutil.iter_modules(__path__)}
    for name in sorted(found, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n)):
        module = importlib.import_module(f"{__name__}.{name}")
        module.add(sub)
        runners[name] = module.run
    return p, runners


def main(argv: list[str] | None = None) -> int:
    p, runners = parser()
    args = p.parse_args(argv)
    try:
        report = runners[args.command](args)
    except OrthoLoraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no partial output was kept", file=sys.stderr)
        return 130
    if report is not None:
        show(report, args)
    return 0
