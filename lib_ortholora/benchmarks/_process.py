"""A CLI command timed as a user runs it: a fresh `python -m lib_ortholora …` process from start to
exit (interpreter start, imports, work, output), with its CPU user/system seconds and minor page
faults (wait4) and its own peak RSS (VmHWM, written by the process as it exits: ru_maxrss would
carry the parent's peak through fork+exec)."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Runs `python -m lib_ortholora ARGS` in this interpreter; at exit writes VmHWM (kB) to $1.
_WRAPPER = """\
import atexit, runpy, sys
def _hwm(path=sys.argv[1]):
    with open('/proc/self/status') as f:
        kb = next((l.split()[1] for l in f if l.startswith('VmHWM:')), '')
    with open(path, 'w') as out:
        out.write(kb)
atexit.register(_hwm)
sys.argv = ['lib_ortholora'] + sys.argv[2:]
runpy.run_module('lib_ortholora', run_name='__main__', alter_sys=True)
"""


def load() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def run_command(args: list[str], cwd: Path) -> dict:
    """Run the CLI with `args` in a fresh process; its wall time, CPU, faults, peak RSS and the load
    average before and after. A failure is reported (with the tail of its stderr), not raised."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory(prefix="ortholora-bench-") as tmp:
        hwm = Path(tmp) / "hwm"
        figures: dict = {"load_before": load()}
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", _WRAPPER, str(hwm), *args], cwd=cwd, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        err = proc.stderr.read() if proc.stderr else b""
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.stderr:
            proc.stderr.close()
        figures.update(wall_s=round(wall, 2), user_s=round(usage.ru_utime, 2), sys_s=round(usage.ru_stime, 2),
                       minor_faults=usage.ru_minflt, load_after=load())
        if hwm.exists() and hwm.read_text().strip():
            figures["peak_rss_mb"] = round(int(hwm.read_text()) / 1024, 1)
        if proc.returncode:
            figures["error"] = f"exit {proc.returncode}: {err.decode(errors='replace').strip()[-300:]}"
    return figures
