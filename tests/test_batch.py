"""Load: a folder of many LoRAs. Batch inspect (one file after another, as the UI and a shell loop
do) and batch resize (`resize_files` with every file in one run) keep memory flat — measured as the
resident set size of a fresh subprocess, whose growth after the first few files must stay far
below what keeping even a few files would cost. One corrupt file in the middle is reported, naming
it: inspect goes on past it; a resize run (all or nothing) stops there and writes nothing."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

import lorautil as U
from lib_ortholora.cli import main
from lib_ortholora.lorafile import read_lora

ROOT = Path(__file__).resolve().parents[1]
N_FILES = 40
CORRUPT = 20
RANK = 32
WARMUP = 5
RECIPES = "rank=8:sv_fro=0.9"

WORKER = r"""
import json, os, resource, sys
sys.path.insert(0, sys.argv[1])
mode, out, files = sys.argv[2], sys.argv[3], sys.argv[4:]
from lib_ortholora.errors import OrthoLoraError
from lib_ortholora.inspect import inspect_lora
from lib_ortholora.resize import resize_files

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

samples, result = [], {}
if mode == "inspect":
    errors, rows = [], 0
    for path in files:
        try:
            rows += len(inspect_lora(path).rows)
        except OrthoLoraError as err:
            errors.append(str(err))
        samples.append((rss(), peak()))
    result = {"errors": errors, "rows": rows}
else:
    seen = set()
    def progress(done, total, what):
        if what.startswith("decompose "):
            name = what.split()[1]
            if name not in seen:
                seen.add(name)
                samples.append((rss(), peak()))
    try:
        report = resize_files(files, out, "RECIPES", progress=progress)
    except OrthoLoraError as err:
        result = {"error": str(err), "outputs": []}
    else:  # no sample after the call: the report it returns grows with files x layers by design
        result = {"outputs": report.outputs}
result["samples"] = samples
print(json.dumps(result))
""".replace("RECIPES", RECIPES)


def _file_bytes(shapes) -> int:
    return sum(RANK * (s[0] + math.prod(s[1:])) * 2 for s in shapes)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """40 fp16 LoRAs on the 40 biggest layers of tiny SD1.5 (rank 32, ~2 MiB each); number 20 is
    truncated."""
    d = tmp_path_factory.mktemp("many_loras")
    tgts = sorted(U.tiny_targets("sd15"), key=lambda t: -math.prod(t.shape))[:40]
    base = U.lora_tensors(tgts, rank=RANK, alpha=16.0, dtype=torch.float16)
    paths = []
    for i in range(N_FILES):
        tensors = {k: (v * (1 + i / N_FILES)).to(v.dtype) if not k.endswith("alpha") else v for k, v in base.items()}
        path = d / f"lora_{i:02d}.safetensors"
        safetensors.torch.save_file(tensors, str(path), {"ss_base_model_version": "sd_v1"})
        paths.append(path)
    blob = paths[CORRUPT].read_bytes()
    paths[CORRUPT].write_bytes(blob[: len(blob) // 2])
    return paths, _file_bytes([t.shape for t in tgts])


def _run(mode: str, paths, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", WORKER, str(ROOT), mode, str(out), *map(str, paths)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_flat(samples, per_file: int, what: str) -> None:
    """After the warm-up, neither the resident set nor its peak may grow by more than a few files'
    worth (keeping every file would add (N − warm-up) × per_file, here ~70 MiB; in float32, twice)."""
    rss = [r for r, _ in samples]
    peaks = [p for _, p in samples]
    bound = max(4 * per_file, 12 << 20)
    grown = max(rss[WARMUP:]) - rss[WARMUP]
    peak_grown = peaks[-1] - peaks[WARMUP]
    mib = 1 / 2**20
    detail = f"{what}: RSS {[round(r * mib) for r in rss]} MiB"
    assert grown < bound, f"resident set grew {grown * mib:.1f} MiB after {WARMUP} files; {detail}"
    assert peak_grown < bound, f"peak RSS grew {peak_grown * mib:.1f} MiB after {WARMUP} files; {detail}"


@pytest.mark.slow
def test_batch_inspect_memory_flat_and_corrupt_file_reported(folder, tmp_path):
    paths, per_file = folder
    result = _run("inspect", paths, tmp_path)
    assert len(result["samples"]) == N_FILES
    assert len(result["errors"]) == 1
    assert result["errors"][0].startswith(f"{paths[CORRUPT]}: ") and "truncated or corrupt" in result["errors"][0]
    assert result["rows"] == (N_FILES - 1) * 40
    _assert_flat(result["samples"], per_file, "inspect")


@pytest.mark.slow
def test_batch_resize_memory_flat_and_corrupt_file_reported(folder, tmp_path):
    paths, per_file = folder
    out = tmp_path / "resized"
    good = [p for p in paths if p != paths[CORRUPT]]
    result = _run("resize", good, out)
    done = {Path(p).name for p in result["outputs"]}
    assert len(done) == (N_FILES - 1) * len(RECIPES.split(":"))
    assert sorted(p.name for p in out.iterdir()) == sorted(done)  # no temp or partial file
    lf = read_lora(out / f"{paths[-1].stem}_rank8.safetensors")
    assert {m.rank for m in lf.modules.values()} == {8}
    _assert_flat(result["samples"], per_file, "resize")
    failed = _run("resize", paths, tmp_path / "failed")
    assert failed["error"].startswith(f"{paths[CORRUPT]}: truncated or corrupt"), failed
    assert not (tmp_path / "failed").exists()  # not even the folder the run made


@pytest.mark.slow
def test_cli_batch_with_a_corrupt_file(folder, tmp_path, capsys):
    """The CLI: resize of several files names the corrupt one and exits 2 having written nothing;
    an inspect loop goes on past it."""
    paths, _ = folder
    some = paths[CORRUPT - 2: CORRUPT + 3]
    out = tmp_path / "cli"
    capsys.readouterr()
    code = main(["resize", *map(str, some), "-o", str(out), "-r", "rank=4", "--quiet"])
    printed, err = capsys.readouterr()
    assert code == 2 and not printed
    assert re.fullmatch(rf"error: {re.escape(str(paths[CORRUPT]))}: truncated or corrupt.*\n", err), err
    assert not out.exists()
    codes = []
    for path in some:
        codes.append(main(["inspect", str(path), "--json", "--quiet"]))
        printed, err = capsys.readouterr()
        if path == paths[CORRUPT]:
            assert err.startswith(f"error: {path}: truncated or corrupt")
        else:
            assert json.loads(printed)["operation"] == "inspect"
    assert codes == [0, 0, 2, 0, 0]
