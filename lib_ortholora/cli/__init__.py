"""Command line: `ortholora <command> …` or `python -m lib_ortholora <command> …`. Each module of this
package named in COMMANDS is one command, with `add(subparsers)` registering its parser and
`run(args) -> Report | None`; `args.progress` is the progress bar (None with --quiet). Bad input
prints one `error:` line and exits 2; Ctrl-C, SIGTERM and SIGHUP stop the run keeping no partial
output and exit 128 + the signal number. What stdout cannot encode (the bytes of a non-UTF-8 file
name) is written as backslash escapes."""
from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

from ..dtypes import OUTPUT_DTYPES as DTYPES
from ..errors import OrthoLoraError, printable
from ..outputs import OutputExists
from ..progress import TextBar
from ..report import Report

COMMANDS = ("demo", "extract", "inspect", "merge", "join", "mix", "diag", "resize", "ortho", "synth", "bench", "ui")
"""The commands, in the order `--help` lists them (each a module of this package)."""


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
    """The report on stdout (a non-UTF-8 file name's bytes shown `\\xff`, as in error lines)."""
    print(printable(report.to_json() if getattr(args, "json", False) else report.render(max_rows=60)))


def parser(prog: str | None = None) -> tuple[argparse.ArgumentParser, dict]:
    """The parser (`prog`: the name `--help` shows; None: the program's own, as argparse takes it)
    and each command's `run`."""
    p = argparse.ArgumentParser(prog=prog, description="Command line of lib_ortholora, a LoRA toolbox for "
                                                       "Stable Diffusion 1.x, 2.x and SDXL.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    runners = {}
    for name in COMMANDS:
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


@contextmanager
def lenient_stdout() -> Iterator[None]:
    """Inside, stdout writes what its encoding cannot hold as backslash escapes instead of failing
    (a report that prints a non-UTF-8 file name); its error handler is put back afterwards."""
    out = sys.stdout
    errors = getattr(out, "errors", None)
    if not hasattr(out, "reconfigure") or errors in (None, "backslashreplace"):
        yield
        return
    out.reconfigure(errors="backslashreplace")
    try:
        yield
    finally:
        out.reconfigure(errors=errors)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    with lenient_stdout():
        return _main(argv, prog)


def _main(argv: list[str] | None, prog: str | None) -> int:
    p, runners = parser(prog)
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
