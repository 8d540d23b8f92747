"""The run context of every operation (lib_ortholora.run): named phases with progress, Stop in
every phase (reading and writing included) keeping nothing, and one report vocabulary."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from lib_ortholora.extract import extract_lora
from lib_ortholora.inspect import inspect_lora
from lib_ortholora.diag import bake_diag
from lib_ortholora.join import join_loras
from lib_ortholora.merge import merge_lora
from lib_ortholora.mix import mix_loras
from lib_ortholora.ortho import ortho_lora
from lib_ortholora.parallel import layer_parallelism
from lib_ortholora.report import Status
from lib_ortholora.resize import resize_files
from test_bad_inputs import kit  # noqa: F401 - the fixture

OPS = ("extract", "merge", "join", "mix", "diag", "resize", "ortho", "inspect")


class Stop(Exception):
    """What a Stop button raises from inside `progress`."""


def call(kit, op: str, out: Path, progress):
    out.mkdir(exist_ok=True)
    o = out / "out.safetensors"
    return {
        "extract": lambda: extract_lora(kit.base, kit.tuned, 4, save_path=o, progress=progress),
        "merge": lambda: merge_lora(kit.base, kit.lora, 1.0, o, progress=progress),
        "join": lambda: join_loras([kit.lora, kit.lora2], o, progress=progress),
        "mix": lambda: mix_loras([kit.lora, kit.lora2], o, "fro=0.9", progress=progress),
        "diag": lambda: bake_diag(kit.lora, "1,1,0,1", o, progress=progress),
        "resize": lambda: resize_files([kit.lora], out, "rank=2:sv_fro=0.9", progress=progress),
        "ortho": lambda: ortho_lora([kit.lora, kit.lora2], out, progress=progress),
        "inspect": lambda: inspect_lora(kit.lora, progress=progress),
    }[op]()


@pytest.mark.parametrize("op", OPS)
def test_every_phase_reports_progress_and_can_be_stopped(kit, tmp_path, op):  # noqa: F811
    seen: list[tuple[int, int, str]] = []
    report = call(kit, op, tmp_path / "first", lambda done, total, what: seen.append((done, total, what)))
    phases = list(dict.fromkeys(what.split(" ")[0] for _, _, what in seen))
    assert phases[0] == ("layers" if op == "extract" else "read"), phases
    if op != "inspect":
        assert phases[-1] in ("write", "merge"), phases  # merge writes as it goes
    assert list(report.totals["phase_seconds"]) == phases
    for phase in phases:  # a stable total within each phase
        counts = [(d, t) for d, t, w in seen if w.split(" ")[0] == phase]
        assert all(0 <= d <= t for d, t in counts) and counts[-1][0] == counts[-1][1], (phase, counts)
    for phase in phases:
        out = tmp_path / f"stop-{phase}"

        def stop(done, total, what, phase=phase):
            if what.split(" ")[0] == phase and done:
                raise Stop(phase)

        with pytest.raises(Stop):
            call(kit, op, out, stop)
        assert os.listdir(out) == [], (phase, os.listdir(out))


@pytest.mark.parametrize("op", OPS)
def test_one_report_vocabulary(kit, tmp_path, op):  # noqa: F811
    report = call(kit, op, tmp_path, None)
    totals = report.totals
    assert isinstance(totals["seconds"], float) and totals["architecture"] == "SD1.x", totals
    assert not [k for k in totals if "." in k or k.endswith("_s")], totals  # no file names, one name for times
    assert "rank_policy" not in totals
    if op in ("extract", "mix", "ortho"):
        assert isinstance(totals["policy"], str)
    assert all(isinstance(r.status, Status) for r in report.rows)
    assert report.to_json()  # serializable as it is


def test_overlapping_sections_restore_torchs_thread_count():
    """Two resize runs overlapping in two threads (two API requests): torch's thread count,
    which new threads inherit process-wide, is back to what it was once both have left."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    entered, leave_first, first_left = threading.Event(), threading.Event(), threading.Event()
    after: dict[str, int] = {}

    def first():
        with layer_parallelism():
            entered.set()
            leave_first.wait(30)
        after["first"] = torch.get_num_threads()
        first_left.set()

    def second():
        entered.wait(30)
        with layer_parallelism() as workers:
            after["workers"] = workers
            leave_first.set()
            first_left.wait(30)
        after["second"] = torch.get_num_threads()

    try:
        threads = [threading.Thread(target=f) for f in (first, second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        fresh = threading.Thread(target=lambda: after.setdefault("new thread", torch.get_num_threads()))
        fresh.start()
        fresh.join()
        assert after == {"workers": 2, "first": 2, "second": 2, "new thread": 2}
    finally:
        torch.set_num_threads(before)
