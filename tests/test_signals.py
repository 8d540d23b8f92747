"""Real signals sent to a real `python -m lib_ortholora extract` child: SIGTERM, SIGHUP and SIGINT
stop it like Ctrl-C (exit 128 + signal, one line, no output, no temp file, inputs byte-identical);
after SIGKILL, which cannot be handled, the next run removes the temp file it left and says so."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lib_ortholora.ui import UiConfig, api

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def temps(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith((".tmp", ".new")))


def start_extract(base: Path, tuned: Path, out: Path) -> subprocess.Popen:
    """An extraction long enough to be interrupted (exact SVDs, full spectra), once its output is
    claimed (its temp file exists) and its work has begun."""
    proc = subprocess.Popen([sys.executable, "-m", "lib_ortholora", "extract", str(base), str(tuned), "-o", str(out),
                             "--rank", "fro=0.9999", "--svd", "exact", "--dtype", "fp32"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not temps(out.parent):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the child never claimed its output"
        time.sleep(0.005)
    return proc


@pytest.fixture
def inputs(pairs):
    base, tuned = pairs("sd15", noise=0.02)
    before = {p: digest(p) for p in (base, tuned)}
    yield base, tuned
    assert {p: digest(p) for p in (base, tuned)} == before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_a_stop_signal_keeps_no_partial_output(inputs, tmp_path, sig):
    out = tmp_path / "out"
    out.mkdir()
    proc = start_extract(*inputs, out / "x.safetensors")
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, (proc.returncode, stderr)
    lines = [line.split("\r")[-1] for line in stderr.splitlines() if line.split("\r")[-1].strip()]
    assert lines == [f"interrupted ({sig.name}); no partial output was kept"], stderr
    assert os.listdir(out) == []


def test_after_sigkill_the_next_run_removes_the_temp_file(inputs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = start_extract(*inputs, out / "x.safetensors")
    proc.kill()
    proc.wait(300)
    (left,) = temps(out)  # SIGKILL cannot be handled: the temp file stays, unlocked
    done = subprocess.run([sys.executable, "-m", "lib_ortholora", "extract", *map(str, inputs), "-o",
                           str(out / "y.safetensors"), "--rank", "2", "--no-conv", "--quiet"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"removed 1 stale temp file(s) an interrupted run left in {out}: {left}" in done.stdout
    assert temps(out) == [] and sorted(os.listdir(out)) == ["y.safetensors"]


def test_the_api_and_tab_remove_stale_temp_files_too(demo_root, tmp_path):
    """What SIGKILL leaves (a temp file of our naming nobody holds) is removed by the next
    operation run through the HTTP API / the tab, and the report says so."""
    import shutil

    models = Path(shutil.copytree(demo_root, tmp_path / "models"))
    stale = models / "Lora" / ".j.safetensors.ortholora-0123456789ab.tmp"
    stale.write_bytes(b"half a LoRA")
    report = api.run_operation(UiConfig.for_models(models), "join", {"loras": ["demo_style", "demo_other"], "out": "j"})
    assert not stale.exists() and any(stale.name in w and "removed 1 stale" in w for w in report.warnings)
