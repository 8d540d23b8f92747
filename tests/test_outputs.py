"""The output policy (lib_ortholora.outputs): claims refused before any work, locked temp files,
stale ones removed and live ones never, all-or-nothing publication, the replaced file's mode."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from lib_ortholora import outputs
from lib_ortholora.errors import OrthoLoraError
from lib_ortholora.outputs import Outputs, OutputExists, atomic_output, remove_stale_temps

ROOT = Path(__file__).resolve().parents[1]


def temps(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith((".tmp", ".new")))


def test_claim_refusals_come_before_any_temp_file(tmp_path):
    (tmp_path / "taken.safetensors").write_bytes(b"keep")
    (tmp_path / "input.safetensors").write_bytes(b"in")
    os.link(tmp_path / "input.safetensors", tmp_path / "hard.safetensors")
    (tmp_path / "soft.safetensors").symlink_to(tmp_path / "input.safetensors")
    (tmp_path / "dir.safetensors").mkdir()
    inputs = [tmp_path / "input.safetensors"]
    cases = [
        ([tmp_path / "x.ckpt"], False, OrthoLoraError, r"must be a \.safetensors file"),
        ([tmp_path / "dir.safetensors"], True, OrthoLoraError, r"is a folder"),
        ([tmp_path / "nope" / "x.safetensors"], False, OrthoLoraError, r"output folder does not exist"),
        ([tmp_path / "taken.safetensors"], False, OutputExists, r"exists; pass overwrite"),
        ([tmp_path / "a.safetensors", tmp_path / "sub" / ".." / "a.safetensors"], True, OrthoLoraError,
         r"two outputs of this run"),
        ([tmp_path / "input.safetensors"], True, OrthoLoraError, r"is also an input"),
        ([tmp_path / "hard.safetensors"], True, OrthoLoraError, r"is also an input"),
        ([tmp_path / "soft.safetensors"], True, OrthoLoraError, r"is also an input"),
    ]
    (tmp_path / "sub").mkdir()
    before = sorted(os.listdir(tmp_path))
    for targets, overwrite, kind, problem in cases:
        with pytest.raises(kind, match=problem) as err:
            with Outputs() as outputs:
                outputs.claim(targets, inputs=inputs, overwrite=overwrite)
                pytest.fail("the claim must refuse")
        assert "\n" not in str(err.value)
        assert sorted(os.listdir(tmp_path)) == before
    assert (tmp_path / "input.safetensors").read_bytes() == b"in"


def test_publish_is_all_or_nothing(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    with pytest.raises(RuntimeError):
        with Outputs() as outputs:
            outputs.claim([a, b])
            with atomic_output(a) as tmp:
                tmp.write_bytes(b"a")
            raise RuntimeError("the second output failed")
    assert os.listdir(tmp_path) == []
    # a move that fails (b appeared meanwhile) takes back the outputs already moved
    with pytest.raises(OutputExists):
        with Outputs() as outputs:
            outputs.claim([a, b])
            for path in (a, b):
                with atomic_output(path) as tmp:
                    tmp.write_bytes(path.name.encode())
            b.write_bytes(b"theirs")
    assert sorted(os.listdir(tmp_path)) == ["b.safetensors"] and b.read_bytes() == b"theirs"


def test_overwrite_keeps_the_replaced_files_mode(tmp_path):
    target = tmp_path / "x.safetensors"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    with atomic_output(target, overwrite=True) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and stat.S_IMODE(target.stat().st_mode) == 0o640


def test_stale_temp_files_are_removed_live_ones_never(tmp_path):
    stale = tmp_path / ".old.safetensors.ortholora-0123456789ab.tmp"
    other = tmp_path / ".notes.tmp"  # not our naming: never touched
    other.write_bytes(b"x")
    with Outputs() as live:
        live.claim([tmp_path / "live.safetensors"])
        (live_tmp,) = [c.tmp for c in live.claims.values()]
        stale.write_bytes(b"left by a killed run")
        with Outputs() as second:
            second.claim([tmp_path / "second.safetensors"])
            assert second.removed == [stale]
        assert live_tmp.exists() and not stale.exists() and other.exists()
        assert remove_stale_temps(tmp_path) == []  # a live writer's temp (locked) stays
        assert live_tmp.exists()
    assert temps(tmp_path) == [".notes.tmp"]


HOLD = """
import sys, time
from pathlib import Path
from lib_ortholora.outputs import Outputs
with Outputs() as outputs:
    outputs.claim([Path(sys.argv[1])])
    print("claimed", flush=True)
    time.sleep(600)
"""


def test_a_temp_file_of_another_live_process_is_never_removed(tmp_path):
    """A real second process holds its claim; ours leaves its temp alone until it is killed."""
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "theirs.safetensors")], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "claimed"
        (theirs,) = temps(tmp_path)
        with Outputs() as outputs:
            outputs.claim([tmp_path / "ours.safetensors"])
            assert outputs.removed == [] and theirs in temps(tmp_path)
        child.kill()
        child.wait(30)
        with Outputs() as outputs:
            outputs.claim([tmp_path / "ours.safetensors"])
            assert [p.name for p in outputs.removed] == [theirs]
        assert temps(tmp_path) == []
    finally:
        child.kill()
        child.wait(30)


def test_a_run_holds_one_open_file_per_folder_not_per_output(tmp_path):
    """A batch of many outputs must not run out of file descriptors."""
    open_fds = lambda: len(os.listdir("/proc/self/fd"))  # noqa: E731
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("no /proc")
    before = open_fds()
    with Outputs() as outputs:
        outputs.claim([tmp_path / f"x{i}.safetensors" for i in range(200)])
        assert open_fds() - before == 1
        assert len(temps(tmp_path)) == 200
    assert os.listdir(tmp_path) == []


def test_nested_runs_write_into_the_outer_claim(tmp_path):
    target = tmp_path / "x.safetensors"
    with Outputs() as outer:
        outer.claim([target])
        with Outputs() as inner:
            inner.claim([target])  # borrowed: written into the outer claim
            with atomic_output(target) as tmp:
                tmp.write_bytes(b"x")
        assert not target.exists() and inner.published == []
    assert target.read_bytes() == b"x" and outer.published == [target]


def test_claims_made_folders_go_when_nothing_is_written(tmp_path):
    with pytest.raises(RuntimeError):
        with Outputs() as outputs:
            outputs.claim([tmp_path / "a" / "b" / "x.safetensors"], make_folders=True)
            raise RuntimeError("failed")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("nth", [1, 2], ids=["lock file", "temp file"])
def test_an_interrupt_right_after_a_file_is_made_leaves_nothing(tmp_path, monkeypatch, nth):
    """A stop signal raises in the main thread between any two bytecodes, also right after the lock
    or the temp file is made and before the run has recorded it: discard must still find it."""
    real, calls = outputs._create, []

    def create_then_interrupt(path):
        fd = real(path)
        calls.append(path)
        if len(calls) == nth:
            raise KeyboardInterrupt
        return fd

    monkeypatch.setattr(outputs, "_create", create_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        with outputs.Outputs() as run:
            run.claim([tmp_path / "x.safetensors"])
    assert len(calls) == nth and os.listdir(tmp_path) == []


def test_an_interrupt_right_after_the_output_folder_is_made_leaves_nothing(tmp_path, monkeypatch):
    real = Path.mkdir

    def mkdir_then_interrupt(self, *args, **kw):
        real(self, *args, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "mkdir", mkdir_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        with outputs.Outputs() as run:
            run.claim([tmp_path / "new" / "deeper" / "x.safetensors"], make_folders=True)
    assert os.listdir(tmp_path) == []
