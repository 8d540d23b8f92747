"""Command line: `python -m lib_ortholora <command> …`. Every module of this package is one command,
with `add(subparsers)` registering its parser and `run(args) -> Report | None`; `args.progress` is
the progress bar (None with --quiet). Bad input prints one `error:` line and exits 2; Ctrl-C,
SIGTERM and SIGHUP stop the run keeping no partial output and exit 128 + the signal number."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

from ..arguments import OUTPUT_DTYPES as DTYPES
from ..errors import OrthoLoraError
from ..outputs import OutputExists
from ..progress import TextBar
from ..report import Report

ORDER = ("demo", "extract", "inspect", "merge", "join", "mix", "diag", "resize", "ortho", "synth", "bench", "ui")


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


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, like Ctrl-C's KeyboardInterrupt."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextmanager
def stopped_by_signals() -> Iterator[None]:
    """Inside, SIGTERM and SIGHUP raise `Stopped` (in the main thread; elsewhere nothing changes)."""
    def stop(signum: int, frame: object) -> None:
        raise Stopped(signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
    previous = {sig: signal.signal(sig, stop) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    p, runners = parser()
    args = p.parse_args(argv)
    args.progress = None if getattr(args, "quiet", True) else TextBar(args.command)

    def say(message: str) -> None:
        if args.progress is not None:
            args.progress.end()
        print(message, file=sys.stderr)

    try:
        with stopped_by_signals():
            report = runners[args.command](args)
    except OutputExists as e:
        say(f"error: {e.path}: exists; pass --overwrite to replace it")
        return 2
    except OrthoLoraError as e:
        say(f"error: {e}")
        return 2
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        say(f"interrupted ({signal.Signals(signum).name}); no partial output was kept")
        return 128 + signum
    if report is not None:
        show(report, args)
    return 0
